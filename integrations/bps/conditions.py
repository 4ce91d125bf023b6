"""Condition images made without downloads: edge maps of any image, layout maps of the synthetic world.

Both are (N, 1, H, W) float tensors in [0, 1] at the images' pixel resolution.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..tiny_sd.world import render

CONDITIONS = ("edges", "layout")
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the luminance of images (N, 3, H, W) in [-1, 1], scaled to [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (batch, 3, height, width), got {tuple(images.shape)}")
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    luminance = (images * weights[:, None, None]).sum(1, keepdim=True) * 0.5 + 0.5
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None].to(images)
    gradients = F.conv2d(F.pad(luminance, (1, 1, 1, 1), mode="replicate"), kernels)
    return (gradients.square().sum(1, keepdim=True).sqrt() / 4.0).clamp(0, 1)  # a full black-white step = 1


def layout_map(scenes, resolution: int) -> torch.Tensor:
    """Where each scene's shape lies: 1 inside, 0 outside (rendered with the world's own renderer)."""
    white = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    masks = [
        np.asarray(render(dataclasses.replace(s, background="black"), resolution, fill=white))[..., 0] for s in scenes
    ]
    return torch.from_numpy(np.stack(masks)).float()[:, None].div(255.0).sub(15 / 255).div(240 / 255).clamp(0, 1)


def make_condition(kind: str, images: torch.Tensor, scenes) -> torch.Tensor:
    """The condition of ``kind`` ('edges' or 'layout') for images (N, 3, H, W) in [-1, 1] and their scenes."""
    if kind == "edges":
        return edge_map(images)
    if kind == "layout":
        return layout_map(scenes, images.shape[-1])
    raise ValueError(f"condition must be one of {CONDITIONS}, got {kind!r}")
