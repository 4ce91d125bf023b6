"""Sample-in-GEMM: out = a @ op(w) + bias with the weight sample w = mu + softplus(rho) * eps built tile by tile
in registers, never written to memory (the skinny-M path: cross-attention K/V on 77 tokens, low-resolution
blocks at batch 1).

``op(w)`` is w^T (forward, y = x @ w^T) or w (input gradient, dx = dy @ w): the kernel reads the weight
through strides, so both are one kernel. The generated weight tile is the first ``tl.dot`` operand (the
register operand of Hopper's wgmma): each program computes out^T tiles, acc[j, m] = sum_r w'[j, r] a[m, r].
The same pass can sum the KL: only the programs of the first row block add the KL of the tiles they build,
into one partial per column block (no atomics).

Block names: BLOCK_M rows of ``a``, BLOCK_N output columns, BLOCK_K the reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..posterior_math import KL_DIRECTION_CODES, kl_element, load_gap
from .config import EXACT, PRUNE_SAMPLED_GEMM, check_numel, dot_options, sampled_gemm_configs
from .gemm_tiles import mma, sampled_tile, tile_layout


@triton.autotune(
    configs=sampled_gemm_configs(),
    key=["M", "N", "K"],
    reset_to_zero=["kl_partials_ptr"],
    prune_configs_by={"early_config_prune": PRUNE_SAMPLED_GEMM},
)
@triton.jit
def _sampled_matmul_kernel(
    a_ptr,
    mu_ptr,
    rho_ptr,
    prior_ptr,
    seed_ptr,
    bias_ptr,  # a [M, K] compute dtype; weight tensors contiguous
    out_ptr,
    kl_partials_ptr,  # out [M, N] compute dtype; [cdiv(N, BLOCK_N)] float32
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    prior_sigma,
    HAS_BIAS: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    WITH_KL: tl.constexpr,
    KL_DIRECTION: tl.constexpr,
    LAYOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    kl = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w, _, mu, _, sigma, index, w_mask = sampled_tile(
            mu_ptr, rho_ptr, seed, pid_n * BLOCK_N, k0, stride_wn, stride_wk, N, K, LAYOUT, BLOCK_N, BLOCK_K
        )
        a_t = tl.load(
            a_ptr + offs_m[None, :] * stride_am + offs_k[:, None] * stride_ak,
            mask=(offs_m[None, :] < M) & (offs_k[:, None] < K),
            other=0.0,
        )  # [BLOCK_K, BLOCK_M]
        acc = mma(acc, w.to(a_ptr.dtype.element_ty), a_t, INPUT_PRECISION, DOT_FP32)
        if WITH_KL:
            if pid_m == 0:
                gap = load_gap(mu, prior_ptr, index, w_mask, HAS_PRIOR)
                kl += tl.where(w_mask, kl_element(gap, sigma, prior_sigma, KL_DIRECTION), 0.0)
    if WITH_KL:
        if pid_m == 0:
            tl.store(kl_partials_ptr + pid_n, tl.sum(tl.sum(kl, axis=1), axis=0))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m[None, :] < M) & (offs_n[:, None] < N),
    )


def sampled_matmul(
    a,
    mu,
    rho,
    seed,
    *,
    transpose_weight: bool = True,
    bias=None,
    prior_mu=None,
    prior_sigma: float = 1.0,
    kl_direction: str = "qp",
    with_kl: bool = False,
):
    """Returns ``(out, kl)``: out = a @ w^T + bias (``transpose_weight``, a [M, K] for w [N, K]) or a @ w
    (a [M, N]), in a's dtype, with w = mu + softplus(rho) * eps(seed) never materialised; kl the summed KL
    of the posterior (0-d float32, nats) or an empty tensor when ``with_kl`` is False.

    a: 2-D, any strides; mu, rho: contiguous float32 [N, K]; bias: [N] or None (``transpose_weight`` only);
    prior_mu: contiguous [N, K] any float dtype, or None (zero mean); seed: one-element int64 tensor.
    """
    n_out, n_in = mu.shape
    check_numel(mu.numel())
    if transpose_weight:  # out[m, n] = sum_k a[m, k] w[n, k]
        out_features, stride_wn, stride_wk = n_out, n_in, 1
    else:  # out[m, k] = sum_n a[m, n] w[n, k]
        if bias is not None:
            raise ValueError("bias is only supported with transpose_weight=True")
        out_features, stride_wn, stride_wk = n_in, 1, n_in
    rows, reduction = a.shape
    if reduction != (n_in if transpose_weight else n_out):
        raise ValueError(
            f"a has {reduction} columns; the weight {tuple(mu.shape)} needs {n_in if transpose_weight else n_out}"
        )
    if not with_kl:  # prior and direction are not read: one compiled kernel serves them all
        prior_mu, kl_direction = None, "qp"
    out = (torch.empty if reduction else torch.zeros)((rows, out_features), dtype=a.dtype, device=a.device)
    n_partials = triton.cdiv(out_features, min(c.kwargs["BLOCK_N"] for c in sampled_gemm_configs())) if with_kl else 0
    partials = torch.zeros(n_partials, dtype=torch.float32, device=a.device)
    if out_features and reduction:
        # At least one row block even when a has no rows: its programs sum the KL.
        def grid(meta):
            return (triton.cdiv(out_features, meta["BLOCK_N"]), max(1, triton.cdiv(rows, meta["BLOCK_M"])))

        _sampled_matmul_kernel[grid](
            a,
            mu,
            rho,
            mu if prior_mu is None else prior_mu,
            seed,
            a if bias is None else bias,
            out,
            partials,
            rows,
            out_features,
            reduction,
            a.stride(0),
            a.stride(1),
            stride_wn,
            stride_wk,
            out.stride(0),
            out.stride(1),
            prior_sigma,
            HAS_BIAS=bias is not None,
            HAS_PRIOR=prior_mu is not None,
            WITH_KL=with_kl,
            KL_DIRECTION=KL_DIRECTION_CODES[kl_direction],
            LAYOUT=tile_layout(stride_wn, stride_wk),
            **dot_options(a.dtype),
            **EXACT,
        )
    return out, partials.sum() if with_kl else partials
