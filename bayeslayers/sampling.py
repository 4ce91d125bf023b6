"""sampling(): draw one fixed posterior sample, also in eval mode, for uncertainty estimates."""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from .convert import posterior_layers
from .rng import mix_seed


@contextmanager
def sampling(model: nn.Module, seed: int):
    """Within the block every Bayesian layer of ``model`` uses the weight sample of ``seed`` in every forward.

    The sample is the same across calls (one posterior sample for a whole denoising trajectory), differs
    between layers, and works in eval mode. Use different seeds for different posterior samples.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    layers = [layer for _, layer in posterior_layers(model)]
    if not layers:
        raise ValueError("sampling: the model has no Bayesian layers; call bayeslayers.convert first")
    previous = [layer.fixed_seed for layer in layers]
    try:
        for layer in layers:
            layer.fixed_seed = mix_seed(seed, layer.layer_id)
        yield model
    finally:
        for layer, fixed in zip(layers, previous):
            layer.fixed_seed = fixed
