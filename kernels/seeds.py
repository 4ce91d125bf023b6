"""Seeds as device tensors: what the kernels read, and the on-device mix of a draw with a layer id.

A seed is a 64-bit integer held in a one-element int64 tensor on the weight's device (two's complement:
Python ints in [0, 2**64) are accepted and stored bit for bit). Kernels load it with ``tl.load``, so a new
seed every step needs no recompilation, no host sync, and is CUDA-graph / torch.compile friendly.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_SEED_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_DRAW_BOUND = 1 << 62


def _signed64(value: int) -> int:
    """The int64 with the same 64 bits as ``value`` (taken mod 2**64)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """A one-element int64 tensor on ``device`` from a Python int or an integer tensor of one element."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seed tensor must hold one int64 value, got shape {tuple(seed.shape)} {seed.dtype}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    return torch.tensor([_signed64(seed)], dtype=torch.int64, device=device)


def _shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(value: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic = arithmetic mod 2**64)."""
    value = value + _signed64(_GOLDEN)
    value = (value ^ _shift_right(value, 30)) * _signed64(_MIX1)
    value = (value ^ _shift_right(value, 27)) * _signed64(_MIX2)
    return value ^ _shift_right(value, 31)


def splitmix64(value: int) -> int:
    """SplitMix64 finaliser on a Python int (mod 2**64)."""
    value = (value + _GOLDEN) & _MASK64
    value = ((value ^ (value >> 30)) * _MIX1) & _MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*values: int) -> int:
    """Hashes integers (a draw or user seed, layer id, step, ...) into one non-negative 63-bit seed: the
    SplitMix64 chain that :func:`mix_seed_tensor` computes on the device."""
    state = 0
    for value in values:
        state = splitmix64(state ^ (int(value) & _MASK64))
    return state & _SEED_MASK


def mix_seed_tensor(draw: torch.Tensor, layer_id) -> torch.Tensor:
    """63-bit seed from a drawn int64 tensor and a layer id (int, or an int64 tensor of one element), on the
    draw's device.

    Bit-identical to ``mix_seed(draw, layer_id)``, computed without a host sync.
    """
    layer_id = layer_id.reshape(1).to(draw.device) if isinstance(layer_id, torch.Tensor) else _signed64(layer_id)
    state = _splitmix64(draw)
    state = _splitmix64(state ^ layer_id)
    return state & _SEED_MASK


# Every draw mutates this token, so a compiled graph keeps the draws in program order: eager and compiled runs
# then take the same numbers from the generator and draw the same weight samples for one torch.manual_seed.
DRAW_ORDER = torch.zeros(1, dtype=torch.int64)


@torch.library.custom_op("bayeslayers::draw_layer_seed", mutates_args=("order",))
def _draw_layer_seed_op(order: torch.Tensor, layer_id: torch.Tensor) -> torch.Tensor:
    draw = torch.randint(0, _DRAW_BOUND, (1,), dtype=torch.int64, device=layer_id.device)
    order.add_(1)
    if layer_id.device.type == "cpu":  # host integers: cheaper than a chain of one-element tensor ops
        return torch.tensor([mix_seed(int(draw.item()), int(layer_id.item()))], dtype=torch.int64)
    return mix_seed_tensor(draw, layer_id)


@_draw_layer_seed_op.register_fake
def _(order, layer_id):
    return torch.empty(1, dtype=torch.int64, device=layer_id.device)


def device_layer_seed(layer_id, device: torch.device) -> torch.Tensor:
    """A fresh seed for one sampling forward: a draw from ``device``'s default generator mixed with ``layer_id``
    (an int or an int64 tensor of one element).

    ``torch.manual_seed`` makes it reproducible, eager or compiled, and activation checkpointing (which saves
    and restores the device generators) redraws the same seed when it recomputes a forward. One opaque
    operator draws and mixes (Inductor, torch 2.13 CPU, miscompiles the SplitMix64 chain fused with randint).
    """
    if not isinstance(layer_id, torch.Tensor):
        layer_id = torch.tensor([_signed64(layer_id)], dtype=torch.int64)
    return _draw_layer_seed_op(DRAW_ORDER, layer_id.reshape(1).to(device))
