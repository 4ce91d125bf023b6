"""convert(): swap plain layers for Bayesian ones in place; to_deterministic(): swap them back (mean weights)."""

from __future__ import annotations

import torch.nn as nn

from .layers import BayesianLayer
from .presets import get_preset
from .registry import MODES, layer_type_for_source, layer_type_of, source_types
from .rng import layer_id_for
from .targets import check_targets, name_matches


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
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


def _select(model, targets, excludes, mode):
    sources = source_types(mode)
    converted = [name for name, _ in bayesian_modules(model)]
    selected, candidates = [], []
    for name, module in model.named_modules():
        if not name or not isinstance(module, sources):
            continue
        inside = next((c for c in converted if name == c or name.startswith(c + ".")), None)
        if inside is None:
            candidates.append(name)
        if name_matches(name, excludes) or not name_matches(name, targets):
            continue
        if inside is not None:
            raise ValueError(f"module {name!r} is already part of the Bayesian layer {inside!r}; "
                             "converting it again is not supported")
        selected.append(name)
    for name, module in model.named_modules():
        if name in converted and name_matches(name, targets) and not name_matches(name, excludes):
            raise ValueError(f"module {name!r} is already a Bayesian layer ({type(module).__name__}); "
                             "converting it again is not supported")
    if not selected:
        shown = ", ".join(repr(c) for c in candidates[:8]) or "none"
        raise ValueError(f"target_modules {targets!r} matched no convertible module "
                         f"({'/'.join(t.__name__ for t in sources)}) in mode {mode!r}; "
                         f"candidates include: {shown}")
    return selected


CONVERT_DEFAULTS = dict(mode="full", rank=4, lora_alpha=None, init_sigma=0.01, prior_sigma=0.01, kl_direction="qp",
                        bayesian_factors="AB", prior_dtype=None)
_UNSET = object()


def convert(model: nn.Module, target_modules=None, exclude_modules=None, mode=_UNSET, rank=_UNSET,
            lora_alpha=_UNSET, init_sigma=_UNSET, prior_sigma=_UNSET, kl_direction=_UNSET,
            preset: str | None = None, *, bayesian_factors=_UNSET, prior_dtype=_UNSET) -> nn.Module:
    """Replaces matching nn.Linear / nn.Conv2d modules of ``model`` in place by Bayesian layers.

    Args:
        target_modules: module names (peft semantics: exact name or ``.name`` suffix) or a full-match regex.
        exclude_modules: same forms; checked before ``target_modules``.
        mode: "full" (default; the weight becomes Bayesian, other parameters keep ``requires_grad``) or "lora"
            (a Bayesian LoRA adapter of ``rank`` (4) / ``lora_alpha`` (= rank) is added; every other
            parameter is frozen).
        init_sigma: initial posterior std (0.01); prior_sigma: prior std (0.01); both > 0.
        kl_direction: "qp" = KL(q||p) (default) or "pq" = KL(p||q) (the seed paper's code).
        preset: a registered preset (see :func:`bayeslayers.available_presets`); arguments passed explicitly
            override the preset's values, which override the defaults.
        bayesian_factors: LoRA factors that are Bayesian: "AB" (default), "A" or "B".
        prior_dtype: dtype of the stored prior mean (torch.bfloat16 halves its memory); None = fp32.

    Returns:
        ``model`` itself, converted.
    """
    explicit = dict(mode=mode, rank=rank, lora_alpha=lora_alpha, init_sigma=init_sigma, prior_sigma=prior_sigma,
                    kl_direction=kl_direction, bayesian_factors=bayesian_factors, prior_dtype=prior_dtype)
    options = dict(CONVERT_DEFAULTS)
    if preset is not None:
        preset_options = get_preset(preset)
        target_modules = preset_options.pop("target_modules", None) if target_modules is None else target_modules
        exclude_modules = preset_options.pop("exclude_modules", None) if exclude_modules is None else exclude_modules
        options.update({k: v for k, v in preset_options.items() if k in CONVERT_DEFAULTS})
    options.update({k: v for k, v in explicit.items() if v is not _UNSET})
    mode = options.pop("mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target_modules = check_targets(target_modules, "target_modules")
    exclude_modules = check_targets(exclude_modules, "exclude_modules")
    if target_modules is None:
        raise ValueError("convert needs target_modules or a preset naming the modules to make Bayesian")

    selected = _select(model, target_modules, exclude_modules, mode)
    if mode == "lora":
        model.requires_grad_(False)
    for name in selected:
        module = model.get_submodule(name)
        layer_type = layer_type_for_source(module, mode)
        layer_options = {k: v for k, v in options.items() if k in layer_type.options}
        _set_submodule(model, name, layer_type.layer.from_module(module, **layer_options))
    assign_layer_ids(model)
    return model


def to_deterministic(model: nn.Module) -> nn.Module:
    """Replaces every Bayesian layer by the plain module holding its posterior mean (LoRA merged).

    The result contains only stock torch modules and runs at the original model's cost. Returns ``model``
    (or the replacement when ``model`` itself is a Bayesian layer).
    """
    if layer_type_of(model) is not None:
        return model.to_deterministic()
    for name, module in bayesian_modules(model):
        _set_submodule(model, name, module.to_deterministic())
    return model
