"""Training checkpoints in safetensors (no pickle): trainable parameters, optimizer and LR-scheduler state,
RNG state (one per process) and the metric history.

Crash safety: a checkpoint is written into a hidden temporary folder, each file flushed to disk, then renamed
into place in one step, so a process killed (even by SIGKILL) while writing leaves every earlier checkpoint
complete. ``trainer_state.json`` records each file's size and CRC32; loading checks them, so a truncated or
corrupted file gives an error naming it. Old checkpoints are deleted only after the new one is complete, and
a write error (full disk) removes the partial folder and names the file it failed on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_CHUNK = 1 << 24


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


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _previous_note(output_dir) -> str:
    found = list_checkpoints(output_dir)
    return f"the previous checkpoint {found[-1]} is intact" if found else "no earlier checkpoint exists"


def check_finite_parameters(named_params: dict, output_dir, step: int) -> None:
    """FloatingPointError naming the first parameter holding NaN/Inf (and the last good checkpoint)."""
    for name, param in named_params.items():
        if not bool(torch.isfinite(param.detach()).all()):
            raise FloatingPointError(
                f"training diverged: parameter {name!r} holds NaN or Inf after step {step}; checkpoint-{step} "
                f"was not written and {_previous_note(output_dir)}. Lower --learning_rate (or raise "
                "--max_grad_norm's strictness) and resume from it"
            )


def check_finite_metrics(logs: dict, output_dir, step: int) -> None:
    """FloatingPointError when a logged training metric (loss, KL, sigma) is NaN/Inf."""
    bad = {k: v for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v) and k != "mean_sigma"}
    if "mean_sigma" in logs and math.isinf(logs["mean_sigma"]):
        bad["mean_sigma"] = logs["mean_sigma"]
    if bad:
        raise FloatingPointError(
            f"training diverged at step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())}; nothing was "
            f"saved for this step and {_previous_note(output_dir)}. Lower --learning_rate and resume from it"
        )


def save_checkpoint(
    output_dir,
    step: int,
    named_params: dict,
    optimizer,
    lr_scheduler,
    history: dict,
    total_limit: int | None,
    rng_states: list[torch.Tensor] | None = None,
) -> Path:
    """Writes ``output_dir/checkpoint-{step}`` atomically and prunes down to ``total_limit`` checkpoints.

    ``rng_states``: the torch CPU RNG state of every process (index = process index); default: this one's.
    Raises FloatingPointError (non-finite parameters) or OSError (write failed) naming the cause, with the
    earlier checkpoints untouched.
    """
    check_finite_parameters(named_params, output_dir, step)
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = Path(output_dir) / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng_states = [torch.get_rng_state()] if rng_states is None else rng_states
    rng = {f"torch.{rank}": state for rank, state in enumerate(rng_states)}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors, structure = _optimizer_tensors(optimizer)
    files = {
        "params.safetensors": {k: v.detach().contiguous().cpu() for k, v in named_params.items()},
        "optimizer.safetensors": tensors,
        "rng.safetensors": rng,
    }
    try:
        manifest = {}
        for name, content in files.items():
            path = tmp / name
            try:
                save_file(content, str(path))
                _fsync(path)
            except (OSError, SafetensorError) as error:
                raise OSError(
                    f"could not write checkpoint file {path} ({error}); checkpoint-{step} was not "
                    f"written and {_previous_note(output_dir)}"
                ) from error
            manifest[name] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
        state_path = tmp / STATE_FILE
        try:
            with open(state_path, "w") as handle:
                json.dump(
                    {
                        "step": step,
                        "files": manifest,
                        "optimizer": structure,
                        "lr_scheduler": lr_scheduler.state_dict(),
                        "history": history,
                    },
                    handle,
                )
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise OSError(
                f"could not write checkpoint file {state_path} ({error}); checkpoint-{step} was not "
                f"written and {_previous_note(output_dir)}"
            ) from error
        _fsync(tmp)
        stale = None
        if final.exists():  # the same step saved again (after a resume): swap, then delete the old copy
            stale = final.with_name(f".old-{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync(Path(output_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_checkpoint(output_dir, name: str) -> Path:
    """The checkpoint folder for ``name`` ("latest", a folder name, or a path); FileNotFoundError otherwise."""
    if name == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(output_dir) / name  # an absolute name replaces output_dir
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint folder")
    return path


def _damaged(path: Path, reason: str) -> ValueError:
    others = [p for p in list_checkpoints(path.parent.parent) if p != path.parent]
    hint = f"; resume from an earlier one, e.g. --resume_from_checkpoint {others[-1].name}" if others else ""
    return ValueError(f"checkpoint file {path} is truncated or corrupted ({reason}){hint}")


def _read_state(path: Path) -> dict:
    state_path = path / STATE_FILE
    try:
        with open(state_path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _damaged(state_path, str(error)) from None


def _read_tensors(path: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    file = path / name
    expected = manifest.get(name)
    if expected is not None:  # checkpoints written before the manifest existed have none
        if not file.exists():
            raise _damaged(file, "missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise _damaged(file, f"{size} bytes, expected {expected['bytes']}")
        if _crc32(file) != expected["crc32"]:
            raise _damaged(file, "CRC32 mismatch")
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as error:
        raise _damaged(file, str(error)) from None


def load_checkpoint(path, named_params: dict, optimizer, lr_scheduler, process_index: int = 0) -> tuple[int, dict]:
    """Restores everything :func:`save_checkpoint` wrote; returns (step, history).

    Every file is checked before any state changes: a damaged file or a checkpoint of another model (other
    parameter names or shapes) raises a ValueError naming it and leaves the model, optimizer and RNG as they were.
    """
    path = Path(path)
    state = _read_state(path)
    manifest = state.get("files", {})
    params = _read_tensors(path, "params.safetensors", manifest)
    optimizer_tensors = _read_tensors(path, "optimizer.safetensors", manifest)
    rng = _read_tensors(path, "rng.safetensors", manifest)
    missing = sorted(set(named_params) - set(params))
    unexpected = sorted(set(params) - set(named_params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} is not from this model: it lacks trainable parameters {missing[:3]} "
            f"and holds others {unexpected[:3]} (of {len(missing)} missing, {len(unexpected)} extra)"
        )
    for name, param in named_params.items():
        if tuple(params[name].shape) != tuple(param.shape):
            raise ValueError(
                f"checkpoint {path} is not from this model: {name} has shape "
                f"{tuple(params[name].shape)} there but {tuple(param.shape)} in the model"
            )
    structure = state["optimizer"]
    per_param: dict[int, dict] = {}
    for key, value in list(optimizer_tensors.items()) + list(structure["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(params[name])
    optimizer.load_state_dict({"state": per_param, "param_groups": structure["param_groups"]})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    own = rng.get(f"torch.{process_index}", rng.get("torch", rng.get("torch.0")))
    torch.set_rng_state(own)
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return state["step"], state["history"]
