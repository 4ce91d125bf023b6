"""Backend dispatch: one interface, several implementations of the reparameterized layer.

- ``reference``: plain eager PyTorch; autograd keeps eps, sigma and the sampled weight (the test oracle and
  the benchmark baseline, what a hand-written Bayesian layer does).
- ``torch``: the one autograd seam over kernels in plain torch (torch's own RNG stream, the reference's);
  eps is regenerated in backward, the KL gradient added analytically; runs anywhere.
- ``cpp``: C++ twins of the Triton kernels, one pass each way (``bayeslayers.kernels.cpu``); the CPU default.
- ``triton``: fused Triton kernels (``bayeslayers.kernels``); the CUDA default when available.

``cpp`` and ``triton`` draw the same eps for a seed, as do ``reference`` and ``torch``. Choose with
:func:`set_backend` or the ``BAYESLAYERS_BACKEND`` environment variable; ``auto`` picks, per device type, the
usable backend claiming the highest priority (``Backend.priorities``: triton on CUDA, cpp on CPU, torch anywhere
below them), with one warning saying why when a higher one is unusable; :func:`register_backend` adds one. A
resolution is computed once per (selection, device type) and cached, so forwards (and torch.compile traces) never
re-run availability checks.
"""

from __future__ import annotations

import os
import warnings

import torch

from .base import Backend, KernelBackend
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


def register_backend(backend: Backend) -> Backend:
    """Adds ``backend`` (a :class:`Backend`, typically a ``KernelBackend`` whose ``kernels()`` come from
    :func:`bayeslayers.register_posterior_kernels`) under ``backend.name``, replacing one of that name.

    ``set_backend(backend.name)`` selects it; ``auto`` also picks it on the device types where its
    ``priorities`` claim more than every other usable backend. Returns ``backend``.
    """
    global BACKEND_CHOICES, _selection_count
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a bayeslayers.backends.Backend, got {type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not name.isidentifier() or name in ("auto", "base"):
        raise ValueError(f"backend.name must be an identifier other than 'auto' and 'base', got {name!r}")
    priorities = backend.priorities
    if not isinstance(priorities, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in priorities.items()
    ):
        raise TypeError(f"backend.priorities must map device types to int priorities, got {priorities!r}")
    BACKENDS.pop(name, None)  # a replaced name counts as the latest registration (ties go to the latest)
    BACKENDS[name] = backend
    BACKEND_CHOICES = ("auto", *BACKENDS)
    _selection_count += 1  # compiled graphs retrace; every device resolves again
    _resolved.clear()
    return backend


def _check_name(name: str, argument: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"{argument} must be one of {BACKEND_CHOICES}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Selects the backend for all Bayesian layers: 'auto', 'reference', 'torch', 'cpp', 'triton' or a
    registered one (:func:`register_backend`).

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
    """The usable backend claiming the highest priority for ``device``'s type (of equal ones the latest
    registered); one warning per skipped preferred backend."""
    claims = [(b.priority(device.type), i, b) for i, b in enumerate(BACKENDS.values())]
    candidates = [b for p, i, b in sorted((c for c in claims if c[0] is not None), reverse=True)]
    skipped = []
    for backend in candidates:
        reason = backend.unavailable_reason(device)
        if not reason:
            if skipped and skipped[0][0].name not in _warned:
                _warned.add(skipped[0][0].name)
                warnings.warn(
                    f"bayeslayers: using the {backend.name!r} backend on {device.type}: {skipped[0][1]}", stacklevel=4
                )
            return backend
        skipped.append((backend, reason))
    tried = "; ".join(f"{b.name}: {r}" for b, r in skipped) or "no backend claims it"
    raise RuntimeError(f"no backend can run on device {device} ({tried})")


def materialize_eps(seed: int, shape, device="cpu", backend: str | None = None) -> torch.Tensor:
    """The float32 noise the given (or current) backend draws for ``seed`` and a weight of ``shape``.

    Use it to check a layer against a reference that receives the same ``eps``, or to reproduce a sample
    (``w = mu + softplus(rho) * eps``).
    """
    device = torch.device(device)
    return resolve_backend(device, backend).noise(seed, tuple(shape), device)


__all__ = [
    "Backend",
    "BACKENDS",
    "KernelBackend",
    "get_backend",
    "materialize_eps",
    "register_backend",
    "resolve_backend",
    "set_backend",
]
