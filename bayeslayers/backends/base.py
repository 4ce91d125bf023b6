"""The interface every backend implements."""

from __future__ import annotations

import torch

from ..rng import draw_seed, mix_seed, torch_normal


class Backend:
    """Computes ``(y, kl)`` for y = op(x, mu + softplus(rho) * eps, bias) and the summed closed-form KL.

    Tensors: x in the compute dtype; mu, rho (fp32 parameters, same shape as the weight); bias in the compute
    dtype or None; prior_mu (any float dtype, weight-shaped) or None for a zero-mean prior. kl is a 0-d fp32
    tensor (nats, summed over the weight's elements).
    """

    name = "base"

    def is_available(self, device: torch.device) -> bool:
        return True

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
