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
      theta = float32(int32(w_odd)) * (pi / 2**31)      # in [-pi, pi)
      eps   = (r * cos(theta), r * sin(theta))

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

from .config import check_numel, elementwise_configs
from .seeds import seed_tensor

TWO_POW_M32 = tl.constexpr(2.0**-32)
TWO_POW_M33 = tl.constexpr(2.0**-33)
ANGLE_PER_INT32 = tl.constexpr(math.pi / 2.0**31)


@triton.jit
def box_muller(radius_word, angle_word):
    """Two independent N(0, 1) blocks from two blocks of uint32 Philox words."""
    u = radius_word.to(tl.float32) * TWO_POW_M32 + TWO_POW_M33
    radius = tl.sqrt(-2.0 * tl.log(u))
    theta = angle_word.to(tl.int32, bitcast=True).to(tl.float32) * ANGLE_PER_INT32
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def normal_tile(seed, group):
    """eps of elements ``4 * group[:, None] + [0, 1, 2, 3]``: a ``[BLOCK_GROUPS, 4]`` float32 tile.

    ``seed``: int64 scalar; ``group``: int32 ``[BLOCK_GROUPS]`` Philox counters (global, not tile-local).
    """
    w0, w1, w2, w3 = tl.randint4x(seed, group)
    n0, n1 = box_muller(w0, w1)
    n2, n3 = box_muller(w2, w3)
    word = tl.arange(0, 4)[None, :]
    return tl.where(word == 0, n0[:, None],
                    tl.where(word == 1, n1[:, None], tl.where(word == 2, n2[:, None], n3[:, None])))


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
        _philox_normal_kernel[grid_over(numel)](seed, out, numel)
    return out


def philox_normal(seed, shape, device="cpu") -> torch.Tensor:
    """The float32 eps of a weight of ``shape`` for ``seed`` (Python int or int64 tensor), on ``device``.

    Debug/test view of the stream the sampling and gradient kernels use (see the RNG contract above).
    """
    device = torch.device(device)
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    return philox_normal_into(seed_tensor(seed, device), out)
