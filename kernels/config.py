"""Launch configurations shared by the elementwise kernels.

Every kernel here walks a weight as a flat array of ``numel`` elements, tiled as ``BLOCK_GROUPS`` Philox
counters x 4 words (one element per word), so a program covers ``4 * BLOCK_GROUPS`` elements.

On a GPU the autotuner picks among a few tile sizes per distinct ``numel`` (one tuning run per weight size,
cached for the process; no recompilation per step). Under ``TRITON_INTERPRET=1`` (CPU tests) there is one
large-tile config: the interpreter's cost is per program, not per element.
"""

from __future__ import annotations

import os

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
WORDS_PER_COUNTER = 4  # Philox4x32 yields four 32-bit words per counter value
INTERPRETER_BLOCK_GROUPS = 1024
MAX_NUMEL = 2**31 - 1  # flat element indices stay int32 (the RNG contract's offsets)
# Launch options of every kernel that draws eps: no fused multiply-add contraction, so float32 results are
# the same on a GPU, in the interpreter and in the C++ CPU kernels (see philox.py).
EXACT = {"enable_fp_fusion": False}


def elementwise_configs() -> list[triton.Config]:
    """Autotune candidates for the sample/grad/noise kernels (one config when interpreting)."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_GROUPS": INTERPRETER_BLOCK_GROUPS}, num_warps=4)]
    return [
        triton.Config({"BLOCK_GROUPS": 128}, num_warps=4),
        triton.Config({"BLOCK_GROUPS": 256}, num_warps=4),
        triton.Config({"BLOCK_GROUPS": 512}, num_warps=8),
        triton.Config({"BLOCK_GROUPS": 1024}, num_warps=8),
    ]


def smallest_block_elements() -> int:
    """Elements per program of the smallest config (sizes buffers indexed by program id)."""
    return WORDS_PER_COUNTER * min(c.kwargs["BLOCK_GROUPS"] for c in elementwise_configs())


def check_numel(numel: int) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(f"weights with more than {MAX_NUMEL} elements are not supported (int32 RNG offsets), "
                         f"got {numel}")

