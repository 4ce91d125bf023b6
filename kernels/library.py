"""The kernels as ``torch.library`` custom operators (``torch.ops.bayeslayers.*``) with fake kernels.

torch.compile treats each as one opaque call with known output shapes, so converted layers trace without
graph breaks. They are plain custom ops rather than ``triton_op``: torch 2.13 does not wrap interpreted
kernels (TRITON_INTERPRET=1), so only this form can be tested on CPU, and Inductor has nothing to fuse into a
Philox pass anyway.

Operators (tensor shapes: W = the weight's shape):
  philox_normal(seed, shape) -> eps                                         float32 [shape]
  sample_weight(mu, rho, prior_mu?, seed, prior_sigma, kl_direction, out_dtype, with_kl)
      -> (w [W] out_dtype, kl [] float32, or [0] when with_kl is False)
  reparameterization_grad(d_w?, mu, rho, prior_mu?, seed, g_kl?, prior_sigma, kl_direction, w_dtype?)
      -> (d_mu [W] float32, d_rho [W] float32, w [W] w_dtype, or [0] when w_dtype is None)
"""

from __future__ import annotations

from typing import Optional

import torch

from .philox import philox_normal_into
from .reparam_grad import reparameterization_grad
from .sample_kl import sample_weight_and_kl

Tensor = torch.Tensor


@torch.library.custom_op("bayeslayers::philox_normal", mutates_args=())
def philox_normal_op(seed: Tensor, shape: list[int]) -> Tensor:
    return philox_normal_into(seed, torch.empty(shape, dtype=torch.float32, device=seed.device))


@philox_normal_op.register_fake
def _(seed, shape):
    return seed.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("bayeslayers::sample_weight", mutates_args=())
def sample_weight_op(mu: Tensor, rho: Tensor, prior_mu: Optional[Tensor], seed: Tensor, prior_sigma: float,
                     kl_direction: str, out_dtype: torch.dtype, with_kl: bool) -> tuple[Tensor, Tensor]:
    return sample_weight_and_kl(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl)


@sample_weight_op.register_fake
def _(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl):
    kl = mu.new_empty((), dtype=torch.float32) if with_kl else mu.new_empty(0, dtype=torch.float32)
    return mu.new_empty(mu.shape, dtype=out_dtype), kl


@torch.library.custom_op("bayeslayers::reparameterization_grad", mutates_args=())
def reparameterization_grad_op(d_w: Optional[Tensor], mu: Tensor, rho: Tensor, prior_mu: Optional[Tensor],
                               seed: Tensor, g_kl: Optional[Tensor], prior_sigma: float, kl_direction: str,
                               w_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    d_mu, d_rho, w = reparameterization_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype)
    return d_mu, d_rho, mu.new_empty(0) if w is None else w


@reparameterization_grad_op.register_fake
def _(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype):
    w = mu.new_empty(0) if w_dtype is None else mu.new_empty(mu.shape, dtype=w_dtype)
    return mu.new_empty(mu.shape, dtype=torch.float32), mu.new_empty(mu.shape, dtype=torch.float32), w
