"""Launch configurations shared by the elementwise and the GEMM kernels.

Every elementwise kernel walks a weight as a flat array of ``numel`` elements, tiled as ``BLOCK_GROUPS`` Philox
counters x 4 words (one element per word), so a program covers ``4 * BLOCK_GROUPS`` elements.

On a GPU the autotuner picks among a few tile sizes per distinct ``numel`` (one tuning run per weight size,
cached for the process; no recompilation per step). Under ``TRITON_INTERPRET=1`` (CPU tests) there is one
large-tile config: the interpreter's cost is per program, not per element.
"""

from __future__ import annotations

import torch
import triton

from .interpreter import INTERPRETING

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
        raise ValueError(
            f"weights with more than {MAX_NUMEL} elements are not supported (int32 RNG offsets), got {numel}"
        )


INTERPRETER_GEMM_BLOCK = 32


def _gemm_config_list(shapes) -> list[triton.Config]:
    if INTERPRETING:
        block = INTERPRETER_GEMM_BLOCK
        return [triton.Config({"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Every config the autotuner may pick compiles for sm_80, sm_86,
# sm_89 and sm_90 without local memory and within each target's shared memory (``python -m
# bayeslayers.kernels.aot``; benchmarks/results/aot_compile.csv). Each GEMM has a list for bf16/fp16 operands
# and one for float32 operands (IEEE dots run on FMA units with every operand in registers, TF32 tiles take
# twice the shared memory), chosen per launch by ``prune_gemm_configs``.
#
# Sample-in-GEMM (sampled_matmul.py): each weight tile [BLOCK_N, BLOCK_K] is drawn in registers (Philox +
# Box-Muller per element) every K step, so the tile holds at most 8 elements per thread: 16 and more spilled
# 0.3-2.4 KB per thread at 255 registers (e.g. 64x128x32 / 4 warps, 32x128x64 / 4 warps). At most 3 stages:
# the float32 mu and rho tiles are pipelined through shared memory, and 4 stages of 128x64 fp32 tiles needed
# 220-245 KB (over every target's limit). BLOCK_M is the few rows of x this path is for. float32: 64x64x32 and
# 128x64x32 spilled 8-40 B on sm_80.
SAMPLED_GEMM_SHAPES = [
    (16, 64, 32, 8, 3),
    (32, 64, 32, 8, 3),
    (64, 64, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (16, 128, 16, 8, 3),
    (64, 128, 16, 8, 3),
    (16, 64, 16, 4, 3),
]
# 16x128x16 / 8 warps spilled 8 B on sm_80 in the input gradient at unaligned sizes: not used there.
SAMPLED_UNALIGNED_EXCLUDED = [(16, 128, 16, 8, 3)]
FP32_SAMPLED_GEMM_SHAPES = [
    (16, 64, 32, 8, 3),
    (32, 64, 32, 8, 3),
    (16, 128, 16, 8, 3),
    (64, 128, 16, 8, 3),
    (16, 64, 16, 4, 3),
]
# dW GEMM with the reparameterization epilogue (weight_grad_gemm.py): BLOCK_M is the reduction; the epilogue
# holds dW, mu, rho, sigma and eps of a [BLOCK_N, BLOCK_K] tile at once, so the tile is at most 16 elements per
# thread (32 spilled: 64x128x32 / 4 warps, 64x64x64 / 4 warps; 64 per thread spilled 2.5-6.9 KB; 64x128x32 /
# 8 warps still spilled 32 B on sm_86/sm_89). 128x128x32 spilled 8 B on sm_90 when N or K is not a multiple of
# 16 (unaligned loads): not used there. float32: every tile of 64x64 and more spilled 24 B-6.4 KB or needed
# 128-240 KB of shared memory (TF32): small tiles only.
WEIGHT_GRAD_GEMM_SHAPES = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 64, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 64, 32, 4, 3),
]
FP32_WEIGHT_GRAD_GEMM_SHAPES = [(64, 64, 32, 8, 2), (32, 64, 32, 8, 3), (64, 32, 32, 4, 3), (32, 32, 64, 4, 3)]
WEIGHT_GRAD_UNALIGNED_EXCLUDED = [(128, 128, 32, 8, 3)]
# Plain GEMM tiles (lora_matmul.py): no generated operand. With 4 warps, 64x64 and larger tiles spilled 8-376 B
# at unaligned sizes (masked scalar loads; 128x64x32, 64x128x32, 64x64x64, 32x128x64, 16x128x64, 16x64x128),
# and 4 stages of 128-wide fp32 tiles needed 121-134 KB of shared memory (over sm_86/sm_89's 99 KB): 8 warps
# for the large tiles, 3 stages. float32: every tile of 64x64 and more spilled 16-784 B.
GEMM_SHAPES = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 64, 8, 3),
    (32, 64, 32, 4, 3),
    (16, 64, 64, 4, 3),
]
FP32_GEMM_SHAPES = [(32, 64, 32, 4, 3), (16, 64, 64, 4, 3)]


