"""y, kl = op(x, mu + softplus(rho) * eps, bias), KL(q, p): the autograd Function of the triton and cpp backends.

Forward: the sample+KL kernel writes w in x's dtype, then ``op.forward`` (cuBLAS / cuDNN, or the CPU BLAS). Saved for
backward: x, the seed and references to the parameters (mu, rho, prior mean) -- never eps, sigma or w.
Backward: ``op.backward`` for dW and the bias gradient, then one gradient kernel that regenerates eps,
forms d_mu and d_rho and (when dx is needed) writes w again, then ``op.backward`` for dx. With
``linear_weight_grad`` (a Linear op, kernels that have the dW GEMM with the reparameterization epilogue) d_mu and
d_rho come straight from that GEMM, and a sampling pass without KL writes w for dx.

``op`` is any object with ``forward(x, w, b)`` and ``backward(dy, x, w, needs) -> (dx, dw, db)``
(``bayeslayers.ops.LinearOp`` / ``Conv2dOp``); the kernels only see the weight as a flat array.
"""

from __future__ import annotations

import torch

from .custom_ops import KernelOps
from .seeds import seed_tensor


def _flat(tensor):
    return None if tensor is None else tensor.contiguous()


class ReparameterizedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, rho, bias, prior_mu, seed, op, prior_sigma, kl_direction, kernels, linear_weight_grad):
        w, kl = kernels.sample_weight(mu, rho, prior_mu, seed, prior_sigma, kl_direction, x.dtype, True)
        y = op.forward(x, w, bias)
        ctx.save_for_backward(x, mu, rho, prior_mu, seed)
        ctx.op, ctx.prior_sigma, ctx.kl_direction, ctx.kernels = op, prior_sigma, kl_direction, kernels
        ctx.linear_weight_grad = linear_weight_grad
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y, kl

    @staticmethod
    def backward(ctx, dy, dkl):
        x, mu, rho, prior_mu, seed = ctx.saved_tensors
        op, prior_sigma, kl_direction, kernels = ctx.op, ctx.prior_sigma, ctx.kl_direction, ctx.kernels
        need_x, need_mu, need_rho, need_bias = ctx.needs_input_grad[:4]
        need_weight = need_mu or need_rho
        need_bias = need_bias and ctx.has_bias
        dx = d_w = d_bias = d_mu = d_rho = w = None
        if ctx.linear_weight_grad and dy is not None and need_weight:
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            d_mu, d_rho = kernels.linear_weight_grad(dy2, x2, mu, rho, prior_mu, seed, dkl, prior_sigma,
                                                     kl_direction)
            if need_bias:
                d_bias = dy2.sum(0)
            need_weight = need_bias = False  # done
        if dy is not None and (need_weight or need_bias):
            # The weight's values are not read for dW / db; an uninitialised buffer gives the shape and dtype.
            shape_only = torch.empty(mu.shape, dtype=x.dtype, device=x.device)
            _, d_w, d_bias = op.backward(dy, x, shape_only, (False, need_weight, need_bias))
        write_w = need_x and dy is not None
        if need_weight and (d_w is not None or dkl is not None):
            d_mu, d_rho, w = kernels.reparameterization_grad(
                _flat(d_w), mu, rho, prior_mu, seed, dkl, prior_sigma, kl_direction, x.dtype if write_w else None)
        if write_w:
            if w is None:
                w, _ = kernels.sample_weight(mu, rho, prior_mu, seed, prior_sigma, kl_direction, x.dtype, False)
            dx, _, _ = op.backward(dy, x, w, (True, False, False))
        return (dx, d_mu if need_mu else None, d_rho if need_rho else None, d_bias,
                None, None, None, None, None, None, None)


def reparameterized_op(op, x, mu, rho, bias, prior_mu, prior_sigma: float, kl_direction: str, seed,
                       kernels: KernelOps | None = None, linear_weight_grad: bool = False):
    """Returns ``(y, kl)``: y = op(x, w, bias) with w = mu + softplus(rho) * eps(seed) in x's dtype, and the
    summed closed-form KL (0-d float32, nats) in direction ``kl_direction`` ('qp' or 'pq').

    x: compute dtype; mu, rho: float32 weight-shaped; bias: x's dtype or None; prior_mu: weight-shaped, any
    float dtype, or None (zero mean); seed: Python int or one-element int64 tensor (see ``philox.py``);
    kernels: the operators that sample and differentiate (default: the Triton kernels; ``cpu.CPU_OPS`` for the
    C++ twins); linear_weight_grad: ``op`` is a Linear and d_mu / d_rho come from ``kernels.linear_weight_grad``.
    """
    if kl_direction not in ("qp", "pq"):
        raise ValueError(f"kl_direction must be 'qp' or 'pq', got {kl_direction!r}")
    if mu.dtype != torch.float32 or rho.dtype != torch.float32:
        raise TypeError(f"mu and rho must be float32, got {mu.dtype} and {rho.dtype}")
    kernels = _triton_ops() if kernels is None else kernels
    if linear_weight_grad and kernels.linear_weight_grad is None:
        raise ValueError("linear_weight_grad=True needs kernels with a linear_weight_grad operator")
    return ReparameterizedFunction.apply(x, _flat(mu), _flat(rho), bias, _flat(prior_mu),
                                         seed_tensor(seed, mu.device), op, float(prior_sigma), kl_direction,
                                         kernels, linear_weight_grad)


def _triton_ops() -> KernelOps:
    from .library import TRITON_OPS

    return TRITON_OPS
