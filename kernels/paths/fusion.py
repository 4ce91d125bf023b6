"""Which Triton path a Bayesian Linear / LoRA takes, and running it.

Paths (each computes the same function with the same eps; they differ in speed only):

* ``sample_then_gemm``: one pass samples w in the compute dtype (+ KL), then cuBLAS / cuDNN; the backward
  regenerates eps in the pass that forms d_mu and d_rho (``reparameterized.py``). Every op; the fallback.
* ``sample_in_gemm`` (Linear): the weight tiles are built inside the forward and input-gradient GEMMs
  (``sampled_matmul.py``) and d_mu / d_rho come from the dW GEMM's epilogue: no weight sample is written.
* ``dw_epilogue`` (Linear): sample-then-GEMM forward, d_mu / d_rho from the dW GEMM's epilogue
  (``weight_grad_gemm.py``) instead of a cuBLAS dW followed by the gradient pass.
* ``fused_lora`` (LoRA on a Linear): base + adapter in one GEMM (``lora_matmul.py``); ``unfused_lora`` is the
  base GEMM plus the two adapter GEMMs.

Who decides, first match wins:

1. an explicit policy: ``set_fusion_policy(...)`` or the ``fusion(...)`` context (a :class:`FusionPolicy`);
2. ``BAYESLAYERS_FUSION``: ``off`` (sample-then-GEMM, unfused LoRA everywhere), ``force:<path>`` (that path
   wherever it applies), ``auto`` (the default);
3. ``auto``: on CUDA the first training call of each shape class times the eligible paths and keeps the fastest
   (``path_timing.py``); elsewhere, and for calls that may not be timed, a cached choice or sample-then-GEMM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from .timing import path_selector

FUSION_ENV = "BAYESLAYERS_FUSION"
SAMPLE_THEN_GEMM, SAMPLE_IN_GEMM, DW_EPILOGUE = "sample_then_gemm", "sample_in_gemm", "dw_epilogue"
FUSED_LORA, UNFUSED_LORA = "fused_lora", "unfused_lora"
LINEAR_PATHS = (SAMPLE_THEN_GEMM, SAMPLE_IN_GEMM, DW_EPILOGUE)
PATHS = LINEAR_PATHS + (FUSED_LORA,)
# Sample-in-GEMM regenerates each weight tile once per BLOCK_M rows: beyond this many rows it is ALU-bound by
# the Philox draws (2-3.5x slower than sampling once at SD shapes), so it is not even timed there.
SAMPLE_IN_GEMM_TIMED_ROWS = 1024
ALL_ROWS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class FusionPolicy:
    """A fixed policy: ``sample_in_gemm_max_rows`` (Linears with at most this many input rows, tokens x batch,
    take sample-in-GEMM), ``weight_grad_epilogue`` (other Linears take the dW epilogue), ``fused_lora``."""

    sample_in_gemm_max_rows: int = 0
    weight_grad_epilogue: bool = False
    fused_lora: bool = False

    def __post_init__(self):
        rows = self.sample_in_gemm_max_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"sample_in_gemm_max_rows must be a non-negative int, got {rows!r}")
        for name in ("weight_grad_epilogue", "fused_lora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def samples_in_gemm(self, rows: int) -> bool:
        """True when a Linear applied to ``rows`` input rows should build its weight inside the GEMMs."""
        return rows <= self.sample_in_gemm_max_rows

    def linear_path(self, rows: int) -> str:
        if self.samples_in_gemm(rows):
            return SAMPLE_IN_GEMM
        return DW_EPILOGUE if self.weight_grad_epilogue else SAMPLE_THEN_GEMM


FORCED = {
    SAMPLE_THEN_GEMM: FusionPolicy(),
    SAMPLE_IN_GEMM: FusionPolicy(sample_in_gemm_max_rows=ALL_ROWS),
    DW_EPILOGUE: FusionPolicy(weight_grad_epilogue=True),
    FUSED_LORA: FusionPolicy(fused_lora=True),
}

_policy: FusionPolicy | None = None  # None: follow BAYESLAYERS_FUSION


def fusion_mode() -> str:
    """``'policy'`` (an explicit policy is set), else ``BAYESLAYERS_FUSION``: 'auto', 'off' or 'force:<path>'."""
    if _policy is not None:
        return "policy"
    mode = os.environ.get(FUSION_ENV, "auto").strip() or "auto"
    if mode in ("auto", "off") or (mode.startswith("force:") and mode[6:] in FORCED):
        return mode
    raise ValueError(
        f"{FUSION_ENV} must be 'auto', 'off' or 'force:<path>' with a path of {list(FORCED)}, got {mode!r}"
    )


def fusion_policy() -> FusionPolicy:
    """The fixed policy in force: the explicit one, the forced path's, or sample-then-GEMM (``off`` and the
    fallback of ``auto``)."""
    mode = fusion_mode()
    if mode == "policy":
        return _policy
    return FORCED[mode[6:]] if mode.startswith("force:") else FusionPolicy()


def set_fusion_policy(policy: FusionPolicy | None = None, **changes) -> FusionPolicy | None:
    """Sets an explicit policy (``policy`` with ``changes`` applied on top; ``None`` with changes: the defaults
    with the changes); ``set_fusion_policy(None)`` clears it (``BAYESLAYERS_FUSION`` decides again).
    Returns the previous explicit policy (None when there was none)."""
    global _policy
    previous = _policy
    _policy = None if policy is None and not changes else dataclasses.replace(policy or FusionPolicy(), **changes)
    return previous


@contextlib.contextmanager
def fusion(**changes):
    """Context manager: a fixed policy (the current one with ``changes``, e.g. ``fusion(fused_lora=True)``);
    measurement is off within it."""
    previous = _policy
    set_fusion_policy(fusion_policy(), **changes)
    try:
        yield _policy
    finally:
        set_fusion_policy(previous)


# ---------------------------------------------------------------------------------------------------------------
# Running a path


def weight_path(path: str):
    """The :class:`~.reparameterized.WeightPath` of a Linear path name (one instance each)."""
    if path not in LINEAR_PATHS:
        raise ValueError(f"path must be one of {LINEAR_PATHS}, got {path!r}")
    if path not in _WEIGHT_PATHS:
        from ..reparameterized import SampleThenMap
        from ..triton.triton_ops import TRITON_KERNELS
        from .fused import SAMPLE_IN_GEMM as sample_in_gemm  # the one instance sampled_linear uses too

        _WEIGHT_PATHS[path] = (
            sample_in_gemm
            if path == SAMPLE_IN_GEMM
            else SampleThenMap(TRITON_KERNELS, weight_grad_epilogue=path == DW_EPILOGUE)
        )
    return _WEIGHT_PATHS[path]


_WEIGHT_PATHS: dict = {}


def run_linear_path(path: str, layer_map, x, posterior, bias, seed):
    """``(y, kl)`` of ``layer_map`` (a Linear for the fused paths) on ``path``."""
    from ..reparameterized import reparameterize

    return reparameterize(layer_map, x, posterior, bias, seed, weight_path(path))


def _leaf(tensor):
    return None if tensor is None else tensor.detach().requires_grad_(tensor.requires_grad)


def _backward_step(forward, inputs, out_shape, like):
    """One forward + backward of ``forward(*inputs)`` (-> y or (y, kl)) with a constant output gradient: no
    generator is drawn from and no parameter's .grad is touched."""
    dy = like.new_full(out_shape, 1e-3)
    wanted = [t for t in inputs if t is not None and t.requires_grad]

    def step():
        # Plain saved tensors: activation checkpointing's hooks (if the call sits in a checkpointed region) must
        # not see this independent graph.
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            _forward_backward(forward, inputs, wanted, dy)

    return step


