"""Which Triton path a Bayesian Linear / LoRA takes: the fusion policy.

Paths (each computes the same function with the same eps; they differ in speed only):

* ``sample_then_map``: one pass samples w in the compute dtype (+ KL), then the layer map (cuBLAS / cuDNN); the
  backward regenerates eps in the pass that forms d_mu and d_rho (``reparameterized.py``). Every op; the fallback.
* ``sample_in_gemm`` (Linear): the weight tiles are built inside the forward and input-gradient GEMMs
  (``triton/sampled_matmul.py``) and d_mu / d_rho come from the weight-gradient GEMM's epilogue: no weight sample
  is written.
* ``weight_grad_epilogue`` (Linear): sample-then-map forward, d_mu / d_rho from the weight-gradient GEMM's
  epilogue (``triton/weight_grad_gemm.py``) instead of a cuBLAS dW followed by the gradient pass.
* ``fused_lora`` (LoRA on a Linear): base + adapter in one GEMM (``triton/lora_matmul.py``); ``unfused_lora`` is
  the base GEMM plus the two adapter GEMMs.

Who decides, first match wins:

1. an explicit policy: ``set_fusion_policy(...)`` or the ``fusion(...)`` context (a :class:`FusionPolicy`);
2. ``BAYESLAYERS_FUSION``: ``off`` (sample-then-map, unfused LoRA everywhere), ``force:<path>`` (that path
   wherever it applies), ``auto`` (the default);
3. ``auto``: on CUDA the first training call of each shape class times the eligible paths and keeps the fastest
   (``timing.py``); elsewhere, and for calls that may not be timed, a cached choice or sample-then-map.

The path objects and the choice among them are in ``fused.py`` (they need Triton); this module is imported with
``bayeslayers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import torch

FUSION_ENV = "BAYESLAYERS_FUSION"
SAMPLE_THEN_MAP, SAMPLE_IN_GEMM, WEIGHT_GRAD_EPILOGUE = "sample_then_map", "sample_in_gemm", "weight_grad_epilogue"
FUSED_LORA, UNFUSED_LORA = "fused_lora", "unfused_lora"
LINEAR_PATHS = (SAMPLE_THEN_MAP, SAMPLE_IN_GEMM, WEIGHT_GRAD_EPILOGUE)
PATHS = LINEAR_PATHS + (FUSED_LORA,)
RENAMED_PATHS = {"sample_then_gemm": SAMPLE_THEN_MAP, "dw_epilogue": WEIGHT_GRAD_EPILOGUE}  # accepted, with a warning
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
        return WEIGHT_GRAD_EPILOGUE if self.weight_grad_epilogue else SAMPLE_THEN_MAP


FORCED = {
    SAMPLE_THEN_MAP: FusionPolicy(),
    SAMPLE_IN_GEMM: FusionPolicy(sample_in_gemm_max_rows=ALL_ROWS),
    WEIGHT_GRAD_EPILOGUE: FusionPolicy(weight_grad_epilogue=True),
    FUSED_LORA: FusionPolicy(fused_lora=True),
}

_policy: FusionPolicy | None = None  # None: follow BAYESLAYERS_FUSION


def fusion_mode() -> str:
    """``'policy'`` (an explicit policy is set), else ``BAYESLAYERS_FUSION``: 'auto', 'off' or 'force:<path>'."""
    if _policy is not None:
        return "policy"
    mode = os.environ.get(FUSION_ENV, "auto").strip() or "auto"
    if mode.startswith("force:") and mode[6:] in RENAMED_PATHS:
        new = f"force:{RENAMED_PATHS[mode[6:]]}"
        warnings.warn(f"{FUSION_ENV}={mode} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        mode = new
    if mode in ("auto", "off") or (mode.startswith("force:") and mode[6:] in FORCED):
        return mode
    raise ValueError(
        f"{FUSION_ENV} must be 'auto', 'off' or 'force:<path>' with a path of {list(FORCED)}, got {mode!r}"
    )


def fusion_policy() -> FusionPolicy:
    """The fixed policy in force: the explicit one, the forced path's, or sample-then-map (``off`` and the
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


def fuses_lora(device: torch.device) -> bool:
    """True when a LoRA on a Linear should take the Triton backend's ``lora_linear`` (fused by policy, or measured
    on CUDA)."""
    mode = fusion_mode()
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return fusion_policy().fused_lora
