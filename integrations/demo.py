"""The main demo: DreamBooth-BNN on the bundled tiny Stable Diffusion, Bayesian run and plain baseline.

    python -m bayeslayers.integrations.demo [--output_dir outputs/demo] [--max_train_steps 300]

Both runs fine-tune the tiny model on the bundled held-out subject ("a sks star") with prior preservation,
from the same seed; the only difference is ``--bayesian`` / ``--no-bayesian``. Validation grids, training
curves, exported models and the Bayesian state land in ``<output_dir>/{bayesian,baseline}``, and posterior
samples with a per-pixel uncertainty map in ``<output_dir>/bayesian/posterior_samples``. The figure that tells
the story, ``<output_dir>/demo.png`` (training images | plain DreamBooth | DreamBooth-BNN | posterior std), and the
judge's numbers for both arms are written and printed whichever arm is ahead. ``--examples_dir docs/examples``
also copies the figure, both validation grids and the posterior images there (how ``docs/examples/demo_*`` is
made).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

EVAL_PROMPT = "a sks star on a black background"
POSTERIOR_PROMPTS = ("a sks star on a black background", "a sks star on a white background")
ARMS = {"baseline": "plain DreamBooth", "bayesian": "DreamBooth-BNN"}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--kl_weight", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--examples_dir", default=None, help="also copy the figure, grids and posterior images here (docs/examples)"
    )
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


def subject_images():
    """The bundled subject's training images: (N, 3, 32, 32) in [-1, 1]."""
    import torch

    from bayeslayers.integrations import tiny_sd
    from bayeslayers.integrations.dreambooth.data import load_image

    return torch.stack([load_image(p, 32, True) for p in sorted(tiny_sd.subject_path().glob("*.png"))])