def _identity(tensor):
    return tensor


def _forward_backward(forward, inputs, wanted, dy):
    out = forward(*inputs)
    y, kl = out if isinstance(out, tuple) else (out, None)
    outs, grads = [y], [dy]
    if kl is not None and kl.requires_grad:
        outs.append(kl)
        grads.append(torch.ones_like(kl))
    if wanted and y.requires_grad:
        torch.autograd.grad(outs, wanted, grads, allow_unused=True)


def linear_candidates(rows: int, weight_grad: bool) -> list[str]:
    """The Linear paths worth timing for ``rows`` input rows (the dW epilogue only when d_mu is needed)."""
    paths = [SAMPLE_THEN_GEMM]
    if weight_grad:
        paths.append(DW_EPILOGUE)
    if rows <= SAMPLE_IN_GEMM_TIMED_ROWS:
        paths.append(SAMPLE_IN_GEMM)
    return paths


def choose_linear_path(layer_map, x, posterior, bias, seed, linear: bool) -> str:
    """The path a Bayesian layer call takes (see the module docstring)."""
    rows = x.numel() // max(1, x.shape[-1])
    if not linear:
        return SAMPLE_THEN_GEMM
    if fusion_mode() != "auto":
        return fusion_policy().linear_path(rows)
    mu, rho = posterior.mu, posterior.rho
    weight_grad = mu.requires_grad or rho.requires_grad
    leaves = [_leaf(t) for t in (x, mu, rho, bias)]

    def make_step(path):
        def forward(x_, mu_, rho_, bias_):
            return run_linear_path(path, layer_map, x_, posterior._replace(mu=mu_, rho=rho_), bias_, seed)

        return _backward_step(forward, leaves, (*x.shape[:-1], mu.shape[0]), x)

    return path_selector().choose(
        "linear",
        rows,
        mu.shape[0],
        mu.shape[1],
        x.dtype,
        x.device,
        weight_grad or x.requires_grad,
        linear_candidates(rows, weight_grad),
        make_step,
        SAMPLE_THEN_GEMM,
    )


