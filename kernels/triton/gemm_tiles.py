"""Building blocks of the GEMM kernels: weight tiles generated in registers (eps of any block of flat weight
indices, w = mu + sigma * eps) and one tile product.

The elementwise kernels draw eps four at a time (one Philox counter per 4 consecutive elements). A GEMM tile
covers a block of rows and columns of the weight (or of its transpose): where its rows are runs of
consecutive elements starting at multiples of 4 (the weight's row length a multiple of 4, as at every SD
shape) the tile draws the same way, one counter per 4 elements; otherwise each element draws its own counter
``index // 4`` and keeps word ``index % 4``. Both give the numbers of the RNG contract of ``philox.py`` bit
for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..posterior_math import softplus
from .philox import box_muller, counter_normals

SCATTERED = tl.constexpr(0)
ROWS_ALONG_K = tl.constexpr(1)
ROWS_ALONG_N = tl.constexpr(2)


def tile_layout(stride_wn: int, stride_wk: int) -> int:
    """The ``tile_normals`` LAYOUT for a weight read with these strides (flat-index units)."""
    if stride_wk == 1 and stride_wn % 4 == 0:
        return ROWS_ALONG_K.value
    if stride_wn == 1 and stride_wk % 4 == 0:
        return ROWS_ALONG_N.value
    return SCATTERED.value


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
def sampled_tile(
    mu_ptr,
    rho_ptr,
    seed,
    n0,
    k0,
    stride_wn,
    stride_wk,
    N,
    K,
    LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(w, eps, mu, rho, sigma, index, mask) of the ``[BLOCK_N, BLOCK_K]`` weight tile at rows ``n0 + [0, BLOCK_N)``
    (< N) and columns ``k0 + [0, BLOCK_K)`` (< K) of a weight read through ``(stride_wn, stride_wk)``;
    float32, 0 outside the weight."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    index = tl.where(mask, offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, 0)
    mu = tl.load(mu_ptr + index, mask=mask, other=0.0)
    rho = tl.load(rho_ptr + index, mask=mask, other=0.0)
    eps = tile_normals(seed, n0, k0, stride_wn, stride_wk, LAYOUT, BLOCK_N, BLOCK_K)
    sigma = softplus(rho)
    w = tl.where(mask, mu + sigma * eps, 0.0)
    return w, eps, mu, rho, sigma, index, mask


@triton.jit
def mma(acc, a, b, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b with float32 accumulation (options from ``config.dot_options``)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def normal_rows(seed, row_start, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """eps of the flat indices ``row_start[:, None] + [0, BLOCK_C)``, ``[BLOCK_R, BLOCK_C]`` float32, for rows
    that start at multiples of 4: one Philox counter per 4 elements, as the elementwise kernels draw them."""
    group = (row_start >> 2)[:, None] + tl.arange(0, BLOCK_C // 4)[None, :]
    n0, n1, n2, n3 = counter_normals(seed, group)
    # join(join(n0, n2), join(n1, n3))[r, g, c, i] = n_{2c + i}: row-major flattening gives n0, n1, n2, n3.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK_R, BLOCK_C))


@triton.jit
def tile_normals(
    seed, n0, k0, stride_wn, stride_wk, LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """eps of the ``[BLOCK_N, BLOCK_K]`` tile at flat indices ``(n0 + i) * stride_wn + (k0 + j) * stride_wk``.

    LAYOUT ``ROWS_ALONG_K`` (stride_wk == 1, stride_wn % 4 == 0) and ``ROWS_ALONG_N`` (stride_wn == 1,
    stride_wk % 4 == 0) draw one counter per 4 elements; ``SCATTERED`` one per element (any strides).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if LAYOUT == ROWS_ALONG_K:
        return normal_rows(seed, offs_n * stride_wn + k0, BLOCK_N, BLOCK_K)
    elif LAYOUT == ROWS_ALONG_N:
        return tl.trans(normal_rows(seed, offs_k * stride_wk + n0, BLOCK_K, BLOCK_N))
    else:
        return normal_at(seed, offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk)
