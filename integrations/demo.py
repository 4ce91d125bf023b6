"""Quick demo: make a diffusers UNet Bayesian, train a few denoising steps, export it back.

    python -m bayeslayers.integrations.demo [--steps 30] [--kl_weight 1e-3]

Builds a small UNet2DConditionModel from a config (no download), converts it with the dreambooth-bnn preset,
trains on the epsilon-prediction loss of a fixed set of random latents plus ``kl_weight * KL``, prints the
per-layer posterior statistics, and checks that the exported deterministic UNet reproduces the Bayesian
model's mean output.
"""

from __future__ import annotations

import argparse
import time

import torch

import bayeslayers


def tiny_unet_config() -> dict:
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=8)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-3)
    parser.add_argument("--init_sigma", type=float, default=0.01)
    parser.add_argument("--prior_sigma", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


def main(args) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    bayeslayers.convert(unet, preset="dreambooth-bnn", init_sigma=args.init_sigma, prior_sigma=args.prior_sigma)
    rows = bayeslayers.summary(unet)
    total = sum(p.numel() for p in unet.parameters())
    print(f"converted {len(rows)} layers: {sum(r.numel for r in rows)} of {total} weights are Bayesian "
          f"(backend: {bayeslayers.get_backend()})")

    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 32)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate)
    unet.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
        mse = torch.nn.functional.mse_loss(pred, noise)
        kl = bayeslayers.kl_loss(unet)
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            sigma = sum(r.mean_sigma * r.numel for r in bayeslayers.summary(unet)) / sum(r.numel for r in rows)
            print(f"step {step:4d}  mse {mse.item():.4f}  KL {kl.item():.3e}  mean sigma {sigma:.4e}")
    seconds = time.perf_counter() - start

    print(bayeslayers.summary(unet))
    unet.eval()
    with torch.no_grad():
        mean_out = unet(latents, torch.full((4,), 500), encoder_hidden_states=text).sample
        plain = bayeslayers.to_deterministic(unet)
        export_error = (plain(latents, torch.full((4,), 500), encoder_hidden_states=text).sample - mean_out).abs().max()
    print(f"{args.steps} steps in {seconds:.1f} s; exported deterministic UNet matches the mean model "
          f"(max abs difference {export_error.item():.2e})")
    return {"seconds": seconds, "export_error": export_error.item(), "final_mse": mse.item()}


def cli():
    main(parse_args())


if __name__ == "__main__":
    cli()