def apply_bayesian(layer_map, x, posterior, bias, seed, linear: bool):
    """``(y, kl)`` on the chosen path: what the Triton backend's ``apply`` returns."""
    path = choose_linear_path(layer_map, x, posterior, bias, seed, linear)
    return run_linear_path(path, layer_map, x, posterior, bias, seed)


def fuses_lora(device: torch.device) -> bool:
    """True when a LoRA on a Linear should call :func:`apply_lora` (fused by policy, or measured on CUDA)."""
    mode = fusion_mode()
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return fusion_policy().fused_lora


def unfused_lora(x, w, bias, a, b, scaling: float):
    """x @ w^T + bias + scaling * (x @ a^T) @ b^T as three GEMMs."""
    return torch.nn.functional.linear(x, w, bias) + scaling * torch.nn.functional.linear(
        torch.nn.functional.linear(x, a), b
    )


def run_lora_path(path: str, x, w, bias, a, b, scaling: float):
    if path == FUSED_LORA:
        from .fused import lora_linear

        return lora_linear(x, w, bias, a, b, scaling)
    if path != UNFUSED_LORA:
        raise ValueError(f"path must be {FUSED_LORA!r} or {UNFUSED_LORA!r}, got {path!r}")
    return unfused_lora(x, w, bias, a, b, scaling)


def choose_lora_path(x, w, bias, a, b, scaling: float) -> str:
    if fusion_mode() != "auto":
        return FUSED_LORA if fusion_policy().fused_lora else UNFUSED_LORA
    rows = x.numel() // max(1, x.shape[-1])
    leaves = [_leaf(t) for t in (x, w, bias, a, b)]

    def make_step(path):
        def forward(*tensors):
            return run_lora_path(path, *tensors, scaling)

        return _backward_step(forward, leaves, (*x.shape[:-1], w.shape[0]), x)

    needs_grad = any(t is not None and t.requires_grad for t in (x, w, bias, a, b))
    return path_selector().choose(
        f"lora{a.shape[0]}",
        rows,
        w.shape[0],
        w.shape[1],
        x.dtype,
        x.device,
        needs_grad,
        [FUSED_LORA, UNFUSED_LORA],
        make_step,
        UNFUSED_LORA,
    )


def apply_lora(x, w, bias, a, b, scaling: float):
    """y = x @ w^T + scaling * (x @ a^T) @ b^T + bias on the chosen LoRA path."""
    return run_lora_path(choose_lora_path(x, w, bias, a, b, scaling), x, w, bias, a, b, scaling)
