"""Building blocks of the GEMM kernels: weight tiles generated in registers (eps of any block of flat weight
indices, w = mu + sigma * eps) and one tile product.

The elementwise kernels draw eps four at a time (one Philox counter per 4 consecutive elements). A GEMM tile
covers arbitrary rows and columns of the weight (or of its transpose), so here each element draws its own
counter ``index // 4`` and keeps word ``index % 4``: the same numbers bit for bit (the RNG contract of
``philox.py``), at four Philox evaluations per element instead of one -- the price of regenerating a weight
inside a GEMM, which is why sampling in the GEMM pays only where x has few rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .philox import box_muller
from .posterior_math import softplus


@triton.jit
def normal_at(seed, index):
    """eps of the flat weight indices ``index`` (int32 block of any shape, each in [0, 2**31)), float32."""
    w0, w1, w2, w3 = tl.randint4x(seed, index >> 2)
    word = index & 3
    first_pair = word < 2
    radius, angle = tl.where(first_pair, w0, w2), tl.where(first_pair, w1, w3)
    n_cos, n_sin = box_muller(radius, angle)
    return tl.where((word & 1) == 0, n_cos, n_sin)


@triton.jit
def sampled_tile(mu_ptr, rho_ptr, seed, index, mask):
    """(w, eps, mu, rho) float32 at ``index`` (flat indices into contiguous mu/rho); 0 where ``mask`` is False."""
    index = tl.where(mask, index, 0)
    mu = tl.load(mu_ptr + index, mask=mask, other=0.0)
    rho = tl.load(rho_ptr + index, mask=mask, other=0.0)
    eps = normal_at(seed, index)
    w = tl.where(mask, mu + softplus(rho) * eps, 0.0)
    return w, eps, mu, rho


@triton.jit
def mma(acc, a, b, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b with float32 accumulation (options from ``config.dot_options``)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