def evaluate_run(run_dir: Path, num_images: int = 32):
    """Judge metrics of a finished run's exported model (subject similarity, shape accuracy, corruption score:
    1 = as clean as the training renders, higher = noisier) and its images, (N, 3, 32, 32) in [-1, 1]."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from bayeslayers.integrations import tiny_sd
    from bayeslayers.integrations.tiny_sd.evaluate import generate
    from bayeslayers.integrations.tiny_sd.fidelity import subject_metrics

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd.pipeline_path(), safety_checker=None, unet=UNet2DConditionModel.from_pretrained(run_dir / "unet")
    )
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, [EVAL_PROMPT] * num_images, 25, 3.0, seed=123)
    return subject_metrics(images, subject_images()), images


def _tile(images, columns: int = 2):
    """(N, 3, H, W) in [-1, 1] -> one (rows*H, columns*W, 3) array in [0, 1]."""
    import numpy as np

    array = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    n, h, w, _ = array.shape
    rows = -(-n // columns)
    out = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, image in enumerate(array):
        out[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = image
    return out


def _metrics_line(metrics: dict) -> str:
    return f"subject sim. {metrics['subject_similarity']:.3f}, shape acc. {metrics['shape_accuracy']:.3f}"


def ahead(metrics: dict) -> list[str]:
    """One sentence per judge metric naming the arm ahead (or a tie): higher similarity and accuracy are better,
    a lower corruption score is cleaner."""
    lines = []
    for key, higher_better in (("subject_similarity", True), ("shape_accuracy", True), ("corruption_score", False)):
        plain, bnn = metrics["baseline"][key], metrics["bayesian"][key]
        if plain == bnn:
            lines.append(f"{key}: tie ({plain:.3f})")
            continue
        winner = "bayesian" if (bnn > plain) == higher_better else "baseline"
        lines.append(f"{key}: {ARMS[winner]} ahead ({ARMS['baseline']} {plain:.3f}, {ARMS['bayesian']} {bnn:.3f})")
    return lines


def demo_figure(training, plain, bayesian, std, metrics: dict, path: Path, panel_px: int = 320) -> Path:
    """One PNG of four captioned panels, each ``panel_px`` px wide: the training images, four images of the
    plain and of the Bayesian fine-tune (mean weights, the same four initial noises) and the per-pixel std over
    posterior samples with its colour bar. ``training``/``plain``/``bayesian``: (N, 3, H, W) in [-1, 1];
    ``std``: (H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    inches = panel_px / dpi
    fig, axes = plt.subplots(
        1, 4, figsize=(4 * inches + 0.9, inches + 1.1), dpi=dpi, gridspec_kw={"width_ratios": [1, 1, 1, 1.18]}
    )
    panels = [
        (_tile(training[:4]), f"training images ({len(training)})\n'a sks star'"),
        (_tile(plain[:4]), f"{ARMS['baseline']}\n{_metrics_line(metrics['baseline'])}"),
        (_tile(bayesian[:4]), f"{ARMS['bayesian']} (posterior mean)\n{_metrics_line(metrics['bayesian'])}"),
    ]
    for ax, (image, caption) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    shown = axes[3].imshow(std, cmap="magma", interpolation="nearest", vmin=0)
    axes[3].set_title(f"{ARMS['bayesian']}: per-pixel std\nover posterior samples (mean {std.mean():.4f})", fontsize=9)
    axes[3].axis("off")
    fig.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.04)
    fig.suptitle(f"'{EVAL_PROMPT}', same seeds in both arms; judge scores over 32 images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def copy_examples(out: Path, results: dict, examples: Path) -> list[Path]:
    """Copies the figure, both final validation grids and the first prompt's posterior images into ``examples``
    under the names ``docs/examples/demo_*`` carries."""
    examples.mkdir(parents=True, exist_ok=True)
    pairs = [(out / "demo.png", "demo.png")]
    for name in ARMS:
        grid = results[name].get("validation_grid")
        if grid:
            pairs.append((Path(grid), f"demo_{name}_final.png"))
    first = results["posterior"][0]
    pairs += [(Path(first["grid"]), "demo_posterior_samples.png"), (Path(first["std_map"]), "demo_posterior_std.png")]
    written = []
    for source, name in pairs:
        shutil.copyfile(source, examples / name)
        written.append(examples / name)
    return written


def posterior(sample, args):
    """``bayeslayers-sample`` on the Bayesian run: its result rows and the first prompt's (H, W) std map."""
    pipe = sample.load_bayesian_pipeline(args)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out_dir = Path(args.model_dir, "posterior_samples")
    rows, first_std = [], None
    for i, prompt in enumerate(args.prompt):
        images = sample.posterior_images(
            pipe,
            prompt,
            args.num_posterior_samples,
            args.num_inference_steps,
            args.guidance_scale,
            resolution,
            args.seed,
        )
        grid, std_path = sample.save_outputs(images, i, out_dir, prompt)
        std = sample.std_map(images)
        first_std = std if first_std is None else first_std
        rows.append(
            {"prompt": prompt, "grid": str(grid), "std_map": str(std_path), "mean_pixel_std": float(std.mean())}
        )
    return rows, first_std


def main(args) -> dict:
    from bayeslayers.integrations import dreambooth, sample

    started = time.perf_counter()
    results = {}
    for name, bayesian in (("bayesian", True), ("baseline", False)):
        print(f"== DreamBooth {'with Bayesian layers' if bayesian else 'baseline (plain fine-tuning)'} ==")
        results[name] = dreambooth.main(dreambooth.parse_args(recipe_flags(args, name, bayesian)))
    sample_args = sample.parse_args(
        ["--model_dir", str(Path(args.output_dir) / "bayesian"), "--num_posterior_samples", "8"]
        + ["--guidance_scale", "3.0"]
        + [flag for p in POSTERIOR_PROMPTS for flag in ("--prompt", p)]
    )
    results["posterior"], std = posterior(sample, sample_args)
    evaluated = {name: evaluate_run(Path(args.output_dir) / name) for name in ARMS}
    results["metrics"] = {name: metrics for name, (metrics, _) in evaluated.items()}
    results["figure"] = str(
        demo_figure(
            subject_images(),
            evaluated["baseline"][1],
            evaluated["bayesian"][1],
            std,
            results["metrics"],
            Path(args.output_dir) / "demo.png",
        )
    )
    minutes = (time.perf_counter() - started) / 60
    print(f"\nDone in {minutes:.1f} min. Outputs:")
    for name in ("bayesian", "baseline"):
        r = results[name]
        print(
            f"  {name:9s} validation grid {r.get('validation_grid')}\n            curves {r['curves']}  "
            f"final loss {r['final_loss']:.4f}"
        )
    print(f"\n  judge metrics on 32 images of '{EVAL_PROMPT}' (mean weights, same seeds in both arms):")
    for name, metrics in results["metrics"].items():
        print(f"  {ARMS[name]:17s} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    for line in ahead(results["metrics"]):
        print(f"  {line}")
    for row in results["posterior"]:
        print(
            f"  posterior samples {row['grid']}  uncertainty map {row['std_map']}  "
            f"(mean pixel std {row['mean_pixel_std']:.4f})"
        )
    print(f"  figure {results['figure']}")
    if args.examples_dir:
        results["examples"] = [str(p) for p in copy_examples(Path(args.output_dir), results, Path(args.examples_dir))]
        print(f"  copied to {args.examples_dir}: " + ", ".join(Path(p).name for p in results["examples"]))
    return results


def cli():
    main(parse_args())


if __name__ == "__main__":
    cli()
