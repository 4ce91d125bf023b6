"""The synthetic captioned world the tiny Stable Diffusion models are trained on.

Each RGB image (32x32 or 64x64) shows one shape (circle, square, triangle, star) of one colour and size at a
random position on a plain background, captioned "a {size} {colour} {shape} on a {background} background".
:func:`pattern` draws two-colour textures (checkerboards, stripes, dots, speckle) for shapes that carry one.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.22, "large": 0.38}  # radius as a fraction of the image side
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SUPERSAMPLE = 4  # render() draws at 4x resolution
PATTERNS = ("checker", "stripes", "diagonal", "dots", "speckle")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    background: str
    x: float  # centre, fraction of the image side
    y: float

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def shape_polygon(shape: str, cx: float, cy: float, r: float, points: int = 5):
    """Vertices (pixels) of a square, triangle or star of circumradius ``r`` centred at (cx, cy)."""
    if shape == "square":
        h = r / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    vertices = []
    for i in range(2 * points):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / points
        vertices.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return vertices


def render(scene: Scene, resolution: int = RESOLUTION, fill=None) -> Image.Image:
    """Draws ``scene`` with 4x supersampling; ``fill`` overrides the colour with a PIL image pattern."""
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    r = SIZES[scene.size] * side
    cx, cy = scene.x * side, scene.y * side
    if scene.shape == "circle":
        draw.ellipse((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=255)
    else:
        draw.polygon(shape_polygon(scene.shape, cx, cy, r), fill=255)
    layer = fill.resize((side, side)) if fill is not None else Image.new("RGB", (side, side), COLOURS[scene.colour])
    image.paste(layer, (0, 0), mask)
    return image.resize((resolution, resolution), Image.LANCZOS)


def pattern(kind: str, colours, cell: float, resolution: int, seed: int = 0) -> Image.Image:
    """A two-colour texture at render()'s supersampled size: ``colours`` (RGB of the ground, RGB of the marks),
    ``cell`` the period's half-width in output pixels (2 = a 2-pixel checker or stripe), ``seed`` the speckle's."""
    if kind not in PATTERNS:
        raise ValueError(f"kind must be one of {PATTERNS}, got {kind!r}")
    side = resolution * SUPERSAMPLE
    y, x = np.mgrid[0:side, 0:side] / SUPERSAMPLE
    if kind == "checker":
        on = (np.floor(x / cell) + np.floor(y / cell)) % 2 == 1
    elif kind == "stripes":
        on = np.floor(y / cell) % 2 == 1
    elif kind == "diagonal":
        on = np.floor((x + y) / cell) % 2 == 1
    elif kind == "dots":
        on = (x % (2 * cell) - cell) ** 2 + (y % (2 * cell) - cell) ** 2 < (0.6 * cell) ** 2
    else:
        cells = np.random.default_rng(seed).random((math.ceil(resolution / cell) + 1,) * 2) < 0.5
        on = cells[np.floor(y / cell).astype(int), np.floor(x / cell).astype(int)]
    return Image.fromarray(np.where(on[..., None], np.array(colours[1]), np.array(colours[0])).astype(np.uint8))


def random_pattern(rng: np.random.Generator, resolution: int) -> Image.Image:
    """A random texture: kind, two distinct world colours, cell 1.5-5 output pixels."""
    first, second = rng.choice(len(COLOURS), size=2, replace=False)
    palette = tuple(COLOURS.values())
    kind = str(rng.choice(PATTERNS))
    return pattern(
        kind, (palette[first], palette[second]), float(rng.uniform(1.5, 5.0)), resolution, int(rng.integers(1 << 30))
    )


def random_scene(rng: np.random.Generator, shapes=SHAPES, colours=tuple(COLOURS)) -> Scene:
    size = str(rng.choice(tuple(SIZES)))
    margin = SIZES[size] + 0.06
    return Scene(
        str(rng.choice(shapes)),
        str(rng.choice(colours)),
        size,
        str(rng.choice(tuple(BACKGROUNDS))),
        float(rng.uniform(margin, 1 - margin)),
        float(rng.uniform(margin, 1 - margin)),
    )


def held_out(scene: Scene) -> bool:
    """Colour/shape pairs never shown in training (they test generalisation to new prompt combinations)."""
    return (scene.colour, scene.shape) in {
        ("red", "triangle"),
        ("blue", "star"),
        ("yellow", "circle"),
        ("purple", "square"),
    }


def make_dataset(n: int, seed: int, split: str = "train", resolution: int = RESOLUTION, textured: float = 0.0):
    """(images uint8 (n, resolution, resolution, 3), scenes) for split 'train' (held-out pairs excluded) or
    'heldout' (only them). A ``textured`` share of the shapes is filled with :func:`random_pattern` in place of
    their colour (drawn from a second stream: the scenes are those of ``textured=0``)."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng)
        if held_out(scene) == (split == "heldout"):
            scenes.append(scene)
    texture_rng = np.random.default_rng([seed, 1])
    fills = [
        random_pattern(texture_rng, resolution) if textured and texture_rng.random() < textured else None
        for _ in scenes
    ]
    images = np.stack([np.asarray(render(s, resolution, fill)) for s, fill in zip(scenes, fills)])
    return images, scenes


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
