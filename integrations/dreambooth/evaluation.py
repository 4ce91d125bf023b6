"""Evaluation during training (``--eval_steps``): a fixed evaluation set (each prompt x ``--num_eval_images``,
one fixed seed per image) generated with the mean weights, scored by ``bayeslayers.integrations.metrics``,
logged to ``eval_metrics.csv`` / the trackers and drawn as ``metrics_vs_step.png``."""

from __future__ import annotations

import csv
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

EVAL_CSV = "eval_metrics.csv"
EVAL_PLOT = "metrics_vs_step.png"


def read_eval_prompts(path) -> list[str]:
    """``--eval_prompts``: a text file (one prompt per line) or a JSON list of prompts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--eval_prompts: {path} is not a file")
    if path.suffix == ".json":
        prompts = json.loads(path.read_text())
        if isinstance(prompts, dict):
            prompts = prompts.get("eval_prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"--eval_prompts: {path} must hold a JSON list of prompts (or 'eval_prompts': [...])")
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--eval_prompts: {path} holds no prompt")
    return prompts


def is_bundled_model(path) -> bool:
    """Whether ``path`` is a bundled tiny model's pipeline (either size): its judge is the default metric."""
    try:
        from bayeslayers.integrations import tiny_sd
        from bayeslayers.integrations.tiny_sd.models import RESOLUTIONS
    except ImportError:
        return False
    try:
        resolved = Path(path).resolve()
    except OSError:
        return False
    return any(resolved == (tiny_sd.assets_dir(r) / "pipeline").resolve() for r in RESOLUTIONS)


