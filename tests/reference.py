"""Float64 references the tests compare every backend against (independent of the library's code paths)."""

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence


def sampled_weight(mu, rho, eps):
    """w = mu + softplus(rho) * eps in float64."""
    return mu.double() + F.softplus(rho.double()) * eps.double()


def kl_reference(mu, rho, prior_mu, prior_sigma, direction):
    """Summed KL from torch.distributions (float64); prior_mu None = zero mean."""
    mu, sigma = mu.double(), F.softplus(rho.double())
    prior_mean = torch.zeros_like(mu) if prior_mu is None else prior_mu.double()
    q, p = Normal(mu, sigma), Normal(prior_mean, torch.full_like(mu, prior_sigma))
    return (kl_divergence(q, p) if direction == "qp" else kl_divergence(p, q)).sum()


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
