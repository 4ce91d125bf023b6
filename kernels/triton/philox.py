"""Standard normals from Philox4x32-10, and the RNG contract every kernel of this package follows.

RNG contract
------------
eps of a weight is a pure function of (seed, flat element index):

* ``seed``: a 64-bit integer (int64 tensor on the device; see ``seeds.py``). Its low and high 32 bits are
  the Philox key ``(k0, k1)``. Layer id, step and user seed are mixed into it, never into the offset.
* element ``i`` (row-major index into the weight, ``0 <= i < 2**31``) uses counter ``(i // 4, 0, 0, 0)``
  and takes word ``i % 4`` of Philox4x32-10 (``tl.randint4x``): all four words are used, one per element.
* words ``(w0, w1)`` give elements ``4g, 4g+1`` and ``(w2, w3)`` give ``4g+2, 4g+3`` by Box-Muller::

      u     = float32(w_even) * 2**-32 + 2**-33          # in (0, 1]: log(u) is finite
      r     = sqrt(-2 * log(u))
      theta = w_odd * 2 pi / 2**32                       # a uniform angle
      eps   = (r * cos(theta), r * sin(theta))

  in float32 with IEEE-exact operations only (+, -, *, correctly rounded division and square root, integer
  and bit operations, no fused multiply-add): ``log`` from the exponent bits and an odd series in
  s = (m - 1) / (m + 1), ``cos``/``sin`` from the quadrant in the word's top bits and Taylor series on
  [-pi/4, pi/4]. No libm call means no implementation-defined rounding, so the C++ CPU kernels
  (``csrc/reparameterization_cpu.cpp``) reproduce every eps bit for bit.

Offsets come from global indices, never tile indices, so the forward, the backward and every autotune
config produce the same eps bit for bit on one device. The stream depends on the Triton Philox
implementation (validated with Triton 3.4-3.9 semantics: counter ``(offset, 0, 0, 0)``, key ``(seed_lo,
seed_hi)``); ``tests/test_triton_kernels.py`` pins it against an independent Philox4x32-10.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..seeds import seed_tensor
from .config import EXACT, check_numel, elementwise_configs
from .interpreter import prepare_interpreter

prepare_interpreter()  # every Triton kernel module imports this one

TWO_POW_M32 = tl.constexpr(2.0**-32)
TWO_POW_M33 = tl.constexpr(2.0**-33)
SQRT2 = tl.constexpr(math.sqrt(2.0))
LN2 = tl.constexpr(math.log(2.0))
RADIANS_PER_UNIT = tl.constexpr(math.pi / 2.0**31)  # a quarter turn is 2**30 units
# Series coefficients (float64 here, rounded to float32 by the kernels exactly as the C++ twin rounds them).
LOG_C11, LOG_C9, LOG_C7 = tl.constexpr(2.0 / 11.0), tl.constexpr(2.0 / 9.0), tl.constexpr(2.0 / 7.0)
LOG_C5, LOG_C3, LOG_C1 = tl.constexpr(2.0 / 5.0), tl.constexpr(2.0 / 3.0), tl.constexpr(2.0)
SIN_C11, SIN_C9, SIN_C7 = tl.constexpr(-1.0 / 39916800.0), tl.constexpr(1.0 / 362880.0), tl.constexpr(-1.0 / 5040.0)
SIN_C5, SIN_C3 = tl.constexpr(1.0 / 120.0), tl.constexpr(-1.0 / 6.0)
COS_C12, COS_C10, COS_C8 = tl.constexpr(1.0 / 479001600.0), tl.constexpr(-1.0 / 3628800.0), tl.constexpr(1.0 / 40320.0)
COS_C6, COS_C4, COS_C2 = tl.constexpr(-1.0 / 720.0), tl.constexpr(1.0 / 24.0), tl.constexpr(-0.5)


@triton.jit
def log_unit(u):
    """Natural log of float32 u in (0, 1]: exponent bits + odd series in s = (m - 1) / (m + 1), |s| < 0.172."""
    bits = u.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) - 127
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    high = mantissa > SQRT2
    mantissa = tl.where(high, mantissa * 0.5, mantissa)  # [sqrt(1/2), sqrt(2)]
    exponent = tl.where(high, exponent + 1, exponent)
    s = tl.div_rn(mantissa - 1.0, mantissa + 1.0)
    z = s * s
    p = z * LOG_C11 + LOG_C9
    p = p * z + LOG_C7
    p = p * z + LOG_C5
    p = p * z + LOG_C3
    p = p * z + LOG_C1
    return exponent.to(tl.float32) * LN2 + s * p


@triton.jit
def cos_sin_turn(word):
    """cos and sin of the angle ``word * 2 pi / 2**32`` (uint32 word), float32."""
    quadrant = ((word + 0x20000000) >> 30) & 3  # nearest quarter turn
    a = (word - (quadrant << 30)).to(tl.int32, bitcast=True).to(tl.float32) * RADIANS_PER_UNIT  # [-pi/4, pi/4]
    z = a * a
    ps = z * SIN_C11 + SIN_C9
    ps = ps * z + SIN_C7
    ps = ps * z + SIN_C5
    ps = ps * z + SIN_C3
    sin_a = a + (a * z) * ps
    pc = z * COS_C12 + COS_C10
    pc = pc * z + COS_C8
    pc = pc * z + COS_C6
    pc = pc * z + COS_C4
    pc = pc * z + COS_C2
    cos_a = 1.0 + z * pc
    cos = tl.where(quadrant == 0, cos_a, tl.where(quadrant == 1, -sin_a, tl.where(quadrant == 2, -cos_a, sin_a)))
    sin = tl.where(quadrant == 0, sin_a, tl.where(quadrant == 1, cos_a, tl.where(quadrant == 2, -sin_a, -cos_a)))
    return cos, sin


@triton.jit
def box_muller(radius_word, angle_word):
    """Two independent N(0, 1) blocks from two blocks of uint32 Philox words."""
    u = radius_word.to(tl.float32) * TWO_POW_M32 + TWO_POW_M33
    radius = tl.sqrt_rn(-2.0 * log_unit(u))
    cos, sin = cos_sin_turn(angle_word)
    return radius * cos, radius * sin


@triton.jit
def counter_normals(seed, group):
    """The four eps of each Philox counter in ``group`` (elements ``4 * group + 0..3``), float32 blocks of
    group's shape."""
    w0, w1, w2, w3 = tl.randint4x(seed, group)
    n0, n1 = box_muller(w0, w1)
    n2, n3 = box_muller(w2, w3)
    return n0, n1, n2, n3


