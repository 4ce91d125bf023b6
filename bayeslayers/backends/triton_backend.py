"""Triton backend: fused sample+KL and gradient kernels from ``bayeslayers.kernels``.

Runs on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before the kernels were imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import Backend


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str:
        if importlib.util.find_spec("triton") is None:
            return "the 'triton' package is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        kernels = _kernels()
        if not hasattr(kernels, "reparameterized_op"):
            return "this build of bayeslayers.kernels provides no fused reparameterization kernels"
        return ""

    def is_available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) == ""

    def noise(self, seed, shape, device):
        return _kernels().philox_normal(seed, shape, device)

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed):
        return _kernels().reparameterized_op(op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed)


def _kernels():
    import bayeslayers.kernels as kernels

    return kernels
