"""save() / load(): the Bayesian state of a model (posterior, prior, options) as one safetensors file."""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .convert import bayesian_modules, convert
from .registry import layer_type_by_name, layer_type_of

FORMAT = "bayeslayers/1"
_FROZEN_PREFIX = "base_layer."  # LoRA base weights belong to the base model, not to the Bayesian state


def _layer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds for a Bayesian layer: its ``bayes_state()`` where it defines one (a peft
    layer: its adapter's factors, rho included), else its state dict without the frozen LoRA base."""
    if hasattr(module, "bayes_state"):
        return module.bayes_state()
    return {k: v for k, v in module.state_dict().items() if not k.startswith(_FROZEN_PREFIX)}


def save(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes every Bayesian layer's state (mu, rho, prior mean, bias / LoRA factors) and options to ``path``.

    The file is written next to its destination and renamed into place, so an interrupted save never
    destroys an earlier checkpoint. ``metadata`` adds string key/values to the file header.
    """
    entries = bayesian_modules(model)
    if not entries:
        raise ValueError("save: the model has no Bayesian layers; call bayeslayers.convert first")
    tensors, layers = {}, {}
    for name, module in entries:
        for posterior_name, layer in module.named_modules():
            if hasattr(layer, "check_finite"):
                layer.check_finite(f"{name}.{posterior_name}".rstrip("."))
        for key, tensor in _layer_state(module).items():
            tensors[f"{name}.{key}"] = tensor.detach().contiguous().cpu()
        layers[name] = {"type": layer_type_of(module).name, "options": module.options()}
    header = {"format": FORMAT, "layers": json.dumps(layers)}
    header.update(metadata or {})
    path = os.fspath(path)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp_path, metadata=header)
        os.replace(tmp_path, path)
    except (OSError, SafetensorError) as error:
        kept = "the existing file there is unchanged" if os.path.exists(path) else "nothing was written"
        raise OSError(f"save: could not write {path!r} ({error}); {kept}") from error
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The header of a bayeslayers checkpoint: {'format', 'layers': {name: {'type', 'options'}}, ...}."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable safetensors file, truncated or corrupted ({error})"
        ) from None
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not a bayeslayers checkpoint (format {header.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return {**header, "layers": json.loads(header["layers"])}


def _convert_like_checkpoint(model: nn.Module, layers: dict) -> None:
    for name, entry in layers.items():
        layer_type = layer_type_by_name(entry["type"])
        # BayesConfig reads the saved dtype names ("bfloat16") itself
        convert(model, target_modules=re.escape(name), mode=layer_type.mode, **entry["options"])


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a :func:`save` checkpoint into ``model`` and returns it.

    An unconverted model is first converted exactly as the saved one was (same layers, same options). A
    converted model must have the same Bayesian layers, types and shapes: the first mismatch raises a
    ValueError naming it, as does a tensor holding NaN or inf.
    """
    header = read_metadata(path)
    layers = header["layers"]
    present = dict(bayesian_modules(model))
    if not present:
        _convert_like_checkpoint(model, layers)
        present = dict(bayesian_modules(model))
    for name in present:
        if name not in layers:
            raise ValueError(f"load: model layer {name!r} is Bayesian but the checkpoint has no such layer")
    with safe_open(os.fspath(path), framework="pt") as handle:
        keys = set(handle.keys())
        for name, entry in layers.items():
            module = present.get(name)
            if module is None:
                raise ValueError(f"load: checkpoint layer {name!r} is not a Bayesian layer of the model")
            found = layer_type_of(module).name
            if found != entry["type"]:
                raise ValueError(
                    f"load: layer {name!r} is {found!r} in the model but {entry['type']!r} in the checkpoint"
                )
            expected = _layer_state(module)
            if entry["options"].get("store_prior", True) is False:  # saved without a prior: apply_options drops it
                expected = {k: v for k, v in expected.items() if not k.endswith("prior_mu")}
            stored = {k[len(name) + 1 :] for k in keys if k.startswith(name + ".")}
            if stored != set(expected):
                raise ValueError(
                    f"load: layer {name!r} holds tensors {sorted(expected)} in the model but "
                    f"{sorted(stored)} in the checkpoint"
                )
            for key, target in expected.items():
                shape = tuple(handle.get_slice(f"{name}.{key}").get_shape())
                if shape != tuple(target.shape):
                    raise ValueError(
                        f"load: {name}.{key} has shape {tuple(target.shape)} in the model but {shape} in the checkpoint"
                    )
            module.apply_options(entry["options"])  # first: the prior buffer takes the saved dtype (and presence)
            for key, target in _layer_state(module).items():
                tensor = handle.get_tensor(f"{name}.{key}")
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"load: {os.fspath(path)!r} holds non-finite values (NaN or inf) in {name}.{key}; the "
                        "checkpoint is corrupt or was saved from a diverged run"
                    )
                with torch.no_grad():
                    target.copy_(tensor)
    return model
