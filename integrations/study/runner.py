"""One study run: the DreamBooth recipe on one subject, one arm and one seed, evaluated every ``eval_steps``
with the mean weights; its evaluation rows are kept in ``<run>/rows.json`` (a finished run is not rerun)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .arms import ARMS, StudySettings


@dataclass(frozen=True)
class SubjectData:
    """A subject as the recipe needs it: its images, prompts and evaluation prompts."""

    name: str
    instance_data_dir: str
    instance_prompt: str
    class_prompt: str
    eval_prompts: tuple[str, ...]

    @classmethod
    def bundled(cls, name: str, resolution: int = 32) -> SubjectData:
        """A subject of the bundled model of that size (``tiny_sd.subject.subjects(resolution)``)."""
        from bayeslayers.integrations import tiny_sd

        prompts = tiny_sd.subject_prompts(name, resolution)
        return cls(
            name,
            str(tiny_sd.subject_path(name, resolution)),
            prompts["instance_prompt"],
            prompts["class_prompt"],
            tuple(prompts["eval_prompts"]),
        )


def run_dir(root: Path, subject: str, arm: str, seed: int) -> Path:
    return Path(root, "runs", subject, arm, f"seed{seed}")


def recipe_flags(subject: SubjectData, arm: str, seed: int, settings: StudySettings, root: Path, extra=()) -> list:
    """The bayeslayers-dreambooth command line of one run; ``extra``: more flags (the user's model, metrics)."""
    spec = ARMS[arm]
    out = run_dir(root, subject.name, arm, seed)
    prompts_file = Path(root, "eval_prompts", f"{subject.name}.txt")
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(subject.eval_prompts) + "\n")
    flags = [
        *spec.flags,
        "--output_dir",
        str(out),
        "--instance_data_dir",
        subject.instance_data_dir,
        "--instance_prompt",
        subject.instance_prompt,
        "--class_prompt",
        subject.class_prompt,
        "--seed",
        str(seed),
        "--max_train_steps",
        str(settings.max_train_steps),
        "--learning_rate",
        str(settings.learning_rate[spec.train_mode]),
        "--train_batch_size",
        str(settings.train_batch_size),
        "--checkpointing_steps",
        str(settings.max_train_steps + 1),  # no checkpoints: a lost run is rerun
        "--report_to",
        "none",
        "--guidance_scale",
        str(settings.guidance_scale),
        "--num_inference_steps",
        str(settings.num_inference_steps),
        "--validation_scheduler",
        "DDIMScheduler",
        "--eval_steps",
        str(settings.eval_steps),
        "--eval_prompts",
        str(prompts_file),
        "--eval_num_inference_steps",
        str(settings.eval_inference_steps),
        "--num_eval_images",
        str(settings.images_per_prompt),
        "--eval_reference_dir",
        subject.instance_data_dir,
    ]
    if spec.bayesian:
        kl_weight = settings.kl_weight[spec.train_mode] if spec.kl_weight is None else spec.kl_weight
        flags += ["--kl_weight", str(kl_weight)]
    if settings.with_prior_preservation:
        class_dir = Path(root, "class_images", subject.class_prompt.replace(" ", "_"))
        flags += ["--with_prior_preservation", "--class_data_dir", str(class_dir)]
        flags += ["--num_class_images", str(settings.num_class_images)]
    return flags + list(extra)


def reference_corruption(subject: SubjectData) -> float:
    """Mean judge corruption score (high-frequency energy / clean renders') of the subject's own images."""
    from bayeslayers.integrations.metrics import evaluate, load_images

    references = load_images(subject.instance_data_dir)
    return float(
        evaluate(references, [subject.instance_prompt] * len(references), metrics="judge")["judge_corruption"].mean()
    )


