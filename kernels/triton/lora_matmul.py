"""Fused LoRA GEMM: out = x @ w^T + scaling * (x @ a^T) @ b^T + bias, x read once.

Each program keeps two accumulators over the shared reduction loop: the base tile x @ w^T and the low-rank
projection x @ a^T for its rows (rank columns, padded to ``BLOCK_RANK``), then adds scaling * (x a^T) b^T in
the epilogue (LoRAFusion's fusion of the adapter into the base GEMM). The extra work per program is
``rank / BLOCK_N`` of the base GEMM's.

The same kernel gives the input gradient: dx = dy @ w + scaling * (dy @ b) @ a is this product with
(w, a, b) -> (w^T, b^T, a^T), passed as strided views. a and b are the adapter factors' weights (the
Bayesian factors' samples, drawn by the sample+KL kernel: they are small).

Block names: BLOCK_M rows of x, BLOCK_N outputs, BLOCK_K the reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import PRUNE_LORA_GEMM, dot_options, gemm_configs
from .gemm_tiles import mma


@triton.autotune(
    configs=gemm_configs(),
    key=["M", "N", "K", "RANK"],
    prune_configs_by={"early_config_prune": PRUNE_LORA_GEMM},
)
@triton.jit
def _lora_matmul_kernel(
    x_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    out_ptr,  # x [M, K], w [N, K], a [RANK, K], b [N, RANK], out [M, N]
    M,
    N,
    K,
    RANK,
    scaling,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_RANK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_RANK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & in_k[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=in_k[:, None] & (offs_n[None, :] < N),
            other=0.0,
        )
        a_t = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=in_k[:, None] & (offs_r[None, :] < RANK),
            other=0.0,
        )
        acc = mma(acc, x, w_t, INPUT_PRECISION, DOT_FP32)
        xa = mma(xa, x, a_t, INPUT_PRECISION, DOT_FP32)
    b_t = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=(offs_r[:, None] < RANK) & (offs_n[None, :] < N),
        other=0.0,
    )
    # The adapter path rounds x @ a^T to the compute dtype, as a LoRA of two layers does.
    acc += scaling * mma(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), xa.to(x_ptr.dtype.element_ty), b_t, INPUT_PRECISION, DOT_FP32
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


MIN_DOT_SIZE = 16  # tl.dot needs every block dimension >= 16


def lora_matmul(x, w, a, b, scaling: float, bias=None):
    """Returns x @ w^T + scaling * (x @ a^T) @ b^T + bias in x's dtype.

    x [M, K], w [N, K], a [rank, K], b [N, rank]: 2-D, any strides, all in x's dtype; bias [N] or None.
    """
    rows, n_in = x.shape
    n_out, rank = b.shape
    if w.shape != (n_out, n_in) or a.shape != (rank, n_in):
        raise ValueError(
            f"LoRA shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if len({x.dtype, w.dtype, a.dtype, b.dtype}) != 1:
        raise TypeError(f"x, w, a and b must share one dtype, got {x.dtype}, {w.dtype}, {a.dtype}, {b.dtype}")
    out = (torch.empty if n_in else torch.zeros)((rows, n_out), dtype=x.dtype, device=x.device)
    if rows and n_out and n_in:
        grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]))  # noqa: E731
        _lora_matmul_kernel[grid](
            x,
            w,
            a,
            b,
            x if bias is None else bias,
            out,
            rows,
            n_out,
            n_in,
            rank,
            scaling,
            x.stride(0),
            x.stride(1),
            w.stride(0),
            w.stride(1),
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_RANK=max(MIN_DOT_SIZE, triton.next_power_of_2(rank)),
            **dot_options(x.dtype),
        )
    if bias is not None and not n_in:
        out += bias
    return out