def _union(*lists):
    return list(dict.fromkeys(shape for shapes in lists for shape in shapes))


def config_shape(config) -> tuple:
    return (
        config.kwargs["BLOCK_M"],
        config.kwargs["BLOCK_N"],
        config.kwargs["BLOCK_K"],
        config.num_warps,
        config.num_stages,
    )


def prune_gemm_configs(low_precision, fp32, operand: str, unaligned_excluded=()):
    """An ``early_config_prune``: launches whose ``operand`` is float32 keep the ``fp32`` shapes, others the
    ``low_precision`` ones, less ``unaligned_excluded`` when N or K is not a multiple of 16. Keeps every config
    when none matches (the interpreter's single config)."""

    def prune(configs, named_args, **kwargs):
        is_fp32 = getattr(named_args.get(operand), "dtype", None) == torch.float32
        allowed = set(fp32 if is_fp32 else low_precision)
        if named_args.get("N", 0) % 16 or named_args.get("K", 0) % 16:
            allowed -= set(unaligned_excluded)
        return [c for c in configs if config_shape(c) in allowed] or configs

    return prune


def gemm_configs() -> list[triton.Config]:
    """Autotune candidates of the LoRA GEMM (``BLOCK_M`` rows of x, ``BLOCK_N`` outputs, ``BLOCK_K``
    reduction). One small config when interpreting."""
    return _gemm_config_list(_union(GEMM_SHAPES, FP32_GEMM_SHAPES))


def sampled_gemm_configs() -> list[triton.Config]:
    """Autotune candidates of the sample-in-GEMM kernel (see ``SAMPLED_GEMM_SHAPES``)."""
    return _gemm_config_list(_union(SAMPLED_GEMM_SHAPES, FP32_SAMPLED_GEMM_SHAPES))


def weight_grad_gemm_configs() -> list[triton.Config]:
    """Autotune candidates of the dW GEMM with the reparameterization epilogue (see ``WEIGHT_GRAD_GEMM_SHAPES``)."""
    return _gemm_config_list(_union(WEIGHT_GRAD_GEMM_SHAPES, FP32_WEIGHT_GRAD_GEMM_SHAPES))


PRUNE_LORA_GEMM = prune_gemm_configs(GEMM_SHAPES, FP32_GEMM_SHAPES, "x_ptr")
PRUNE_SAMPLED_GEMM = prune_gemm_configs(
    SAMPLED_GEMM_SHAPES, FP32_SAMPLED_GEMM_SHAPES, "a_ptr", SAMPLED_UNALIGNED_EXCLUDED
)
PRUNE_WEIGHT_GRAD_GEMM = prune_gemm_configs(
    WEIGHT_GRAD_GEMM_SHAPES, FP32_WEIGHT_GRAD_GEMM_SHAPES, "x_ptr", WEIGHT_GRAD_UNALIGNED_EXCLUDED
)


def dot_options(dtype: torch.dtype) -> dict:
    """constexpr options of ``gemm_tiles.mma`` for operands of ``dtype``: float32 GEMMs follow
    torch's TF32 setting (as cuBLAS does); bf16 dots go through float32 under the interpreter, whose bf16
    ``tl.dot`` is wrong (a CPU-only workaround; GPUs take bf16 operands directly)."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"INPUT_PRECISION": "tf32" if tf32 else "ieee", "DOT_FP32": INTERPRETING and dtype == torch.bfloat16}
