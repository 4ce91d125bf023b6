"""convert(): swap plain layers for Bayesian ones in place; to_deterministic(): swap them back (mean weights)."""

from __future__ import annotations

import torch.nn as nn

from .config import DEFAULTS, BayesConfig
from .layers import BayesianLayer
from .presets import get_preset
from .registry import layer_type_for_source, layer_type_of, source_types
from .rng import layer_id_for
from .targets import check_targets, name_matches


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)  # "" is the model itself
    setattr(parent, child, module)


def bayesian_modules(model: nn.Module):
    """(name, module) of every converted layer (the registry's types), outermost first, not nested ones."""
    found = []
    for name, module in model.named_modules():
        if layer_type_of(module) is not None and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return found


def posterior_layers(model: nn.Module):
    """(name, layer) of every posterior-holding layer, including the factors inside LoRA layers."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BayesianLayer)]


def assign_layer_ids(model: nn.Module) -> None:
    """Gives each posterior a stable id from its qualified name (used to derive its noise seeds)."""
    for name, layer in posterior_layers(model):
        layer.layer_id = layer_id_for(name)


ALL_ADAPTER_LAYERS = ".*"  # mode 'peft' without target_modules: every peft LoRA layer holding the adapter


def _accepts(module: nn.Module, config: BayesConfig) -> bool:
    """Whether the layer type converting ``module`` takes it with these options (a peft layer must hold the
    adapter); a type without an ``accepts`` classmethod takes every module of its source class."""
    accepts = getattr(layer_type_for_source(module, config.mode).layer, "accepts", None)
    return accepts is None or accepts(module, **config.layer_options(("adapter_name",)))


def _adapter_clause(config) -> str:
    if config.mode != "peft":
        return ""
    return f" holding the adapter {config.adapter_name!r}" if config.adapter_name else " holding the active adapter"


def _peft_hint(model, targets, excludes, mode) -> str:
    """The advice for a selection that found nothing because the targeted modules are peft LoRA layers."""
    if mode == "peft":
        return ""
    peft_layers = source_types("peft")
    for name, module in model.named_modules():
        if peft_layers and isinstance(module, peft_layers) and name_matches(name, targets):
            if not name_matches(name, excludes):
                return (
                    f"; {name!r} is a peft LoRA layer: make its adapter Bayesian with mode='peft' "
                    "(presets 'dreambooth-bnn-peft', 'causal-lm-bnn-peft')"
                )
    return ""


def _select(model, targets, excludes, config):
    mode = config.mode
    sources = source_types(mode)
    converted = [name for name, _ in bayesian_modules(model)]
    selected, candidates = [], []
    for name, module in model.named_modules():
        if not name or not isinstance(module, sources):
            continue
        inside = next((c for c in converted if name == c or name.startswith(c + ".")), None)
        accepted = inside is not None or _accepts(module, config)
        if inside is None and accepted:
            candidates.append(name)
        if name_matches(name, excludes) or not name_matches(name, targets) or not accepted:
            continue
        if inside is not None and targets is ALL_ADAPTER_LAYERS:
            continue  # the default selection of mode 'peft' takes the layers not yet converted
        if inside is not None:
            what = "a Bayesian layer" if inside == name else f"part of the Bayesian layer {inside!r}"
            raise ValueError(f"module {name!r} is already {what}; converting it again is not supported")
        selected.append(name)
    for name, module in model.named_modules():
        if targets is ALL_ADAPTER_LAYERS:
            break  # the default selection of mode 'peft' skips converted layers
        if name in converted and name_matches(name, targets) and not name_matches(name, excludes):
            raise ValueError(
                f"module {name!r} is already a Bayesian layer ({type(module).__name__}); "
                "converting it again is not supported"
            )
    if not selected:
        shown = ", ".join(repr(c) for c in candidates[:8]) or "none"
        raise ValueError(
            f"target_modules {targets!r} matched no convertible module "
            f"({'/'.join(t.__name__ for t in sources) or 'none registered'}) in mode {mode!r}"
            f"{_adapter_clause(config)}; "
            f"candidates include: {shown}{_peft_hint(model, targets, excludes, mode)}"
        )
    return selected


def resolve_config(
    target_modules=None, exclude_modules=None, preset: str | None = None, config: BayesConfig | None = None, **options
) -> BayesConfig:
    """The :class:`BayesConfig` a ``convert`` call means: the defaults, or ``preset``'s, or ``config``, with the
    arguments given here on top (unknown option names raise a TypeError listing the options)."""
    if preset is not None and config is not None:
        raise ValueError("pass either preset or config, not both")
    if config is not None and not isinstance(config, BayesConfig):
        raise TypeError(f"config must be a bayeslayers.BayesConfig, got {type(config).__name__}")
    base = get_preset(preset) if preset is not None else config if config is not None else DEFAULTS
    if target_modules is not None:
        options["target_modules"] = target_modules
    if exclude_modules is not None:
        options["exclude_modules"] = exclude_modules
    return base.replace(**options)


def convert(
    model: nn.Module,
    target_modules=None,
    exclude_modules=None,
    *,
    preset: str | None = None,
    config: BayesConfig | None = None,
    **options,
) -> nn.Module:
    """Replaces matching nn.Linear / nn.Conv2d modules of ``model`` in place by Bayesian layers.

    Args:
        target_modules: module names (peft semantics: exact name or ``.name`` suffix) or a full-match regex.
        exclude_modules: same forms; checked before ``target_modules``.
        preset: a registered preset (see :func:`bayeslayers.available_presets`), or
        config: a :class:`BayesConfig`; either gives the starting options (else the defaults).
        **options: any :class:`BayesConfig` field (``mode``, ``init_sigma``, ``prior_sigma``, ``kl_direction``,
            ``prior_dtype``, ``rank``, ``lora_alpha``, ``bayesian_factors``), overriding the preset / config.

    In mode "full" the weight becomes Bayesian and other parameters keep ``requires_grad``; in mode "lora" a
    Bayesian LoRA adapter is added and every other parameter of ``model`` is frozen; in mode "peft" the factors
    (``bayesian_factors``) of the peft LoRA adapter ``adapter_name`` (default: the active one) become Bayesian in
    place, in every targeted peft LoRA layer holding it (all of them when ``target_modules`` is None), and
    ``requires_grad`` stays as peft set it (see ``docs/peft.md``). Each new layer takes over the ``training`` flag
    of the module it replaces.

    Returns:
        ``model`` itself, converted.
    """
    config = resolve_config(target_modules, exclude_modules, preset, config, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = check_targets(config.target_modules, "target_modules")
    excludes = check_targets(config.exclude_modules, "exclude_modules")
    if targets is None and config.mode == "peft":
        targets = ALL_ADAPTER_LAYERS
    if targets is None:
        raise ValueError("convert needs target_modules or a preset naming the modules to make Bayesian")

    selected = _select(model, targets, excludes, config)
    if config.mode == "lora":  # freeze the model, but not the adapters of earlier lora conversions
        adapters = [p for _, m in bayesian_modules(model) for p in m.parameters() if p.requires_grad]
        model.requires_grad_(False)
        for parameter in adapters:
            parameter.requires_grad_(True)
    for name in selected:
        module = model.get_submodule(name)
        layer_type = layer_type_for_source(module, config.mode)
        layer = layer_type.layer.from_module(module, **config.layer_options(layer_type.options))
        _set_submodule(model, name, layer.train(module.training))
    assign_layer_ids(model)
    return model


def to_deterministic(model: nn.Module) -> nn.Module:
    """Replaces every Bayesian layer by the plain module holding its posterior mean (LoRA merged).

    The result contains only stock torch modules and runs at the original model's cost (a peft LoRA layer stays
    a stock peft layer, its factors holding the means). Returns ``model``
    (or the replacement when ``model`` itself is a Bayesian layer).
    """
    if layer_type_of(model) is not None:
        return model.to_deterministic()
    for name, module in bayesian_modules(model):
        _set_submodule(model, name, module.to_deterministic())
    return model
