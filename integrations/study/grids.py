"""Example grids of a finished study: one subject's evaluation images across training, one row per arm, so the
curves' dip can be seen. The columns are evenly spaced evaluation steps plus the *dip*, the step where the first
plain arm's corruption (mean over seeds) peaks."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .runner import run_dir


def dip_step(rows: list[dict], subject: str, arm: str, column: str = "corruption") -> int | None:
    """The evaluation step of ``arm`` on ``subject`` where ``column``'s mean over seeds is highest (None: no
    such rows)."""
    by_step = defaultdict(list)
    for row in rows:
        if row["subject"] == subject and row["arm"] == arm and column in row:
            by_step[row["step"]].append(row[column])
    if not by_step:
        return None
    return max(sorted(by_step), key=lambda step: sum(by_step[step]) / len(by_step[step]))


def grid_steps(rows: list[dict], subject: str, columns: int, dip: int | None) -> list[int]:
    """``columns`` evenly spaced evaluation steps of ``subject`` (first and last included) and ``dip``."""
    steps = sorted({row["step"] for row in rows if row["subject"] == subject})
    if columns < 2:
        raise ValueError(f"columns must be >= 2, got {columns}")
    picked = {steps[round(i * (len(steps) - 1) / (columns - 1))] for i in range(columns)} if steps else set()
    if dip is not None:
        picked.add(dip)
    return sorted(picked)


def subject_grid(
    root: Path,
    rows: list[dict],
    subject: str,
    arms: list[str],
    out: Path,
    seed: int = 0,
    images: tuple[int, ...] = (0, 1),
    columns: int = 5,
    scale: int = 2,
) -> Path:
    """Writes ``out`` (PNG): rows = arms, columns = evaluation steps (:func:`grid_steps`, the plain arm's dip
    marked), each cell the evaluation images ``images`` (indices into the fixed evaluation set) of ``seed``'s
    run side by side, upscaled ``scale`` x (nearest, so 2-pixel textures stay visible)."""
    from PIL import Image, ImageDraw

    from bayeslayers.integrations.metrics.files import run_eval_steps

    plain = next((a for a in arms if "bnn" not in a), arms[0])
    dip = dip_step(rows, subject, plain)
    steps = grid_steps(rows, subject, columns, dip)
    cells = {}
    for arm in arms:
        folders = run_eval_steps(run_dir(root, subject, arm, seed))
        for step in steps:
            cells[arm, step] = [Image.open(folders[step] / f"{i:03d}.png").convert("RGB") for i in images]
    side = next(iter(cells.values()))[0].size[0] * scale
    label_w, label_h, pad = 110, 14, 4
    cell_w = len(images) * side + pad
    canvas = Image.new("RGB", (label_w + len(steps) * cell_w, label_h + len(arms) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, step in enumerate(steps):
        draw.text((label_w + j * cell_w, 1), f"step {step}" + (" (dip)" if step == dip else ""), fill="black")
    for i, arm in enumerate(arms):
        y = label_h + i * (side + pad)
        draw.text((2, y + side // 2 - 6), arm, fill="black")
        for j, step in enumerate(steps):
            for k, image in enumerate(cells[arm, step]):
                canvas.paste(image.resize((side, side), Image.NEAREST), (label_w + j * cell_w + k * side, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def write_grids(root: Path, rows: list[dict], arms: list[str], seed: int = 0) -> list[Path]:
    """``root/grid_<subject>.png`` for every subject whose runs of all ``arms`` at ``seed`` saved their
    evaluation images."""
    written = []
    for subject in dict.fromkeys(row["subject"] for row in rows):
        if all((run_dir(root, subject, arm, seed) / "eval").is_dir() for arm in arms):
            written.append(subject_grid(root, rows, subject, arms, root / f"grid_{subject}.png", seed=seed))
    return written
