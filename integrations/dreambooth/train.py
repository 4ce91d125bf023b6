"""The DreamBooth-BNN training loop (diffusers-style, accelerate for devices / mixed precision / multi-GPU)."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

import bayeslayers

from .args import fused_optimizer_blocker, posterior_options, use_fused_optimizer
from .checkpoints import (
    check_finite_metrics,
    check_finite_parameters,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import DreamBoothData, check_image_dir, generate_class_images
from .distributed import check_launch, process_rng_states, run_seed, shared_weight_sample
from .evaluation import Evaluator
from .export import export_model, plot_history, write_model_card
from .images import captioned_grid
from .recipe import (
    allow_tf32,
    build_lr_scheduler,
    build_optimizer,
    class_image_pipeline,
    create_hub_repo,
    diffusion_loss,
    enable_xformers,
    resolve_training_length,
    sample_noise,
    upload_to_hub,
)
from .text import PromptEncoder, load_tokenizer, prepare_text_encoder


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
    """Tokenizer, text encoder (frozen in ``weight_dtype`` unless ``--train_text_encoder``: then fp32 and
    trainable), frozen VAE, UNet and the DDPM noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path, common = args.pretrained_model_name_or_path, dict(revision=args.revision)
    tokenizer = load_tokenizer(args)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vae.requires_grad_(False).to(device, dtype=weight_dtype).eval()
    if args.train_text_encoder:
        prepare_text_encoder(text_encoder, args)
        text_encoder.to(device)
    else:
        text_encoder.requires_grad_(False).to(device, dtype=weight_dtype).eval()
    return tokenizer, text_encoder, vae, unet.to(device), noise_scheduler


def make_bayesian(unet, args) -> None:
    """Converts the UNet as the flags say (or, for the plain LoRA baseline, adds deterministic LoRA)."""
    targets = args.bayes_target_modules
    if targets is not None and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    options = dict(
        target_modules=targets,
        preset=args.bayes_preset,
        mode=args.train_mode,
        rank=args.rank,
        **posterior_options(args),
    )
    if args.train_mode == "lora" and args.use_peft:
        add_peft_adapter(unet, args, targets)
        if args.bayesian:
            preset = bayeslayers.get_preset(args.bayes_preset)
            options.update(preset=None, mode="peft", bayesian_factors=preset.bayesian_factors, factor_prior="current")
            options["target_modules"] = preset.target_modules if targets is None else targets
            options.pop("rank")
            bayeslayers.convert(unet, **options)
    elif args.train_mode == "lora":
        options["bayesian_factors"] = (
            bayeslayers.get_preset(args.bayes_preset).bayesian_factors if args.bayesian else ""
        )
        bayeslayers.convert(unet, **options)
    elif args.bayesian:
        bayeslayers.convert(unet, **options)


def add_peft_adapter(unet, args, targets) -> None:
    """``--use_peft``: a rank ``--rank`` peft LoRA adapter (alpha = rank; A Kaiming-uniform, B zero, as the
    library's LoRA layer) on the preset's (or ``--bayes_target_modules``') layers, the rest of the UNet frozen."""
    from peft import LoraConfig

    if targets is None:
        targets = bayeslayers.get_preset(args.bayes_preset).target_modules
    targets = list(targets) if isinstance(targets, tuple) else targets
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True, target_modules=targets))


