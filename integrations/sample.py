"""Posterior samples of a DreamBooth-BNN fine-tune: one fixed weight sample per denoising trajectory, a grid
of images per prompt and a per-pixel standard-deviation map (the model's epistemic uncertainty). A Bayesian
text encoder (``--bayes_text_encoder`` runs) is sampled along with the UNet. Images of small models are written
upscaled (nearest) to >= 256 px each, under a caption row with the prompt.

    bayeslayers-sample --model_dir dreambooth-bnn-model --prompt "a sks star on a blue background" \
        --num_posterior_samples 8
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

import bayeslayers

BAYESIAN_STATE = "bayesian_state.safetensors"
TEXT_ENCODER_BAYESIAN_STATE = "text_encoder_bayesian_state.safetensors"


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="output_dir of a bayeslayers-dreambooth run")
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="base pipeline; default: the one named in the run's model card, else the bundled tiny model",
    )
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--num_posterior_samples", type=int, default=8)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="initial noise seed, shared by all posterior samples")
    p.add_argument("--output_dir", default=None, help="default: <model_dir>/posterior_samples")
    args = p.parse_args(input_args)
    state = Path(args.model_dir, BAYESIAN_STATE)
    if not state.exists():
        raise ValueError(f"--model_dir {args.model_dir!r} holds no {BAYESIAN_STATE} (train with --bayesian)")
    if args.num_posterior_samples < 2:
        raise ValueError(f"--num_posterior_samples must be >= 2 for a std map, got {args.num_posterior_samples}")
    return args


def _base_model(args) -> str:
    if args.pretrained_model_name_or_path:
        return args.pretrained_model_name_or_path
    card = Path(args.model_dir, "README.md")
    if card.exists():
        for line in card.read_text().splitlines():
            if line.startswith("Base model: `"):
                return line.split("`")[1]
    from bayeslayers.integrations import tiny_sd

    return str(tiny_sd.pipeline_path())


def load_bayesian_pipeline(args):
    """The base pipeline with the run's UNet and text encoder (full mode: the exported ones) and their
    posteriors loaded."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = _base_model(args)
    extra = {}
    if Path(args.model_dir, "unet").is_dir():
        extra["unet"] = UNet2DConditionModel.from_pretrained(Path(args.model_dir, "unet"))
    if Path(args.model_dir, "text_encoder").is_dir():
        extra["text_encoder"] = CLIPTextModel.from_pretrained(Path(args.model_dir, "text_encoder"))
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    bayeslayers.load(pipe.unet, Path(args.model_dir, BAYESIAN_STATE))
    text_state = Path(args.model_dir, TEXT_ENCODER_BAYESIAN_STATE)
    if text_state.exists():
        bayeslayers.load(pipe.text_encoder, text_state)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def posterior_images(pipe, prompt, num_samples, steps, guidance, resolution, seed) -> np.ndarray:
    """(num_samples, H, W, 3) float images in [0, 1], one posterior weight sample each, same initial noise."""
    images = []
    bayesian = [m for m in (pipe.unet, pipe.text_encoder) if bayeslayers.posterior_layers(m)]
    for k in range(num_samples):
        with ExitStack() as stack:
            for module in bayesian:
                stack.enter_context(bayeslayers.sampling(module, seed=k))
            generator = torch.Generator().manual_seed(seed)
            images.append(
                pipe(
                    prompt,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=generator,
                    output_type="np",
                ).images[0]
            )
    return np.stack(images)


def std_map(images: np.ndarray) -> np.ndarray:
    """Per-pixel std over posterior samples, averaged over RGB: (H, W) float."""
    return images.std(axis=0).mean(axis=-1)


def save_outputs(images, prompt_index, out_dir, prompt: str = "") -> tuple[Path, Path]:
    """``promptNN_samples.png`` (one column per posterior sample) and ``promptNN_std.png`` (the std map in
    magma, next to the mean image), both upscaled to >= 256 px per image under a caption row."""
    from bayeslayers.integrations.dreambooth.images import captioned_grid, colormap

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = min(8, len(images))
    grid_path = out_dir / f"prompt{prompt_index:02d}_samples.png"
    captioned_grid(
        list(images),
        f"{prompt} ({len(images)} posterior samples)",
        columns=columns,
        labels=[f"sample {k}" for k in range(len(images))],
    ).save(grid_path)
    std = std_map(images)
    std_path = out_dir / f"prompt{prompt_index:02d}_std.png"
    captioned_grid(
        [images.mean(axis=0), colormap(std)],
        f"{prompt}: posterior mean | per-pixel std (magma, 0 to {std.max():.3f})",
        columns=2,
        labels=["mean", "std"],
    ).save(std_path)
    return grid_path, std_path


def main(args) -> list[dict]:
    pipe = load_bayesian_pipeline(args)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out_dir = Path(args.output_dir or Path(args.model_dir, "posterior_samples"))
    results = []
    for i, prompt in enumerate(args.prompt):
        images = posterior_images(
            pipe,
            prompt,
            args.num_posterior_samples,
            args.num_inference_steps,
            args.guidance_scale,
            resolution,
            args.seed,
        )
        grid, std = save_outputs(images, i, out_dir, prompt)
        results.append(
            {"prompt": prompt, "grid": str(grid), "std_map": str(std), "mean_pixel_std": float(std_map(images).mean())}
        )
    return results


def cli():
    for row in main(parse_args()):
        print(row)


if __name__ == "__main__":
    cli()
