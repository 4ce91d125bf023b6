"""Configs of the tiny Stable Diffusion models: stock diffusers/transformers classes, SD1.5's block types.

Two sizes, one name each: ``tiny-sd-32`` (the bundled model, 32x32 images, 8x8x4 latents) and ``tiny-sd-64``
(64x64 images, 16x16x4 latents: room for the fine noisy patterns of the corruption stage). Both VAEs downsample
by 4; ``get_config(resolution)`` is the one place that tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _vae(resolution: int, channels: tuple[int, ...]) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=resolution,
        layers_per_block=1,
        block_out_channels=channels,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
    )


def _unet(latent_side: int, channels: tuple[int, ...]) -> dict:
    return dict(
        sample_size=latent_side,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
)


@dataclass(frozen=True)
class TinySDConfig:
    """One model size: architectures, training defaults (``train.py``) and its asset folder name."""

    name: str
    resolution: int  # image side, pixels
    vae: dict
    unet: dict
    text: dict
    vae_steps: int
    unet_steps: int
    num_images: int = 6000
    batch_size: int = 64
    textured_fraction: float = 0.0  # share of the VAE's training images drawn with a random texture fill
    cpu_budget_minutes: int = 45  # what the step counts were sized for, on 2 CPU cores

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)


CONFIGS = {
    32: TinySDConfig(
        "tiny-sd-32", 32, _vae(32, (32, 64, 64)), _unet(8, (48, 96, 96)), TEXT_CONFIG, vae_steps=600, unet_steps=4000
    ),
    64: TinySDConfig(
        "tiny-sd-64",
        64,
        _vae(64, (32, 64, 64)),
        _unet(16, (48, 96, 96)),
        TEXT_CONFIG,
        vae_steps=1000,  # 2.9 s per step measured at batch 64 on 2 cores: 49 min
        unet_steps=1000,  # 1.8 s per step: 30 min (the shipped model's; more steps did not fit its session)
        textured_fraction=0.5,
        cpu_budget_minutes=100,
    ),
}
RESOLUTIONS = tuple(CONFIGS)


def get_config(resolution: int) -> TinySDConfig:
    if resolution not in CONFIGS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    return CONFIGS[resolution]


def build_vae(resolution: int = 32):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**get_config(resolution).vae)


def build_unet(resolution: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**get_config(resolution).unet)


def build_text_encoder(tokenizer, resolution: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **get_config(resolution).text,
    )
    return CLIPTextModel(config)
