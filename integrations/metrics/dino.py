"""DINO subject fidelity: cosine of self-supervised ViT CLS-token features (DreamBooth's DINO metric)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .images import check_images
from .models import DEFAULT_DINO_MODEL, LoadedModel, cached_features, load_dino, resolve_device


def _vit(model, device) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_dino(str(model), resolve_device(device))


@torch.no_grad()
def dino_features(images, model=DEFAULT_DINO_MODEL, device=None, batch_size: int = 32) -> torch.Tensor:
    """Unit-norm CLS tokens (N, D) of the ViT's last layer (after its final layer norm); on the CPU."""
    images = check_images(images)
    return cached_features("dino", model, images, lambda: _features(images, model, device, batch_size))


@torch.no_grad()
def _features(images, model, device, batch_size):
    vit = _vit(model, device)
    features = []
    for start in range(0, len(images), batch_size):
        hidden = vit.model(pixel_values=vit.pixels(images[start : start + batch_size])).last_hidden_state
        features.append(hidden[:, 0].float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


def dino(images, references, model=DEFAULT_DINO_MODEL, device=None, batch_size: int = 32) -> torch.Tensor:
    """DINO (N,): mean cosine between each image's CLS feature and those of the reference images."""
    images, references = check_images(images), check_images(references, "references")
    reference = dino_features(references, model, device, batch_size)
    return (dino_features(images, model, device, batch_size) @ reference.T).mean(-1)
