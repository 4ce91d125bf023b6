"""The Triton-only fused paths as host functions: sample-in-GEMM Linear, and LoRA fused into the base GEMM.

``sampled_linear`` runs a Bayesian Linear on the :class:`~.reparameterized.SampleInGemm` path (no weight sample
is ever written). ``lora_linear`` computes y = x @ w^T + scaling * (x @ a^T) @ b^T + bias in one GEMM
(``lora_matmul.py``) and its input gradient in another; the factor gradients are rank-sized products. The
factors themselves are drawn by ``reparameterized.sampled_weight`` (eps never stored).
"""

from __future__ import annotations

import torch

from ..posterior import Posterior
from ..reparameterized import SampleInGemm, reparameterize
from ..triton.triton_ops import TRITON_KERNELS, lora_matmul_op

SAMPLE_IN_GEMM = SampleInGemm(TRITON_KERNELS)


def sampled_linear(x, posterior: Posterior, bias, seed):
    """Returns ``(y, kl)`` of a Bayesian Linear on the sample-in-GEMM path.

    x: [..., K] compute dtype; posterior: mu, rho float32 [N, K], prior_mu [N, K] or None; bias: [N] in x's
    dtype or None; seed: Python int or one-element int64 tensor.
    """
    return reparameterize(None, x, posterior, bias, seed, SAMPLE_IN_GEMM)


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
