"""One end-to-end training step of a UNet2DConditionModel: deterministic vs converted with dreambooth-bnn."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

import bayeslayers

TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16)
# shape = (batch, latent size, config name)
UNET_SHAPES = {"cpu": [(1, 16, "tiny"), (4, 16, "tiny")], "cuda": [(1, 64, "sd15"), (4, 64, "sd15")],
               "quick": [(1, 8, "tiny")]}


class UNetStep(nn.Module):
    def __init__(self, unet, text, timesteps, bayesian):
        super().__init__()
        self.unet, self.text, self.timesteps, self.bayesian = unet, text, timesteps, bayesian

    def forward(self, latents):
        out = self.unet(latents, self.timesteps, encoder_hidden_states=self.text).sample
        return out, (bayeslayers.kl_loss(self.unet, check_finite=False) if self.bayesian else None)


def build_unet_step(provider, shape, device, dtype):
    from diffusers import UNet2DConditionModel

    if provider in ("bayesian-torch",):
        raise ValueError("bayesian-torch has no UNet conversion")
    batch, size, name = shape
    torch.manual_seed(0)
    config = TINY if name == "tiny" else json.loads((Path(__file__).parent / "sd15_unet.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**config).to(device)
    numel = 0
    if provider != "deterministic":
        bayeslayers.set_backend(provider)
        bayeslayers.convert(unet, preset="dreambooth-bnn")
        numel = sum(layer.weight_mu.numel() for _, layer in bayeslayers.posterior_layers(unet))
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    latents = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    if dtype != torch.float32:
        latents, text = latents.float(), text.float()
    return UNetStep(unet, text, timesteps, provider != "deterministic"), latents, numel
