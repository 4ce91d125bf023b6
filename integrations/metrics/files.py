"""Evaluation sets on disk: a folder of PNGs plus ``prompts.json`` ({file name: prompt}), per-image CSVs and
summaries, and the layout a DreamBooth run writes (``RUN/eval/step-NNNNNN/``, ``RUN/eval/config.json``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from .images import image_files, load_images

PROMPTS_FILE = "prompts.json"
RUN_EVAL_DIR = "eval"
RUN_EVAL_CONFIG = "config.json"


def read_prompts(path, files) -> list[str]:
    """One prompt per image file. ``path``: ``.json`` ({file name: prompt} or a list in file order), ``.csv``
    (columns ``file``, ``prompt``), or text (one line for every image, or one line per image in name order)."""
    path, names = Path(path), [Path(f).name for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: {path} is not a file")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        mapping = data if isinstance(data, dict) else dict(zip(names, data)) if len(data) == len(names) else None
    elif path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and not {"file", "prompt"} <= set(rows[0]):
            raise ValueError(f"--prompts: {path} needs the columns 'file' and 'prompt', got {list(rows[0])}")
        mapping = {Path(r["file"]).name: r["prompt"] for r in rows}
    else:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        mapping = {n: lines[0] for n in names} if len(lines) == 1 else dict(zip(names, lines))
        if len(lines) not in (1, len(names)):
            mapping = None
    if mapping is None:
        raise ValueError(f"--prompts: {path} lists a number of prompts other than the {len(names)} images")
    missing = [n for n in names if n not in mapping]
    if missing:
        raise ValueError(f"--prompts: {path} has no prompt for {', '.join(missing[:5])}")
    return [mapping[n] for n in names]


def save_eval_set(images: torch.Tensor, prompts: list[str], folder) -> list[Path]:
    """Writes images (N, 3, H, W) in [-1, 1] as ``NNN.png`` plus ``prompts.json``; returns the files."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    files = [folder / f"{i:03d}.png" for i in range(len(pixels))]
    for path, array in zip(files, pixels):
        Image.fromarray(np.ascontiguousarray(array)).save(path)
    (folder / PROMPTS_FILE).write_text(json.dumps({p.name: t for p, t in zip(files, prompts)}, indent=1))
    return files


def load_eval_set(folder, prompts_file=None):
    """(images (N, 3, H, W) in [-1, 1], prompts, files) of a folder (prompts from ``prompts_file`` or the
    folder's ``prompts.json``)."""
    files = image_files(folder, "--images")
    prompts_file = prompts_file or Path(folder, PROMPTS_FILE)
    return load_images(files), read_prompts(prompts_file, files), files


def run_eval_steps(run) -> dict[int, Path]:
    """{step: folder} of the evaluation sets a DreamBooth run saved (``--eval_steps``)."""
    folder = Path(run, RUN_EVAL_DIR)
    if not folder.is_dir():
        raise FileNotFoundError(f"--from-run: {run} has no {RUN_EVAL_DIR}/ folder (train with --eval_steps)")
    steps = {int(p.name.split("-")[1]): p for p in folder.glob("step-*") if p.is_dir()}
    if not steps:
        raise FileNotFoundError(f"--from-run: no step-* evaluation sets in {folder}")
    return dict(sorted(steps.items()))


def run_eval_config(run) -> dict:
    path = Path(run, RUN_EVAL_DIR, RUN_EVAL_CONFIG)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_per_image_csv(path, files, prompts, values: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    """One row per image: ``extra`` columns, file, prompt, then every metric column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*extra, "file", "prompt", *values])
        for i, (file, prompt) in enumerate(zip(files, prompts)):
            row = [_cell(float(v[i])) for v in values.values()]
            writer.writerow([*extra.values(), Path(file).name, prompt, *row])
    return path


def append_csv_row(path, row: dict) -> None:
    """Appends ``row`` to a CSV, rewriting it when ``row`` brings new columns."""
    path = Path(path)
    rows = []
    if path.is_file():
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    columns = list(dict.fromkeys([*(rows[0] if rows else {}), *row]))
    rows.append({k: _cell(v) for k, v in row.items()})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """The summary as an aligned text table: metric, mean, std, n."""
    width = max([len("metric"), *map(len, summary)])
    lines = [f"{'metric':<{width}}  {'mean':>9}  {'std':>9}  {'n':>5}"]
    for column, stats in summary.items():
        mean, std = (f"{stats[k]:9.4f}" if not math.isnan(stats[k]) else f"{'-':>9}" for k in ("mean", "std"))
        lines.append(f"{column:<{width}}  {mean}  {std}  {stats['count']:>5}")
    return "\n".join(lines)
