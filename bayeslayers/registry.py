"""The one registry of Bayesian layer types: it drives convert, to_deterministic, save and load.

A layer type registers which plain module it replaces (``source``) in which convert ``mode`` and which options
its ``from_module`` accepts. Registered classes implement ``from_module(module, **options)``,
``to_deterministic()`` and ``options()``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import import_module

import torch.nn as nn

from .config import LORA_FIELDS, MODES, POSTERIOR_FIELDS, check_choice
from .layers import BayesConv2d, BayesLinear, BayesLoRAConv2d, BayesLoRALinear


@dataclass(frozen=True)
class LayerType:
    name: str  # stable name stored in checkpoints
    mode: str  # "full" or "lora"
    source: type  # the plain module class it replaces (subclasses match too)
    layer: type  # the Bayesian module class
    options: tuple[str, ...]  # the BayesConfig fields layer.from_module accepts


_TYPES: dict[str, LayerType] = {}


def register_layer_type(name: str, mode: str, source: type, layer: type, options=POSTERIOR_FIELDS) -> LayerType:
    """Adds a Bayesian layer type; later registrations for the same (mode, source) take precedence.

    ``options``: the :class:`~bayeslayers.BayesConfig` fields its ``from_module`` takes as keywords.
    """
    check_choice(mode, MODES, "mode")
    layer_type = LayerType(name, mode, source, layer, tuple(options))
    _TYPES.pop(name, None)  # a re-registered name moves to the end: the latest registration
    _TYPES[name] = layer_type
    return layer_type


# Layer types of optional packages, registered by their module on first need (``import bayeslayers`` stays light).
_OPTIONAL_TYPES = {"peft_lora_linear": "bayeslayers.peft_lora", "peft_lora_conv2d": "bayeslayers.peft_lora"}
_OPTIONAL_PACKAGES = {"peft": "bayeslayers.peft_lora"}


def _load_optional_types() -> None:
    """Registers the optional packages' layer types once the package is imported (a model holding their
    modules implies it is)."""
    for package, module in _OPTIONAL_PACKAGES.items():
        if package in sys.modules and module not in sys.modules:
            import_module(module)


def layer_type_by_name(name: str) -> LayerType:
    if name not in _TYPES and name in _OPTIONAL_TYPES:
        import_module(_OPTIONAL_TYPES[name])
    if name not in _TYPES:
        raise ValueError(f"unknown Bayesian layer type {name!r}; registered: {sorted(_TYPES)}")
    return _TYPES[name]


def layer_type_for_source(module: nn.Module, mode: str) -> LayerType | None:
    """The registered type that converts ``module`` in ``mode``: the most specific source class wins, and of
    equally specific ones the latest registered."""
    _load_optional_types()
    matches = [t for t in _TYPES.values() if t.mode == mode and isinstance(module, t.source)]
    if not matches:
        return None
    return max(reversed(matches), key=lambda t: len(t.source.__mro__))  # max keeps the first of equal keys


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The registered type of a converted Bayesian module, or None for any other module."""
    for layer_type in _TYPES.values():
        if type(module) is layer_type.layer:
            return layer_type
    return None


def source_types(mode: str) -> tuple[type, ...]:
    _load_optional_types()
    return tuple(t.source for t in _TYPES.values() if t.mode == mode)


register_layer_type("linear", "full", nn.Linear, BayesLinear)
register_layer_type("conv2d", "full", nn.Conv2d, BayesConv2d)
register_layer_type("lora_linear", "lora", nn.Linear, BayesLoRALinear, POSTERIOR_FIELDS + LORA_FIELDS)
register_layer_type("lora_conv2d", "lora", nn.Conv2d, BayesLoRAConv2d, POSTERIOR_FIELDS + LORA_FIELDS)
