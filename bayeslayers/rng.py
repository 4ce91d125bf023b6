"""Seeds: how one weight sample's seed is derived.

RNG contract: the noise ``eps`` of one weight sample is a pure function of a 63-bit integer seed and the
weight's shape (each backend owns one stream: ``Backend.noise``). Each sampling forward draws
``seed = mix_seed(draw, layer_id)``, where ``draw`` comes from the default generator of the weight's device
(so ``torch.manual_seed`` makes training reproducible and activation checkpointing, which saves and restores
the generators, redraws the same sample when it recomputes a forward) and ``layer_id`` is a stable hash of
the layer's qualified name (``convert``) or a process-unique number (layers built directly). Backward
regenerates ``eps`` from the same seed instead of storing it.
"""

from __future__ import annotations

import itertools
import zlib

_MASK64 = (1 << 64) - 1
_SEED_BITS = 63
_unnamed_ids = itertools.count(1 << 32)  # above every crc32 name id: the two kinds never collide


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


def unnamed_layer_id() -> int:
    """A process-unique id (>= 2**32) for a posterior built outside ``convert``, in construction order."""
    return next(_unnamed_ids)
