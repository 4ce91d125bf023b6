"""Diversity: mean pairwise distance among the images of one prompt."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .images import check_prompts


def pairwise_diversity(features: torch.Tensor, prompts) -> torch.Tensor:
    """(N,) mean cosine distance (1 - cos) from each image's feature (N, D) to the other images of its prompt;
    NaN for an image alone with its prompt. The mean over one prompt's images is its mean pairwise distance."""
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    prompts = check_prompts(prompts, len(features))
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T
    same = torch.tensor([[a == b for b in prompts] for a in prompts])
    same.fill_diagonal_(False)
    counts = same.sum(1)
    total = (distance * same).sum(1)
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, float("nan")))


def dino_diversity(images, prompts, model=None, device=None, batch_size: int = 32) -> torch.Tensor:
    """(N,) DINO-feature diversity among images of the same prompt (see :func:`pairwise_diversity`)."""
    from .dino import DEFAULT_DINO_MODEL, dino_features

    return pairwise_diversity(dino_features(images, model or DEFAULT_DINO_MODEL, device, batch_size), prompts)