@triton.jit
def normal_tile(seed, group):
    """eps of elements ``4 * group[:, None] + [0, 1, 2, 3]``: a ``[BLOCK_GROUPS, 4]`` float32 tile.

    ``seed``: int64 scalar; ``group``: int32 ``[BLOCK_GROUPS]`` Philox counters (global, not tile-local).
    """
    n0, n1, n2, n3 = counter_normals(seed, group)
    word = tl.arange(0, 4)[None, :]
    return tl.where(
        word == 0, n0[:, None], tl.where(word == 1, n1[:, None], tl.where(word == 2, n2[:, None], n3[:, None]))
    )


@triton.jit
def tile_indices(BLOCK_GROUPS: tl.constexpr):
    """This program's Philox counters ``[BLOCK_GROUPS]`` and flat element indices ``[BLOCK_GROUPS, 4]``."""
    group = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    index = group[:, None] * 4 + tl.arange(0, 4)[None, :]
    return group, index


@triton.autotune(configs=elementwise_configs(), key=["numel"])
@triton.jit
def _philox_normal_kernel(seed_ptr, out_ptr, numel, BLOCK_GROUPS: tl.constexpr):
    group, index = tile_indices(BLOCK_GROUPS)
    eps = normal_tile(tl.load(seed_ptr), group)
    tl.store(out_ptr + index, eps, mask=index < numel)


def grid_over(numel: int):
    """Launch grid for the elementwise kernels: one program per 4 * BLOCK_GROUPS elements."""
    return lambda meta: (triton.cdiv(numel, 4 * meta["BLOCK_GROUPS"]),)


def philox_normal_into(seed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fills the contiguous float32 ``out`` with the eps of (seed, out.numel()) and returns it."""
    numel = out.numel()
    check_numel(numel)
    if numel:
        _philox_normal_kernel[grid_over(numel)](seed, out, numel, **EXACT)
    return out


def philox_normal(seed, shape, device="cpu") -> torch.Tensor:
    """The float32 eps of a weight of ``shape`` for ``seed`` (Python int or int64 tensor), on ``device``.

    Debug/test view of the stream the sampling and gradient kernels use (see the RNG contract above).
    """
    device = torch.device(device)
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    return philox_normal_into(seed_tensor(seed, device), out)
