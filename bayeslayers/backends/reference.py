"""Reference backend: the naive eager implementation (autograd stores eps, sigma and the sampled weight)."""

from __future__ import annotations

from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed):
        weight, kl = self.sample_weight(mu, rho, prior_mu, prior_sigma, kl_direction, seed, x.dtype)
        return op.forward(x, weight, bias), kl