def validation_pipeline(args, unet, text_encoder, vae, tokenizer, weight_dtype):
    """StableDiffusionPipeline over the training modules with the ``--validation_scheduler`` (variance type
    "learned" mapped to "fixed_small", as in diffusers)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    config = diffusers.DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler")
    extra = {}
    if "variance_type" in config:
        variance = config["variance_type"]
        extra["variance_type"] = "fixed_small" if variance in ("learned", "learned_range") else variance
    scheduler = getattr(diffusers, args.validation_scheduler).from_config(config, **extra)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_validation(args, pipe, step, resolution, accelerator, prompts=None):
    """Generates ``num_validation_images`` with the mean weights; saves a captioned PNG grid (each image
    upscaled to >= 256 px); returns its path. ``prompts`` (a PromptEncoder) supplies pre-computed embeddings."""
    modules = [m for m in (pipe.unet, pipe.text_encoder) if m is not None]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    count = args.num_validation_images
    if prompts is not None and prompts.text_encoder is None:
        text = dict(
            prompt_embeds=prompts([args.validation_prompt] * count), negative_prompt_embeds=prompts([""] * count)
        )
    else:
        text = dict(prompt=[args.validation_prompt] * count)
    with torch.random.fork_rng(devices=[]):
        images = pipe(
            **text,
            height=resolution,
            width=resolution,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
        ).images
    for module, training in zip(modules, was_training):
        module.train(training)
    path = Path(args.output_dir, "validation", f"step-{step:06d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    arm = "DreamBooth-BNN" if args.bayesian else "plain DreamBooth"
    captioned_grid(images, f"{arm}, step {step}: {args.validation_prompt}").save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return path


HISTORY_KEYS = ("loss", "kl", "mean_sigma", "kl_unet", "kl_text_encoder", "mean_sigma_text_encoder")


def mean_sigma(unet) -> float:
    """Mean posterior std over all Bayesian weights (one device sync)."""
    layers = [layer for _, layer in bayeslayers.posterior_layers(unet)]
    if not layers:
        return float("nan")
    with torch.no_grad():
        total = torch.stack([layer.weight_sigma.sum() for layer in layers]).sum()
    return total.item() / sum(layer.weight_mu.numel() for layer in layers)


def movement_logs(model, sigma_0: float, prefix: str = "") -> dict:
    """``sigma_ratio/<group>/<mean|p05|p95>``: sigma / sigma_0 per layer group (bayeslayers.sigma_movement)."""
    stats = bayeslayers.sigma_movement(model, sigma_0)
    return {f"sigma_ratio/{prefix}{group}/{k}": v for group, values in stats.items() for k, v in values.items()}


def release_optimizer_state(optimizer) -> None:
    """Drops the gradients and the optimizer's per-parameter state once training is over (the last checkpoint is
    written): the end of a run (validation, export) then peaks without them."""
    optimizer.zero_grad(set_to_none=True)
    getattr(optimizer, "optimizer", optimizer).state.clear()  # accelerate's wrapper holds the torch optimizer


def main(args, step_callback=None) -> dict:
    """Trains, checkpoints, validates and exports; returns the final metrics.

    ``step_callback(args, step)`` runs after each optimizer step (hooks for tests and notebooks).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / args.logging_dir)),
    )
    check_launch(accelerator)
    if args.seed is not None:
        torch.manual_seed(args.seed + accelerator.process_index)
    if args.allow_tf32:
        allow_tf32()
    hub_repo = create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args, accelerator.device, weight_dtype)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = args.resolution or unet.config.sample_size * vae_factor
    if resolution % vae_factor:
        raise ValueError(f"--resolution must be divisible by the VAE factor {vae_factor}, got {resolution}")

    class_images = ()
    if args.with_prior_preservation:
        if accelerator.is_main_process:
            base_pipeline = partial(class_image_pipeline, args, accelerator.device)  # loaded only if needed
            generate_class_images(
                base_pipeline,
                args.class_prompt,
                args.class_data_dir,
                args.num_class_images,
                args.sample_batch_size,
                resolution,
                args.num_inference_steps,
                args.guidance_scale,
                args.seed or 0,
            )
        accelerator.wait_for_everyone()
        class_images = check_image_dir(args.class_data_dir, "--class_data_dir")[: args.num_class_images]
    data = DreamBoothData(
        args.instance_images,
        args.instance_prompt,
        resolution,
        args.center_crop,
        class_images,
        args.class_prompt,
        args.image_interpolation_mode,
        args.dataloader_num_workers,
    )
    resolve_training_length(
        args, data.steps_per_epoch(args.train_batch_size * accelerator.num_processes, args.gradient_accumulation_steps)
    )

    make_bayesian(unet, args)
    if args.enable_xformers_memory_efficient_attention:
        enable_xformers(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    named_params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if args.train_text_encoder:  # checkpoint names: UNet parameters as they are, text encoder ones prefixed
        named_params.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    fused = use_fused_optimizer(args, accelerator.num_processes)
    if args.bayesian and not fused and args.optimizer == "adamw":
        reason = fused_optimizer_blocker(args, accelerator.num_processes) or "--no-fused_optimizer"
        accelerator.print(f"optimizer: torch AdamW, not the fused one ({reason})")
    optimizer = build_optimizer(
        list(named_params.values()), args, accelerator.num_processes, fused, (unet, text_encoder)
    )
    optimizer_name = type(optimizer).__name__
    # IVON's rho gradients are its Hessian estimate, not a step: clipping leaves them alone
    ivon = args.optimizer == "ivon"
    clipped_params = [p for n, p in named_params.items() if not (ivon and n.endswith("weight_rho"))]
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator.num_processes)
    if args.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    raw_unet, raw_text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    trained_models = [unet, text_encoder] if args.train_text_encoder else [unet]
    precompute = (
        [args.instance_prompt, args.class_prompt, args.validation_prompt, "", *(args.eval_prompt_list or ())]
        if args.pre_compute_text_embeddings
        else ()
    )
    prompt_encoder = PromptEncoder(
        tokenizer,
        text_encoder,
        args.tokenizer_max_length,
        args.text_encoder_use_attention_mask,
        [p for p in precompute if p is not None],
    )
    if args.pre_compute_text_embeddings:  # the text encoder is not kept during training
        text_encoder = raw_text_encoder = None

    step, history = 0, {"step": [], "loss": [], "kl": [], "mean_sigma": []}
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
        step, history = load_checkpoint(checkpoint, named_params, optimizer, lr_scheduler, accelerator.process_index)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "dreambooth-bnn", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    pipe = validation_pipeline(args, raw_unet, raw_text_encoder, vae, tokenizer, weight_dtype)
    bayesian = bool(bayeslayers.posterior_layers(raw_unet))
    text_bayesian = raw_text_encoder is not None and bool(bayeslayers.posterior_layers(raw_text_encoder))
    evaluator = None
    if args.eval_steps and accelerator.is_main_process:
        evaluator = Evaluator(args, pipe, resolution, accelerator, prompt_encoder)
        if step == 0:  # the base model: where the curves start
            evaluator(0)
    evaluated = step
    # False: the Bayesian layers store no prior (--kl_weight 0), so no KL exists and none is logged
    has_prior = not args.bayesian or posterior_options(args)["store_prior"]
    progress = tqdm(
        range(args.max_train_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process
    )
    unet.train()
    sample_seed, forwards = run_seed(accelerator, args.seed), step * args.gradient_accumulation_steps
    started = time.perf_counter()
    interrupted = None
    with stop_requests() as stop:
        while step < args.max_train_steps:
            with accelerator.accumulate(*trained_models):
                pixels, prompts = data.batch(args.train_batch_size)
                with torch.no_grad():
                    latents = vae.encode(pixels.to(accelerator.device, weight_dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                noise = sample_noise(latents, args.offset_noise)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = (
                    noise
                    if noise_scheduler.config.prediction_type == "epsilon"
                    else noise_scheduler.get_velocity(latents, noise, timesteps)
                )
                class_labels = timesteps if args.class_labels_conditioning == "timesteps" else None
                with shared_weight_sample(sample_seed, forwards):  # one weight sample per global batch
                    with torch.set_grad_enabled(args.train_text_encoder):
                        text = prompt_encoder(prompts)
                    pred = unet(noisy, timesteps, encoder_hidden_states=text, class_labels=class_labels).sample
                forwards += 1
                loss = diffusion_loss(pred, target, timesteps, noise_scheduler, args)
                zero = torch.zeros((), device=loss.device)
                # divergence (NaN/Inf loss or KL) is reported after the step by check_finite_metrics
                kl_unet = bayeslayers.kl_loss(raw_unet, check_finite=False) if bayesian and has_prior else zero
                kl_text = (
                    bayeslayers.kl_loss(raw_text_encoder, check_finite=False) if text_bayesian and has_prior else zero
                )
                kl = kl_unet + kl_text
                total = loss + args.kl_weight * kl if args.kl_weight > 0 else loss
                accelerator.backward(total)
                if accelerator.sync_gradients and args.max_grad_norm > 0:  # 0: no clipping
                    accelerator.clip_grad_norm_(clipped_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            logs = {
                "loss": loss.item(),
                "kl": kl.item() if has_prior else None,
                "mean_sigma": mean_sigma(raw_unet),
                "lr": lr_scheduler.get_last_lr()[0],
            }
            if bayesian:
                logs.update(movement_logs(raw_unet, args.init_sigma))
            if text_bayesian:
                logs.update(
                    kl_unet=kl_unet.item() if has_prior else None,
                    kl_text_encoder=kl_text.item() if has_prior else None,
                    mean_sigma_text_encoder=mean_sigma(raw_text_encoder),
                )
                logs.update(movement_logs(raw_text_encoder, args.init_sigma, "text_encoder."))
            logs = {key: value for key, value in logs.items() if value is not None}
            check_finite_metrics(logs, out, step)
            for key in logs:
                if key in HISTORY_KEYS or key.startswith("sigma_ratio/"):
                    history.setdefault(key, []).append(logs[key])
            history["step"].append(step)
            shown = {"loss": f"{logs['loss']:.4f}"}
            if bayesian:
                ratio = [logs[f"sigma_ratio/all/{k}"] for k in ("mean", "p05", "p95")]
                kl = f"{logs['kl']:.3g}" if has_prior else "-"
                shown.update(kl=kl, sigma_ratio="{:.5f} [{:.5f}, {:.5f}]".format(*ratio))
            progress.set_postfix(**shown)
            accelerator.log(logs, step=step)
            if step_callback is not None:
                step_callback(args, step)
            scheduled = step % args.checkpointing_steps == 0
            if scheduled or stop["signal"] is not None:
                check_finite_parameters(named_params, out, step)  # on every process, so all stop together
                rng_states = process_rng_states(accelerator) if scheduled else None
            validate = bool(args.validation_prompt) and step % args.validation_steps == 0
            if validate:  # recorded before the checkpoint, so a resumed run's curves mark it too
                history.setdefault("validation_step", []).append(step)
            if accelerator.is_main_process:
                if scheduled or stop["signal"] is not None:
                    save_checkpoint(
                        out,
                        step,
                        named_params,
                        optimizer,
                        lr_scheduler,
                        history,
                        args.checkpoints_total_limit,
                        rng_states,
                    )
                if validate:
                    run_validation(args, pipe, step, resolution, accelerator, prompt_encoder)
                if evaluator is not None and step % args.eval_steps == 0:
                    evaluator(step)
                    evaluated = step
            if stop["signal"] is not None:
                interrupted = stop["signal"]
                break
    progress.close()
    seconds = time.perf_counter() - started
    release_optimizer_state(optimizer)  # the export below copies weights: not while the moments are alive
    if interrupted is not None:
        accelerator.print(
            f"stopped by signal {interrupted} at step {step}; checkpoint saved, resume with "
            "--resume_from_checkpoint latest"
        )
        accelerator.end_training()
        return {"interrupted": True, "step": step}

    metrics = {
        "steps": step,
        "epochs": args.num_train_epochs,
        "final_loss": history["loss"][-1],
        "final_kl": history["kl"][-1] if history["kl"] else None,
        "final_mean_sigma": history["mean_sigma"][-1],
        **{f"final_{k}": v[-1] for k, v in history.items() if k.startswith("sigma_ratio/")},
        "train_seconds": round(seconds, 2),
        "optimizer": optimizer_name,
    }
    if text_bayesian:
        metrics.update(
            final_kl_unet=history["kl_unet"][-1] if history.get("kl_unet") else None,
            final_kl_text_encoder=history["kl_text_encoder"][-1] if history.get("kl_text_encoder") else None,
            final_mean_sigma_text_encoder=history["mean_sigma_text_encoder"][-1],
        )
    result = dict(metrics)
    if evaluator is not None:
        if evaluated != step:
            evaluator(step)
        result["eval_seconds"] = round(evaluator.seconds, 2)  # every evaluation, step 0 and the last included
        result["eval_metrics"] = str(out / "eval_metrics.csv")
        result["metrics_vs_step"] = str(out / "metrics_vs_step.png")
    if accelerator.is_main_process:
        grid = None
        if args.validation_prompt:
            grid = run_validation(args, pipe, step, resolution, accelerator, prompt_encoder)
            if step not in history.get("validation_step", []):
                history.setdefault("validation_step", []).append(step)
            result["validation_grid"] = str(grid)
        plot_history(history, out / "training_curves.png")
        result["curves"] = str(out / "training_curves.png")
        written = export_model(raw_unet, args, raw_text_encoder if args.train_text_encoder else None)
        result["model_card"] = str(write_model_card(args, metrics, written, grid))
        result.update(written)
        if hub_repo is not None:
            upload_to_hub(args, hub_repo)
            result["hub_repo"] = hub_repo
    accelerator.end_training()
    return result
