"""The corruption-stage study: fidelity, corruption and diversity against training steps, for plain and Bayesian
DreamBooth and LoRA, several subjects and seeds.

    python -m bayeslayers.integrations.study [--quick] [--output_dir outputs/study]
    python -m bayeslayers.integrations.study --corruption [--output_dir outputs/corruption]  # the 64 px model
    python -m bayeslayers.integrations.study --pretrained_model_name_or_path path/to/sd15 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --class_prompt "a photo of dog" \\
        --eval_prompts dog_prompts.txt --metrics clip_t,clip_i,dino,diversity,clip_iqa --resolution 512

Writes ``evaluations.csv`` (every evaluation of every run), ``curves.png`` (each metric against the fraction of
training, mean over subjects, band = +-1 std over seeds), ``results.md`` / ``results.json`` (best and final
values, where the best was reached, dip area per arm), ``grid_<subject>.png`` (the first seed's evaluation images
across training, one row per arm, the plain arm's corruption peak marked) and, for the Bayesian arms,
``uncertainty.json`` (rank correlation of each image's posterior uncertainty with its fidelity, gain from dropping
the most uncertain 25 %).
A finished run is kept in ``runs/`` and not rerun: the same command resumes an interrupted study.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from .arms import ARMS, CORRUPTION, FULL, QUICK, SMOKE, StudySettings


def parse_args(input_args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="one subject, one seed, a few steps (a smoke run, about 1.3 min on 2 cores)",
    )
    p.add_argument(
        "--corruption",
        action="store_true",
        help="the corruption-stage study on the 64 px model: plain vs Bayesian full fine-tuning, 2 texture "
        "subjects, 3 seeds, 1000 steps at lr 5e-4, evaluated every 5 %% (with --quick: its smoke run)",
    )
    p.add_argument("--output_dir", default="outputs/study")
    p.add_argument("--subjects", default=None, help="comma-separated bundled subjects (default: all four)")
    p.add_argument(
        "--arms", default=None, help=f"comma-separated, from {', '.join(ARMS)} (default: {', '.join(FULL.arms)})"
    )
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--evaluations", type=int, default=None, help="evaluation points after step 0 (default 15)")
    p.add_argument("--images_per_prompt", type=int, default=None)
    p.add_argument("--learning_rate_full", type=float, default=None)
    p.add_argument("--learning_rate_lora", type=float, default=None)
    p.add_argument("--kl_weight", type=float, default=None, help="both Bayesian arms (default: full 1e-4, LoRA 0)")
    p.add_argument("--kl_weight_full", type=float, default=None)
    p.add_argument("--kl_weight_lora", type=float, default=None)
    p.add_argument("--uncertainty_samples", type=int, default=None, help="posterior samples per image; 0 skips")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once, in worker processes (default: 2 on a 2+ core machine for the bundled model, else 1)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument(
        "--reuse_dir",
        default=None,
        help="a finished study's output folder (e.g. docs/study) made with the same settings: its runs of arms not "
        "run here are reported beside this study's, from its evaluations.csv and uncertainty_images.csv",
    )
    p.add_argument(
        "--report_only",
        action="store_true",
        help="write the outputs from the finished runs in --output_dir, train none",
    )
    p.add_argument(
        "--plot_only",
        action="store_true",
        help="redraw curves.png from --output_dir's evaluations.csv and settings.json, train none",
    )
    user = p.add_argument_group("your own model and subject (e.g. SD1.5)")
    user.add_argument("--pretrained_model_name_or_path", default=None, help="default: the bundled tiny model")
    user.add_argument("--instance_data_dir", default=None)
    user.add_argument("--instance_prompt", default=None)
    user.add_argument("--class_prompt", default=None)
    user.add_argument("--eval_prompts", default=None, help="text file, one recontextualisation prompt per line")
    user.add_argument("--metrics", default=None, help="bayeslayers-eval metrics (default: judge / the paper's)")
    user.add_argument("--resolution", type=int, default=None)
    args = p.parse_args(input_args)
    for name in ("jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.instance_data_dir is not None and (args.instance_prompt is None or args.eval_prompts is None):
        p.error("--instance_data_dir needs --instance_prompt and --eval_prompts")
    return args


def _names(value: str | None, default: tuple, choices, flag: str) -> tuple:
    if value is None:
        return default
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if choices is not None and n not in choices]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown or no names {unknown}; choose from {', '.join(choices)}")
    return names


def settings_from_args(args) -> StudySettings:
    from bayeslayers.integrations.tiny_sd.subject import subjects

    if args.corruption:
        smoke = {k: v for k, v in SMOKE.items() if not k.startswith("uncertainty")}
        base = CORRUPTION.replace(subjects=CORRUPTION.subjects[:1], **smoke) if args.quick else CORRUPTION
    else:
        base = QUICK if args.quick else FULL
    changes = {
        "subjects": _names(args.subjects, base.subjects, subjects(base.resolution), "--subjects"),
        "arms": _names(args.arms, base.arms, ARMS, "--arms"),
        "seeds": tuple(int(s) for s in _names(args.seeds, tuple(map(str, base.seeds)), None, "--seeds")),
    }
    for name in ("max_train_steps", "evaluations", "images_per_prompt", "uncertainty_samples"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    for name in ("learning_rate", "kl_weight"):
        values = dict(getattr(base, name))
        for mode in ("full", "lora"):
            given = getattr(args, f"{name}_{mode}")
            if given is None:
                given = getattr(args, name, None)
            if given is not None:
                values[mode] = given
        changes[name] = values
    return base.replace(**changes)


def settings_differ(saved: dict, current: dict) -> list[str]:
    """The settings (other than subjects, arms and seeds) in which two studies differ; a setting a saved study
    does not record has its default."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default for f in fields(StudySettings) if f.default is not MISSING}
    return sorted(
        k for k in current if k not in ("subjects", "arms", "seeds") and saved.get(k, defaults.get(k)) != current[k]
    )


