"""Reference backend: the naive eager implementation (autograd stores eps, sigma and the sampled weight)."""

from __future__ import annotations

import torch.nn.functional as F

from ..kl import kl_elementwise
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed):
        eps = self.noise(seed, tuple(mu.shape), mu.device).to(mu.dtype)
        sigma = F.softplus(rho)
        weight = mu + sigma * eps
        y = op.forward(x, weight.to(x.dtype), bias)
        kl = kl_elementwise(mu, sigma, prior_mu, prior_sigma, kl_direction).sum()
        return y, kl
