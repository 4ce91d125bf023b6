"""One pass: weight sample w = mu + softplus(rho) * eps in the compute dtype, plus per-program KL partial sums.

Reads mu, rho (float32, contiguous, weight-shaped) and optionally the prior mean (any float dtype); eps is
regenerated from (seed, flat index) as ``philox.py`` documents. The KL of each program's tile goes to
``kl_partials[program_id]`` (no atomics); a second reduction over that small vector gives the total, so the
result does not depend on scheduling. Autotune reruns are harmless: every output is overwritten, never
accumulated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..posterior_math import KL_DIRECTION_CODES, kl_element, load_gap, softplus
from .config import EXACT, check_numel, elementwise_configs, smallest_block_elements
from .philox import grid_over, normal_tile, tile_indices


@triton.autotune(configs=elementwise_configs(), key=["numel"])
@triton.jit
def _sample_weight_kl_kernel(
    mu_ptr,
    rho_ptr,
    prior_ptr,
    seed_ptr,  # inputs: [numel] float32, float32, any float (or dummy), int64[1]
    w_ptr,
    kl_partials_ptr,  # outputs: [numel] compute dtype, [n_programs] float32
    numel,
    prior_sigma,
    HAS_PRIOR: tl.constexpr,
    KL_DIRECTION: tl.constexpr,
    WITH_KL: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    group, index = tile_indices(BLOCK_GROUPS)
    mask = index < numel
    mu = tl.load(mu_ptr + index, mask=mask, other=0.0)
    rho = tl.load(rho_ptr + index, mask=mask, other=0.0)
    sigma = softplus(rho)
    eps = normal_tile(tl.load(seed_ptr), group)
    tl.store(w_ptr + index, (mu + sigma * eps).to(w_ptr.dtype.element_ty), mask=mask)
    if WITH_KL:
        gap = load_gap(mu, prior_ptr, index, mask, HAS_PRIOR)
        kl = tl.where(mask, kl_element(gap, sigma, prior_sigma, KL_DIRECTION), 0.0)
        tl.store(kl_partials_ptr + tl.program_id(0), tl.sum(tl.sum(kl, axis=1), axis=0))


def sample_weight_and_kl(
    mu, rho, prior_mu, seed, prior_sigma: float, kl_direction: str, out_dtype: torch.dtype, with_kl: bool = True
):
    """Returns ``(w, kl)``: w of mu's shape in ``out_dtype``; kl a 0-d float32 tensor (nats, summed), or an
    empty tensor when ``with_kl`` is False.

    mu, rho: contiguous float32; prior_mu: contiguous, any float dtype, or None (zero mean); seed: int64
    tensor of one element on mu's device.
    """
    numel = mu.numel()
    check_numel(numel)
    if not with_kl:  # prior and direction are not read: one compiled kernel serves them all
        prior_mu, kl_direction = None, "qp"
    w = torch.empty(mu.shape, dtype=out_dtype, device=mu.device)
    n_partials = triton.cdiv(numel, smallest_block_elements()) if with_kl else 0
    partials = torch.zeros(n_partials, dtype=torch.float32, device=mu.device)
    if numel:
        _sample_weight_kl_kernel[grid_over(numel)](
            mu,
            rho,
            mu if prior_mu is None else prior_mu,
            seed,
            w,
            partials,
            numel,
            prior_sigma,
            HAS_PRIOR=prior_mu is not None,
            KL_DIRECTION=KL_DIRECTION_CODES[kl_direction],
            WITH_KL=with_kl,
            **EXACT,
        )
    kl = partials.sum() if with_kl else partials
    return w, kl
