"""Assembles the shipped assets from a finished training run: pipeline, judge, subjects, samples, model card.

python -m bayeslayers.integrations.tiny_sd.build_assets --run_dir /tmp/tiny_sd_run [--output_dir DIR]

The model size (32 or 64 px) is the run's (``training_report.json``); the default ``--output_dir`` is that
size's folder in the package (``tiny_sd.assets_dir``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import assets_dir, models
from .evaluate import GRID_PROMPTS, prompt_accuracy, sample_grid, seconds_per_image
from .judge import judge_config
from .subject import DEFAULT_SUBJECTS, save_subjects, subjects
from .tokenizer import save_tokenizer_files
from .train import SIZED
from .train_judge import train_judge


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--output_dir", default=None, help="default: the package's assets folder for the model size")
    parser.add_argument("--judge_steps", type=int, default=1500)
    parser.add_argument("--judge_images", type=int, default=6000, help="fresh world renders the judge trains on")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--inference_steps", type=int, default=25, help="DDIM steps of every evaluation image")
    parser.add_argument("--eval_images", type=int, default=384)
    parser.add_argument("--guidance_sweep", default="1.5,3,5", help="comma-separated scales, colour/shape only")
    args = parser.parse_args(input_args)
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    run = Path(args.run_dir)
    report = json.loads((run / "training_report.json").read_text())
    resolution = report.get("resolution", 32)
    out = Path(args.output_dir) if args.output_dir else assets_dir(resolution)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    shutil.copytree(run / "pipeline", out / "pipeline")
    save_tokenizer_files(out / "pipeline" / "tokenizer")  # vocab.json + merges.txt beside tokenizer.json

    save_subjects(out / "subjects", resolution)

    started = time.perf_counter()
    judge, judge_accuracy, clean_energy = train_judge(
        args.judge_steps, resolution=resolution, num_images=args.judge_images
    )
    judge_seconds = time.perf_counter() - started
    save_file(
        judge.state_dict(),
        str(out / "judge.safetensors"),
        metadata={"clean_high_frequency_energy": repr(clean_energy), "held_out_accuracy": repr(judge_accuracy)},
    )
    config = judge_config(
        clean_energy, judge_accuracy, resolution, steps=args.judge_steps, seconds=round(judge_seconds, 1)
    )
    (out / "judge_config.json").write_text(json.dumps(config, indent=1))

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    steps = args.inference_steps
    accuracy = prompt_accuracy(pipe, judge, clean_energy, n=args.eval_images, steps=steps, guidance=args.guidance)
    sweep = {}
    for scale in (float(v) for v in args.guidance_sweep.split(",") if v):
        result = (
            accuracy
            if scale == args.guidance
            else prompt_accuracy(pipe, judge, clean_energy, n=args.eval_images, steps=steps, guidance=scale)
        )
        sweep[scale] = {k: result[k] for k in ("colour", "shape")}
    seconds = seconds_per_image(pipe, steps)
    sample_grid(pipe, out / "samples.png", steps=steps, guidance=args.guidance)
    other_models = {c.name for c in models.CONFIGS.values()}  # the 64 px folder sits inside the 32 px one
    files = [p for p in out.rglob("*") if p.is_file() and not other_models & set(p.relative_to(out).parts)]
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    measured = {
        "judge_accuracy": judge_accuracy,
        "judge_seconds": judge_seconds,
        "prompt_accuracy": accuracy,
        "guidance": args.guidance,
        "inference_steps": steps,
        "eval_images": args.eval_images,
        "guidance_sweep": sweep,
        "seconds_per_image": seconds,
        "assets_mb": size_mb,
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("vae", "unet", "text_encoder")
        },
    }
    write_card(report, measured, out)
    (run / "evaluation.json").write_text(json.dumps(measured, indent=1))
    print(json.dumps(measured, indent=1))


def _loss_at(history, fraction):
    """Running loss at the logged step nearest ``fraction`` of the run."""
    target = history[-1][0] * fraction
    return min(history, key=lambda entry: abs(entry[0] - target))[1]


def _limits(report, accuracy, budget_minutes: int) -> str:
    confusion = accuracy["shape_confusion"]
    wrong = [
        (count, asked, read) for asked, reads in confusion.items() for read, count in reads.items() if read != asked
    ]
    weakest = min(accuracy["shape_by_prompt"].items(), key=lambda item: item[1])
    history = report["unet_history"]
    text = f'Limits: the weakest held-out prompt is "{weakest[0]}" ({weakest[1]:.0%} right shape)'
    if wrong:
        count, asked, read = max(wrong)
        text += f"; the most frequent shape error is {asked} read as {read} ({count} images)"
    by_size = ", ".join(f"{size} {value:.0%}" for size, value in sorted(accuracy["shape_by_size"].items()))
    late, final = _loss_at(history, 0.75), history[-1][1]
    trend = "still falling" if final < late else "flat or rising"
    return text + (
        f"; right shapes by size: {by_size}. The epsilon-MSE was {trend} when training stopped "
        f"({late:.4f} at 75 % of the steps, {final:.4f} at the end); the step "
        f"count was set by the {budget_minutes}-minute CPU budget."
    )


def _changed_sizes(report, config) -> str:
    """The training command's flags for the sizes that differ from the model size's defaults."""
    return "".join(f" --{k} {report[k]}" for k in SIZED if k in report and report[k] != getattr(config, k))


def write_card(report, measured, out: Path):
    config = models.get_config(report.get("resolution", 32))
    side, latent = config.resolution, config.latent_side
    accuracy, guidance = measured["prompt_accuracy"], measured["guidance"]
    steps = measured.get("inference_steps", 25)
    subject_set = subjects(side)
    default = subject_set[DEFAULT_SUBJECTS[side]]
    others = [s for s in subject_set.values() if s is not default]
    unet_k = report["unet_steps"] / 1000
    vae_k = report["vae_steps"] / 1000
    parameters = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in measured["parameters"].items())
    sweep = "; ".join(
        f"guidance {scale:g}: colour {v['colour']:.1%}, shape {v['shape']:.1%}"
        for scale, v in measured["guidance_sweep"].items()
    )
    lines = [
        f"# Tiny Stable Diffusion, {side} px (`{config.name}`)",
        "",
        "A text-to-image latent diffusion model with Stable Diffusion 1.5's structure (AutoencoderKL, "
        "UNet2DConditionModel with CrossAttnDownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D, "
        "CLIPTextModel + CLIPTokenizer, DDIM scheduler), trained from scratch on this package's synthetic world: "
        f"{side}x{side} images of one shape (circle, square, triangle, star) in one of six colours, two sizes, "
        'at a random position on a black, white or gray background, captioned "a {size} {colour} {shape} on a '
        '{background} background". Four colour/shape pairs are held out of training (red triangle, blue star, '
        "yellow circle, purple square) to test prompt generalisation."
        + (
            f" The VAE also sees the same scenes with {config.textured_fraction:.0%} of the shapes filled by random "
            "two-colour textures (checkerboards, stripes, dots, speckle) so that it can code fine patterns."
            if config.textured_fraction
            else ""
        ),
        "",
        "Reproduce: `python -m bayeslayers.integrations.tiny_sd.train --output_dir RUN --seed "
        f"{report['seed']}"
        + (f" --resolution {side}" if side != 32 else "")
        + _changed_sizes(report, config)
        + "` (resumable: rerun the same "
        "command) then "
        "`python -m bayeslayers.integrations.tiny_sd.build_assets --run_dir RUN`.",
        "",
        "## Configuration",
        "",
        f"- VAE: `{config.vae['block_out_channels']}` channels, {side}x{side}x3 -> {latent}x{latent}x4 latents; "
        f"{report['vae_steps']} steps, batch {report['batch_size']}; latent scaling factor "
        f"{report['latent_scaling_factor']:.4f}"
        + (
            f"; reconstruction MSE with textures {report['vae_recon_mse_vae_data']:.4f}"
            if config.textured_fraction and "vae_recon_mse_vae_data" in report
            else ""
        ),
        f"- UNet: `{config.unet['block_out_channels']}` channels, cross-attention dim "
        f"{config.unet['cross_attention_dim']}; text encoder: {config.text['num_hidden_layers']} layers, "
        f"width {config.text['hidden_size']}, trained jointly; {report['unet_steps']} steps, batch "
        f"{report['batch_size']}, AdamW with cosine schedule, 10 % empty captions (classifier-free guidance)",
        f"- Parameters: {parameters}",
        "- Tokenizer: CLIP BPE built from the project's `vocab.json` / `merges.txt` (one token per world word); "
        "scheduler: DDPM for training, DDIM shipped",
        f"- Data: {report['num_images']} images, seed {report['seed']}; {report.get('threads', 2)} CPU threads",
        "",
        "## Measured (2-core CPU, torch 2.13 CPU)",
        "",
        f"- VAE stage: {report['vae_seconds'] / 60:.1f} min wall"
        + (f", {report['vae_cpu_seconds'] / 60:.1f} min CPU" if "vae_cpu_seconds" in report else "")
        + f"; final loss {report['vae_final_loss']:.4f}, reconstruction MSE {report['vae_recon_mse']:.4f} on [-1, 1]",
        f"- UNet + text encoder stage: {report['unet_seconds'] / 60:.1f} min wall "
        f"({report['unet_seconds'] / unet_k / 60:.1f} min per 1k steps)"
        + (
            f", {report['unet_cpu_seconds'] / unet_k / 60:.1f} min CPU per 1k steps (process CPU time, all threads)"
            if "unet_cpu_seconds" in report
            else ""
        )
        + f"; final epsilon-MSE (running mean) {report['unet_final_loss']:.4f}",
        f"- Training in total: {(report['vae_seconds'] + report['unet_seconds']) / 60:.1f} min wall"
        + (
            f" (VAE {report['vae_cpu_seconds'] / vae_k / 60:.1f} min CPU per 1k steps)"
            if "vae_cpu_seconds" in report
            else ""
        ),
        f"- Judge ({measured['judge_seconds'] / 60:.1f} min to train) accuracy on fresh clean renders: "
        + ", ".join(f"{k} {v:.1%}" for k, v in measured["judge_accuracy"].items()),
        f"- Prompt accuracy on {measured['eval_images']} images of held-out colour/shape prompts ({steps} DDIM steps, "
        f"guidance {guidance:g}): "
        + ", ".join(f"{k} {accuracy[k]:.1%}" for k in ("colour", "shape", "size", "background"))
        + f"; corruption score {accuracy['corruption_score']:.2f} "
        "(lower is cleaner; 1.0 = as clean as the training renders)",
        "- Right shapes per held-out prompt: "
        + ", ".join(f"{k} {v:.0%}" for k, v in sorted(accuracy["shape_by_prompt"].items())),
        f"- Guidance sweep ({measured['eval_images']} images each): {sweep}",
        f"- One image at {steps} steps: {measured['seconds_per_image']:.2f} s",
        f"- Assets in total: {measured['assets_mb']:.1f} MB",
        "",
        _limits(report, accuracy, config.cpu_budget_minutes),
        "",
        "## Files",
        "",
        "- `pipeline/`: the diffusers folder (`StableDiffusionPipeline.from_pretrained`, safetensors).",
        "- `judge.safetensors` + `judge_config.json`: the judge "
        f"(`bayeslayers.integrations.tiny_sd.load_judge({'' if side == 32 else side})`) and its clean-data "
        "high-frequency reference.",
        f"- `subjects/`: {len(subject_set)} few-shot subjects never seen in training (`subject.py`): "
        f'{default.look} {default.shape} (the default, "{default.instance_prompt}", {len(default.scenes)} images), '
        + ", ".join(f"{s.look} {s.shape} ({len(s.scenes)} images)" for s in others)
        + "; `prompts.json` holds the instance, class and evaluation prompts.",
        "- `samples.png`: rows = " + "; ".join(GRID_PROMPTS) + f" (4 seeds each, guidance {guidance:g}).",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
