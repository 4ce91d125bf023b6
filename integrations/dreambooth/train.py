"""The DreamBooth-BNN training loop (diffusers-style, accelerate for devices / mixed precision / multi-GPU)."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import bayeslayers

from .checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import DreamBoothData, check_image_dir, generate_class_images
from .export import export_model, plot_history, write_model_card


@contextmanager
def stop_requests():
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (to checkpoint before exiting)."""
    requested = {"signal": None}
    previous = {}

    def handler(signum, frame):
        requested["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def load_components(args, device, weight_dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, common = args.pretrained_model_name_or_path, dict(revision=args.revision)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).to(device, dtype=weight_dtype).eval()
    return tokenizer, text_encoder, vae, unet.to(device), noise_scheduler


def make_bayesian(unet, args) -> None:
    """Converts the UNet as the flags say (or, for the plain LoRA baseline, adds deterministic LoRA)."""
    targets = args.bayes_target_modules
    if targets is not None and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    options = dict(target_modules=targets, preset=args.bayes_preset, mode=args.train_mode, rank=args.rank,
                   init_sigma=args.init_sigma, prior_sigma=args.prior_sigma, kl_direction=args.kl_direction)
    if args.train_mode == "lora":
        options["bayesian_factors"] = bayeslayers.get_preset(args.bayes_preset).get("bayesian_factors", "AB") \
            if args.bayesian else ""
        bayeslayers.convert(unet, **options)
    elif args.bayesian:
        bayeslayers.convert(unet, **options)


def validation_pipeline(args, unet, text_encoder, vae, tokenizer, weight_dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_grid(images, columns: int):
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


@torch.no_grad()
def run_validation(args, pipe, step, resolution, accelerator):
    """Generates ``num_validation_images`` with the mean weights; saves a PNG grid; returns its path."""
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    with torch.random.fork_rng(devices=[]):
        images = pipe([args.validation_prompt] * args.num_validation_images, height=resolution, width=resolution,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                      generator=generator).images
    unet.train(was_training)
    path = Path(args.output_dir, "validation", f"step-{step:06d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, min(4, len(images))).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")
    return path


def encode_prompts(tokenizer, text_encoder, prompts, device):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def mean_sigma(unet) -> float:
    """Mean posterior std over all Bayesian weights (one device sync)."""
    layers = [layer for _, layer in bayeslayers.posterior_layers(unet)]
    if not layers:
        return float("nan")
    with torch.no_grad():
        total = torch.stack([layer.weight_sigma.sum() for layer in layers]).sum()
    return total.item() / sum(layer.weight_mu.numel() for layer in layers)


def main(args, step_callback=None) -> dict:
    """Trains, checkpoints, validates and exports; returns the final metrics.

    ``step_callback(args, step)`` runs after each optimizer step (hooks for tests and notebooks).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=report_to,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / args.logging_dir)))
    if args.seed is not None:
        torch.manual_seed(args.seed + accelerator.process_index)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args, accelerator.device, weight_dtype)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = args.resolution or unet.config.sample_size * vae_factor
    if resolution % vae_factor:
        raise ValueError(f"--resolution must be divisible by the VAE factor {vae_factor}, got {resolution}")

    class_images = ()
    if args.with_prior_preservation:
        pipe = validation_pipeline(args, unet, text_encoder, vae, tokenizer, weight_dtype)
        if accelerator.is_main_process:
            generate_class_images(pipe, args.class_prompt, args.class_data_dir, args.num_class_images,
                                  args.sample_batch_size, resolution, args.num_inference_steps, args.guidance_scale,
                                  args.seed or 0)
        accelerator.wait_for_everyone()
        class_images = check_image_dir(args.class_data_dir, "--class_data_dir")[: args.num_class_images]
    data = DreamBoothData(args.instance_images, args.instance_prompt, resolution, args.center_crop, class_images,
                          args.class_prompt)

    make_bayesian(unet, args)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    named_params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(named_params.values()), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    raw_unet = accelerator.unwrap_model(unet)

    step, history = 0, {"step": [], "loss": [], "kl": [], "mean_sigma": []}
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
        step, history = load_checkpoint(checkpoint, named_params, optimizer, lr_scheduler)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-bnn", config={k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool))})

    pipe = validation_pipeline(args, raw_unet, text_encoder, vae, tokenizer, weight_dtype)
    bayesian = bool(bayeslayers.posterior_layers(raw_unet))
    progress = tqdm(range(args.max_train_steps), initial=step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    unet.train()
    started = time.perf_counter()
    interrupted = None
    with stop_requests() as stop:
        while step < args.max_train_steps:
            with accelerator.accumulate(unet):
                pixels, prompts = data.batch(args.train_batch_size)
                with torch.no_grad():
                    latents = vae.encode(pixels.to(accelerator.device, weight_dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                    text = encode_prompts(tokenizer, text_encoder, prompts, accelerator.device)
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if noise_scheduler.config.prediction_type == "epsilon" \
                    else noise_scheduler.get_velocity(latents, noise, timesteps)
                pred = unet(noisy, timesteps, encoder_hidden_states=text).sample.float()
                if args.with_prior_preservation:
                    pred, pred_prior = pred.chunk(2)
                    target, target_prior = target.chunk(2)
                    loss = F.mse_loss(pred, target.float()) + args.prior_loss_weight * F.mse_loss(
                        pred_prior, target_prior.float())
                else:
                    loss = F.mse_loss(pred, target.float())
                kl = bayeslayers.kl_loss(raw_unet) if bayesian else torch.zeros((), device=loss.device)
                total = loss + args.kl_weight * kl if args.kl_weight > 0 else loss
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(named_params.values()), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            logs = {"loss": loss.item(), "kl": kl.item(), "mean_sigma": mean_sigma(raw_unet),
                    "lr": lr_scheduler.get_last_lr()[0]}
            for key in ("loss", "kl", "mean_sigma"):
                history[key].append(logs[key])
            history["step"].append(step)
            shown = {"loss": f"{logs['loss']:.4f}"}
            if args.bayesian:
                shown.update(kl=f"{logs['kl']:.3g}", sigma=f"{logs['mean_sigma']:.3g}")
            progress.set_postfix(**shown)
            accelerator.log(logs, step=step)
            if step_callback is not None:
                step_callback(args, step)
            if accelerator.is_main_process:
                if step % args.checkpointing_steps == 0 or stop["signal"] is not None:
                    save_checkpoint(out, step, named_params, optimizer, lr_scheduler, history,
                                    args.checkpoints_total_limit)
                if args.validation_prompt and step % args.validation_steps == 0:
                    run_validation(args, pipe, step, resolution, accelerator)
            if stop["signal"] is not None:
                interrupted = stop["signal"]
                break
    progress.close()
    seconds = time.perf_counter() - started
    if interrupted is not None:
        accelerator.print(f"stopped by signal {interrupted} at step {step}; checkpoint saved, resume with "
                          "--resume_from_checkpoint latest")
        accelerator.end_training()
        return {"interrupted": True, "step": step}

    metrics = {"steps": step, "final_loss": history["loss"][-1], "final_kl": history["kl"][-1],
               "final_mean_sigma": history["mean_sigma"][-1], "train_seconds": round(seconds, 2)}
    result = dict(metrics)
    if accelerator.is_main_process:
        if args.validation_prompt:
            result["validation_grid"] = str(run_validation(args, pipe, step, resolution, accelerator))
        plot_history(history, out / "training_curves.png")
        result["curves"] = str(out / "training_curves.png")
        written = export_model(raw_unet, args)
        write_model_card(args, metrics, written)
        result.update(written)
    accelerator.end_training()
    return result
