"""C++ backend: the CPU twins of the Triton kernels (``bayeslayers.kernels.cpu``), the CPU default.

One pass samples the weight and sums the KL, one pass forms d_mu and d_rho; eps is regenerated from the seed,
never stored, and follows the Triton kernels' Philox stream bit for bit (a seed gives the same posterior
sample on CPU and GPU). The extension is compiled on first use (about a minute) and cached on disk; where it
cannot be built, ``auto`` falls back to the ``torch`` backend with one warning.
"""

from __future__ import annotations

import torch

import bayeslayers.kernels as kernels

from .base import KernelBackend


class CppBackend(KernelBackend):
    name = "cpp"
    priorities = {"cpu": 100}

    def unavailable_reason(self, device: torch.device) -> str:
        if device.type != "cpu":
            return "the C++ kernels run on CPU tensors only"
        return kernels.cpu.unavailable_reason()

    def kernels(self):
        return kernels.cpu.CPU_KERNELS

    def noise(self, seed, shape, device):
        return kernels.cpu.philox_normal(seed, shape).to(device)