class Evaluator:
    """Generates the evaluation set at a step and scores it. ``pipe`` shares the training modules; they are put
    in eval mode (Bayesian layers: mean weights) and their modes restored afterwards; the training RNG streams
    are untouched."""

    def __init__(self, args, pipe, resolution, accelerator, prompt_encoder=None):
        from bayeslayers.integrations.metrics import load_images, parse_metric_names

        self.args, self.pipe, self.resolution, self.accelerator = args, pipe, resolution, accelerator
        self.prompt_encoder = prompt_encoder
        self.metrics = parse_metric_names(args.eval_metrics, "--eval_metrics")
        self.prompts = [p for p in args.eval_prompt_list for _ in range(args.num_eval_images)]
        self.seeds = [(args.seed or 0) + i for i in range(len(self.prompts))]
        self.references = load_images(args.eval_reference_images)
        self.out = Path(args.output_dir)
        self.seconds = 0.0
        self.write_config()

    def write_config(self) -> None:
        from bayeslayers.integrations.metrics.files import RUN_EVAL_CONFIG, RUN_EVAL_DIR

        config = {
            "metrics": ",".join(self.metrics),
            "reference": str(self.args.eval_reference_dir),
            "clip_model": self.args.eval_clip_model,
            "dino_model": self.args.eval_dino_model,
            "prompts": self.args.eval_prompt_list,
            "num_eval_images": self.args.num_eval_images,
            "num_inference_steps": self.args.eval_num_inference_steps,
            "guidance_scale": self.args.guidance_scale,
            "seeds": self.seeds,
        }
        path = self.out / RUN_EVAL_DIR / RUN_EVAL_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=1))

    @torch.no_grad()
    def generate(self) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], quantised to 8 bits (as the saved PNGs, so bayeslayers-eval agrees)."""
        args, pipe = self.args, self.pipe
        modules = [m for m in (pipe.unet, pipe.text_encoder) if m is not None]
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        batch = max(1, args.sample_batch_size)
        images = []
        try:
            for start in range(0, len(self.prompts), batch):
                prompts = self.prompts[start : start + batch]
                generators = [
                    torch.Generator(device=self.accelerator.device).manual_seed(s)
                    for s in self.seeds[start : start + batch]
                ]
                if self.prompt_encoder is not None and self.prompt_encoder.text_encoder is None:
                    text = dict(
                        prompt_embeds=self.prompt_encoder(prompts),
                        negative_prompt_embeds=self.prompt_encoder([""] * len(prompts)),
                    )
                else:
                    text = dict(prompt=prompts)
                out = pipe(
                    **text,
                    height=self.resolution,
                    width=self.resolution,
                    num_inference_steps=args.eval_num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    generator=generators,
                    output_type="pt",
                ).images
                images.append(out.float().cpu())
        finally:
            for module, training in zip(modules, was_training):
                module.train(training)
        pixels = (torch.cat(images).clamp(0, 1) * 255).round()
        return pixels / 127.5 - 1.0

    def __call__(self, step: int) -> dict[str, float]:
        """Generates, scores, saves ``eval/step-NNNNNN/`` (PNGs, prompts.json, metrics.csv), appends the means to
        ``eval_metrics.csv``, logs them (``eval/<metric>``) and redraws the plot; returns the means."""
        with untouched_rng():  # metric models initialise before loading: keep the training streams as they were
            return self._evaluate(step)

    def _evaluate(self, step: int) -> dict[str, float]:
        from bayeslayers.integrations.metrics import evaluate, summarize
        from bayeslayers.integrations.metrics.files import RUN_EVAL_DIR, save_eval_set, write_per_image_csv

        started = time.perf_counter()
        images = self.generate()
        generated = time.perf_counter()
        values = evaluate(
            images,
            self.prompts,
            self.references,
            metrics=self.metrics,
            clip_model=self.args.eval_clip_model,
            dino_model=self.args.eval_dino_model,
            device=self.accelerator.device,
        )
        scored = time.perf_counter()
        folder = self.out / RUN_EVAL_DIR / f"step-{step:06d}"
        files = save_eval_set(images, self.prompts, folder)
        write_per_image_csv(folder / "metrics.csv", files, self.prompts, values)
        means = {column: stats["mean"] for column, stats in summarize(values).items()}
        seconds = time.perf_counter() - started
        self.seconds += seconds
        row = {
            "step": step,
            **means,
            "generate_seconds": round(generated - started, 3),
            "metric_seconds": round(scored - generated, 3),
        }
        write_eval_row(self.out / EVAL_CSV, row)
        self.accelerator.log({f"eval/{k}": v for k, v in means.items() if v == v}, step=step)
        plot_metrics(self.out / EVAL_CSV, self.out / EVAL_PLOT)
        return means


@contextmanager
def untouched_rng():
    """Restores the CPU torch, numpy and Python RNG states afterwards (generation uses its own generators)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def write_eval_row(path, row: dict) -> None:
    """Adds ``row`` to the CSV, replacing an earlier row of the same step (a resumed run re-evaluates)."""
    from bayeslayers.integrations.metrics.files import append_csv_row

    path = Path(path)
    if path.is_file():
        with path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) < row["step"]]
        path.unlink()
        for kept in rows:
            append_csv_row(path, kept)
    append_csv_row(path, row)


def read_eval_rows(output_dir) -> list[dict[str, float]]:
    """The rows of a run's ``eval_metrics.csv``: {"step": int, metric: mean (NaN if undefined), ...} per step."""
    path = Path(output_dir, EVAL_CSV)
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir} has no {EVAL_CSV} (train with --eval_steps)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {k: int(v) if k == "step" else float(v) if v != "" else float("nan") for k, v in row.items()} for row in rows
    ]


def read_eval_csv(path) -> dict[str, list[float]]:
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    return {c: [float(r[c]) if r.get(c) not in (None, "") else float("nan") for r in rows] for c in columns}


def plot_metrics(csv_path, path) -> None:
    """One panel per metric (mean over the evaluation set) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_eval_csv(csv_path)
    columns = [c for c in data if c not in ("step", "generate_seconds", "metric_seconds")]
    columns = [c for c in columns if any(v == v for v in data[c])]
    if not columns:
        return
    cols = min(4, len(columns))
    rows = -(-len(columns) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        ax.plot(data["step"], data[column], marker="o", markersize=3)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
