"""Trains a tiny Stable Diffusion from scratch on the synthetic world (CPU-friendly, resumable).

    python -m bayeslayers.integrations.tiny_sd.train --output_dir /tmp/tiny_sd_run [--seed 0] [--resolution 64]

``--resolution`` picks the model size (``models.CONFIGS``: 32 px with 8x8x4 latents, the bundled model; 64 px
with 16x16x4 latents), which also sets the defaults of the step counts, batch size and data size.
Stages: (1) AutoencoderKL on the images (reconstruction + KL; at 64 px half of them carry a random texture),
(2) the UNet and the CLIP text encoder jointly on epsilon prediction over the frozen VAE's latents of the plain
images, with 10 % empty captions for classifier-free guidance.
A checkpoint (safetensors) is written every ``--checkpoint_every`` steps; rerunning the command resumes.
The finished pipeline is saved as a standard diffusers folder in ``<output_dir>/pipeline``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import models
from .tokenizer import build_tokenizer
from .world import make_dataset, to_tensor

SIZED = ("num_images", "batch_size", "vae_steps", "unet_steps")  # defaults taken from the model size's config


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=32, choices=models.RESOLUTIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=None, help="default: the model size's (6000)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the model size's (64)")
    p.add_argument("--vae_steps", type=int, default=None, help="default: the model size's (32 px: 600)")
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--vae_kl_weight", type=float, default=1e-4)
    p.add_argument("--unet_steps", type=int, default=None, help="default: the model size's (32 px: 4000)")
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--checkpoint_every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(input_args)
    config = models.get_config(args.resolution)
    for name in SIZED:
        if getattr(args, name) is None:
            setattr(args, name, getattr(config, name))
        elif getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    return args


def _save_stage(path: Path, modules: dict, optimizer, step: int, history: list, clock: dict, run: dict) -> None:
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for index, values in opt["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng"] = torch.get_rng_state()
    tmp = path.with_suffix(".tmp")
    metadata = {"step": str(step), "history": json.dumps(history), "clock": json.dumps(clock), "run": json.dumps(run)}
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _load_stage(path: Path, modules: dict, optimizer, run: dict) -> tuple[int, list, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    saved = json.loads(meta.get("run", "{}"))
    if saved and saved != run:  # a 32 px checkpoint loads into the 64 px model without a shape error
        raise ValueError(f"{path} was written by a different run {saved}; this one is {run}: use a new --output_dir")
    tensors = load_file(str(path))
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng"])
    clock = json.loads(meta.get("clock", '{"seconds": 0.0, "cpu_seconds": 0.0}'))
    return int(meta["step"]), json.loads(meta["history"]), clock


def _loop(name, steps, modules, optimizer, scheduler, loss_fn, ckpt: Path, every: int, run: dict):
    """Runs ``loss_fn()`` optimisation steps with a tqdm bar, resuming from ``ckpt`` when it exists (and was
    written by the same ``run`` settings).

    Returns (history [[step, running loss], ...], clock {"seconds": wall, "cpu_seconds": process CPU}); the
    clock sums over resumed sessions."""
    from tqdm.auto import tqdm

    step, history, clock = (
        _load_stage(ckpt, modules, optimizer, run) if ckpt.exists() else (0, [], {"seconds": 0.0, "cpu_seconds": 0.0})
    )
    for _ in range(step):
        scheduler.step()
    bar = tqdm(total=steps, initial=step, desc=name)
    running = None
    wall, cpu = time.perf_counter(), time.process_time()

    def tick():
        nonlocal wall, cpu
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        clock["seconds"] += now_wall - wall
        clock["cpu_seconds"] += now_cpu - cpu
        wall, cpu = now_wall, now_cpu

    while step < steps:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0 or step == steps:
            history.append([step, running])
        if step % every == 0 or step == steps:
            tick()
            _save_stage(ckpt, modules, optimizer, step, history, clock, run)
    bar.close()
    tick()
    return history, clock


def _cosine(optimizer, steps, warmup=100):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def main(args) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    config = models.get_config(args.resolution)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images, scenes = make_dataset(args.num_images, args.seed, resolution=config.resolution)
    pixels = to_tensor(images)
    if config.textured_fraction:  # the VAE also learns to code textures; the UNet sees only the plain world
        textured, _ = make_dataset(
            args.num_images, args.seed, resolution=config.resolution, textured=config.textured_fraction
        )
        vae_pixels = to_tensor(textured)
    else:
        vae_pixels = pixels
    data_seconds = time.perf_counter() - started
    run = {k: getattr(args, k) for k in ("resolution", "seed", "num_images", "batch_size")}
    captions = [s.caption for s in scenes]
    tokenizer = build_tokenizer(out / "tokenizer_src")
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    empty_ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids

    vae = models.build_vae(config.resolution)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    latent_elements = 4 * config.latent_side**2  # KL summed over a latent, per element

    def vae_loss():
        batch = vae_pixels[torch.randint(0, len(vae_pixels), (args.batch_size,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, batch) + args.vae_kl_weight * posterior.kl().mean() / latent_elements

    vae_history, vae_clock = _loop(
        "vae",
        args.vae_steps,
        {"vae": vae},
        vae_opt,
        _cosine(vae_opt, args.vae_steps),
        vae_loss,
        out / "vae_stage.safetensors",
        args.checkpoint_every,
        dict(run, steps=args.vae_steps),
    )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        recon_mse = F.mse_loss(vae.decode(latents[:256]).sample, pixels[:256]).item()
        coded = vae.encode(vae_pixels[:256]).latent_dist.mean
        vae_recon_mse = F.mse_loss(vae.decode(coded).sample, vae_pixels[:256]).item()  # textures included
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    unet, text_encoder = models.build_unet(config.resolution), models.build_text_encoder(tokenizer, config.resolution)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in models.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    unet_opt = torch.optim.AdamW(
        list(unet.parameters()) + list(text_encoder.parameters()), lr=args.unet_lr, weight_decay=1e-2
    )

    def unet_loss():
        index = torch.randint(0, len(latents), (args.batch_size,))
        z = latents[index]
        tokens = ids[index].clone()
        dropped = torch.rand(args.batch_size) < args.caption_dropout
        tokens[dropped] = empty_ids[0]
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,))
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        return F.mse_loss(pred, noise)

    unet_history, unet_clock = _loop(
        "unet",
        args.unet_steps,
        {"unet": unet, "text_encoder": text_encoder},
        unet_opt,
        _cosine(unet_opt, args.unet_steps),
        unet_loss,
        out / "unet_stage.safetensors",
        args.checkpoint_every,
        dict(run, steps=args.unet_steps),
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**models.SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    report = {
        "model": config.name,
        "resolution": config.resolution,
        "latent_shape": [4, config.latent_side, config.latent_side],
        "seed": args.seed,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "threads": args.threads,
        "data_seconds": round(data_seconds, 1),
        "vae_seconds": round(vae_clock["seconds"], 1),
        "vae_cpu_seconds": round(vae_clock["cpu_seconds"], 1),
        "unet_seconds": round(unet_clock["seconds"], 1),
        "unet_cpu_seconds": round(unet_clock["cpu_seconds"], 1),
        "vae_final_loss": vae_history[-1][1] if vae_history else None,
        "vae_recon_mse": recon_mse,
        "vae_recon_mse_vae_data": vae_recon_mse,
        "latent_scaling_factor": scaling,
        "unet_final_loss": unet_history[-1][1] if unet_history else None,
        "vae_history": vae_history,
        "unet_history": unet_history,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(parse_args())
