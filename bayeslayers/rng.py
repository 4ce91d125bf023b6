"""Seeds and the torch noise stream.

RNG contract: the noise ``eps`` of one weight sample is a pure function of a 63-bit integer seed and the
weight's shape. Each sampling forward draws ``seed = mix_seed(draw, layer_id)``, where ``draw`` comes from
torch's default CPU generator (so ``torch.manual_seed`` makes training reproducible and activation
checkpointing, which saves and restores that generator, redraws the same sample when it recomputes a
forward) and ``layer_id`` is a stable hash of the layer's qualified name. Backward regenerates ``eps`` from
the same seed instead of storing it.

Each backend owns one stream (``Backend.noise``); :func:`materialize_eps` exposes it for tests and users.
"""

from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1
_SEED_BITS = 63


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*values: int) -> int:
    """Hashes integers (user seed, layer id, step, ...) into one non-negative 63-bit seed."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK64))
    return state & ((1 << _SEED_BITS) - 1)


def layer_id_for(name: str) -> int:
    """Stable 32-bit id of a layer from its qualified module name (same across runs and processes)."""
    return zlib.crc32(name.encode("utf-8"))


def draw_seed() -> int:
    """A fresh 62-bit integer from torch's default CPU generator (restored by activation checkpointing)."""
    return int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item())


def torch_normal(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 tensor of ``shape``: a pure function of ``(seed, shape, device type)``."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def materialize_eps(seed: int, shape, device="cpu", backend: str | None = None) -> torch.Tensor:
    """The float32 noise the given (or current) backend draws for ``seed`` and a weight of ``shape``.

    Use it to check a layer against a reference that receives the same ``eps``, or to reproduce a sample
    (``w = mu + softplus(rho) * eps``).
    """
    from .backends import resolve_backend

    return resolve_backend(torch.device(device), backend).noise(seed, tuple(shape), torch.device(device))
