"""Triton backend: fused sample+KL and gradient kernels from ``bayeslayers.kernels``, and the fused GEMMs
(sample-in-GEMM Linear, dW epilogue, LoRA in the base GEMM) where ``bayeslayers.kernels.fusion_policy()`` says.

Runs on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before the kernels were imported.

Seeds: :meth:`TritonBackend.layer_seed` returns a one-element int64 tensor drawn from the default generator
of the device the kernels run on and mixed with the layer id there (no host sync; CUDA-graph and
torch.compile friendly; activation checkpointing restores the generator and so redraws the same seed).
Python int seeds (``sampling()``, ``fixed_seed``) are accepted as well. The eps stream is the Philox one
documented in ``bayeslayers/kernels/philox.py``; it differs from the torch backend's stream.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..ops import LinearOp
from .base import Backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str:
        if importlib.util.find_spec("triton") is None:
            return "the 'triton' package is not installed"
        if device.type != "cuda" and not _interpreting():
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        kernels = _kernels()
        if not hasattr(kernels, "sample_weight_and_kl"):
            return "this build of bayeslayers.kernels provides no fused reparameterization kernels"
        return ""

    def layer_seed(self, layer_id: int) -> torch.Tensor:
        """int64 device tensor: a draw from the kernels' device's default generator mixed with ``layer_id``."""
        return _kernels().device_layer_seed(layer_id, _seed_device())

    def noise(self, seed, shape, device):
        return _kernels().philox_normal(seed, shape, device)

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed):
        # kernels/fusion.py picks the path (fixed policy, BAYESLAYERS_FUSION, or measured on CUDA) and runs it.
        from bayeslayers.kernels.fusion import apply_bayesian

        return apply_bayesian(op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed,
                              linear=isinstance(op, LinearOp))

    def sample_weight(self, mu, rho, prior_mu, prior_sigma, kl_direction, seed, dtype):
        return _kernels().sampled_weight(mu, rho, prior_mu, prior_sigma, kl_direction, seed, dtype)

    def fuses_lora(self, device):
        from bayeslayers.kernels.fusion import fuses_lora

        return fuses_lora(device)

    def lora_linear(self, x, w, bias, a, b, scaling):
        from bayeslayers.kernels.fusion import apply_lora

        return apply_lora(x, w, bias, a, b, scaling)


def _seed_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU (interpreter); seeds move to the weight's
    device in ``reparameterized_op`` if they differ."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _kernels():
    import bayeslayers.kernels as kernels

    return kernels
