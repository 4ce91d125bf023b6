"""y, kl = x @ w^T + bias, KL(q, p) with the weight sample never materialised (the sample-in-GEMM path).

Forward: ``sampled_matmul`` builds w = mu + softplus(rho) * eps tile by tile inside the GEMM and sums the KL in
the same pass. Backward: dx = dy @ w by the same kernel reading the weight transposed; d_mu and d_rho from the
dW GEMM's epilogue (``weight_grad_gemm.py``). Saved for backward: x and the seed (plus references to mu, rho
and the prior mean), as on the sample-then-GEMM path.
"""

from __future__ import annotations

import torch

from .library import TRITON_OPS, reparameterized_weight_grad_op, sampled_matmul_op
from .seeds import seed_tensor


class SampledLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, rho, bias, prior_mu, seed, prior_sigma, kl_direction):
        x2 = x.reshape(-1, x.shape[-1])
        y, kl = sampled_matmul_op(x2, mu, rho, prior_mu, seed, bias, True, prior_sigma, kl_direction, True)
        ctx.save_for_backward(x, mu, rho, prior_mu, seed)
        ctx.prior_sigma, ctx.kl_direction, ctx.has_bias = prior_sigma, kl_direction, bias is not None
        ctx.set_materialize_grads(False)
        return y.reshape(*x.shape[:-1], mu.shape[0]), kl

    @staticmethod
    def backward(ctx, dy, dkl):
        x, mu, rho, prior_mu, seed = ctx.saved_tensors
        need_x, need_mu, need_rho, need_bias = ctx.needs_input_grad[:4]
        dx = d_mu = d_rho = d_bias = None
        dy2 = None if dy is None else dy.reshape(-1, dy.shape[-1])
        if need_x and dy is not None:
            dx = sampled_matmul_op(dy2, mu, rho, None, seed, None, False, 1.0, "qp", False)[0].reshape(x.shape)
        if (need_mu or need_rho) and dy is not None:
            d_mu, d_rho = reparameterized_weight_grad_op(dy2, x.reshape(-1, x.shape[-1]), mu, rho, prior_mu, seed,
                                                         dkl, ctx.prior_sigma, ctx.kl_direction)
        elif (need_mu or need_rho) and dkl is not None:  # only the KL was used
            d_mu, d_rho, _ = TRITON_OPS.reparameterization_grad(None, mu, rho, prior_mu, seed, dkl, ctx.prior_sigma,
                                                                ctx.kl_direction, None)
        if need_bias and ctx.has_bias and dy is not None:
            d_bias = dy2.sum(0)
        return dx, d_mu if need_mu else None, d_rho if need_rho else None, d_bias, None, None, None, None


def sampled_linear(x, mu, rho, bias, prior_mu, prior_sigma: float, kl_direction: str, seed):
    """Returns ``(y, kl)`` like ``reparameterized_op(LinearOp(), ...)``, on the sample-in-GEMM path.

    x: [..., K] compute dtype; mu, rho: float32 [N, K]; bias: [N] in x's dtype or None; prior_mu: [N, K] any
    float dtype or None; seed: Python int or one-element int64 tensor.
    """
    if kl_direction not in ("qp", "pq"):
        raise ValueError(f"kl_direction must be 'qp' or 'pq', got {kl_direction!r}")
    if mu.dtype != torch.float32 or rho.dtype != torch.float32:
        raise TypeError(f"mu and rho must be float32, got {mu.dtype} and {rho.dtype}")
    return SampledLinearFunction.apply(x, mu.contiguous(), rho.contiguous(), bias,
                                       None if prior_mu is None else prior_mu.contiguous(),
                                       seed_tensor(seed, mu.device), float(prior_sigma), kl_direction)
