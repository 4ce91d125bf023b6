"""Closed-form KL divergence between the Gaussian posterior q = N(mu, sigma^2) and prior p = N(m, s^2).

Per element, summed by the callers. ``kl_direction="qp"`` is KL(q || p), the usual variational term;
``"pq"`` is KL(p || q), the direction of the seed paper's public code. The formulas live with the kernels
(``bayeslayers.kernels.posterior``), so every implementation shares one definition and one direction check.
"""

from bayeslayers.kernels.posterior import KL_DIRECTIONS, check_kl_direction, kl_elementwise, kl_grads

__all__ = ["KL_DIRECTIONS", "check_kl_direction", "kl_elementwise", "kl_grads"]
