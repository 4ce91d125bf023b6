"""``bayeslayers-eval``: metrics of a folder of generated images (or of a DreamBooth run's evaluation sets) ->
per-image CSV, summary JSON and a printed table.

    bayeslayers-eval --images samples/ --prompts prompts.json --reference dog/ --metrics clip_t,clip_i,dino
    bayeslayers-eval --from-run run1                  # the run's latest --eval_steps set, metrics and reference
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .files import (
    format_table,
    load_eval_set,
    run_eval_config,
    run_eval_steps,
    write_per_image_csv,
)
from .images import image_files, load_images
from .models import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from .registry import METRIC_HELP, PAPER_METRICS, build_metric, evaluate, parse_metric_names, summarize

PROG = "bayeslayers-eval"
CSV_NAME = "metrics.csv"
SUMMARY_NAME = "metrics_summary.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-image metrics of generated images: "
        + "; ".join(f"{name}: {text}" for name, text in METRIC_HELP.items()),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=str, help="folder of generated images (png/jpg)")
    source.add_argument(
        "--from-run", "--from_run", dest="from_run", type=str, help="a bayeslayers-dreambooth --output_dir"
    )
    parser.add_argument(
        "--prompts",
        type=str,
        default=None,
        help="with --images: .json {file: prompt}, .csv (file,prompt) or text (one line, or one per image in "
        "name order); default: the folder's prompts.json",
    )
    parser.add_argument("--step", type=int, default=None, help="with --from-run: which step (default: the latest)")
    parser.add_argument("--reference", type=str, default=None, help="folder of the subject's reference images")
    parser.add_argument(
        "--metrics",
        type=str,
        default=None,
        help=f"comma-separated; default {','.join(PAPER_METRICS)} (with --from-run: the run's --eval_metrics)",
    )
    parser.add_argument("--clip_model", type=str, default=None, help=f"hub id or folder; default {DEFAULT_CLIP_MODEL}")
    parser.add_argument("--dino_model", type=str, default=None, help=f"hub id or folder; default {DEFAULT_DINO_MODEL}")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--output_dir", type=str, default=None, help="where the CSV and JSON go; default: the images' folder"
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_run and args.prompts:
        parser.error("--prompts goes with --images; a run's evaluation sets carry their prompts.json")
    if args.step is not None and not args.from_run:
        parser.error("--step goes with --from-run")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        if args.metrics is not None:
            args.metrics = ",".join(parse_metric_names(args.metrics))
    except ValueError as error:
        parser.error(str(error))
    return args


def resolve(args) -> dict:
    """The images folder, prompts file, reference folder, metrics and models the arguments mean."""
    settings = dict(
        images=args.images,
        prompts=args.prompts,
        reference=args.reference,
        metrics=args.metrics,
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        step=None,
    )
    if args.from_run:
        steps = run_eval_steps(args.from_run)
        step = max(steps) if args.step is None else args.step
        if step not in steps:
            raise ValueError(f"--step {step}: {args.from_run} has evaluation sets at steps {list(steps)}")
        config = run_eval_config(args.from_run)
        settings.update(images=str(steps[step]), step=step)
        for key in ("reference", "metrics", "clip_model", "dino_model"):
            settings[key] = settings[key] or config.get(key)
    settings["metrics"] = settings["metrics"] or ",".join(PAPER_METRICS)
    settings["clip_model"] = settings["clip_model"] or DEFAULT_CLIP_MODEL
    settings["dino_model"] = settings["dino_model"] or DEFAULT_DINO_MODEL
    return settings


def per_prompt_means(prompts, values) -> dict[str, dict[str, float]]:
    import torch

    result = {}
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([p == prompt for p in prompts])
        result[prompt] = {k: float(v[index].nanmean()) for k, v in values.items()}
    return result


def without_nan(value):
    """NaN (a metric undefined for every image) -> None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def main(args) -> dict:
    """Evaluates; writes ``metrics.csv`` and ``metrics_summary.json``; returns the summary."""
    settings = resolve(args)
    images, prompts, files = load_eval_set(settings["images"], settings["prompts"])
    references = None
    if settings["reference"]:
        references = load_images(image_files(settings["reference"], "--reference"))
    names = parse_metric_names(settings["metrics"])
    needing = [n for n in names if "references" in build_metric(n).requires]
    if needing and references is None:
        raise ValueError(f"--reference (the subject's images) is required by {', '.join(needing)}")
    values = evaluate(
        images,
        prompts,
        references,
        metrics=names,
        clip_model=settings["clip_model"],
        dino_model=settings["dino_model"],
        device=args.device,
        batch_size=args.batch_size,
    )
    out = Path(args.output_dir or settings["images"])
    csv_path = write_per_image_csv(out / CSV_NAME, files, prompts, values)
    summary = {
        **{k: v for k, v in settings.items() if v is not None},
        "num_images": len(files),
        "num_references": 0 if references is None else len(references),
        "summary": summarize(values),
        "per_prompt": per_prompt_means(prompts, values),
        "csv": str(csv_path),
    }
    (out / SUMMARY_NAME).write_text(json.dumps(without_nan(summary), indent=1, default=str))
    summary["json"] = str(out / SUMMARY_NAME)
    return summary


def cli(argv=None) -> None:
    args = parse_args(argv)
    try:
        summary = main(args)
    except (OSError, ValueError) as error:
        sys.exit(f"{PROG}: error: {error}")
    print(f"{summary['num_images']} images in {summary['images']}")
    print(format_table(summary["summary"]))
    print(f"per-image values: {summary['csv']}\nsummary: {summary['json']}")


if __name__ == "__main__":
    cli()
