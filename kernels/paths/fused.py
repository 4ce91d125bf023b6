"""The Triton backend's paths and the choice among them (the policy of ``fusion.py``, or timed by ``timing.py``).

``TRITON_PATHS`` holds one :class:`~..reparameterized.WeightPath` per Linear path name; :func:`choose_weight_path`
returns the one a call takes (sample-then-map for every other layer map). ``sampled_linear`` runs a Bayesian
Linear on the sample-in-GEMM path (no weight sample is ever written). ``lora_linear`` computes
y = x @ w^T + scaling * (x @ a^T) @ b^T + bias in one GEMM (``triton/lora_matmul.py``) and its input gradient in
another; the factor gradients are rank-sized products. The factors themselves are sampled by
``reparameterized.sample_weight`` (eps never stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..posterior import Posterior
from ..reparameterized import SampleInGemm, SampleThenMap, WeightPath, reparameterize
from ..triton.triton_ops import TRITON_KERNELS, lora_matmul_op
from .fusion import (
    FUSED_LORA,
    SAMPLE_IN_GEMM,
    SAMPLE_THEN_MAP,
    UNFUSED_LORA,
    WEIGHT_GRAD_EPILOGUE,
    fusion_mode,
    fusion_policy,
)
from .timing import path_selector

TRITON_PATHS: dict[str, WeightPath] = {
    SAMPLE_THEN_MAP: SampleThenMap(TRITON_KERNELS),
    WEIGHT_GRAD_EPILOGUE: SampleThenMap(TRITON_KERNELS, weight_grad_epilogue=True),
    SAMPLE_IN_GEMM: SampleInGemm(TRITON_KERNELS),
}
# Sample-in-GEMM regenerates each weight tile once per BLOCK_M rows: beyond this many rows it is ALU-bound by
# the Philox draws (2-3.5x slower than sampling once at SD shapes), so it is not even timed there.
SAMPLE_IN_GEMM_TIMED_ROWS = 1024


def sampled_linear(x, posterior: Posterior, bias, seed):
    """Returns ``(y, kl)`` of a Bayesian Linear on the sample-in-GEMM path.

    x: [..., K] compute dtype; posterior: mu, rho float32 [N, K], prior_mu [N, K] or None; bias: [N] in x's
    dtype or None; seed: Python int or one-element int64 tensor.
    """
    return reparameterize(None, x, posterior, bias, seed, TRITON_PATHS[SAMPLE_IN_GEMM])


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


# ---------------------------------------------------------------------------------------------------------------
# Choosing a path


def _leaf(tensor):
    return None if tensor is None else tensor.detach().requires_grad_(tensor.requires_grad)


def _backward_step(forward, inputs, out_shape, like):
    """One forward + backward of ``forward(*inputs)`` (-> y or (y, kl)) with a constant output gradient: no
    generator is drawn from and no parameter's .grad is touched."""
    dy = like.new_full(out_shape, 1e-3)
    wanted = [t for t in inputs if t is not None and t.requires_grad]

    def step():
        # Plain saved tensors: activation checkpointing's hooks (if the call sits in a checkpointed region) must
        # not see this independent graph.
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            _forward_backward(forward, inputs, wanted, dy)

    return step


def _identity(tensor):
    return tensor


def _forward_backward(forward, inputs, wanted, dy):
    out = forward(*inputs)
    y, kl = out if isinstance(out, tuple) else (out, None)
    outs, grads = [y], [dy]
    if kl is not None and kl.requires_grad:
        outs.append(kl)
        grads.append(torch.ones_like(kl))
    if wanted and y.requires_grad:
        torch.autograd.grad(outs, wanted, grads, allow_unused=True)


def linear_candidates(rows: int, weight_grad: bool) -> dict[str, WeightPath]:
    """The Linear paths worth timing for ``rows`` input rows (the weight-gradient epilogue only when d_mu is
    needed)."""
    names = [SAMPLE_THEN_MAP]
    if weight_grad:
        names.append(WEIGHT_GRAD_EPILOGUE)
    if rows <= SAMPLE_IN_GEMM_TIMED_ROWS:
        names.append(SAMPLE_IN_GEMM)
    return {name: TRITON_PATHS[name] for name in names}


def choose_weight_path(layer_map, x, posterior: Posterior, bias, seed, linear: bool) -> WeightPath:
    """The path a Bayesian layer call takes on the Triton backend (see ``fusion.py``)."""
    rows = x.numel() // max(1, x.shape[-1])
    if not linear:
        return TRITON_PATHS[SAMPLE_THEN_MAP]
    if fusion_mode() != "auto":
        return TRITON_PATHS[fusion_policy().linear_path(rows)]
    mu, rho = posterior.mu, posterior.rho
    weight_grad = mu.requires_grad or rho.requires_grad
    leaves = [_leaf(t) for t in (x, mu, rho, bias)]

    def make_step(path):
        def forward(x_, mu_, rho_, bias_):
            return reparameterize(layer_map, x_, posterior._replace(mu=mu_, rho=rho_), bias_, seed, path)

        return _backward_step(forward, leaves, (*x.shape[:-1], mu.shape[0]), x)

    return path_selector().choose(
        "linear",
        rows,
        mu.shape[0],
        mu.shape[1],
        x.dtype,
        x.device,
        weight_grad or x.requires_grad,
        linear_candidates(rows, weight_grad),
        make_step,
        TRITON_PATHS[SAMPLE_THEN_MAP],
    )


def unfused_lora(x, w, bias, a, b, scaling: float):
    """x @ w^T + bias + scaling * (x @ a^T) @ b^T as three GEMMs."""
    return F.linear(x, w, bias) + scaling * F.linear(F.linear(x, a), b)


LORA_PATHS = {FUSED_LORA: lora_linear, UNFUSED_LORA: unfused_lora}


def choose_lora_path(x, w, bias, a, b, scaling: float):
    """The function computing a LoRA call: :func:`lora_linear` or :func:`unfused_lora` (policy, or timed)."""
    if fusion_mode() != "auto":
        return LORA_PATHS[FUSED_LORA if fusion_policy().fused_lora else UNFUSED_LORA]
    rows = x.numel() // max(1, x.shape[-1])
    leaves = [_leaf(t) for t in (x, w, bias, a, b)]

    def make_step(path):
        def forward(*tensors):
            return path(*tensors, scaling)

        return _backward_step(forward, leaves, (*x.shape[:-1], w.shape[0]), x)

    needs_grad = any(t is not None and t.requires_grad for t in (x, w, bias, a, b))
    return path_selector().choose(
        f"lora{a.shape[0]}",
        rows,
        w.shape[0],
        w.shape[1],
        x.dtype,
        x.device,
        needs_grad,
        LORA_PATHS,
        make_step,
        unfused_lora,
    )
