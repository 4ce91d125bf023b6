"""Few-shot subjects in the tiny models' world: objects with a look the base model cannot produce from their
class word alone (a pattern, two colours, a shape variant), never seen in its training. Each has 4-5 training
renders (different positions, sizes and backgrounds, as DreamBooth's 3-5 photos), a class prompt, and
evaluation prompts that recontextualise it (background, size: the world's captions have no words for position).

``SUBJECTS`` are the 32 px model's (``checker_star``, "a sks star", red/yellow checkerboard, is the recipe's
default); ``TEXTURE_SUBJECTS`` the 64 px model's: fine textures (2-3 pixel cells) whose high frequencies an
8x8 latent could not hold, so that noisy patterns on them show in :func:`~.judge.corruption_score`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLOURS, RESOLUTION, SIZES, SUPERSAMPLE, Scene, pattern, render

IDENTIFIER = "sks"  # DreamBooth's rare token, one token in the tiny tokenizer; one subject is trained at a time


def _side(resolution: int) -> int:
    return resolution * SUPERSAMPLE


def checker_fill(scene: Scene, resolution: int, cells: int = 6) -> Image.Image:
    """Red/yellow checkerboard."""
    board = (np.indices((cells, cells)).sum(0) % 2).astype(bool)
    array = np.where(board[..., None], np.array([230, 40, 40]), np.array([245, 220, 40])).astype(np.uint8)
    return Image.fromarray(array).resize((_side(resolution), _side(resolution)), Image.NEAREST)


def split_fill(scene: Scene, resolution: int) -> Image.Image:
    """Left half blue, right half orange, split through the shape's centre."""
    image = Image.new("RGB", (_side(resolution), _side(resolution)), COLOURS["orange"])
    ImageDraw.Draw(image).rectangle((0, 0, int(scene.x * _side(resolution)), _side(resolution)), fill=COLOURS["blue"])
    return image


def stripe_fill(scene: Scene, resolution: int, stripes: int = 8) -> Image.Image:
    """Horizontal green/yellow stripes."""
    rows = (np.arange(stripes) % 2).astype(bool)[:, None, None]
    array = np.where(rows, np.array(COLOURS["yellow"]), np.array(COLOURS["green"])).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(array, (stripes, 1, 3)).copy()).resize(
        (_side(resolution), _side(resolution)), Image.NEAREST
    )


def ring_fill(scene: Scene, resolution: int, hole: float = 0.45) -> Image.Image:
    """Purple with a background-coloured hole at the shape's centre: a circle becomes a ring."""
    image = Image.new("RGB", (_side(resolution), _side(resolution)), COLOURS["purple"])
    r = SIZES[scene.size] * 0.8 * hole * _side(resolution)
    cx, cy = scene.x * _side(resolution), scene.y * _side(resolution)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=BACKGROUNDS[scene.background])
    return image


def texture_fill(scene: Scene, resolution: int, kind: str, colours, cell: float, seed: int = 0) -> Image.Image:
    """A :func:`~.world.pattern` fixed to the image (the same texture in every render)."""
    return pattern(kind, colours, cell, resolution, seed)


@dataclass(frozen=True)
class Subject:
    name: str
    shape: str  # the class word, one of world.SHAPES
    look: str  # what makes it this subject, in words
    fill: Callable[[Scene, int], Image.Image]  # (scene, resolution) -> pattern at render()'s supersampled size
    scenes: tuple[Scene, ...]  # the training renders
    resolution: int = RESOLUTION

    @property
    def instance_prompt(self) -> str:
        return f"a {IDENTIFIER} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.shape}"

    @property
    def validation_prompt(self) -> str:
        return f"a {IDENTIFIER} {self.shape} on a black background"

    @property
    def eval_prompts(self) -> tuple[str, ...]:
        """Recontextualisations: every background, and both sizes."""
        s = f"{IDENTIFIER} {self.shape}"
        return (
            f"a {s} on a black background",
            f"a {s} on a white background",
            f"a {s} on a gray background",
            f"a small {s} on a white background",
            f"a large {s} on a gray background",
        )

    def render(self) -> list[Image.Image]:
        """The training images, (resolution, resolution) RGB."""
        return [render(scene, self.resolution, self.fill(scene, self.resolution)) for scene in self.scenes]


