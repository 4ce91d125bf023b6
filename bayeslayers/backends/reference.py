"""Reference backend: the naive eager implementation (autograd stores eps, sigma and the sampled weight).

It draws the torch backend's eps (torch's generator seeded with the layer's seed), so the two give the same
sample for the same seed; it is the tests' oracle and the benchmarks' baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bayeslayers.kernels as kernels

from ..kl import kl_elementwise
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def noise(self, seed, shape, device):
        return kernels.torch_normal_op(kernels.seed_tensor(seed, torch.device("cpu")), list(shape), device)

    def sample_weight(self, posterior, seed, dtype):
        mu, rho, prior_mu, prior_sigma, kl_direction = posterior
        sigma = F.softplus(rho)
        w = mu + sigma * self.noise(seed, tuple(mu.shape), mu.device)
        return w.to(dtype), kl_elementwise(mu, sigma, prior_mu, prior_sigma, kl_direction).sum()

    def apply(self, layer_map, x, posterior, bias, seed):
        weight, kl = self.sample_weight(posterior, seed, x.dtype)
        return layer_map.forward(x, weight, bias), kl