def check_settings(root: Path, settings: StudySettings) -> None:
    """Records the settings in ``root/settings.json``; finished runs there are reused only if everything but the
    list of subjects, arms and seeds is the same (otherwise their curves would not be comparable)."""
    path = root / "settings.json"
    current = json.loads(json.dumps(settings.__dict__, default=list))
    if path.exists():
        differs = settings_differ(json.loads(path.read_text()), current)
        if differs:
            raise ValueError(
                f"--output_dir {root} holds runs made with other settings ({', '.join(differs)}); "
                "use another --output_dir"
            )
    path.write_text(json.dumps(current, indent=1))


def finished_rows(root: Path, subject: str, arm: str, seed: int, name: str) -> list[dict]:
    from .runner import run_dir

    path = run_dir(root, subject, arm, seed) / name
    return json.loads(path.read_text()) if path.exists() else []


def read_csv(path: Path) -> list[dict]:
    """Rows of :func:`write_csv`, numbers parsed (empty cells dropped)."""

    def parse(value: str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with path.open(newline="") as handle:
        return [{k: parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def reused_rows(folder: Path, settings: StudySettings) -> tuple[list[dict], list[dict]]:
    """Evaluation and per-image rows of a finished study in ``folder`` for the arms this study does not run, of
    this study's subjects and seeds; a ValueError if its settings differ (other than subjects, arms, seeds)."""
    saved = json.loads((folder / "settings.json").read_text())
    current = json.loads(json.dumps(settings.__dict__, default=list))
    differs = settings_differ(saved, current)
    if differs:
        raise ValueError(f"--reuse_dir {folder} was made with other settings ({', '.join(differs)})")

    def keep(row):
        return row["arm"] not in settings.arms and row["subject"] in settings.subjects and row["seed"] in settings.seeds

    rows = [r for r in read_csv(folder / "evaluations.csv") if keep(r)]
    images = folder / "uncertainty_images.csv"
    image_rows = [r for r in read_csv(images) if keep(r)] if images.exists() else []
    if not rows:
        raise ValueError(f"--reuse_dir {folder} holds no run of other arms for these subjects and seeds")
    return rows, image_rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_only(root: Path) -> Path:
    """Redraws ``root/curves.png`` from ``root/evaluations.csv`` and ``root/settings.json`` (a finished study)."""
    from . import analysis

    settings = json.loads((root / "settings.json").read_text())
    rows = read_csv(root / "evaluations.csv")
    metrics = [m for m in analysis.METRICS if any(m.column in r for r in rows)]
    title = _title(settings, len(settings["subjects"]))
    analysis.plot_curves(rows, list(settings["arms"]), root / "curves.png", metrics, title=title)
    return root / "curves.png"


def main(args) -> dict:
    from . import analysis
    from .grids import write_grids
    from .runner import SubjectData

    if args.plot_only:
        return {"curves": str(plot_only(Path(args.output_dir)))}

    settings = settings_from_args(args)
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    check_settings(root, settings)
    if args.instance_data_dir is not None:
        eval_prompts = [line.strip() for line in Path(args.eval_prompts).read_text().splitlines() if line.strip()]
        subjects = [
            SubjectData(
                Path(args.instance_data_dir).name,
                args.instance_data_dir,
                args.instance_prompt,
                args.class_prompt,
                tuple(eval_prompts),
            )
        ]
    else:
        subjects = [SubjectData.bundled(name, settings.resolution) for name in settings.subjects]
    started = time.perf_counter()
    model, flags = model_flags(args, settings)
    tasks = [
        (subject, arm, seed, settings, root, flags, model)
        for subject in subjects
        for seed in settings.seeds
        for arm in settings.arms
    ]
    if args.report_only:
        results = [
            (
                finished_rows(root, s.name, arm, seed, "rows.json"),
                finished_rows(root, s.name, arm, seed, "uncertainty.json"),
            )
            for s, arm, seed, *_ in tasks
        ]
    else:
        results = _run_all(tasks, args, started)
    rows = [row for run_rows, _ in results for row in run_rows]
    image_rows = [row for _, run_images in results for row in run_images]
    if not rows:
        raise ValueError(f"--output_dir {root} holds no finished run of these subjects, arms and seeds")
    arms = list(settings.arms)
    if args.reuse_dir is not None:
        reused, reused_images = reused_rows(Path(args.reuse_dir), settings)
        arms = list(dict.fromkeys(r["arm"] for r in reused)) + arms
        rows, image_rows = reused + rows, reused_images + image_rows
    write_csv(root / "evaluations.csv", rows)
    metrics = [m for m in analysis.METRICS if any(m.column in r for r in rows)]
    table = analysis.arm_table(rows, arms, metrics)
    title = _title(json.loads(json.dumps(settings.__dict__, default=list)), len(subjects))
    analysis.plot_curves(rows, arms, root / "curves.png", metrics, title=title)
    grids = write_grids(root, rows, [a for a in arms if a in settings.arms], seed=settings.seeds[0])
    sigma = analysis.sigma_table(rows, arms)
    uncertainty = analysis.uncertainty_summary(image_rows)
    if image_rows:
        write_csv(root / "uncertainty_images.csv", image_rows)
    report = {
        "settings": settings.__dict__,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "table": table,
        "sigma": sigma,
        "uncertainty": uncertainty,
        "grids": [str(p) for p in grids],
    }
    if args.reuse_dir is not None:
        report["reused"] = {"dir": args.reuse_dir, "arms": [a for a in arms if a not in settings.arms]}
    (root / "results.json").write_text(json.dumps(report, indent=1, default=list))
    text = analysis.markdown_table(table)
    if sigma:
        text += "\n\nFinal sigma / sigma_0 over all Bayesian weights (mean over runs, min..max):\n\n"
        text += analysis.sigma_markdown(sigma)
    if uncertainty:
        text += "\n\nPosterior uncertainty as a quality signal (per run, mean ± std over runs):\n\n"
        text += analysis.uncertainty_markdown(uncertainty)
    (root / "results.md").write_text(text + "\n")
    print(text)
    print(f"[study] wrote {root / 'evaluations.csv'}, {root / 'curves.png'}, {root / 'results.md'}", *grids)
    return report


def _run_all(tasks: list, args, started: float) -> list:
    """Every run, sequentially or in ``--jobs`` worker processes, printing progress as each finishes."""
    from .parallel import default_jobs, run_parallel
    from .runner import class_dir_key, run_and_analyse

    jobs = args.jobs or default_jobs(args.pretrained_model_name_or_path is not None)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    done = []

    def report(task, _result, run_started=None):
        done.append(task)
        subject, arm, seed = task[:3]
        took = "" if run_started is None else f"{time.perf_counter() - run_started:.0f} s, "
        print(
            f"[study] {len(done)}/{len(tasks)} {subject.name} {arm} seed {seed}: "
            f"{took}total {(time.perf_counter() - started) / 60:.1f} min",
            flush=True,
        )

    print(f"[study] {len(tasks)} runs, {jobs} at a time, {threads} torch thread(s) each", flush=True)
    if jobs > 1:
        return run_parallel(
            run_and_analyse, tasks, jobs, threads, shared_key=lambda t: class_dir_key(*t), on_done=report
        )
    if args.threads is not None:
        import torch

        torch.set_num_threads(threads)
    results = []
    for task in tasks:
        run_started = time.perf_counter()
        results.append(run_and_analyse(*task))
        report(task, results[-1], run_started)
    return results


def model_flags(args, settings: StudySettings) -> tuple[str | None, list[str]]:
    """(the model every run starts from, None for the recipe's default; the recipe flags that choose it): the
    user's model, else the bundled model of ``settings.model``."""
    flags = user_flags(args)
    if args.pretrained_model_name_or_path is not None or settings.resolution == 32:
        return args.pretrained_model_name_or_path, flags
    from bayeslayers.integrations import tiny_sd

    model = str(tiny_sd.pipeline_path(settings.resolution))
    flags = ["--pretrained_model_name_or_path", model, "--resolution", str(settings.resolution)] + flags
    return model, flags


def user_flags(args) -> list[str]:
    """Recipe flags for a user's own model: its path, resolution and metrics."""
    flags = []
    for name in ("pretrained_model_name_or_path", "resolution"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    if args.metrics is not None:
        flags += ["--eval_metrics", args.metrics]
    return flags


def _title(settings: dict, subjects: int) -> str:
    model = settings.get("model", "tiny-sd-32")
    return (
        f"{'' if model == 'tiny-sd-32' else model + ': '}{subjects} subjects x {len(settings['seeds'])} seeds, "
        f"{settings['max_train_steps']} steps, batch {settings.get('train_batch_size', 4)}, "
        f"lr full {settings['learning_rate']['full']:g} / lora {settings['learning_rate']['lora']:g}"
    )


def cli():
    main(parse_args())
