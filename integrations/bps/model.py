"""PowerSteering: a side network that steers a frozen diffusers UNet's hidden features from a condition image.

Built *for* a given ``UNet2DConditionModel`` config: the condition image (B, C, H, W) goes to latent resolution
by pixel-unshuffle (the VAE factor), through ResBlocks that use the frozen UNet's timestep embedding, an
encoder / middle / decoder mirroring the UNet's levels, and one zero-initialised 1x1 conv per UNet block output:

* down side: one residual per skip feature of the UNet (``conv_in``, every resnet, every downsampler), added
  where ControlNet residuals go (``down_block_additional_residuals``);
* middle: one residual added to the mid block's output;
* up side: one residual per resnet of every up block, added to that layer's output (after its attention).

Each residual is multiplied by a per-position weight (``down_scales``, ``mid_scale``, ``up_scales``; default
"head-heavy, foot-light": large near the input, 1 on the decoder side). At initialisation every residual is
zero, so the steered UNet equals the frozen one exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

# The per-position weights of the reference implementation for SD1.5's 12 skip features (the middle's, 16, is
# 2**levels for any depth).
SD15_DOWN_SCALES = (16.0, 16.0, 1.0, 8.0, 8.0, 1.0, 4.0, 4.0, 1.0, 2.0, 2.0, 1.0)


def _groups(channels: int, preferred: int) -> int:
    return math.gcd(channels, preferred)


def zero_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between; 1x1 skip when channels change."""

    def __init__(self, channels_in: int, channels_out: int, temb_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels_in, groups), channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, channels_out)
        self.norm2 = nn.GroupNorm(_groups(channels_out, groups), channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _steering_level(
    channels_in: int, channels: int, unet_channels: int, count: int, temb_channels: int, groups: int
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``count`` ResBlocks at one resolution and the zero convs that map each output to the UNet's channels."""
    blocks = nn.ModuleList(
        [ResBlock(channels_in if i == 0 else channels, channels, temb_channels, groups) for i in range(count)]
    )
    return blocks, nn.ModuleList([zero_conv(channels, unet_channels) for _ in range(count)])


def default_down_scales(layers_per_block: int, levels: int) -> list[float]:
    """Head-heavy, foot-light: 2**(levels - level) on resnet outputs (and conv_in), 1 on downsamplers.

    For SD1.5's layout (2 resnets, 4 levels) this is the reference implementation's list.
    """
    if (layers_per_block, levels) == (2, 4):
        return list(SD15_DOWN_SCALES)
    scales = [float(2**levels)]  # conv_in
    for level in range(levels):
        scales += [float(2 ** (levels - level))] * layers_per_block
        if level < levels - 1:
            scales.append(1.0)
    return scales


class PowerSteering(ModelMixin, ConfigMixin):
    """Residuals for every block of a ``UNet2DConditionModel`` from a condition image and the UNet's time embedding.

    Create it with :meth:`from_unet`; attach it with :meth:`attach` (see ``steer.py``) or call it directly:
    ``down, mid, up = steering(condition, temb)`` with condition (B, condition_channels, H, W), H and W the
    latent size times ``vae_scale_factor``, and temb (B, temb_channels) the UNet's timestep embedding.
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        temb_channels: int = 1280,
        condition_channels: int = 3,
        vae_scale_factor: int = 8,
        width: float = 1.0,
        norm_num_groups: int = 32,
        down_scales: list[float] | None = None,
        mid_scale: float | None = None,
        up_scales: list[float] | None = None,
    ):
        super().__init__()
        levels = len(block_out_channels)
        channels = [max(8, int(round(c * width))) for c in block_out_channels]
        self.unshuffle = nn.PixelUnshuffle(vae_scale_factor)
        self.conv_in = nn.Conv2d(condition_channels * vae_scale_factor**2, channels[0], 3, padding=1)
        self.conv_in_out = zero_conv(channels[0], block_out_channels[0])

        self.encoder = nn.ModuleList()
        self.encoder_outs = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        self.downsampler_outs = nn.ModuleList()
        previous = channels[0]
        for level in range(levels):
            blocks, outs = _steering_level(
                previous, channels[level], block_out_channels[level], layers_per_block, temb_channels, norm_num_groups
            )
            previous = channels[level]
            self.encoder.append(blocks)
            self.encoder_outs.append(outs)
            if level < levels - 1:
                self.downsamplers.append(nn.Conv2d(previous, previous, 3, stride=2, padding=1))
                self.downsampler_outs.append(zero_conv(previous, block_out_channels[level]))

        self.middle = ResBlock(previous, previous, temb_channels, norm_num_groups)
        self.middle_out = zero_conv(previous, block_out_channels[-1])

        self.decoder = nn.ModuleList()
        self.decoder_outs = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for up_level, level in enumerate(reversed(range(levels))):
            blocks, outs = _steering_level(
                previous,
                channels[level],
                block_out_channels[level],
                layers_per_block + 1,
                temb_channels,
                norm_num_groups,
            )
            previous = channels[level]
            self.decoder.append(blocks)
            self.decoder_outs.append(outs)
            if up_level < levels - 1:
                self.upsamplers.append(nn.Conv2d(previous, previous, 3, padding=1))

        n_down = 1 + levels * layers_per_block + levels - 1
        n_up = levels * (layers_per_block + 1)
        self.down_scales = (
            list(down_scales) if down_scales is not None else default_down_scales(layers_per_block, levels)
        )
        self.mid_scale = float(mid_scale if mid_scale is not None else 2**levels)
        self.up_scales = list(up_scales) if up_scales is not None else [1.0] * n_up
        for name, values, expected in (("down_scales", self.down_scales, n_down), ("up_scales", self.up_scales, n_up)):
            if len(values) != expected:
                raise ValueError(f"{name} must hold {expected} weights for this UNet layout, got {len(values)}")

    @classmethod
    def from_unet(
        cls, unet, condition_channels: int = 3, vae_scale_factor: int = 8, width: float = 1.0, **kwargs
    ) -> PowerSteering:
        """A steering network shaped for ``unet`` (a ``UNet2DConditionModel``), on its device and dtype."""
        config = unet.config
        if config.mid_block_type is None:
            raise ValueError("unet: PowerSteering needs a UNet with a mid block")
        layers = config.layers_per_block
        if not isinstance(layers, int):
            raise ValueError(f"unet: layers_per_block must be one int for all levels, got {layers}")
        steering = cls(
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=layers,
            temb_channels=unet.time_embedding.linear_2.out_features,
            condition_channels=condition_channels,
            vae_scale_factor=vae_scale_factor,
            width=width,
            norm_num_groups=config.norm_num_groups,
            **kwargs,
        )
        parameter = next(unet.parameters())
        return nn.Module.to(steering, device=parameter.device, dtype=parameter.dtype)

    def check_condition(self, condition: torch.Tensor, latent_size: tuple[int, int]) -> None:
        """Raises ValueError when ``condition`` does not fit the latents (channels, pixel size)."""
        expected = self.config.condition_channels
        factor = self.config.vae_scale_factor
        if condition.dim() != 4 or condition.shape[1] != expected:
            raise ValueError(f"condition must be (batch, {expected}, height, width), got {tuple(condition.shape)}")
        want = (latent_size[0] * factor, latent_size[1] * factor)
        if tuple(condition.shape[-2:]) != want:
            raise ValueError(
                f"condition must be {want[0]}x{want[1]} pixels for {latent_size[0]}x{latent_size[1]} "
                f"latents (vae_scale_factor {factor}), got {condition.shape[-2]}x{condition.shape[-1]}"
            )

    def forward(self, condition: torch.Tensor, temb: torch.Tensor):
        """Returns ``(down, mid, up)``: lists of residuals (already weighted) for the UNet's skip features, its
        mid block and its up-block layers, in the UNet's order."""
        h = self.conv_in(self.unshuffle(condition.to(self.dtype)))
        temb = temb.to(self.dtype)
        down, sizes = [self.conv_in_out(h)], []
        for level, (blocks, outs) in enumerate(zip(self.encoder, self.encoder_outs)):
            for block, out in zip(blocks, outs):
                h = block(h, temb)
                down.append(out(h))
            sizes.append(h.shape[-2:])
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                down.append(self.downsampler_outs[level](h))
        h = self.middle(h, temb)
        mid = self.middle_out(h) * self.mid_scale
        up = []
        for up_level, (blocks, outs) in enumerate(zip(self.decoder, self.decoder_outs)):
            for block, out in zip(blocks, outs):
                h = block(h, temb)
                up.append(out(h))
            if up_level < len(self.upsamplers):
                size = sizes[len(sizes) - 2 - up_level]  # as the UNet's upsamplers: back to the skip's size
                h = self.upsamplers[up_level](F.interpolate(h, size=tuple(size), mode="nearest"))
        down = [r * s for r, s in zip(down, self.down_scales)]
        up = [r * s for r, s in zip(up, self.up_scales)]
        return down, mid, up

    def check_unet(self, unet) -> None:
        """Raises ValueError naming the first config field in which this network does not fit ``unet``."""
        config = unet.config
        wanted = {
            "block_out_channels": tuple(config.block_out_channels),
            "layers_per_block": config.layers_per_block,
            "temb_channels": unet.time_embedding.linear_2.out_features,
        }
        for name, value in wanted.items():
            have = tuple(self.config[name]) if name == "block_out_channels" else self.config[name]
            if have != value:
                raise ValueError(f"steering network: {name} is {have}, the UNet needs {value}")

    def conv_names(self) -> list[str]:
        """Qualified names of every Conv2d (the layers ``bayeslayers.convert`` makes Bayesian for BPS)."""
        return [name for name, module in self.named_modules() if isinstance(module, nn.Conv2d)]

    def attach(self, unet):
        """Steers ``unet`` from now on (hooks); returns the :class:`~.steer.Steerer`, whose ``conditioned(image)``
        context sets the condition. The UNet's own parameters are not touched."""
        from .steer import Steerer

        if getattr(self, "_steerer", None) is not None:
            raise RuntimeError("this steering network is already attached; call detach() first")
        self._steerer = Steerer(self, unet)
        return self._steerer

    def detach(self) -> None:
        """Removes the hooks: the UNet computes exactly what it computed before :meth:`attach`."""
        steerer = getattr(self, "_steerer", None)
        if steerer is not None:
            steerer.remove()
        self._steerer = None
