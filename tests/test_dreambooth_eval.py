"""Evaluation during DreamBooth training (--eval_steps) on a random tiny pipeline: the fixed evaluation set is
generated with the mean weights, scored, logged and plotted, and leaves the training itself unchanged."""

import csv
import json

import numpy as np
import pytest
import torch
from tiny_models import RECIPE_PROMPT as PROMPT
from tiny_models import recipe_argv

from bayeslayers.integrations.dreambooth import main, parse_args

EVAL_PROMPTS = ["a sks star on a black background", "a sks star on a white background"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import recipe_workspace, save_tiny_clip

    root, pipe, images = recipe_workspace(tmp_path_factory.mktemp("dreambooth_eval"))
    (root / "eval_prompts.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    return root, pipe, images, save_tiny_clip(root / "clip")


def _args(workspace, out, *extra):
    # init sigma 0.1: a sampled-weight generation would differ visibly from the mean model's
    flags = ("--num_inference_steps", "3", "--max_train_steps", "4", "--init_sigma", "0.1")
    return parse_args(recipe_argv(workspace, out, *flags, *extra))


def _eval_flags(workspace, steps="2"):
    root, _, _, clip = workspace
    return [
        "--eval_steps",
        steps,
        "--eval_prompts",
        str(root / "eval_prompts.txt"),
        "--num_eval_images",
        "2",
        "--eval_metrics",
        "judge,clip_t",
        "--eval_clip_model",
        clip,
    ]


@pytest.fixture(scope="module")
def evaluated_run(workspace):
    """The run with evaluation; ``result["logged"]`` holds what went to the trackers ({step: keys})."""
    from accelerate import Accelerator

    logged = {}
    original = Accelerator.log

    def log(self, values, step=None, log_kwargs=None):
        logged.setdefault(step, set()).update(values)
        return original(self, values, step=step, log_kwargs=log_kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Accelerator, "log", log)
        result = main(_args(workspace, "with-eval", *_eval_flags(workspace)))
    return dict(result, logged=logged)


def test_eval_steps_log_csv_plot_and_eval_sets(workspace, evaluated_run):
    root = workspace[0]
    out = root / "with-eval"
    with open(out / "eval_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # the base model, every 2 steps
    for column in ("judge_subject_similarity", "judge_corruption", "judge_shape_accuracy", "clip_t"):
        assert all(r[column] != "" for r in rows), column
    assert float(rows[0]["generate_seconds"]) > 0 and float(rows[0]["metric_seconds"]) > 0
    assert (out / "metrics_vs_step.png").stat().st_size > 1000
    for step in (0, 2, 4):  # the trackers (tensorboard with --report_to tensorboard) get the means too
        assert {"eval/judge_subject_similarity", "eval/clip_t"} <= evaluated_run["logged"][step]
    assert "eval/clip_t" not in evaluated_run["logged"][1]
    assert evaluated_run["eval_seconds"] > 0 and evaluated_run["metrics_vs_step"] == str(out / "metrics_vs_step.png")
    folder = out / "eval" / "step-000004"
    prompts = json.loads((folder / "prompts.json").read_text())
    assert list(prompts.values()) == [EVAL_PROMPTS[0]] * 2 + [EVAL_PROMPTS[1]] * 2
    config = json.loads((out / "eval" / "config.json").read_text())
    assert config["metrics"] == "judge,clip_t" and config["seeds"] == [0, 1, 2, 3]
    # bayeslayers-eval on the saved set reproduces the logged means
    from bayeslayers.integrations.metrics import cli

    summary = cli.main(cli.parse_args(["--from-run", str(out)]))
    assert summary["step"] == 4 and summary["num_references"] == 3
    from bayeslayers.integrations.dreambooth.evaluation import read_eval_rows

    logged = read_eval_rows(out)
    assert [r["step"] for r in logged] == [0, 2, 4] and logged[-1]["clip_t"] == pytest.approx(float(rows[-1]["clip_t"]))
    for column in ("judge_subject_similarity", "judge_corruption", "clip_t"):
        assert summary["summary"][column]["mean"] == pytest.approx(float(rows[-1][column]), abs=1e-5)


def test_eval_images_are_the_mean_models_with_fixed_seeds(workspace, evaluated_run):
    """The last evaluation set is what stock diffusers makes from the exported mean UNet with the same seeds."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from bayeslayers.integrations.metrics import load_images

    root, pipe_path = workspace[0], workspace[1]
    stock = StableDiffusionPipeline.from_pretrained(
        pipe_path, unet=UNet2DConditionModel.from_pretrained(evaluated_run["unet"]), safety_checker=None
    )
    stock.scheduler = DPMSolverMultistepScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    prompts = [EVAL_PROMPTS[0]] * 2 + [EVAL_PROMPTS[1]] * 2
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    expected = stock(prompts, num_inference_steps=3, guidance_scale=7.5, generator=generators, output_type="pt").images
    saved = load_images(sorted((root / "with-eval" / "eval" / "step-000004").glob("*.png")))
    np.testing.assert_allclose(saved.numpy(), (expected * 2 - 1).numpy(), atol=1.5 / 127.5)
    base = load_images(sorted((root / "with-eval" / "eval" / "step-000000").glob("*.png")))
    assert (saved - base).abs().max() > 2 / 127.5  # training changed the images


def test_evaluation_leaves_training_unchanged(workspace, evaluated_run):
    from safetensors.torch import load_file

    plain = main(_args(workspace, "without-eval"))
    a, b = load_file(plain["bayesian_state"]), load_file(evaluated_run["bayesian_state"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert "eval_seconds" not in plain


def test_eval_flags_are_checked_before_training(workspace, tmp_path):
    flags = _eval_flags(workspace)
    with pytest.raises(ValueError, match="--eval_steps must be a positive integer"):
        _args(workspace, "x", *flags[:1], "0", *flags[2:])
    with pytest.raises(ValueError, match="--num_eval_images must be a positive integer"):
        _args(workspace, "x", *flags, "--num_eval_images", "0")
    with pytest.raises(ValueError, match="--eval_metrics: unknown or no metric 'lpips'"):
        _args(workspace, "x", *flags, "--eval_metrics", "judge,lpips")
    with pytest.raises(FileNotFoundError, match="--eval_prompts: .* is not a file"):
        _args(workspace, "x", *flags, "--eval_prompts", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="--eval_prompts: .* holds no prompt"):
        _args(workspace, "x", *flags, "--eval_prompts", str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="--eval_reference_dir must be an existing directory"):
        _args(workspace, "x", *flags, "--eval_reference_dir", str(tmp_path / "missing"))
    defaults = _args(workspace, "x", "--eval_steps", "5")  # a user's model: the paper's metrics, prompt fallback
    assert defaults.eval_metrics == "clip_t,clip_i,dino,diversity,clip_iqa"
    assert defaults.eval_prompt_list == [PROMPT]
    assert defaults.eval_reference_dir == workspace[2]  # the instance images
    assert defaults.eval_num_inference_steps == 3  # --num_inference_steps
    with pytest.raises(ValueError, match="--eval_num_inference_steps must be a positive integer"):
        _args(workspace, "x", *flags, "--eval_num_inference_steps", "0")
    assert _args(workspace, "x").eval_prompt_list is None  # no --eval_steps: no evaluation


def test_bundled_model_defaults_to_the_judge_and_the_subjects_prompts():
    from bayeslayers.integrations import tiny_sd

    args = parse_args(["--eval_steps", "10", "--output_dir", "unused"])
    assert args.eval_metrics == "judge"
    expected = tiny_sd.subject_prompts().get("eval_prompts") or [args.validation_prompt]
    assert args.eval_prompt_list == expected


def test_an_unloadable_metric_model_fails_before_training(workspace, tmp_path):
    args = _args(
        workspace,
        "bad-model",
        "--eval_steps",
        "2",
        "--eval_metrics",
        "clip_t",
        "--eval_clip_model",
        str(tmp_path / "missing"),
    )
    with pytest.raises(OSError, match="--eval_clip_model"):
        main(args)
    assert not (workspace[0] / "bad-model" / "eval_metrics.csv").exists()
    assert not list((workspace[0] / "bad-model").glob("checkpoint-*"))
