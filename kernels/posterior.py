"""The Gaussian posterior of one weight tensor as the kernels receive it, and its float math in plain torch.

q = N(mu, sigma^2) per element with sigma = softplus(rho); prior p = N(prior_mu, prior_sigma^2) (prior_mu None:
zero mean). KL per element in nats; ``kl_direction`` "qp" is KL(q || p), the usual variational term, "pq" is
KL(p || q), the direction of the seed paper's public code. The Triton kernels (``posterior_math.py``) and the
C++ twins compute the same quantities; this module is their plain-torch counterpart and imports no Triton.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KL_DIRECTIONS = ("qp", "pq")
KL_DIRECTION_CODES = {"qp": 0, "pq": 1}  # the kernels' KL_DIRECTION constexpr / C++ argument


def check_kl_direction(kl_direction: str) -> str:
    """Returns ``kl_direction`` or raises a ValueError naming the choices."""
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
    return kl_direction


class Posterior(NamedTuple):
    """One weight's posterior and prior, passed whole so no argument order can be mixed up.

    mu, rho: float32, weight-shaped; prior_mu: weight-shaped (any float dtype) or None (zero mean);
    prior_sigma: the prior std (> 0); kl_direction: "qp" or "pq".
    """

    mu: torch.Tensor
    rho: torch.Tensor
    prior_mu: torch.Tensor | None
    prior_sigma: float
    kl_direction: str

    def checked(self, param_dtypes=(torch.float32,)) -> Posterior:
        """Validated (mu and rho of one of ``param_dtypes``), with contiguous tensors (the kernels read flat
        arrays)."""
        check_kl_direction(self.kl_direction)
        if self.mu.dtype not in param_dtypes or self.rho.dtype != self.mu.dtype:
            names = " or ".join(str(d).replace("torch.", "") for d in param_dtypes)
            raise TypeError(f"mu and rho must both be {names}, got {self.mu.dtype} and {self.rho.dtype}")
        prior_mu = None if self.prior_mu is None else self.prior_mu.contiguous()
        return Posterior(
            self.mu.contiguous(), self.rho.contiguous(), prior_mu, float(self.prior_sigma), self.kl_direction
        )


def mean_gap(mu: torch.Tensor, prior_mu: torch.Tensor | None) -> torch.Tensor:
    """mu - prior mean (mu itself for a zero-mean prior)."""
    return mu if prior_mu is None else mu - prior_mu.to(mu.dtype)


def kl_elementwise(mu, sigma, prior_mu, prior_sigma: float, kl_direction: str = "qp") -> torch.Tensor:
    """KL per weight element (nats), shaped like ``mu``."""
    gap_sq = mean_gap(mu, prior_mu).square()
    if kl_direction == "qp":
        return (math.log(prior_sigma) - torch.log(sigma)) + (sigma.square() + gap_sq) / (2 * prior_sigma**2) - 0.5
    return (torch.log(sigma) - math.log(prior_sigma)) + (prior_sigma**2 + gap_sq) / (2 * sigma.square()) - 0.5


def kl_grads(mu, sigma, prior_mu, prior_sigma: float, kl_direction: str = "qp"):
    """Analytic (dKL/dmu, dKL/dsigma) of :func:`kl_elementwise`, each shaped like ``mu`` (not differentiable)."""
    return (
        kl_grad_mu(mu, sigma, prior_mu, prior_sigma, kl_direction),
        kl_grad_sigma(mu, sigma, prior_mu, prior_sigma, kl_direction),
    )


def _fresh_gap(mu, prior_mu):
    """mu - prior mean in a new tensor (free to overwrite)."""
    return mu.clone() if prior_mu is None else mu - prior_mu.to(mu.dtype)


def kl_grad_mu(mu, sigma, prior_mu, prior_sigma: float, kl_direction: str = "qp"):
    """dKL/dmu, one new tensor and no other temporary of mu's size beyond one (qp) or two (pq)."""
    if kl_direction == "qp":
        return _fresh_gap(mu, prior_mu).mul_(1.0 / prior_sigma**2)
    return _fresh_gap(mu, prior_mu).mul_(sigma.square().reciprocal_())


def kl_grad_sigma(mu, sigma, prior_mu, prior_sigma: float, kl_direction: str = "qp"):
    """dKL/dsigma, one new tensor and at most two temporaries of mu's size alive at once."""
    if kl_direction == "qp":
        return (sigma * (1.0 / prior_sigma**2)).sub_(sigma.reciprocal())
    gap_term = _fresh_gap(mu, prior_mu).square_().add_(prior_sigma**2)  # (s^2 + gap^2)
    gap_term.mul_(sigma.square().reciprocal_()).div_(sigma)
    return sigma.reciprocal().sub_(gap_term)
