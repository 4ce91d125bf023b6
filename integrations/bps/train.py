"""Train a (Bayesian) Power Steering network for a frozen Stable Diffusion UNet on condition/image pairs.

    bayeslayers-bps --output_dir runs/bps --condition edges
    bayeslayers-bps --output_dir runs/bps-bayes --bayesian --steering_model_name_or_path runs/bps/steering \
        --max_train_steps 500 --init_sigma 1e-3 --prior_sigma 0.01 --rho_learning_rate 1e-2
    python -m bayeslayers.integrations.bps --pretrained_model_name_or_path path/to/sd15 ...

Data: the synthetic captioned world of the bundled tiny model, rendered at the pipeline's resolution; the
condition (edge map or layout map) is computed from each image, so nothing is downloaded. The UNet, VAE and
text encoder stay frozen; only the steering network trains (plain epsilon/v loss, plus ``kl_weight`` x KL per
training image with ``--bayesian``). Checkpoints (safetensors) resume exactly; validation grids show
condition | steered | frozen; the end of the run evaluates condition adherence, the tiny judge's prompt
accuracy and the Frechet distance on its embeddings (bundled model only), and with ``--bayesian`` draws
several steering weight samples per validation scene with a per-pixel std map (``validation/posterior_samples.png``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import bayeslayers
from bayeslayers.config import OPTIMIZER_FIELDS, POSTERIOR_FIELDS, BayesConfig
from bayeslayers.optim import FusedBayesAdamW, SigmaAdamW, posterior_param_groups

from ..dreambooth.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from ..dreambooth.images import captioned_grid
from ..dreambooth.text import encode, tokenize
from ..dreambooth.train import stop_requests
from ..tiny_sd.world import make_dataset, to_tensor
from .conditions import CONDITIONS, make_condition
from .metrics import condition_adherence, judge_report
from .model import PowerSteering


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="diffusers Stable Diffusion folder or hub id (default: the bundled tiny model)",
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--steering_model_name_or_path",
        default=None,
        help="start from a trained steering network (a save_pretrained folder, e.g. <run>/steering of a "
        "deterministic run); with --bayesian its weights become the posterior means and the prior mean",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--condition", choices=CONDITIONS, default="edges")
    p.add_argument("--num_train_images", type=int, default=512)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the UNet's sample size x VAE factor)")
    p.add_argument("--steering_width", type=float, default=1.0, help="steering channels / UNet channels")
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--max_train_steps", type=int, default=300)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="global gradient-norm clipping; 0: none")
    p.add_argument(
        "--fused_optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --bayesian: update mu and rho inside each Bayesian conv's gradient pass (FusedBayesAdamW); "
        "default: wherever it applies (not with --max_grad_norm > 0, fp16, or several processes)",
    )
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--bayesian", action="store_true", help="Bayesian convs in the steering network (KL to its init)")
    # Steering starts at zero-initialised output convs: a narrow initial posterior and a wider prior (measured).
    BayesConfig.add_arguments(p, POSTERIOR_FIELDS, defaults={"init_sigma": 1e-4, "prior_sigma": 0.05})
    BayesConfig.add_arguments(p, OPTIMIZER_FIELDS)  # --rho_learning_rate, --sigma_space (with --bayesian)
    p.add_argument("--kl_weight", type=float, default=1e-3, help="weight of the KL per training image")
    p.add_argument("--checkpointing_steps", type=int, default=100)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--eval_images", type=int, default=64, help="images per model in the final evaluation (0: none)")
    p.add_argument(
        "--num_posterior_samples",
        type=int,
        default=4,
        help="with --bayesian: steering weight samples per validation scene for the final uncertainty grid (0: none)",
    )
    return p


def fused_optimizer_blocker(args, num_processes: int = 1) -> str:
    """Why FusedBayesAdamW cannot serve this run, naming the flag to change ('' when it can)."""
    reasons = [
        (not args.bayesian, "it updates Bayesian layers: pass --bayesian"),
        (args.max_grad_norm > 0, "--max_grad_norm > 0 clips by the norm of all gradients (--max_grad_norm 0: off)"),
        (args.mixed_precision == "fp16", "--mixed_precision fp16 needs GradScaler's inf check first (bf16 works)"),
        (args.sigma_space, "--sigma_space steps sigma with SigmaAdamW"),
        (num_processes > 1, "several processes (DDP) are not supported by it yet"),
    ]
    return next((reason for blocked, reason in reasons if blocked), "")


def parse_args(input_args=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(input_args)
    for flag in ("num_train_images", "train_batch_size", "max_train_steps", "num_validation_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.init_sigma <= 0 or args.prior_sigma <= 0:
        parser.error("--init_sigma and --prior_sigma must be positive")
    if args.rho_learning_rate is not None and args.rho_learning_rate <= 0:
        parser.error(f"--rho_learning_rate must be positive, got {args.rho_learning_rate}")
    if args.num_posterior_samples == 1 or args.num_posterior_samples < 0:
        parser.error(f"--num_posterior_samples must be 0 or at least 2 (a std map), got {args.num_posterior_samples}")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    if args.fused_optimizer and fused_optimizer_blocker(args):
        parser.error(
            f"--fused_optimizer cannot be used here: {fused_optimizer_blocker(args)}; pass --no-fused_optimizer"
        )
    if args.pretrained_model_name_or_path is None:
        from .. import tiny_sd

        args.pretrained_model_name_or_path = str(tiny_sd.pipeline_path())
    return args


def load_pipeline(args, device, dtype):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=dtype,
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe.to(device), noise_scheduler


def synthetic_data(args, pipe, resolution: int, count: int, seed: int, device):
    """(latents, text embeddings, conditions, images, scenes) of ``count`` rendered scenes."""
    images, scenes = make_dataset(count, seed, resolution=resolution)
    images = to_tensor(images)
    conditions = make_condition(args.condition, images, scenes)
    latents, texts = [], []
    with torch.no_grad():
        for i in range(0, count, 64):
            batch = images[i : i + 64].to(device, pipe.vae.dtype)
            latents.append(pipe.vae.encode(batch).latent_dist.sample() * pipe.vae.config.scaling_factor)
            tokens = tokenize(pipe.tokenizer, [s.caption for s in scenes[i : i + 64]])
            texts.append(encode(pipe.text_encoder, tokens, use_attention_mask=False))
    return torch.cat(latents), torch.cat(texts), conditions, images, scenes


@torch.no_grad()
def generate(pipe, steerer, scenes, conditions, args, steer: bool, seed: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for the scenes' captions, steered by ``conditions`` or not."""
    out = []
    for i in range(0, len(scenes), 16):
        generator = torch.Generator().manual_seed(seed + i)
        with steerer.conditioned(conditions[i : i + 16].to(pipe.device) if steer else None):
            images = pipe(
                [s.caption for s in scenes[i : i + 16]],
                height=conditions.shape[-2],
                width=conditions.shape[-1],
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                generator=generator,
                output_type="np",
            ).images
        out.append(to_tensor((np.clip(images, 0, 1) * 255).round().astype(np.uint8)))
    return torch.cat(out)