def _scenes(shape: str, colour: str) -> tuple[Scene, ...]:
    return (
        Scene(shape, colour, "large", "black", 0.50, 0.50),
        Scene(shape, colour, "large", "gray", 0.42, 0.55),
        Scene(shape, colour, "large", "white", 0.58, 0.45),
        Scene(shape, colour, "small", "black", 0.35, 0.35),
    )


SUBJECTS = {
    s.name: s
    for s in (
        Subject(
            "checker_star",
            "star",
            "red/yellow checkerboard",
            checker_fill,
            _scenes("star", "red") + (Scene("star", "red", "large", "gray", 0.55, 0.58),),
        ),
        Subject("split_circle", "circle", "left half blue, right half orange", split_fill, _scenes("circle", "blue")),
        Subject("striped_square", "square", "green/yellow horizontal stripes", stripe_fill, _scenes("square", "green")),
        Subject("ring_circle", "circle", "purple ring (a circle with a hole)", ring_fill, _scenes("circle", "purple")),
    )
}
TEXTURE_SUBJECTS = {
    s.name: s
    for s in (
        Subject(
            "fine_checker_star",
            "star",
            "red/yellow checkerboard of 2-pixel cells",
            partial(texture_fill, kind="checker", colours=(COLOURS["yellow"], COLOURS["red"]), cell=2),
            _scenes("star", "red") + (Scene("star", "red", "large", "gray", 0.55, 0.58),),
            64,
        ),
        Subject(
            "pinstripe_square",
            "square",
            "blue/white diagonal pinstripes, 2-pixel period half",
            partial(texture_fill, kind="diagonal", colours=((240, 240, 240), COLOURS["blue"]), cell=2),
            _scenes("square", "blue"),
            64,
        ),
        Subject(
            "dotted_circle",
            "circle",
            "purple with a grid of yellow dots every 6 pixels",
            partial(texture_fill, kind="dots", colours=(COLOURS["purple"], COLOURS["yellow"]), cell=3),
            _scenes("circle", "purple"),
            64,
        ),
        Subject(
            "speckled_triangle",
            "triangle",
            "orange/green speckle of 2-pixel cells (a fixed random pattern)",
            partial(texture_fill, kind="speckle", colours=(COLOURS["orange"], COLOURS["green"]), cell=2, seed=7),
            _scenes("triangle", "orange"),
            64,
        ),
    )
}
SUBJECT_SETS = {32: SUBJECTS, 64: TEXTURE_SUBJECTS}  # the few-shot subjects of each model size
DEFAULT_SUBJECT = "checker_star"
DEFAULT_SUBJECTS = {32: DEFAULT_SUBJECT, 64: "fine_checker_star"}

# The default subject's prompts, as the recipe and the demo use them.
INSTANCE_PROMPT = SUBJECTS[DEFAULT_SUBJECT].instance_prompt
CLASS_PROMPT = SUBJECTS[DEFAULT_SUBJECT].class_prompt
VALIDATION_PROMPT = SUBJECTS[DEFAULT_SUBJECT].validation_prompt


def subjects(resolution: int = RESOLUTION) -> dict[str, Subject]:
    if resolution not in SUBJECT_SETS:
        raise ValueError(f"resolution must be one of {tuple(SUBJECT_SETS)}, got {resolution!r}")
    return SUBJECT_SETS[resolution]


def get_subject(name: str, resolution: int = RESOLUTION) -> Subject:
    known = subjects(resolution)
    if name not in known:
        raise ValueError(f"subject must be one of {sorted(known)} at {resolution} px, got {name!r}")
    return known[name]


def save_subjects(directory, resolution: int = RESOLUTION) -> None:
    """Writes ``<directory>/<name>/{<name>_<i>.png, prompts.json}`` for every subject of that model size."""
    import json
    from pathlib import Path

    for subject in subjects(resolution).values():
        folder = Path(directory) / subject.name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for i, image in enumerate(subject.render()):
            image.save(folder / f"{subject.name}_{i}.png")
        prompts = {
            "instance_prompt": subject.instance_prompt,
            "class_prompt": subject.class_prompt,
            "validation_prompt": subject.validation_prompt,
            "eval_prompts": list(subject.eval_prompts),
            "look": subject.look,
        }
        (folder / "prompts.json").write_text(json.dumps(prompts, indent=1))


if __name__ == "__main__":  # python -m bayeslayers.integrations.tiny_sd.subject: rewrites the bundled subjects
    from . import ASSETS

    save_subjects(ASSETS / "subjects")
