"""The main demo: DreamBooth-BNN on the bundled tiny Stable Diffusion, Bayesian run and plain baseline.

    python -m bayeslayers.integrations.demo [--output_dir outputs/demo] [--max_train_steps 300]

Both runs fine-tune the tiny model on the bundled held-out subject ("a sks star") with prior preservation,
from the same seed; the only difference is ``--bayesian`` / ``--no-bayesian``. Validation grids, training
curves, exported models and the Bayesian state land in ``<output_dir>/{bayesian,baseline}``, and posterior
samples with a per-pixel uncertainty map in ``<output_dir>/bayesian/posterior_samples``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--kl_weight", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


def recipe_flags(args, name: str, bayesian: bool) -> list[str]:
    out = Path(args.output_dir)
    return [
        "--output_dir",
        str(out / name),
        "--class_data_dir",
        str(out / "class_images"),
        "--with_prior_preservation",
        "--num_class_images",
        "32",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        str(args.max_train_steps),
        "--learning_rate",
        str(args.learning_rate),
        "--validation_steps",
        str(max(1, args.max_train_steps // 3)),
        "--checkpointing_steps",
        str(args.max_train_steps),
        "--checkpoints_total_limit",
        "1",
        "--seed",
        str(args.seed),
        "--kl_weight",
        str(args.kl_weight),
        "--guidance_scale",
        "3.0",
        "--num_validation_images",
        "8",
        "--validation_scheduler",
        "DDIMScheduler",
        "--bayesian" if bayesian else "--no-bayesian",
    ]


def evaluate_run(run_dir: Path, num_images: int = 32) -> dict[str, float]:
    """Judge metrics of a finished run's exported model: subject similarity, shape accuracy, corruption."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from bayeslayers.integrations import tiny_sd
    from bayeslayers.integrations.dreambooth.data import load_image
    from bayeslayers.integrations.tiny_sd.evaluate import generate
    from bayeslayers.integrations.tiny_sd.fidelity import subject_metrics

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd.pipeline_path(), safety_checker=None, unet=UNet2DConditionModel.from_pretrained(run_dir / "unet")
    )
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, ["a sks star on a black background"] * num_images, 25, 3.0, seed=123)
    subject = torch.stack([load_image(p, 32, True) for p in sorted(tiny_sd.subject_path().glob("*.png"))])
    return subject_metrics(images, subject)


def main(args) -> dict:
    from bayeslayers.integrations import dreambooth, sample

    started = time.perf_counter()
    results = {}
    for name, bayesian in (("bayesian", True), ("baseline", False)):
        print(f"== DreamBooth {'with Bayesian layers' if bayesian else 'baseline (plain fine-tuning)'} ==")
        results[name] = dreambooth.main(dreambooth.parse_args(recipe_flags(args, name, bayesian)))
    model_dir = str(Path(args.output_dir) / "bayesian")
    prompts = ["a sks star on a black background", "a sks star on a white background"]
    results["posterior"] = sample.main(
        sample.parse_args(
            ["--model_dir", model_dir, "--num_posterior_samples", "8", "--guidance_scale", "3.0"]
            + [flag for p in prompts for flag in ("--prompt", p)]
        )
    )
    results["metrics"] = {name: evaluate_run(Path(args.output_dir) / name) for name in ("bayesian", "baseline")}
    minutes = (time.perf_counter() - started) / 60
    print(f"\nDone in {minutes:.1f} min. Outputs:")
    for name in ("bayesian", "baseline"):
        r = results[name]
        print(
            f"  {name:9s} validation grid {r.get('validation_grid')}\n            curves {r['curves']}  "
            f"final loss {r['final_loss']:.4f}"
        )
    print("\n  judge metrics on 32 images of 'a sks star on a black background' (mean weights):")
    for name, metrics in results["metrics"].items():
        print(f"  {name:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    for row in results["posterior"]:
        print(
            f"  posterior samples {row['grid']}  uncertainty map {row['std_map']}  "
            f"(mean pixel std {row['mean_pixel_std']:.4f})"
        )
    return results


def cli():
    main(parse_args())


if __name__ == "__main__":
    cli()
