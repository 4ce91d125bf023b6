"""Triton backend: fused sample+KL and gradient kernels from ``bayeslayers.kernels``, and the fused GEMMs
(sample-in-GEMM Linear, dW epilogue, LoRA in the base GEMM) where ``bayeslayers.kernels.fusion_policy()`` says.

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
        from bayeslayers.kernels.interpreter import INTERPRETING, TRITON_INSTALLED

        if not TRITON_INSTALLED:
            return "the 'triton' package is not installed"
        if device.type != "cuda" and not INTERPRETING:
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        return ""

    def kernels(self):
        return kernels_module().TRITON_KERNELS

    def noise(self, seed, shape, device):
        return kernels_module().philox_normal(seed, shape, device)

    def path(self, layer_map, x):
        kernels = kernels_module()
        if not isinstance(layer_map, LinearMap):
            return self.sample_then_map()
        policy = kernels.fusion_policy()
        if policy.samples_in_gemm(x.numel() // max(1, x.shape[-1])):
            from bayeslayers.kernels.fused_paths import SAMPLE_IN_GEMM

            return SAMPLE_IN_GEMM
        return self.sample_then_map(weight_grad_epilogue=policy.weight_grad_epilogue)

    def fuses_lora(self, device):
        return kernels_module().fusion_policy().fused_lora

    def lora_linear(self, x, w, bias, a, b, scaling):
        return kernels_module().lora_linear(x, w, bias, a, b, scaling)
