"""Elementwise math of the Gaussian posterior, shared by the sampling and gradient kernels (float32).

q = N(mu, sigma^2) with sigma = softplus(rho); prior p = N(m, s^2); ``gap = mu - m``. KL per element in
nats, as ``bayeslayers.kl`` defines it:

* ``KL_QP`` (KL(q || p)): log s - log sigma + (sigma^2 + gap^2) / (2 s^2) - 1/2
* ``KL_PQ`` (KL(p || q)): log sigma - log s + (s^2 + gap^2) / (2 sigma^2) - 1/2

Scalars passed by the host (float64 there, float32 here): ``prior_sigma = s`` and ``prior_var = s^2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .posterior import KL_DIRECTION_CODES  # noqa: F401  (re-exported for the kernels)

KL_QP = tl.constexpr(0)
KL_PQ = tl.constexpr(1)


@triton.jit
def log1p(z):
    """log(1 + z), exact to a few ulps even when 1 + z rounds (Goldberg: log(1 + z) * z / ((1 + z) - 1))."""
    one_plus_z = 1.0 + z
    rounded_z = one_plus_z - 1.0
    return tl.where(rounded_z == 0.0, z, tl.log(one_plus_z) * (z / tl.where(rounded_z == 0.0, 1.0, rounded_z)))


@triton.jit
def softplus(rho):
    """log(1 + exp(rho)) without cancellation for very negative rho; rho itself above 20 (as F.softplus)."""
    return tl.where(rho > 20.0, rho, tl.maximum(rho, 0.0) + log1p(tl.exp(-tl.abs(rho))))


@triton.jit
def sigmoid(rho):
    """d softplus / d rho."""
    return 1.0 / (1.0 + tl.exp(-rho))


@triton.jit
def kl_element(gap, sigma, prior_sigma, DIRECTION: tl.constexpr):
    """Closed-form KL per element (nats), in r = sigma / s and t = r - 1: exactly 0 when q equals p."""
    r = sigma / prior_sigma
    t = r - 1.0
    g = gap / prior_sigma
    log_r = log1p(t)
    if DIRECTION == KL_QP:
        return 0.5 * t * (r + 1.0) - log_r + 0.5 * g * g
    else:
        r2 = r * r
        return log_r - 0.5 * t * (r + 1.0) / r2 + 0.5 * g * g / r2


@triton.jit
def kl_element_grads(gap, sigma, prior_var, DIRECTION: tl.constexpr):
    """(dKL/dmu, dKL/dsigma) per element."""
    if DIRECTION == KL_QP:
        return gap / prior_var, sigma / prior_var - 1.0 / sigma
    else:
        inv_var = 1.0 / (sigma * sigma)
        return gap * inv_var, 1.0 / sigma - (prior_var + gap * gap) * inv_var / sigma


@triton.jit
def load_gap(mu, prior_ptr, index, mask, HAS_PRIOR: tl.constexpr):
    """mu - prior mean (prior of any float dtype, read as float32); mu itself for a zero-mean prior."""
    if HAS_PRIOR:
        return mu - tl.load(prior_ptr + index, mask=mask, other=0.0).to(tl.float32)
    else:
        return mu
