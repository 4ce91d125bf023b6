"""A pair of kernels as ``torch.library`` custom operators with fake kernels (``torch.ops.bayeslayers.*``).

torch.compile treats each operator as one opaque call with known output shapes, so converted layers trace
without graph breaks. The Triton kernels (``library.py``) and their C++ CPU twins (``cpu.py``) register the same
two schemas under different names:

  {prefix}sample_weight(mu, rho, prior_mu?, seed, prior_sigma, kl_direction, out_dtype, with_kl)
      -> (w [W] out_dtype, kl [] float32, or [0] when with_kl is False)
  {prefix}reparameterization_grad(d_w?, mu, rho, prior_mu?, seed, g_kl?, prior_sigma, kl_direction, w_dtype?)
      -> (d_mu [W] float32, d_rho [W] float32, w [W] w_dtype, or [0] when w_dtype is None)

(W: the weight's shape; seed: one-element int64 tensor on the weights' device.)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

Tensor = torch.Tensor


class KernelOps(NamedTuple):
    """The operators an autograd Function needs (see ``reparameterized.py``); ``linear_weight_grad``, the
    dW GEMM with the reparameterization epilogue, only where a backend has one."""

    sample_weight: Callable
    reparameterization_grad: Callable
    linear_weight_grad: Optional[Callable] = None


def define_kernel_ops(prefix: str, sample_weight_and_kl: Callable, reparameterization_grad: Callable,
                      linear_weight_grad: Optional[Callable] = None) -> KernelOps:
    """Registers ``bayeslayers::{prefix}sample_weight`` and ``bayeslayers::{prefix}reparameterization_grad``.

    ``sample_weight_and_kl(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl) -> (w, kl)``
    and ``reparameterization_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype)
    -> (d_mu, d_rho, w or None)`` implement them.
    """

    @torch.library.custom_op(f"bayeslayers::{prefix}sample_weight", mutates_args=())
    def sample_weight_op(mu: Tensor, rho: Tensor, prior_mu: Optional[Tensor], seed: Tensor, prior_sigma: float,
                         kl_direction: str, out_dtype: torch.dtype, with_kl: bool) -> tuple[Tensor, Tensor]:
        return sample_weight_and_kl(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl)

    @sample_weight_op.register_fake
    def _(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl):
        kl = mu.new_empty((), dtype=torch.float32) if with_kl else mu.new_empty(0, dtype=torch.float32)
        return mu.new_empty(mu.shape, dtype=out_dtype), kl

    @torch.library.custom_op(f"bayeslayers::{prefix}reparameterization_grad", mutates_args=())
    def reparameterization_grad_op(d_w: Optional[Tensor], mu: Tensor, rho: Tensor, prior_mu: Optional[Tensor],
                                   seed: Tensor, g_kl: Optional[Tensor], prior_sigma: float, kl_direction: str,
                                   w_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
        d_mu, d_rho, w = reparameterization_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction,
                                                 w_dtype)
        return d_mu, d_rho, mu.new_empty(0) if w is None else w

    @reparameterization_grad_op.register_fake
    def _(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype):
        w = mu.new_empty(0) if w_dtype is None else mu.new_empty(mu.shape, dtype=w_dtype)
        return mu.new_empty(mu.shape, dtype=torch.float32), mu.new_empty(mu.shape, dtype=torch.float32), w

    return KernelOps(sample_weight_op, reparameterization_grad_op, linear_weight_grad)
