"""Triton backend: fused sample+KL and gradient kernels from ``bayeslayers.kernels``, and the fused GEMMs
(sample-in-GEMM Linear, weight-gradient epilogue, LoRA in the base GEMM) where the fusion policy chooses them (a
fixed policy, ``BAYESLAYERS_FUSION``, or timed on the user's GPU; ``bayeslayers/kernels/paths/``).

Runs on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before the kernels were imported. Seeds are
one-element int64 tensors drawn on the weight's device (no host sync; CUDA-graph and torch.compile friendly;
activation checkpointing restores the generator and so redraws the same seed). The eps stream is the Philox
one documented in ``bayeslayers/kernels/triton/philox.py``.
"""

from __future__ import annotations

import torch

import bayeslayers.kernels as kernels
from bayeslayers.kernels.paths.fusion import fuses_lora
from bayeslayers.kernels.triton.interpreter import INTERPRETING, TRITON_INSTALLED

from ..layer_maps import LinearMap
from .base import KernelBackend


class TritonBackend(KernelBackend):
    name = "triton"
    priorities = {"cuda": 100}

    def unavailable_reason(self, device: torch.device) -> str:
        if not TRITON_INSTALLED:
            return "the 'triton' package is not installed"
        if device.type != "cuda" and not INTERPRETING:
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
        return ""

    def kernels(self):
        return kernels.TRITON_KERNELS

    def noise(self, seed, shape, device):
        return kernels.philox_normal(seed, shape, device)

    def weight_path(self, layer_map, x, posterior, bias, seed):
        from bayeslayers.kernels.paths.fused import choose_weight_path  # imports Triton: on first use

        return choose_weight_path(layer_map, x, posterior, bias, seed, linear=isinstance(layer_map, LinearMap))

    def fuses_lora(self, device):
        return fuses_lora(device)

    def lora_linear(self, x, w, bias, a, b, scaling):
        from bayeslayers.kernels.paths.fused import choose_lora_path

        return choose_lora_path(x, w, bias, a, b, scaling)(x, w, bias, a, b, scaling)
