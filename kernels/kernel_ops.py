"""The two posterior kernels of one implementation as ``torch.library`` operators (``torch.ops.bayeslayers.*``).

torch.compile treats each operator as one opaque call with known output shapes, so converted layers trace
without graph breaks. The Triton kernels (``triton/triton_ops.py``), their C++ CPU twins (``cpu/``) and the
plain-torch implementation (``torch_impl.py``) register the same two schemas under different prefixes:

  {prefix}sample_weight(mu, rho, prior_mu?, seed, prior_sigma, kl_direction, out_dtype, with_kl)
      -> (w [W] out_dtype, kl [] float32, or [0] when with_kl is False)
  {prefix}reparameterization_grad(d_w?, mu, rho, prior_mu?, seed, g_kl?, prior_sigma, kl_direction, w_dtype?)
      -> (d_mu [W] float32, d_rho [W] float32, w [W] w_dtype, or [0] when w_dtype is None)

(W: the weight's shape; seed: one-element int64 tensor on the weights' device.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from .posterior import Posterior

Tensor = torch.Tensor


class AdamWArguments(NamedTuple):
    """What a gradient pass with AdamW fused in needs: the moments (m_mu, v_mu, m_rho, v_rho: float32, mu's
    shape) and, for mu and for rho, seven scalars of this step: 1 - lr * weight_decay, 1 - beta1, beta2,
    1 - beta2, sqrt(1 - beta2^t), eps, -lr / (1 - beta1^t) (torch.optim.AdamW's)."""

    moments: tuple
    mu_scalars: tuple
    rho_scalars: tuple


class PosteriorKernels(NamedTuple):
    """The operators of one implementation, called with a :class:`Posterior` by ``reparameterized.py``.

    ``weight_grad_gemm`` (the dW GEMM with the reparameterization epilogue) and ``sampled_matmul``
    (sample-in-GEMM) exist for the Triton kernels only; ``reparameterization_grad_into_d_w`` (the gradient pass
    writing d_mu over a d_w of d_mu's dtype, returning ``(d_rho, w)``) for the C++ and plain-torch kernels.
    """

    sample_weight_op: Callable
    reparameterization_grad_op: Callable
    weight_grad_gemm_op: Optional[Callable] = None
    sampled_matmul_op: Optional[Callable] = None
    reparameterization_grad_into_d_w_op: Optional[Callable] = None
    param_dtypes: tuple = (torch.float32,)  # dtypes of mu and rho the kernels take
    # the gradient pass with AdamW on mu, rho and their moments fused in (C++): a plain function, eager only
    reparameterization_grad_adamw_fn: Optional[Callable] = None

    def sample_weight(self, posterior: Posterior, seed: Tensor, out_dtype: torch.dtype, with_kl: bool = True):
        """``(w, kl)``: mu + softplus(rho) * eps(seed) in ``out_dtype`` and the summed KL (0-d float32, or empty
        when ``with_kl`` is False)."""
        mu, rho, prior_mu, prior_sigma, kl_direction = posterior
        return self.sample_weight_op(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl)

    def reparameterization_grad_adamw(
        self, d_w, mu, rho, prior_mu, prior_sigma, kl_direction, *, w_dtype, adamw: AdamWArguments, seed, g_kl=None
    ):
        """The gradient pass with AdamW fused in (mu, rho, moments updated in place); returns w or None."""
        return self.reparameterization_grad_adamw_fn(
            d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype, adamw
        )

    def reparameterization_grad(
        self,
        posterior: Posterior,
        seed: Tensor,
        d_w: Tensor | None,
        g_kl: Tensor | None,
        w_dtype: torch.dtype | None = None,
        d_w_is_temporary: bool = False,
    ):
        """``(d_mu, d_rho, w or None)`` from the sampled weight's gradient ``d_w`` and the KL's upstream ``g_kl``
        (either may be None); ``w`` is the weight sample again, written in the same pass when ``w_dtype`` is set.
        ``d_w_is_temporary``: nothing else reads ``d_w``, so d_mu may be written over it where the kernels can."""
        mu, rho, prior_mu, prior_sigma, kl_direction = posterior
        in_place = self.reparameterization_grad_into_d_w_op
        if d_w_is_temporary and in_place is not None and d_w is not None:
            grad_dtype = torch.promote_types(mu.dtype, torch.float32)
            if d_w.dtype == mu.dtype == grad_dtype and d_w.shape == mu.shape and d_w.is_contiguous():
                d_rho, w = in_place(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype)
                return d_w, d_rho, (w if w_dtype is not None else None)
        d_w = None if d_w is None else d_w.contiguous()
        d_mu, d_rho, w = self.reparameterization_grad_op(
            d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype
        )
        return d_mu, d_rho, (w if w_dtype is not None else None)


def register_posterior_kernels(
    prefix: str,
    sample_weight_and_kl: Callable,
    reparameterization_grad: Callable,
    grad_into_d_w: bool = False,
    **fused_ops: Callable,
) -> PosteriorKernels:
    """Registers ``bayeslayers::{prefix}sample_weight`` and ``bayeslayers::{prefix}reparameterization_grad``
    (and ``{prefix}reparameterization_grad_into_d_w`` with ``grad_into_d_w``: ``reparameterization_grad`` then
    takes ``d_mu=d_w`` to write d_mu over ``d_w``).

    ``sample_weight_and_kl(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl) -> (w, kl)``
    and ``reparameterization_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype)
    -> (d_mu, d_rho, w or None)`` implement them; ``fused_ops`` are the optional fields of
    :class:`PosteriorKernels`, already registered operators.
    """

    @torch.library.custom_op(f"bayeslayers::{prefix}sample_weight", mutates_args=())
    def sample_weight_op(
        mu: Tensor,
        rho: Tensor,
        prior_mu: Optional[Tensor],
        seed: Tensor,
        prior_sigma: float,
        kl_direction: str,
        out_dtype: torch.dtype,
        with_kl: bool,
    ) -> tuple[Tensor, Tensor]:
        return sample_weight_and_kl(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl)

    @sample_weight_op.register_fake
    def _(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl):
        kl_dtype = torch.promote_types(mu.dtype, torch.float32)
        kl = mu.new_empty(() if with_kl else (0,), dtype=kl_dtype)
        return mu.new_empty(mu.shape, dtype=out_dtype), kl

    @torch.library.custom_op(f"bayeslayers::{prefix}reparameterization_grad", mutates_args=())
    def reparameterization_grad_op(
        d_w: Optional[Tensor],
        mu: Tensor,
        rho: Tensor,
        prior_mu: Optional[Tensor],
        seed: Tensor,
        g_kl: Optional[Tensor],
        prior_sigma: float,
        kl_direction: str,
        w_dtype: Optional[torch.dtype],
    ) -> tuple[Tensor, Tensor, Tensor]:
        d_mu, d_rho, w = reparameterization_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype)
        return d_mu, d_rho, mu.new_empty(0) if w is None else w

    @reparameterization_grad_op.register_fake
    def _(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype):
        w = mu.new_empty(0) if w_dtype is None else mu.new_empty(mu.shape, dtype=w_dtype)
        grad_dtype = torch.promote_types(mu.dtype, torch.float32)
        return mu.new_empty(mu.shape, dtype=grad_dtype), mu.new_empty(mu.shape, dtype=grad_dtype), w

    if grad_into_d_w:

        @torch.library.custom_op(f"bayeslayers::{prefix}reparameterization_grad_into_d_w", mutates_args=("d_w",))
        def grad_into_d_w_op(
            d_w: Tensor,
            mu: Tensor,
            rho: Tensor,
            prior_mu: Optional[Tensor],
            seed: Tensor,
            g_kl: Optional[Tensor],
            prior_sigma: float,
            kl_direction: str,
            w_dtype: Optional[torch.dtype],
        ) -> tuple[Tensor, Tensor]:
            _, d_rho, w = reparameterization_grad(
                d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype, d_mu=d_w
            )
            return d_rho, mu.new_empty(0) if w is None else w

        @grad_into_d_w_op.register_fake
        def _(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype):
            w = mu.new_empty(0) if w_dtype is None else mu.new_empty(mu.shape, dtype=w_dtype)
            return mu.new_empty(mu.shape, dtype=torch.promote_types(mu.dtype, torch.float32)), w

        fused_ops["reparameterization_grad_into_d_w_op"] = grad_into_d_w_op
    return PosteriorKernels(sample_weight_op, reparameterization_grad_op, **fused_ops)
