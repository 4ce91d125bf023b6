"""Assembles the shipped assets from a finished training run: pipeline, judge, subject, samples, model card.

    python -m bayeslayers.integrations.tiny_sd.build_assets --run_dir /tmp/tiny_sd_run
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import ASSETS, models
from .evaluate import GRID_PROMPTS, prompt_accuracy, sample_grid, seconds_per_image
from .subject import CLASS_PROMPT, INSTANCE_PROMPT, VALIDATION_PROMPT, render_subject
from .train_judge import train_judge


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--judge_steps", type=int, default=1500)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(input_args)
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    run = Path(args.run_dir)
    ASSETS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ASSETS / "pipeline", ignore_errors=True)
    shutil.copytree(run / "pipeline", ASSETS / "pipeline")

    subject = ASSETS / "subject"
    shutil.rmtree(subject, ignore_errors=True)
    subject.mkdir()
    for i, image in enumerate(render_subject()):
        image.save(subject / f"sks_star_{i}.png")
    (subject / "prompts.json").write_text(json.dumps({"instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT,
                                                      "validation_prompt": VALIDATION_PROMPT}, indent=1))

    started = time.perf_counter()
    judge, judge_accuracy, clean_energy = train_judge(args.judge_steps)
    judge_seconds = time.perf_counter() - started
    save_file(judge.state_dict(), str(ASSETS / "judge.safetensors"),
              metadata={"clean_high_frequency_energy": repr(clean_energy), "held_out_accuracy": repr(judge_accuracy)})

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    accuracy = prompt_accuracy(pipe, judge, clean_energy, guidance=args.guidance)
    seconds = seconds_per_image(pipe)
    sample_grid(pipe, ASSETS / "samples.png", guidance=args.guidance)
    report = json.loads((run / "training_report.json").read_text())
    size_mb = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    write_card(report, judge_accuracy, judge_seconds, accuracy, seconds, size_mb, args.guidance)
    print(json.dumps({"judge_accuracy": judge_accuracy, "prompt_accuracy": accuracy, "seconds_per_image": seconds,
                      "assets_mb": size_mb}, indent=1))


def write_card(report, judge_accuracy, judge_seconds, accuracy, seconds, size_mb, guidance):
    unet_minutes = report["unet_seconds"] / 60
    per_1k = report["unet_seconds"] / report["unet_steps"] * 1000 / 60
    lines = [
        "# Tiny Stable Diffusion (bundled)", "",
        "A text-to-image latent diffusion model with Stable Diffusion 1.5's structure (AutoencoderKL, "
        "UNet2DConditionModel with CrossAttnDownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D, "
        "CLIPTextModel + CLIPTokenizer, DDIM scheduler), trained from scratch on this package's synthetic world: "
        "32x32 images of one shape (circle, square, triangle, star) in one of six colours, two sizes, at a random "
        "position on a black, white or gray background, captioned \"a {size} {colour} {shape} on a {background} "
        "background\". Four colour/shape pairs are held out of training (red triangle, blue star, yellow circle, "
        "purple square) to test prompt generalisation.", "",
        "Reproduce: `python -m bayeslayers.integrations.tiny_sd.train --output_dir RUN --seed "
        f"{report['seed']}` then `python -m bayeslayers.integrations.tiny_sd.build_assets --run_dir RUN`.", "",
        "## Configuration", "",
        f"- VAE: `{models.VAE_CONFIG['block_out_channels']}` channels, 32x32x3 -> 8x8x4 latents; "
        f"{report['vae_steps']} steps, batch {report['batch_size']}; latent scaling factor "
        f"{report['latent_scaling_factor']:.4f}",
        f"- UNet: `{models.UNET_CONFIG['block_out_channels']}` channels, cross-attention dim "
        f"{models.UNET_CONFIG['cross_attention_dim']}; text encoder: {models.TEXT_CONFIG['num_hidden_layers']} layers, "
        f"width {models.TEXT_CONFIG['hidden_size']}, trained jointly; {report['unet_steps']} steps, batch "
        f"{report['batch_size']}, 10 % empty captions (classifier-free guidance)",
        f"- Data: {report['num_images']} images, seed {report['seed']}", "",
        "## Measured (2-core CPU, torch 2.13 CPU)", "",
        f"- VAE stage: {report['vae_seconds'] / 60:.1f} min, final loss {report['vae_final_loss']:.4f}, "
        f"reconstruction MSE {report['vae_recon_mse']:.4f} on [-1, 1]",
        f"- UNet + text encoder stage: {unet_minutes:.1f} min ({per_1k:.1f} min per 1k steps), final "
        f"epsilon-MSE (running mean) {report['unet_final_loss']:.4f}",
        f"- Judge ({judge_seconds / 60:.1f} min to train) accuracy on fresh clean renders: "
        + ", ".join(f"{k} {v:.1%}" for k, v in judge_accuracy.items()),
        f"- Prompt accuracy on 96 images of held-out colour/shape prompts (25 DDIM steps, guidance {guidance}): "
        + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items() if k != "corruption_score")
        + f"; corruption score {accuracy['corruption_score']:.2f} (1.0 = clean renders)",
        f"- One image at 25 steps: {seconds:.2f} s", f"- Assets in total: {size_mb:.1f} MB", "",
        "`samples.png`: rows = " + "; ".join(GRID_PROMPTS) + " (4 seeds each, guidance "
        f"{guidance}).", "",
        "The held-out subject (`subject/`): a red/yellow checkerboard star, \"a sks star\", 5 images.", "",
    ]
    (ASSETS / "MODEL_CARD.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
