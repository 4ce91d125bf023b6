"""Closed-form KL divergence between the Gaussian posterior q = N(mu, sigma^2) and prior p = N(m, s^2).

Per element, summed by the callers. ``direction="qp"`` is KL(q || p), the usual variational term;
``direction="pq"`` is KL(p || q), the direction of the seed paper's public code.
"""

from __future__ import annotations

import math

import torch

KL_DIRECTIONS = ("qp", "pq")


def check_direction(direction: str) -> str:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    return direction


def _mean_gap(mu: torch.Tensor, prior_mu: torch.Tensor | None) -> torch.Tensor:
    return mu if prior_mu is None else mu - prior_mu.to(mu.dtype)


def kl_elementwise(mu, sigma, prior_mu, prior_sigma: float, direction: str = "qp") -> torch.Tensor:
    """KL per weight element (nats), same shape as ``mu``. ``prior_mu=None`` means a zero prior mean."""
    gap_sq = _mean_gap(mu, prior_mu).square()
    if direction == "qp":
        return (math.log(prior_sigma) - torch.log(sigma)) + (sigma.square() + gap_sq) / (2 * prior_sigma**2) - 0.5
    return (torch.log(sigma) - math.log(prior_sigma)) + (prior_sigma**2 + gap_sq) / (2 * sigma.square()) - 0.5


def kl_grads(mu, sigma, prior_mu, prior_sigma: float, direction: str = "qp"):
    """Analytic (dKL/dmu, dKL/dsigma) of :func:`kl_elementwise`, each shaped like ``mu``."""
    gap = _mean_gap(mu, prior_mu)
    if direction == "qp":
        inv_prior_var = 1.0 / prior_sigma**2
        return gap * inv_prior_var, sigma * inv_prior_var - sigma.reciprocal()
    inv_var = sigma.square().reciprocal()
    return gap * inv_var, sigma.reciprocal() - (prior_sigma**2 + gap.square()) * inv_var / sigma
