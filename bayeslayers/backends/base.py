"""The interface every backend implements."""

from __future__ import annotations

import torch

from ..kl import kl_elementwise
from ..rng import draw_seed, mix_seed, torch_normal


class Backend:
    """Computes ``(y, kl)`` for y = op(x, mu + softplus(rho) * eps, bias) and the summed closed-form KL.

    Tensors: x in the compute dtype; mu, rho (fp32 parameters, same shape as the weight); bias in the compute
    dtype or None; prior_mu (any float dtype, weight-shaped) or None for a zero-mean prior. kl is a 0-d fp32
    tensor (nats, summed over the weight's elements).
    """

    name = "base"

    def is_available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) == ""

    def unavailable_reason(self, device: torch.device) -> str:
        return ""

    def layer_seed(self, layer_id: int) -> int:
        """A fresh seed for one sampling forward of the layer ``layer_id``."""
        return mix_seed(draw_seed(), layer_id)

    def noise(self, seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The float32 eps this backend draws for (seed, shape) on ``device``."""
        return torch_normal(seed, shape, device)

    def apply(self, op, x, mu, rho, bias, prior_mu, prior_sigma: float, kl_direction: str, seed: int):
        raise NotImplementedError

    def sample_weight(self, mu, rho, prior_mu, prior_sigma: float, kl_direction: str, seed, dtype: torch.dtype):
        """``(w, kl)``: the weight sample mu + softplus(rho) * eps(seed) in ``dtype`` and the summed KL,
        differentiable w.r.t. mu and rho (plain autograd here; fused where a backend overrides it)."""
        sigma = torch.nn.functional.softplus(rho)
        w = mu + sigma * self.noise(seed, tuple(mu.shape), mu.device)
        return w.to(dtype), kl_elementwise(mu, sigma, prior_mu, prior_sigma, kl_direction).sum()

    def fuses_lora(self, device: torch.device) -> bool:
        """True when :meth:`lora_linear` runs the base GEMM and the adapter as one kernel on ``device``."""
        return False

    def lora_linear(self, x, w, bias, a, b, scaling: float):
        """y = x @ w^T + scaling * (x @ a^T) @ b^T + bias, all in x's dtype (see :meth:`fuses_lora`)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused LoRA")
