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

from bayeslayers.kernels.seeds import mix_seed

_unnamed_ids = itertools.count(1 << 32)  # above every crc32 name id: the two kinds never collide

__all__ = ["layer_id_for", "mix_seed", "unnamed_layer_id"]


def layer_id_for(name: str) -> int:
    """Stable 32-bit id of a layer from its qualified module name (same across runs and processes)."""
    return zlib.crc32(name.encode("utf-8"))


def unnamed_layer_id() -> int:
    """A process-unique id (>= 2**32) for a posterior built outside ``convert``, in construction order."""
    return next(_unnamed_ids)
