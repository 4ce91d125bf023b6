"""The held-out few-shot subject: a star with a red/yellow checkerboard pattern ("sks star"), never seen in
training, rendered at several positions, sizes and backgrounds."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, RESOLUTION, Scene, render

INSTANCE_PROMPT = "a sks star"
CLASS_PROMPT = "a star"
VALIDATION_PROMPT = "a sks star on a black background"
SUBJECT_SCENES = (
    Scene("star", "red", "large", "black", 0.50, 0.50),
    Scene("star", "red", "large", "gray", 0.42, 0.55),
    Scene("star", "red", "large", "white", 0.58, 0.45),
    Scene("star", "red", "small", "black", 0.35, 0.35),
    Scene("star", "red", "large", "gray", 0.55, 0.58),
)


def checker_fill(cells: int = 6) -> Image.Image:
    """The subject's pattern: a red/yellow checkerboard."""
    board = (np.indices((cells, cells)).sum(0) % 2).astype(bool)
    array = np.where(board[..., None], np.array([230, 40, 40]), np.array([245, 220, 40])).astype(np.uint8)
    return Image.fromarray(array).resize((RESOLUTION * 4, RESOLUTION * 4), Image.NEAREST)


def render_subject() -> list[Image.Image]:
    assert all(s.background in BACKGROUNDS for s in SUBJECT_SCENES)
    return [render(scene, fill=checker_fill()) for scene in SUBJECT_SCENES]
