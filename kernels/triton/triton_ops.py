"""The Triton kernels as ``torch.library`` operators (``torch.ops.bayeslayers.*``).

The sample/gradient pair follows the schemas of ``kernel_ops.py``; the fused GEMMs are registered here:

  sampled_matmul(a, mu, rho, prior_mu?, seed, bias?, transpose_weight, prior_sigma, kl_direction, with_kl)
      -> (out [M, N or K] a.dtype, kl [] float32, or [0] when with_kl is False)
  reparameterized_weight_grad(dy, x, mu, rho, prior_mu?, seed, g_kl?, prior_sigma, kl_direction)
      -> (d_mu [N, K] float32, d_rho [N, K] float32)
  lora_matmul(x, w, a, b, scaling, bias?) -> out [M, N] x.dtype

They are plain custom ops rather than ``triton_op``: torch 2.13 does not wrap interpreted kernels
(TRITON_INTERPRET=1), so only this form can be tested on CPU, and Inductor has nothing to fuse into a Philox
pass anyway.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernel_ops import register_posterior_kernels
from .lora_matmul import lora_matmul
from .reparam_grad import reparameterization_grad
from .sample_kl import sample_weight_and_kl
from .sampled_matmul import sampled_matmul
from .weight_grad_gemm import reparameterized_weight_grad

Tensor = torch.Tensor


@torch.library.custom_op("bayeslayers::sampled_matmul", mutates_args=())
def sampled_matmul_op(
    a: Tensor,
    mu: Tensor,
    rho: Tensor,
    prior_mu: Optional[Tensor],
    seed: Tensor,
    bias: Optional[Tensor],
    transpose_weight: bool,
    prior_sigma: float,
    kl_direction: str,
    with_kl: bool,
) -> tuple[Tensor, Tensor]:
    return sampled_matmul(
        a,
        mu,
        rho,
        seed,
        transpose_weight=transpose_weight,
        bias=bias,
        prior_mu=prior_mu,
        prior_sigma=prior_sigma,
        kl_direction=kl_direction,
        with_kl=with_kl,
    )


@sampled_matmul_op.register_fake
def _(a, mu, rho, prior_mu, seed, bias, transpose_weight, prior_sigma, kl_direction, with_kl):
    out = a.new_empty((a.shape[0], mu.shape[0] if transpose_weight else mu.shape[1]))
    return out, mu.new_empty(() if with_kl else (0,), dtype=torch.float32)


@torch.library.custom_op("bayeslayers::reparameterized_weight_grad", mutates_args=())
def reparameterized_weight_grad_op(
    dy: Tensor,
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    prior_mu: Optional[Tensor],
    seed: Tensor,
    g_kl: Optional[Tensor],
    prior_sigma: float,
    kl_direction: str,
) -> tuple[Tensor, Tensor]:
    return reparameterized_weight_grad(dy, x, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction)


@reparameterized_weight_grad_op.register_fake
def _(dy, x, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction):
    return torch.empty_like(mu, dtype=torch.float32), torch.empty_like(mu, dtype=torch.float32)


@torch.library.custom_op("bayeslayers::lora_matmul", mutates_args=())
def lora_matmul_op(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scaling: float, bias: Optional[Tensor]) -> Tensor:
    return lora_matmul(x, w, a, b, scaling, bias)


@lora_matmul_op.register_fake
def _(x, w, a, b, scaling, bias):
    return x.new_empty((x.shape[0], b.shape[0]))


TRITON_KERNELS = register_posterior_kernels(
    "",
    sample_weight_and_kl,
    reparameterization_grad,
    linear_weight_grad_op=reparameterized_weight_grad_op,
    sampled_matmul_op=sampled_matmul_op,
)
