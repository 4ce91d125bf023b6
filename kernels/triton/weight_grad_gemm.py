"""dW GEMM with the reparameterization epilogue (Linear): d_mu and d_rho straight from dy and x.

dW = dy^T @ x is accumulated tile by tile in registers; the epilogue regenerates eps for exactly the weight
elements of its tile (each produced once) and writes

    d_mu  = dW + g_kl * dKL/dmu
    d_rho = (dW * eps + g_kl * dKL/dsigma) * sigmoid(rho)

so dW never reaches memory and the backward needs no separate gradient pass over the weight.

Block names: BLOCK_N weight rows (outputs), BLOCK_K weight columns (inputs), BLOCK_M the reduction over rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..posterior_math import KL_DIRECTION_CODES
from .config import EXACT, PRUNE_WEIGHT_GRAD_GEMM, check_numel, dot_options, weight_grad_gemm_configs
from .gemm_tiles import mma, sampled_tile, tile_layout
from .reparam_grad import store_posterior_grads


@triton.autotune(
    configs=weight_grad_gemm_configs(),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": PRUNE_WEIGHT_GRAD_GEMM},
)
@triton.jit
def _weight_grad_kernel(
    dy_ptr,
    x_ptr,
    mu_ptr,
    rho_ptr,
    prior_ptr,
    seed_ptr,
    g_kl_ptr,  # dy [M, N], x [M, K]; weight tensors contiguous
    d_mu_ptr,
    d_rho_ptr,  # outputs [N, K] float32
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    prior_var,
    HAS_KL_GRAD: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    KL_DIRECTION: tl.constexpr,
    LAYOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dy_t = tl.load(
            dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
            mask=(offs_m[None, :] < M) & (offs_n[:, None] < N),
            other=0.0,
        )  # [BLOCK_N, BLOCK_M]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        dw = mma(dw, dy_t, x, INPUT_PRECISION, DOT_FP32)
    _, eps, mu, rho, sigma, index, mask = sampled_tile(
        mu_ptr,
        rho_ptr,
        tl.load(seed_ptr),
        tl.program_id(0) * BLOCK_N,
        tl.program_id(1) * BLOCK_K,
        K,
        1,
        N,
        K,
        LAYOUT,
        BLOCK_N,
        BLOCK_K,
    )
    store_posterior_grads(
        dw,
        dw * eps,
        mu,
        rho,
        sigma,
        index,
        mask,
        prior_ptr,
        g_kl_ptr,
        d_mu_ptr,
        d_rho_ptr,
        prior_var,
        HAS_KL_GRAD,
        HAS_PRIOR,
        KL_DIRECTION,
    )


def reparameterized_weight_grad(dy, x, mu, rho, prior_mu, seed, g_kl, prior_sigma: float, kl_direction: str):
    """Returns ``(d_mu, d_rho)`` (float32, mu's shape [N, K]) for y = x @ w^T, w = mu + softplus(rho) * eps(seed).

    dy: [M, N] and x: [M, K] in the compute dtype, any strides; g_kl: the KL's upstream gradient (one
    element) or None; mu, rho, prior_mu, seed as in :func:`sample_kl.sample_weight_and_kl`.
    """
    n_out, n_in = mu.shape
    check_numel(mu.numel())
    if dy.shape[1] != n_out or x.shape[1] != n_in or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} do not match the weight {tuple(mu.shape)}")
    if g_kl is None:  # prior and direction are not read: one compiled kernel serves them all
        prior_mu, kl_direction = None, "qp"
    d_mu = torch.empty_like(mu, dtype=torch.float32)
    d_rho = torch.empty_like(mu, dtype=torch.float32)
    if mu.numel():
        grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), triton.cdiv(n_in, meta["BLOCK_K"]))  # noqa: E731
        _weight_grad_kernel[grid](
            dy,
            x,
            mu,
            rho,
            mu if prior_mu is None else prior_mu,
            seed,
            seed if g_kl is None else g_kl,
            d_mu,
            d_rho,
            x.shape[0],
            n_out,
            n_in,
            dy.stride(0),
            dy.stride(1),
            x.stride(0),
            x.stride(1),
            prior_sigma**2,
            HAS_KL_GRAD=g_kl is not None,
            HAS_PRIOR=prior_mu is not None,
            KL_DIRECTION=KL_DIRECTION_CODES[kl_direction],
            LAYOUT=tile_layout(n_in, 1),
            **dot_options(x.dtype),
            **EXACT,
        )
    return d_mu, d_rho
