"""Image grids people can look at: small generations upscaled (nearest neighbour, so pixels stay pixels) to at
least ``MIN_CELL`` px per image, with the prompt written in a caption row above them."""

from __future__ import annotations

import math
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 256  # px, the short side of each image in a grid
_PAD = 8


def to_pil(image) -> Image.Image:
    """PIL RGB image from a PIL image or an (H, W, 3) / (H, W) float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image, dtype=np.float32)
    array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def upscale(image: Image.Image, min_size: int = MIN_CELL) -> Image.Image:
    """Nearest-neighbour upscale by the smallest integer factor that makes the short side >= ``min_size``."""
    factor = max(1, math.ceil(min_size / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def caption_row(text: str, width: int, font_size: int = 18) -> Image.Image:
    """White strip of ``width`` px holding ``text`` wrapped to fit, in black."""
    font = _font(font_size)
    chars = max(10, int(width / (0.55 * font_size)))
    lines = textwrap.wrap(text, chars) or [""]
    line_height = font_size + 6
    row = Image.new("RGB", (width, _PAD * 2 + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(row)
    for i, line in enumerate(lines):
        draw.text((_PAD, _PAD + i * line_height), line, fill="black", font=font)
    return row


def captioned_grid(
    images, caption: str, columns: int | None = None, min_size: int = MIN_CELL, labels=None
) -> Image.Image:
    """Grid of ``images`` (PIL or float arrays), each upscaled to >= ``min_size`` px, under a caption row.

    ``labels``: optional short text per image, written in its top-left corner (e.g. "sample 3").
    """
    cells = [upscale(to_pil(image), min_size) for image in images]
    if not cells:
        raise ValueError("captioned_grid needs at least one image")
    columns = columns or min(4, len(cells))
    width, height = cells[0].size
    rows = math.ceil(len(cells) / columns)
    header = caption_row(caption, columns * width)
    grid = Image.new("RGB", (columns * width, header.height + rows * height), "white")
    grid.paste(header, (0, 0))
    draw = ImageDraw.Draw(grid)
    font = _font(16)
    for i, cell in enumerate(cells):
        x, y = (i % columns) * width, header.height + (i // columns) * height
        grid.paste(cell, (x, y))
        if labels is not None:
            draw.rectangle((x, y, x + 12 + 9 * len(labels[i]), y + 22), fill="black")
            draw.text((x + 5, y + 3), labels[i], fill="white", font=font)
    return grid


def colormap(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) values -> (H, W, 3) float RGB in [0, 1] through matplotlib's magma, scaled to [0, vmax]."""
    import matplotlib

    vmax = float(values.max()) if vmax is None else vmax
    scaled = values / vmax if vmax > 0 else np.zeros_like(values)
    return matplotlib.colormaps["magma"](np.clip(scaled, 0, 1))[..., :3]
