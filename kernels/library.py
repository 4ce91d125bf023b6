"""The kernels as ``torch.library`` operators (``torch.ops.bayeslayers.*``), so torch.compile traces them.

``triton_op`` derives the fake (meta) implementations from the Python bodies, and ``wrap_triton`` lets
Inductor see the Triton launches. With a torch that lacks ``triton_op`` the plain functions are used.

Operators:
  philox_normal(seed, shape) -> eps                                      float32, shape
  sample_weight(mu, rho, prior_mu?, seed, prior_sigma, kl_direction, out_dtype, with_kl) -> (w, kl)
  reparameterization_grad(d_w?, mu, rho, prior_mu?, seed, g_kl?, prior_sigma, kl_direction, w_dtype?)
      -> (d_mu, d_rho, w)                                                 w is empty when w_dtype is None
"""

from __future__ import annotations

from typing import Optional

import torch

from .philox import philox_normal_into
from .reparam_grad import reparameterization_grad
from .sample_kl import sample_weight_and_kl

_triton_op = getattr(torch.library, "triton_op", None)


def _register(name: str):
    if _triton_op is None:
        return lambda fn: fn
    return lambda fn: _triton_op(f"bayeslayers::{name}", fn, mutates_args=())


@_register("philox_normal")
def philox_normal_op(seed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32, device=seed.device)
    return philox_normal_into(seed, out)


@_register("sample_weight")
def sample_weight_op(mu: torch.Tensor, rho: torch.Tensor, prior_mu: Optional[torch.Tensor], seed: torch.Tensor,
                     prior_sigma: float, kl_direction: str, out_dtype: torch.dtype,
                     with_kl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_weight_and_kl(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl)


@_register("reparameterization_grad")
def reparameterization_grad_op(d_w: Optional[torch.Tensor], mu: torch.Tensor, rho: torch.Tensor,
                               prior_mu: Optional[torch.Tensor], seed: torch.Tensor, g_kl: Optional[torch.Tensor],
                               prior_sigma: float, kl_direction: str,
                               w_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_mu, d_rho, w = reparameterization_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype)
    return d_mu, d_rho, mu.new_empty(0) if w is None else w