def validation_grid(pipe, steerer, steering, data, args, step: int) -> Path:
    """Rows of condition | steered (posterior mean) | frozen for the validation scenes; saved as PNG."""
    from PIL import Image

    _, _, conditions, _, scenes = data
    was_training = steering.training
    steering.eval()
    with torch.random.fork_rng(devices=[]):
        steered = generate(pipe, steerer, scenes, conditions, args, steer=True, seed=args.seed)
        frozen = generate(pipe, steerer, scenes, conditions, args, steer=False, seed=args.seed)
    steering.train(was_training)

    def pil(t):
        return Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())

    tiles = []
    for condition, a, b in zip(conditions, steered, frozen):
        tiles += [pil(condition.expand(3, -1, -1) * 2 - 1), pil(a), pil(b)]
    path = Path(args.output_dir, "validation", f"step-{step:06d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    captioned_grid(tiles, f"step {step}: condition | steered | frozen", columns=3).save(path)
    return path


def posterior_grid(pipe, steerer, steering, data, args) -> tuple[Path, float]:
    """Rows of condition | one image per steering weight sample | per-pixel std over them (the steering's
    epistemic uncertainty; same initial noise for every sample). Returns the PNG path and the mean pixel std."""
    from PIL import Image

    _, _, conditions, _, scenes = data
    steering.eval()
    samples = []
    with torch.random.fork_rng(devices=[]):
        for k in range(args.num_posterior_samples):
            with bayeslayers.sampling(steering, seed=k):
                samples.append(generate(pipe, steerer, scenes, conditions, args, steer=True, seed=args.seed))
    samples = (torch.stack(samples) + 1) / 2  # (K, N, 3, H, W) in [0, 1]
    std = samples.std(dim=0).mean(dim=1)  # (N, H, W)
    scale = float(std.max().clamp_min(1e-8))

    def pil(t):
        return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())

    tiles = []
    for n, condition in enumerate(conditions):
        tiles += [
            pil(condition.expand(3, -1, -1)),
            *(pil(s[n]) for s in samples),
            pil((std[n] / scale).expand(3, -1, -1)),
        ]
    path = Path(args.output_dir, "validation", "posterior_samples.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    caption = f"condition | {args.num_posterior_samples} steering weight samples | per-pixel std (max {scale:.3g})"
    captioned_grid(tiles, caption, columns=args.num_posterior_samples + 2).save(path)
    return path, float(std.mean())


def evaluate(pipe, steerer, steering, args, resolution: int) -> dict:
    """Condition adherence of steered vs frozen images; judge accuracy and Frechet distance when the bundled
    tiny model (32 px) is used."""
    from .. import tiny_sd
    from ..tiny_sd.world import RESOLUTION

    images, scenes = make_dataset(args.eval_images, args.seed + 2, resolution=resolution)
    images = to_tensor(images)
    conditions = make_condition(args.condition, images, scenes)
    steering.eval()
    results = {}
    generated = {
        name: generate(pipe, steerer, scenes, conditions, args, steer=name == "steered", seed=7)
        for name in ("steered", "frozen")
    }
    judge = reference = None
    if resolution == RESOLUTION:
        judge, _ = tiny_sd.load_judge()
        reference = judge.embedding(images)
    for name, output in generated.items():
        results[name] = {"condition_adherence": condition_adherence(conditions, output, args.condition)}
        if judge is not None:
            results[name].update(judge_report(judge, output, scenes, reference))
    results["real_renders"] = {"condition_adherence": condition_adherence(conditions, images, args.condition)}
    return results


def plot_history(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss", "kl") if history.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(history[key])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def initial_steering(args, unet, vae_scale_factor: int) -> PowerSteering:
    """A fresh (zero-output) steering network for ``unet``, or the trained one named by the flags."""
    if args.steering_model_name_or_path is None:
        return PowerSteering.from_unet(
            unet, condition_channels=1, vae_scale_factor=vae_scale_factor, width=args.steering_width
        )
    steering = PowerSteering.from_pretrained(args.steering_model_name_or_path)
    try:
        steering.check_unet(unet)
    except ValueError as error:
        raise ValueError(f"--steering_model_name_or_path {args.steering_model_name_or_path!r}: {error}") from None
    if steering.config.condition_channels != 1 or steering.config.vae_scale_factor != vae_scale_factor:
        raise ValueError(
            f"--steering_model_name_or_path {args.steering_model_name_or_path!r}: expected "
            f"condition_channels 1 and vae_scale_factor {vae_scale_factor}, got "
            f"{steering.config.condition_channels} and {steering.config.vae_scale_factor}"
        )
    parameter = next(unet.parameters())
    return nn.Module.to(steering, device=parameter.device, dtype=parameter.dtype)


def main(args, step_callback=None) -> dict:
    """Trains, checkpoints, validates and evaluates; returns the final metrics (also in metrics.json)."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe, noise_scheduler = load_pipeline(args, accelerator.device, torch.float32)
    factor = pipe.vae_scale_factor
    resolution = args.resolution or pipe.unet.config.sample_size * factor
    if resolution % factor:
        raise ValueError(f"--resolution must be a multiple of the VAE factor {factor}, got {resolution}")

    steering = initial_steering(args, pipe.unet, factor)
    if args.bayesian:
        bayeslayers.convert(steering, config=BayesConfig.from_arguments(args, target_modules=steering.conv_names()))
    steering.train()
    trainable = [(n, p) for n, p in steering.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    groups = posterior_param_groups(steering, args.learning_rate, args.rho_learning_rate, args.sigma_space)
    fused = args.fused_optimizer is not False and not fused_optimizer_blocker(args, accelerator.num_processes)
    if args.fused_optimizer and not fused:
        raise ValueError(
            f"--fused_optimizer cannot be used here: {fused_optimizer_blocker(args, accelerator.num_processes)}"
        )
    if fused:
        for group in groups:
            group.pop("sigma_space", None)
    optimizer_class = FusedBayesAdamW if fused else SigmaAdamW
    optimizer = optimizer_class(groups, lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.lr_warmup_steps) if args.lr_warmup_steps else 1.0
    )
    steering, optimizer = accelerator.prepare(steering, optimizer)
    model = accelerator.unwrap_model(steering)
    steerer = model.attach(pipe.unet)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    train = synthetic_data(args, pipe, resolution, args.num_train_images, args.seed, accelerator.device)
    validation = synthetic_data(args, pipe, resolution, args.num_validation_images, args.seed + 1, accelerator.device)
    history, step = {"loss": [], "kl": [], "seconds_per_step": []}, 0
    if args.resume_from_checkpoint:
        step, history = load_checkpoint(
            resolve_checkpoint(output_dir, args.resume_from_checkpoint), named, optimizer, lr_scheduler
        )
    latents, texts, conditions = train[0], train[1], train[2]
    generator = torch.Generator().manual_seed(args.seed + step)
    progress = tqdm(total=args.max_train_steps, initial=step, desc="steps", disable=not accelerator.is_main_process)
    with stop_requests() as stop:
        while step < args.max_train_steps:
            started = time.perf_counter()
            index = torch.randint(0, len(latents), (args.train_batch_size,), generator=generator)
            x0, text, condition = latents[index], texts[index], conditions[index].to(accelerator.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator
            ).to(x0.device)
            noisy = noise_scheduler.add_noise(x0, noise, timesteps)
            target = (
                noise
                if noise_scheduler.config.prediction_type == "epsilon"
                else noise_scheduler.get_velocity(x0, noise, timesteps)
            )
            with accelerator.autocast(), steerer.conditioned(condition):
                prediction = pipe.unet(noisy, timesteps, text).sample
            loss = F.mse_loss(prediction.float(), target.float())
            # --no-store_prior (for --kl_weight 0): no prior, no KL
            has_kl = args.bayesian and args.store_prior
            kl = bayeslayers.kl_loss(model) / len(latents) if has_kl else torch.zeros(())
            accelerator.backward(loss + args.kl_weight * kl)
            if args.max_grad_norm > 0:  # 0: no clipping
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["loss"].append(loss.item())
            history["kl"].append(kl.item())
            history["seconds_per_step"].append(time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{history['loss'][-1]:.4f}")
            if step_callback is not None:
                step_callback(step)
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps or stop["signal"]:
                save_checkpoint(output_dir, step, named, optimizer, lr_scheduler, history, args.checkpoints_total_limit)
            if step % args.validation_steps == 0 or step == args.max_train_steps:
                validation_grid(pipe, steerer, model, validation, args, step)
            if stop["signal"]:
                progress.close()
                return {"stopped_at": step}
    progress.close()

    model.eval()
    if args.bayesian:  # the posterior (mu, rho, prior) with bayeslayers' format; the architecture as config
        bayeslayers.save(model, output_dir / "steering_posterior.safetensors")
        model.save_config(output_dir / "steering")
    else:
        model.save_pretrained(output_dir / "steering")
    plot_history(history, output_dir / "training_curves.png")
    metrics = {
        "steps": step,
        "final_loss": float(np.mean(history["loss"][-20:])),
        "seconds_per_step": float(np.median(history["seconds_per_step"])),
        "bayesian": args.bayesian,
        "condition": args.condition,
    }
    if args.bayesian and args.num_posterior_samples:
        grid, mean_std = posterior_grid(pipe, steerer, model, validation, args)
        metrics["posterior_samples"] = {"grid": str(grid), "mean_pixel_std": mean_std}
    if args.eval_images:
        metrics["evaluation"] = evaluate(pipe, steerer, model, args, resolution)
    model.detach()
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def cli(input_args=None):
    metrics = main(parse_args(input_args))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    cli()
