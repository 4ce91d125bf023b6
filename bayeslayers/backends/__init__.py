"""Backend dispatch: one interface, several implementations of the reparameterized layer op.

- ``reference``: plain eager PyTorch; autograd keeps eps, sigma and the sampled weight (the test oracle and
  the benchmark baseline, what a hand-written Bayesian layer does).
- ``torch``: a custom autograd Function that regenerates eps from the seed in backward and adds the KL
  gradient analytically (torch's own RNG stream); runs anywhere.
- ``cpp``: C++ twins of the Triton kernels, one pass each way (``bayeslayers.kernels.cpu``); the CPU default.
- ``triton``: fused Triton kernels (``bayeslayers.kernels``); the CUDA default when available.

``cpp`` and ``triton`` draw the same eps for a seed. Choose with :func:`set_backend` or the
``BAYESLAYERS_BACKEND`` environment variable; ``auto`` picks triton on CUDA and cpp on CPU when they are
usable, torch otherwise (with one warning saying why).
"""

from __future__ import annotations

import os
import warnings

import torch

from .base import Backend
from .cpp_backend import CppBackend
from .reference import ReferenceBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), TorchBackend(), CppBackend(),
                                                    TritonBackend())}
BACKEND_CHOICES = ("auto", *BACKENDS)
ENV_VAR = "BAYESLAYERS_BACKEND"

_selected: str | None = None


def _check_name(name: str, argument: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"{argument} must be one of {BACKEND_CHOICES}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Selects the backend for all Bayesian layers: 'auto', 'reference', 'torch', 'cpp' or 'triton'.

    ``None`` clears the selection (back to $BAYESLAYERS_BACKEND, else 'auto').
    """
    global _selected
    _selected = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The selected backend name: set_backend's, else $BAYESLAYERS_BACKEND, else 'auto'."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


def resolve_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend object that serves tensors on ``device`` ('auto' resolved)."""
    name = get_backend() if name is None else _check_name(name, "backend")
    if name == "auto":
        return _auto(device)
    backend = BACKENDS[name]
    if not backend.is_available(device):
        raise RuntimeError(f"backend {name!r} cannot run on device {device}: {backend.unavailable_reason(device)}")
    return backend


_warned: set[str] = set()


def _auto(device: torch.device) -> Backend:
    preferred = BACKENDS["triton"] if device.type == "cuda" else BACKENDS["cpp"] if device.type == "cpu" else None
    if preferred is None:
        return BACKENDS["torch"]
    reason = preferred.unavailable_reason(device)
    if not reason:
        return preferred
    if preferred.name not in _warned:
        _warned.add(preferred.name)
        warnings.warn(f"bayeslayers: using the 'torch' backend on {device.type}: {reason}", stacklevel=3)
    return BACKENDS["torch"]


__all__ = ["Backend", "BACKENDS", "set_backend", "get_backend", "resolve_backend"]
