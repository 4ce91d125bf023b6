"""Triton backend: fused sample+KL and gradient kernels from ``bayeslayers.kernels``, and the fused GEMMs
(sample-in-GEMM Linear, dW epilogue, LoRA in the base GEMM) where ``bayeslayers.kernels.paths.fusion`` chooses
them (a fixed policy, ``BAYESLAYERS_FUSION``, or timed on the user's GPU).

Runs on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before the kernels were imported. Seeds are
one-element int64 tensors drawn on the weight's device (no host sync; CUDA-graph and torch.compile friendly;
activation checkpointing restores the generator and so redraws the same seed). The eps stream is the Philox
one documented in ``bayeslayers/kernels/philox.py``.
"""

from __future__ import annotations

import torch

from ..layer_maps import LinearMap
from .base import KernelBackend, kernels_module


class TritonBackend(KernelBackend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str:
        from bayeslayers.kernels.triton.interpreter import INTERPRETING, TRITON_INSTALLED

        if not TRITON_INSTALLED:
            return "the 'triton' package is not installed"
        if device.type != "cuda" and not INTERPRETING:
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        return ""

    def kernels(self):
        return kernels_module().TRITON_KERNELS

    def noise(self, seed, shape, device):
        return kernels_module().philox_normal(seed, shape, device)

    def apply(self, layer_map, x, posterior, bias, seed):
        # kernels/fusion.py picks the path (fixed policy, BAYESLAYERS_FUSION, or measured on CUDA) and runs it.
        from bayeslayers.kernels.paths.fusion import apply_bayesian

        return apply_bayesian(layer_map, x, posterior, bias, seed, linear=isinstance(layer_map, LinearMap))

    def fuses_lora(self, device):
        from bayeslayers.kernels.paths.fusion import fuses_lora

        return fuses_lora(device)

    def lora_linear(self, x, w, bias, a, b, scaling):
        from bayeslayers.kernels.paths.fusion import apply_lora

        return apply_lora(x, w, bias, a, b, scaling)
