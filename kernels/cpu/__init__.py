"""C++ CPU twins of the Triton kernels (``csrc/reparameterization_cpu.cpp``), built on first use and cached.

Same RNG contract as ``philox.py``: one seed gives the same eps bit for bit on CPU and GPU. Built with
``torch.utils.cpp_extension`` (ninja, the C++ compiler torch was built with) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later imports load the cached library.
Threads: ATen's pool (``torch.set_num_threads``); results do not depend on the thread count. Instruction set:
the kernels are compiled for AVX-512, AVX2 and baseline x86-64 (baseline only elsewhere) and the best one the
CPU supports runs (:func:`instruction_set`; ``BAYESLAYERS_CPU_ISA=avx2|baseline`` or
:func:`set_instruction_set` picks a lower one); every one draws the same eps bit for bit, AVX-512 and AVX2
give the same results bit for bit (fused multiply-adds in the posterior arithmetic), baseline x86-64 (no FMA)
within a few ulp.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..kernel_ops import register_posterior_kernels
from ..posterior import KL_DIRECTION_CODES
from ..seeds import seed_tensor

SOURCE = Path(__file__).parent / "csrc" / "reparameterization_cpu.cpp"
EXTENSION_NAME = "bayeslayers_cpu_kernels"
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]  # no FMA contraction:
# eps bits as the Triton kernels (the posterior arithmetic asks for FMA explicitly); no trapping math: branch-free
# selects vectorise (results unchanged)


@functools.cache
def extension():
    """The compiled extension module (built on the first call of the process if not cached on disk)."""
    from torch.utils.cpp_extension import load

    return load(
        name=EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False
    )


@functools.cache
def unavailable_reason() -> str:
    """Why the extension cannot be built or loaded here ('' when it can)."""
    try:
        extension()
    except Exception as error:  # no compiler, no ninja, a failed build: reported, never raised at import
        return f"the C++ CPU kernels could not be built ({type(error).__name__}: {str(error).strip()[:300]})"
    return ""


def instruction_set() -> str:
    """The instruction set the kernels run with: 'avx512', 'avx2' or 'baseline'."""
    return extension().instruction_set()


def instruction_sets() -> list[str]:
    """The instruction sets this CPU (and build) supports, best first."""
    return list(extension().instruction_sets())


def set_instruction_set(name: str | None) -> None:
    """Runs the kernels with ``name`` (one of :func:`instruction_sets`); None or '' picks the best again."""
    extension().set_instruction_set(name or "")


def _seed_int(seed) -> int:
    if isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1 and seed.device.type == "cpu":
        return int(seed.item())  # the common case (a drawn seed): no conversion
    return int(seed_tensor(seed, torch.device("cpu")).item())


def _float32(tensor):
    return None if tensor is None else tensor.to(torch.float32).contiguous()


def _check_cpu(*tensors):
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "cpu":
            raise ValueError(f"the C++ kernels take CPU tensors, got one on {tensor.device}")


def philox_normal(seed, shape) -> torch.Tensor:
    """The float32 eps of a weight of ``shape`` for ``seed`` (int or int64 tensor): the Triton stream, on CPU."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    extension().philox_normal_into(_seed_int(seed), out)
    return out


def sample_weight_and_kl(
    mu, rho, prior_mu, seed, prior_sigma: float, kl_direction: str, out_dtype: torch.dtype, with_kl: bool = True
):
    """As ``sample_kl.sample_weight_and_kl``, on CPU tensors: ``(w in out_dtype, kl 0-d float32 or empty)``."""
    _check_cpu(mu, rho, prior_mu)
    w = torch.empty(mu.shape, dtype=out_dtype)
    kl = torch.empty(() if with_kl else (0,), dtype=torch.float32)  # written by the kernel: the summed KL
    extension().sample_weight_kl(
        _float32(mu),
        _float32(rho),
        _float32(prior_mu),
        _seed_int(seed),
        float(prior_sigma),
        KL_DIRECTION_CODES[kl_direction],
        w,
        kl,
    )
    return w, kl


def reparameterization_grad(
    d_w,
    mu,
    rho,
    prior_mu,
    seed,
    g_kl,
    prior_sigma: float,
    kl_direction: str,
    w_dtype: torch.dtype | None = None,
    d_mu: torch.Tensor | None = None,
):
    """As ``reparam_grad.reparameterization_grad``, on CPU tensors: ``(d_mu, d_rho, w or None)``.

    ``d_mu``: where to write d_mu (contiguous float32, mu's size); it may be ``d_w`` itself (then overwritten).
    """
    _check_cpu(d_w, mu, rho, prior_mu)
    if d_mu is None:
        d_mu = torch.empty(mu.shape, dtype=torch.float32)
    d_rho = torch.empty(mu.shape, dtype=torch.float32)
    w = None if w_dtype is None else torch.empty(mu.shape, dtype=w_dtype)
    extension().reparameterization_grad(
        _float32(d_w),
        _float32(mu),
        _float32(rho),
        _float32(prior_mu),
        _seed_int(seed),
        0.0 if g_kl is None else float(g_kl.item()),
        float(prior_sigma),
        KL_DIRECTION_CODES[kl_direction],
        d_mu,
        d_rho,
        w,
    )
    return d_mu, d_rho, w


CPU_KERNELS = register_posterior_kernels("cpu_", sample_weight_and_kl, reparameterization_grad, grad_into_d_w=True)
