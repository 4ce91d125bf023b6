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


# ---- the SD1.5-architecture CPU step: Bayesian / deterministic, side by side ----------------------------------


def _step(model: Denoiser, latents: torch.Tensor, noise: torch.Tensor, bayesian: bool) -> float:
    """Seconds of one training step (gradients set to None, forward, loss, backward; no optimizer)."""
    import time

    model.train(bayesian)  # eval(): every Bayesian layer applies its posterior mean through the plain map
    start = time.perf_counter()
    for p in model.parameters():
        p.grad = None
    loss = torch.nn.functional.mse_loss(model(latents), noise)
    if bayesian:
        loss = loss + 1e-6 * bayeslayers.kl_loss(model.unet, check_finite=False)
    loss.backward()
    return time.perf_counter() - start


def step_ratio(config: str, size: int, preset: str, steps: int, backend: str = "cpp", batch: int = 1) -> dict:
    """Bayesian / deterministic step time of one UNet converted with ``preset``, the two kinds interleaved.

    The deterministic step is the same converted model in ``eval()`` mode: each Bayesian layer then applies its
    posterior mean through the plain layer map (F.linear), exactly what plain fine-tuning (full preset) or plain
    LoRA (LoRA preset) computes, with the same trainable tensors receiving gradients except rho. One model
    serves both, so an SD1.5-size pair fits in memory and both kinds see the same background load.
    """
    import statistics

    from diffusers import UNet2DConditionModel

    bayeslayers.set_backend(backend)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(config))
    bayeslayers.convert(unet, preset=preset)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    model = Denoiser(unet, text, timesteps)
    _step(model, latents, noise, False), _step(model, latents, noise, True)  # warm-up (allocator, extension)
    times = {False: [], True: []}
    for i in range(steps):
        for kind in (False, True) if i % 2 == 0 else (True, False):
            times[kind].append(_step(model, latents, noise, kind))
    deterministic, bayesian = statistics.median(times[False]), statistics.median(times[True])
    paired = [b / d for b, d in zip(times[True], times[False])]
    return {
        "config": config,
        "latent_size": size,
        "batch": batch,
        "preset": preset,
        "backend": backend,
        "bayesian_weights": bayesian_weights(unet),
        "steps": steps,
        "deterministic_s": round(deterministic, 4),
        "bayesian_s": round(bayesian, 4),
        "ratio": round(bayesian / deterministic, 4),
        "paired_ratio_min": round(min(paired), 4),
        "paired_ratio_max": round(max(paired), 4),
    }


def main(input_args=None):
    import argparse
    import csv

    from .environment import environment
    from .kernel_throughput import instruction_set_name

    p = argparse.ArgumentParser(description="Bayesian / deterministic UNet training step on CPU, interleaved")
    p.add_argument("--config", default="sd15", help="sd15 (sd15_unet.json) or one of " + ", ".join(CONFIGS))
    p.add_argument("--latent_size", type=int, default=16, help="latent side (16: 128 px images)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--presets", default="dreambooth-bnn,dreambooth-bnn-lora")
    p.add_argument("--backend", default="cpp")
    p.add_argument("--steps", type=int, default=5, help="steps of each kind")
    p.add_argument("--out", default="", help="folder: append rows to unet_step_cpu.csv there")
    p.add_argument("--notes", default="")
    args = p.parse_args(input_args)
    env = environment(torch.device("cpu"), args.notes)
    rows = []
    for preset in args.presets.split(","):
        row = step_ratio(args.config, args.latent_size, preset, args.steps, args.backend, args.batch)
        row.update(isa=instruction_set_name(args.backend), threads=torch.get_num_threads(), **env)
        rows.append(row)
        print(
            f"{preset:22s} deterministic {row['deterministic_s']:.3f} s  bayesian {row['bayesian_s']:.3f} s  "
            f"ratio {row['ratio']:.3f} (pairs {row['paired_ratio_min']:.3f}-{row['paired_ratio_max']:.3f})  "
            f"[{row['isa']}, {row['threads']} threads]"
        )
        bayeslayers.set_backend(None)
    if args.out:
        path = Path(args.out) / "unet_step_cpu.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
