"""Which Triton path a Bayesian Linear / LoRA takes: part 1's sample-then-GEMM, or one of the fused GEMMs.

* ``sample_in_gemm_max_rows``: a Linear whose input has at most this many rows (tokens x batch) builds its
  weight tiles inside the forward and input-gradient GEMMs (``sampled_matmul.py``) and forms d_mu / d_rho in
  the dW GEMM's epilogue (``weight_grad_gemm.py``): no weight sample is ever written.
* ``weight_grad_epilogue``: larger Linears keep the sample-then-GEMM forward but take d_mu / d_rho from the dW
  epilogue instead of a cuBLAS dW followed by the gradient pass.
* ``fused_lora``: Bayesian LoRA on a Linear computes base + adapter in one GEMM (``lora_matmul.py``).

Every path computes the same function with the same eps; they differ in speed only, which only a GPU
measurement decides (``benchmarks/fused_gemm.py`` measures the crossover). Until such a measurement is
recorded here the defaults keep part 1's path everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass(frozen=True)
class FusionPolicy:
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


_policy = FusionPolicy()


def fusion_policy() -> FusionPolicy:
    """The policy in force."""
    return _policy


def set_fusion_policy(policy: FusionPolicy | None = None, **changes) -> FusionPolicy:
    """Sets the policy (``None``: the defaults), with ``changes`` applied on top; returns the previous one."""
    global _policy
    previous = _policy
    _policy = dataclasses.replace(FusionPolicy() if policy is None else policy, **changes)
    return previous


@contextlib.contextmanager
def fusion(**changes):
    """Context manager: the current policy with ``changes`` (e.g. ``fusion(fused_lora=True)``)."""
    previous = set_fusion_policy(_policy, **changes)
    try:
        yield _policy
    finally:
        set_fusion_policy(previous)
