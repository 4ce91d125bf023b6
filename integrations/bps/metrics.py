"""Metrics of steering on the synthetic world: condition adherence and a Frechet distance on judge embeddings.

Condition adherence, per condition kind (1 = the image follows its condition exactly, as real renders do):
``edges``: Pearson correlation of the condition with the generated image's edge map; ``layout``: IoU of the
layout mask with the generated image's foreground (pixels far from the image's border colour).
"""

from __future__ import annotations

import numpy as np
import torch

from .conditions import edge_map

FOREGROUND_DISTANCE = 0.3  # RGB distance (images in [-1, 1]) from the border colour that counts as foreground


def condition_adherence(conditions: torch.Tensor, images: torch.Tensor, kind: str = "edges") -> float:
    """Mean adherence of generated images (N, 3, H, W) in [-1, 1] to their conditions (N, 1, H, W), by ``kind``."""
    if conditions.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"conditions {tuple(conditions.shape)} and images {tuple(images.shape)} differ in size")
    if kind == "layout":
        return layout_iou(conditions, images)
    if kind != "edges":
        raise ValueError(f"kind must be 'edges' or 'layout', got {kind!r}")
    return edge_correlation(conditions, images)


def foreground(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: pixels farther than FOREGROUND_DISTANCE from the median colour of the image's border."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values  # (N, 3)
    return (images - background[..., None, None]).norm(dim=1) > FOREGROUND_DISTANCE


def layout_iou(masks: torch.Tensor, images: torch.Tensor) -> float:
    """Mean intersection over union of layout masks (N, 1, H, W; > 0.5 inside) and the images' foreground."""
    inside, shown = masks[:, 0] > 0.5, foreground(images)
    union = (inside | shown).flatten(1).sum(1).clamp_min(1)
    return float(((inside & shown).flatten(1).sum(1) / union).double().mean())


def edge_correlation(conditions: torch.Tensor, images: torch.Tensor) -> float:
    """Mean Pearson correlation between each edge condition and the edge map of its image (0 = unrelated)."""
    target = conditions.flatten(1).double()
    edges = edge_map(images).flatten(1).double()
    target = target - target.mean(1, keepdim=True)
    edges = edges - edges.mean(1, keepdim=True)
    denominator = (target.norm(dim=1) * edges.norm(dim=1)).clamp_min(1e-12)
    return float(((target * edges).sum(1) / denominator).mean())


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID's formula on two feature sets (N, D): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    a, b = features_a.double().cpu().numpy(), features_b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


@torch.no_grad()
def judge_report(judge, images: torch.Tensor, scenes, reference_features: torch.Tensor) -> dict:
    """Prompt accuracy per attribute read by the tiny judge, and the Frechet distance of the images' judge
    embeddings to ``reference_features`` (embeddings of real renders)."""
    predicted = judge.predict(images)
    accuracy = {
        name: float(np.mean([p == getattr(s, name) for p, s in zip(values, scenes)]))
        for name, values in predicted.items()
    }
    return {"accuracy": accuracy, "frechet_distance": frechet_distance(judge.embedding(images), reference_features)}
