"""End-to-end training step of a UNet2DConditionModel: deterministic vs converted with the dreambooth-bnn preset.

CPU uses a tiny config (``micro`` in --quick); GPU the real SD1.5 architecture (``sd15_unet.json``, random
weights, no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

import bayeslayers

from .providers import BayesStep, Case, PlainStep, _bayesian_torch_layer, bayesian_weights

TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=16,
    norm_num_groups=16,
)
MICRO = dict(
    TINY, sample_size=8, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8
)  # --quick only
NANO = dict(
    MICRO,
    sample_size=4,
    block_out_channels=(32,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
)  # gpu_check --dry-run: Triton kernels under the interpreter
CONFIGS = {"tiny": TINY, "micro": MICRO, "nano": NANO}
SD15_CONFIG = Path(__file__).parent / "sd15_unet.json"
TEXT_TOKENS = 77


def unet_config(name: str) -> dict:
    if name in CONFIGS:
        return dict(CONFIGS[name])
    config = json.loads(SD15_CONFIG.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


class Denoiser(nn.Module):
    """latents -> predicted noise, with fixed text embeddings and timesteps (one training step's forward)."""

    def __init__(self, unet: nn.Module, text: torch.Tensor, timesteps: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("text", text)
        self.register_buffer("timesteps", timesteps)

    def forward(self, latents):
        return self.unet(latents, self.timesteps, encoder_hidden_states=self.text).sample


class KLRecorder(nn.Module):
    """A bayesian-torch layer inside a model: returns the output, keeps the KL of its last forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.kl = layer, None

    def forward(self, x):
        out, self.kl = self.layer(x, return_kl=True)
        return out


class BayesianTorchModelStep(nn.Module):
    """The model with bayesian-torch layers; KL summed over them (each is bayesian-torch's mean reduction)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out, sum(m.kl for m in self.model.modules() if isinstance(m, KLRecorder))


def to_bayesian_torch(model: nn.Module, preset: str = "dreambooth-bnn") -> int:
    """Replaces the preset's Linear layers by bayesian-torch's (weights copied); returns their weight count."""
    import re

    pattern = re.compile(bayeslayers.get_preset(preset).target_modules)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(name)]
    for name, plain in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, KLRecorder(_bayesian_torch_layer(plain)))
    return sum(plain.weight.numel() for _, plain in targets)


def build_unet(provider: str, shape: tuple, device: torch.device) -> Case:
    from diffusers import UNet2DConditionModel

    batch, size, name = shape
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(name))
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator).to(device)
    model = Denoiser(unet, text, timesteps)
    base, _, variant = provider.partition(":")
    compiled = variant == "compiled"
    if base == "deterministic":
        return Case(PlainStep(_compiled(model) if compiled else model).to(device), latents, 0, compiled=compiled)
    if provider == "bayesian-torch":
        weights = to_bayesian_torch(unet)
        return Case(BayesianTorchModelStep(model).to(device), latents, weights)
    bayeslayers.convert(unet, preset="dreambooth-bnn")
    weights = bayesian_weights(unet)
    if compiled:
        return Case(BayesStep(_compiled(model), "auto").to(device), latents, weights, compiled=True)
    return Case(BayesStep(model, provider).to(device), latents, weights)


def _compiled(model: nn.Module) -> nn.Module:
    """The model under torch.compile (Inductor, one graph); compiled on its first call."""
    model.compile(fullgraph=True)
    return model
