"""The corruption-stage study: fidelity, corruption and diversity against training steps, for plain and Bayesian
DreamBooth and LoRA, several subjects and seeds.

    python -m bayeslayers.integrations.study [--quick] [--output_dir outputs/study]
    python -m bayeslayers.integrations.study --pretrained_model_name_or_path path/to/sd15 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --class_prompt "a photo of dog" \\
        --eval_prompts dog_prompts.txt --metrics clip_t,clip_i,dino,diversity,clip_iqa --resolution 512

Writes ``evaluations.csv`` (every evaluation of every run), ``curves.png`` (each metric against the fraction of
training, mean over subjects, band = +-1 std over seeds), ``results.md`` / ``results.json`` (best and final
values, where the best was reached, dip area per arm) and, for the Bayesian arms, ``uncertainty.json`` (rank
correlation of each image's posterior uncertainty with its fidelity, gain from dropping the most uncertain 25 %).
A finished run is kept in ``runs/`` and not rerun: the same command resumes an interrupted study.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from .arms import ARMS, FULL, QUICK, StudySettings


def parse_args(input_args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one subject, one seed, a few steps (a smoke run, ~3 min)")
    p.add_argument("--output_dir", default="outputs/study")
    p.add_argument("--subjects", default=None, help="comma-separated bundled subjects (default: all four)")
    p.add_argument("--arms", default=None, help=f"comma-separated, from {', '.join(ARMS)} (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--evaluations", type=int, default=None, help="evaluation points after step 0 (default 20)")
    p.add_argument("--images_per_prompt", type=int, default=None)
    p.add_argument("--learning_rate_full", type=float, default=None)
    p.add_argument("--learning_rate_lora", type=float, default=None)
    p.add_argument("--kl_weight", type=float, default=None)
    p.add_argument("--uncertainty_samples", type=int, default=None, help="posterior samples per image; 0 skips")
    p.add_argument(
        "--report_only",
        action="store_true",
        help="write the outputs from the finished runs in --output_dir, train none",
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
    from bayeslayers.integrations.tiny_sd.subject import SUBJECTS

    base = QUICK if args.quick else FULL
    changes = {
        "subjects": _names(args.subjects, base.subjects, SUBJECTS, "--subjects"),
        "arms": _names(args.arms, base.arms, ARMS, "--arms"),
        "seeds": tuple(int(s) for s in _names(args.seeds, tuple(map(str, base.seeds)), None, "--seeds")),
    }
    for name in ("max_train_steps", "evaluations", "images_per_prompt", "kl_weight", "uncertainty_samples"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    rates = dict(base.learning_rate)
    for mode in ("full", "lora"):
        if getattr(args, f"learning_rate_{mode}") is not None:
            rates[mode] = getattr(args, f"learning_rate_{mode}")
    changes["learning_rate"] = rates
    return base.replace(**changes)


def check_settings(root: Path, settings: StudySettings) -> None:
    """Records the settings in ``root/settings.json``; finished runs there are reused only if everything but the
    list of subjects, arms and seeds is the same (otherwise their curves would not be comparable)."""
    path = root / "settings.json"
    current = json.loads(json.dumps(settings.__dict__, default=list))
    if path.exists():
        saved = json.loads(path.read_text())
        differs = sorted(k for k in current if k not in ("subjects", "arms", "seeds") and saved.get(k) != current[k])
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


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(args) -> dict:
    from . import analysis
    from .arms import ARMS as arm_specs
    from .runner import SubjectData, run_one, uncertainty_rows

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
        subjects = [SubjectData.bundled(name) for name in settings.subjects]
    started = time.perf_counter()
    rows, image_rows, total = [], [], len(subjects) * len(settings.arms) * len(settings.seeds)
    for subject in subjects:
        for seed in settings.seeds:
            for arm in settings.arms:
                if args.report_only:
                    rows += finished_rows(root, subject.name, arm, seed, "rows.json")
                    image_rows += finished_rows(root, subject.name, arm, seed, "uncertainty.json")
                    continue
                run_started = time.perf_counter()
                rows += run_one(subject, arm, seed, settings, root, user_flags(args))
                if arm_specs[arm].bayesian and settings.uncertainty_samples > 0:
                    model = args.pretrained_model_name_or_path
                    image_rows += uncertainty_rows(subject, arm, seed, settings, root, model)
                done = len({(r["subject"], r["arm"], r["seed"]) for r in rows})
                print(
                    f"[study] {done}/{total} {subject.name} {arm} seed {seed}: "
                    f"{time.perf_counter() - run_started:.0f} s (total {(time.perf_counter() - started) / 60:.1f} min)",
                    flush=True,
                )
    if not rows:
        raise ValueError(f"--output_dir {root} holds no finished run of these subjects, arms and seeds")
    write_csv(root / "evaluations.csv", rows)
    metrics = [m for m in analysis.METRICS if any(m.column in r for r in rows)]
    table = analysis.arm_table(rows, list(settings.arms), metrics)
    analysis.plot_curves(rows, list(settings.arms), root / "curves.png", metrics, title=_title(settings, subjects))
    uncertainty = analysis.uncertainty_summary(image_rows)
    if image_rows:
        write_csv(root / "uncertainty_images.csv", image_rows)
    report = {
        "settings": settings.__dict__,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "table": table,
        "uncertainty": uncertainty,
    }
    (root / "results.json").write_text(json.dumps(report, indent=1, default=list))
    text = analysis.markdown_table(table)
    if uncertainty:
        text += "\n\nPosterior uncertainty as a quality signal (per run, mean ± std over runs):\n\n"
        text += analysis.uncertainty_markdown(uncertainty)
    (root / "results.md").write_text(text + "\n")
    print(text)
    print(f"[study] wrote {root / 'evaluations.csv'}, {root / 'curves.png'}, {root / 'results.md'}")
    return report


def user_flags(args) -> list[str]:
    """Recipe flags for a user's own model: its path, resolution and metrics."""
    flags = []
    for name in ("pretrained_model_name_or_path", "resolution"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    if args.metrics is not None:
        flags += ["--eval_metrics", args.metrics]
    return flags


def _title(settings: StudySettings, subjects) -> str:
    return (
        f"{len(subjects)} subjects x {len(settings.seeds)} seeds, {settings.max_train_steps} steps, "
        f"lr full {settings.learning_rate['full']:g} / lora {settings.learning_rate['lora']:g}"
    )


def cli():
    main(parse_args())
