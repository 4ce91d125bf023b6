"""One pass: gradients of mu and rho through the reparameterization w = mu + softplus(rho) * eps.

With dW the gradient of the loss w.r.t. the sampled weight and g_kl the upstream gradient of the summed KL:

    d_mu  = dW + g_kl * dKL/dmu
    d_rho = (dW * eps + g_kl * dKL/dsigma) * sigmoid(rho)

eps is regenerated from the seed (never stored). Optionally the same pass writes the weight sample w again
(the input gradient dx = dy @ w needs it), so the backward costs one Philox pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..posterior_math import KL_DIRECTION_CODES, kl_element_grads, load_gap, sigmoid, softplus
from .config import EXACT, check_numel, elementwise_configs
from .philox import grid_over, normal_tile, tile_indices


@triton.jit
def store_posterior_grads(
    d_mu,
    d_sigma,
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
    HAS_KL_GRAD: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    KL_DIRECTION: tl.constexpr,
):
    """Adds the KL's gradient (upstream ``g_kl``) to the loss's (d_mu, d_sigma) of a tile and stores d_mu and
    d_rho = d_sigma * sigmoid(rho) at ``index``."""
    if HAS_KL_GRAD:
        g_kl = tl.load(g_kl_ptr).to(tl.float32)
        gap = load_gap(mu, prior_ptr, index, mask, HAS_PRIOR)
        g_mu, g_sigma = kl_element_grads(gap, sigma, prior_var, KL_DIRECTION)
        d_mu += g_kl * g_mu
        d_sigma += g_kl * g_sigma
    tl.store(d_mu_ptr + index, d_mu, mask=mask)
    tl.store(d_rho_ptr + index, d_sigma * sigmoid(rho), mask=mask)


@triton.autotune(configs=elementwise_configs(), key=["numel"])
@triton.jit
def _reparameterization_grad_kernel(
    dw_ptr,
    mu_ptr,
    rho_ptr,
    prior_ptr,
    seed_ptr,
    g_kl_ptr,  # [numel] any float, f32, f32, any float; int64[1]; [1]
    d_mu_ptr,
    d_rho_ptr,
    w_ptr,  # outputs: [numel] float32, float32, compute dtype
    numel,
    prior_var,
    HAS_DW: tl.constexpr,
    HAS_KL_GRAD: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    KL_DIRECTION: tl.constexpr,
    WRITE_W: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    group, index = tile_indices(BLOCK_GROUPS)
    mask = index < numel
    mu = tl.load(mu_ptr + index, mask=mask, other=0.0)
    rho = tl.load(rho_ptr + index, mask=mask, other=0.0)
    sigma = softplus(rho)
    d_mu = tl.zeros_like(mu)
    d_sigma = tl.zeros_like(mu)
    if HAS_DW or WRITE_W:
        eps = normal_tile(tl.load(seed_ptr), group)
        if HAS_DW:
            dw = tl.load(dw_ptr + index, mask=mask, other=0.0).to(tl.float32)
            d_mu = dw
            d_sigma = dw * eps
        if WRITE_W:
            tl.store(w_ptr + index, (mu + sigma * eps).to(w_ptr.dtype.element_ty), mask=mask)
    store_posterior_grads(
        d_mu,
        d_sigma,
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


def reparameterization_grad(
    d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma: float, kl_direction: str, w_dtype: torch.dtype | None = None
):
    """Returns ``(d_mu, d_rho, w)``: float32 gradients of mu's shape, and the weight sample in ``w_dtype``
    (None when ``w_dtype`` is None).

    d_w: the weight gradient (contiguous, any float dtype) or None; g_kl: the KL's upstream gradient (tensor
    of one element) or None; mu, rho, prior_mu, seed as in :func:`sample_weight_and_kl`.
    """
    numel = mu.numel()
    check_numel(numel)
    if g_kl is None:  # prior and direction are not read: one compiled kernel serves them all
        prior_mu, kl_direction = None, "qp"
    d_mu = torch.empty_like(mu, dtype=torch.float32)
    d_rho = torch.empty_like(mu, dtype=torch.float32)
    w = None if w_dtype is None else torch.empty(mu.shape, dtype=w_dtype, device=mu.device)
    if numel:
        _reparameterization_grad_kernel[grid_over(numel)](
            mu if d_w is None else d_w,
            mu,
            rho,
            mu if prior_mu is None else prior_mu,
            seed,
            seed if g_kl is None else g_kl,
            d_mu,
            d_rho,
            d_mu if w is None else w,
            numel,
            prior_sigma**2,
            HAS_DW=d_w is not None,
            HAS_KL_GRAD=g_kl is not None,
            HAS_PRIOR=prior_mu is not None,
            KL_DIRECTION=KL_DIRECTION_CODES[kl_direction],
            WRITE_W=w is not None,
            **EXACT,
        )
    return d_mu, d_rho, w
