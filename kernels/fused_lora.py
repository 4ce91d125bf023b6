"""Bayesian LoRA on a Linear with the adapter fused into the base GEMM.

``sampled_weight`` draws a factor's weight sample (A or B: small) with the sample+KL kernel, differentiable
through the gradient kernel (eps regenerated, never stored); ``lora_linear`` computes
y = x @ w^T + scaling * (x @ a^T) @ b^T + bias in one GEMM (``lora_matmul.py``) and its input gradient in
another; the factor gradients are rank-sized products.
"""

from __future__ import annotations

import torch

from .library import TRITON_OPS, lora_matmul_op
from .seeds import seed_tensor


class SampledWeightFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, rho, prior_mu, seed, prior_sigma, kl_direction, dtype):
        w, kl = TRITON_OPS.sample_weight(mu, rho, prior_mu, seed, prior_sigma, kl_direction, dtype, True)
        ctx.save_for_backward(mu, rho, prior_mu, seed)
        ctx.prior_sigma, ctx.kl_direction = prior_sigma, kl_direction
        ctx.set_materialize_grads(False)
        return w, kl

    @staticmethod
    def backward(ctx, d_w, dkl):
        mu, rho, prior_mu, seed = ctx.saved_tensors
        if d_w is None and dkl is None:
            return None, None, None, None, None, None, None
        d_mu, d_rho, _ = TRITON_OPS.reparameterization_grad(None if d_w is None else d_w.contiguous(), mu, rho,
                                                            prior_mu, seed, dkl, ctx.prior_sigma, ctx.kl_direction,
                                                            None)
        return d_mu, d_rho, None, None, None, None, None


def sampled_weight(mu, rho, prior_mu, prior_sigma: float, kl_direction: str, seed, dtype: torch.dtype):
    """Returns ``(w, kl)``: w = mu + softplus(rho) * eps(seed) in ``dtype`` and the summed KL (0-d float32),
    both differentiable w.r.t. mu and rho."""
    return SampledWeightFunction.apply(mu.contiguous(), rho.contiguous(),
                                       None if prior_mu is None else prior_mu.contiguous(),
                                       seed_tensor(seed, mu.device), float(prior_sigma), kl_direction, dtype)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, a, b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y = lora_matmul_op(x2, w, a, b, scaling, bias)
        ctx.save_for_backward(x, w, a, b)
        ctx.scaling = scaling
        ctx.set_materialize_grads(False)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if dy is None:
            return None, None, None, None, None, None
        s = ctx.scaling
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = lora_matmul_op(dy2, w.t(), b.t(), a.t(), s, None).reshape(x.shape) if need_x else None
        d_w = dy2.t() @ x2 if need_w else None
        d_bias = dy2.sum(0) if need_bias else None
        d_a = (s * (dy2 @ b)).t() @ x2 if need_a else None  # [rank, K]
        d_b = dy2.t() @ (s * (x2 @ a.t())) if need_b else None  # [N, rank]
        return dx, d_w, d_bias, d_a, d_b, None


def lora_linear(x, w, bias, a, b, scaling: float):
    """y = x @ w^T + scaling * (x @ a^T) @ b^T + bias: x [..., K]; w [N, K], a [rank, K], b [N, rank] and bias
    [N] (or None) in x's dtype. Differentiable w.r.t. every tensor."""
    return LoRALinearFunction.apply(x, w, bias, a, b, float(scaling))
