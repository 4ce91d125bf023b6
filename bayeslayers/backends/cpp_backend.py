"""C++ backend: the CPU twins of the Triton kernels (``bayeslayers.kernels.cpu``), the CPU default.

One pass samples the weight and sums the KL, one pass forms d_mu and d_rho; eps is regenerated from the seed,
never stored, and follows the Triton kernels' Philox stream bit for bit (a seed gives the same posterior
sample on CPU and GPU). The extension is compiled on first use (about a minute) and cached on disk; where it
cannot be built, ``auto`` falls back to the ``torch`` backend with one warning.
"""

from __future__ import annotations

import torch

from .base import Backend


class CppBackend(Backend):
    name = "cpp"

    def unavailable_reason(self, device: torch.device) -> str:
        if device.type != "cpu":
            return "the C++ kernels run on CPU tensors only"
        return _kernels().cpu.unavailable_reason()

    def layer_seed(self, layer_id: int) -> torch.Tensor:
        """int64 CPU tensor: a draw from the default generator mixed with ``layer_id`` (as the triton backend)."""
        return _kernels().device_layer_seed(layer_id, torch.device("cpu"))

    def noise(self, seed, shape, device):
        return _kernels().cpu.philox_normal(seed, shape).to(device)

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed):
        kernels = _kernels()
        return kernels.reparameterized_op(op, x, mu, rho, bias, prior_mu, prior_sigma, kl_direction, seed,
                                          kernels.cpu.CPU_OPS)


def _kernels():
    import bayeslayers.kernels as kernels

    return kernels
