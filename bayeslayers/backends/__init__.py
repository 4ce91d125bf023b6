"""Backend dispatch: one interface, several implementations of the reparameterized layer.

- ``reference``: plain eager PyTorch; autograd keeps eps, sigma and the sampled weight (the test oracle and
  the benchmark baseline, what a hand-written Bayesian layer does).
- ``torch``: the one autograd seam over kernels in plain torch (torch's own RNG stream, the reference's);
  eps is regenerated in backward, the KL gradient added analytically; runs anywhere.
- ``cpp``: C++ twins of the Triton kernels, one pass each way (``bayeslayers.kernels.cpu``); the CPU default.
- ``triton``: fused Triton kernels (``bayeslayers.kernels``); the CUDA default when available.

``cpp`` and ``triton`` draw the same eps for a seed, as do ``reference`` and ``torch``. Choose with
:func:`set_backend` or the ``BAYESLAYERS_BACKEND`` environment variable; ``auto`` picks triton on CUDA and cpp
on CPU when they are usable, torch otherwise (with one warning saying why). A resolution is computed once per
(selection, device type) and cached, so forwards (and torch.compile traces) never re-run availability checks.
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

BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), TorchBackend(), CppBackend(), TritonBackend())}
BACKEND_CHOICES = ("auto", *BACKENDS)
ENV_VAR = "BAYESLAYERS_BACKEND"

_selected: str | None = None
_selection_count = 0  # changes with every set_backend: compiled graphs guard on it and retrace
_resolved: dict[tuple[str, str], Backend] = {}
_warned: set[str] = set()


def _check_name(name: str, argument: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"{argument} must be one of {BACKEND_CHOICES}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Selects the backend for all Bayesian layers: 'auto', 'reference', 'torch', 'cpp' or 'triton'.

    ``None`` clears the selection (back to $BAYESLAYERS_BACKEND, else 'auto').
    """
    global _selected, _selection_count
    name = None if name is None else _check_name(name, "backend")
    if name != _selected or name is None:  # a new selection: compiled graphs retrace
        _selected = name
        _selection_count += 1
    _resolved.clear()


def get_backend() -> str:
    """The selected backend name: set_backend's, else $BAYESLAYERS_BACKEND, else 'auto'."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


def resolve_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend object that serves tensors on ``device`` ('auto' resolved); cached per device type."""
    return BACKENDS[_resolved_name(name, device.type, _selection_count)]


def _resolved_name(name: str | None, device_type: str, selection_count: int) -> str:
    """Runs eagerly even while torch.compile traces (availability checks may build the C++ extension); the
    traced graph keeps the answer as a constant and guards on ``selection_count``."""
    key = (get_backend() if name is None else _check_name(name, "backend"), device_type)
    if key not in _resolved:
        _resolved[key] = _resolve(*key)
    return _resolved[key].name


# What ``torch.compiler.assume_constant_result`` sets, without importing torch._dynamo (and Triton) at import.
_resolved_name._dynamo_marked_constant = True


def _resolve(name: str, device_type: str) -> Backend:
    device = torch.device(device_type)
    if name == "auto":
        return _auto(device)
    backend = BACKENDS[name]
    reason = backend.unavailable_reason(device)
    if reason:
        raise RuntimeError(f"backend {name!r} cannot run on device {device}: {reason}")
    return backend


def _auto(device: torch.device) -> Backend:
    preferred = {"cuda": BACKENDS["triton"], "cpu": BACKENDS["cpp"]}.get(device.type)
    if preferred is None:
        return BACKENDS["torch"]
    reason = preferred.unavailable_reason(device)
    if not reason:
        return preferred
    if preferred.name not in _warned:
        _warned.add(preferred.name)
        warnings.warn(f"bayeslayers: using the 'torch' backend on {device.type}: {reason}", stacklevel=4)
    return BACKENDS["torch"]


def materialize_eps(seed: int, shape, device="cpu", backend: str | None = None) -> torch.Tensor:
    """The float32 noise the given (or current) backend draws for ``seed`` and a weight of ``shape``.

    Use it to check a layer against a reference that receives the same ``eps``, or to reproduce a sample
    (``w = mu + softplus(rho) * eps``).
    """
    device = torch.device(device)
    return resolve_backend(device, backend).noise(seed, tuple(shape), device)


__all__ = ["Backend", "BACKENDS", "get_backend", "materialize_eps", "resolve_backend", "set_backend"]
