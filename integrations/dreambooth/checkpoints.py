"""Training checkpoints in safetensors (no pickle): trainable parameters, optimizer and LR-scheduler state,
RNG state and the metric history. Written to a temporary folder and renamed into place; old checkpoints are
deleted only after the new one is complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(output_dir, step: int, named_params: dict, optimizer, lr_scheduler, history: dict,
                    total_limit: int | None) -> Path:
    """Writes ``output_dir/checkpoint-{step}`` atomically and prunes down to ``total_limit`` checkpoints."""
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = Path(output_dir) / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in named_params.items()}, str(tmp / "params.safetensors"))
    tensors, structure = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    with open(tmp / "trainer_state.json", "w") as handle:
        json.dump({"step": step, "optimizer": structure, "lr_scheduler": lr_scheduler.state_dict(),
                   "history": history}, handle)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_checkpoint(output_dir, name: str) -> Path:
    """The checkpoint folder for ``name`` ("latest", a folder name, or a path); FileNotFoundError otherwise."""
    if name == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(name) if os.path.isabs(name) else Path(output_dir) / name
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint folder")
    return path


def load_checkpoint(path, named_params: dict, optimizer, lr_scheduler) -> tuple[int, dict]:
    """Restores everything :func:`save_checkpoint` wrote; returns (step, history)."""
    path = Path(path)
    with open(path / "trainer_state.json") as handle:
        state = json.load(handle)
    params = load_file(str(path / "params.safetensors"))
    missing = sorted(set(named_params) - set(params))
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable parameters of this model, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(params[name])
    tensors = load_file(str(path / "optimizer.safetensors"))
    structure = state["optimizer"]
    per_param: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(structure["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": structure["param_groups"]})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state["step"], state["history"]