def run_one(subject: SubjectData, arm: str, seed: int, settings: StudySettings, root: Path, extra=()) -> list[dict]:
    """Trains one run (unless its rows are already saved) and returns its evaluation rows, each with
    ``corruption``: the judge's corruption over the subject's own images' (1 = as much fine detail as the
    training photos, noisy patterns > 1)."""
    from bayeslayers.integrations import dreambooth
    from bayeslayers.integrations.dreambooth.evaluation import read_eval_rows

    out = run_dir(root, subject.name, arm, seed)
    saved = out / "rows.json"
    if saved.exists():
        return json.loads(saved.read_text())
    shutil.rmtree(out, ignore_errors=True)  # a run interrupted before its rows were written starts over
    started = time.perf_counter()
    result = dreambooth.main(dreambooth.parse_args(recipe_flags(subject, arm, seed, settings, root, extra)))
    if result.get("interrupted"):  # stopped by a signal: its rows are not saved, so the next call reruns it
        raise RuntimeError(f"{out} was stopped at step {result['step']} by a signal; the same command reruns it")
    seconds = time.perf_counter() - started
    reference = reference_corruption(subject)
    rows = []
    for row in read_eval_rows(out):
        row = {
            "subject": subject.name,
            "arm": arm,
            "seed": seed,
            "fraction": row["step"] / settings.max_train_steps,
            **row,
        }
        if "judge_corruption" in row:
            row["corruption"] = row["judge_corruption"] / reference
        row.update({k.replace("final_", "", 1): v for k, v in result.items() if k.startswith("final_sigma_ratio/")})
        row.update(
            run_seconds=round(seconds, 1),
            train_seconds=result.get("train_seconds"),
            eval_seconds=result.get("eval_seconds"),
        )
        rows.append(row)
    saved.write_text(json.dumps(rows))
    return rows


def run_and_analyse(
    subject: SubjectData, arm: str, seed: int, settings: StudySettings, root: Path, extra=(), model=None
):
    """One run and, for a Bayesian arm, its uncertainty analysis: ``(evaluation rows, per-image rows)``."""
    rows = run_one(subject, arm, seed, settings, root, extra)
    images = []
    if ARMS[arm].bayesian and settings.uncertainty_samples > 0:
        images = uncertainty_rows(subject, arm, seed, settings, root, model)
    return rows, images


def class_dir_key(subject: SubjectData, arm: str, seed: int, *_) -> str:
    """Runs with the same key share a class-image folder (the first one fills it)."""
    return subject.class_prompt


def uncertainty_rows(subject: SubjectData, arm: str, seed: int, settings: StudySettings, root: Path, model=None):
    """Per-image rows of a finished Bayesian run: posterior uncertainty and the judge's metrics of the mean-weight
    image, for ``uncertainty_images_per_prompt`` fixed seeds per evaluation prompt."""
    from argparse import Namespace

    from bayeslayers.integrations.metrics import evaluate, load_images
    from bayeslayers.integrations.sample import load_bayesian_pipeline

    from .uncertainty import generate, image_uncertainty

    out = run_dir(root, subject.name, arm, seed)
    saved = out / "uncertainty.json"
    if saved.exists():
        return json.loads(saved.read_text())
    pipe = load_bayesian_pipeline(Namespace(model_dir=str(out), pretrained_model_name_or_path=model))
    prompts = [p for p in subject.eval_prompts for _ in range(settings.uncertainty_images_per_prompt)]
    seeds = [10_000 + i for i in range(len(prompts))]
    steps, guidance = settings.num_inference_steps, settings.guidance_scale
    with torch.no_grad():
        images = generate(pipe, prompts, seeds, steps, guidance)  # eval mode: mean weights
    uncertainty = image_uncertainty(pipe, prompts, seeds, settings.uncertainty_samples, steps, guidance)
    values = evaluate(images, prompts, load_images(subject.instance_data_dir), metrics="judge")
    reference = reference_corruption(subject)
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"subject": subject.name, "arm": arm, "seed": seed, "prompt": prompt, "image_seed": seeds[i]}
        row["uncertainty"] = float(uncertainty[i])
        row.update({column: float(value[i]) for column, value in values.items()})
        row["corruption"] = row["judge_corruption"] / reference
        rows.append(row)
    saved.write_text(json.dumps(rows))
    return rows
