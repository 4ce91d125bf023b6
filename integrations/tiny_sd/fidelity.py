"""Subject-driven generation metrics with the judge: subject similarity (the CLIP-I/DINO role), prompt
following (the CLIP-T role: is it the class asked for?) and the corruption score."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def subject_metrics(images: torch.Tensor, subject_images: torch.Tensor, shape: str = "star") -> dict[str, float]:
    """images, subject_images: (N, 3, R, R) in [-1, 1], R = 32 or 64 (the judge of that model size). Returns mean
    metrics over ``images``."""
    from . import load_judge
    from .judge import corruption_score

    judge, clean_energy = load_judge(images.shape[-1])
    reference = F.normalize(judge.embedding(subject_images), dim=1).mean(0)
    similarity = F.normalize(judge.embedding(images), dim=1) @ F.normalize(reference, dim=0)
    shapes = judge.predict(images)["shape"]
    return {
        "subject_similarity": float(similarity.mean()),
        "shape_accuracy": sum(s == shape for s in shapes) / len(shapes),
        "corruption_score": float(corruption_score(images, clean_energy).mean()),
    }
