"""Image batches for the metrics: checks, loading from a folder, and the CLIP/ViT preprocessing in plain torch
(resize, center crop, normalize as the model's image processor says; no torchvision)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RANGE_SLACK = 1e-3  # decoded images may overshoot [-1, 1] by rounding


def check_images(images, name: str = "images") -> torch.Tensor:
    """Returns ``images`` as a float (N, 3, H, W) tensor in [-1, 1]; raises ValueError/TypeError naming ``name``."""
    if isinstance(images, Sequence) and not isinstance(images, torch.Tensor):
        if not images:
            raise ValueError(f"{name}: no images")
        images = torch.stack([check_images(image[None], name)[0] for image in images])
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor (N, 3, H, W) in [-1, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [-1, 1] (see world.to_tensor), got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    low, high = float(images.min()), float(images.max())
    if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
        hint = " (uint8 pixels? divide by 127.5 and subtract 1)" if high > 2 else ""
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}]{hint}")
    return images if -1 <= low and high <= 1 else images.clamp(-1, 1)


def check_prompts(prompts, count: int, name: str = "prompts") -> list[str]:
    """One prompt per image: a list of ``count`` strings (a single string is repeated)."""
    if isinstance(prompts, str):
        return [prompts] * count
    if prompts is None:
        raise ValueError(f"{name} are required by this metric (one per image)")
    prompts = list(prompts)
    if len(prompts) != count or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be {count} strings (one per image), got {len(prompts)} items")
    return prompts


def image_files(folder, name: str = "folder") -> list[Path]:
    """The image files of ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def load_images(files, size: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1] from image files (RGB), or from every image of a folder. Images of
    different sizes are resized (bicubic) to ``size`` x ``size``, or to the first image's size when ``size`` is
    None."""
    from PIL import Image

    if isinstance(files, (str, Path)):
        files = image_files(files, "images") if Path(files).is_dir() else [files]

    pictures = [Image.open(path).convert("RGB") for path in files]
    target = (size, size) if size else pictures[0].size
    arrays = [np.asarray(p if p.size == target else p.resize(target, Image.BICUBIC)) for p in pictures]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class Preprocessing:
    """What an image processor does, as tensors ops: ``shortest_edge`` or ``resize`` (height, width), then
    ``crop`` (height, width), then ``(x - mean) / std`` on [0, 1] pixels."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, processor) -> Preprocessing:
        """Reads a transformers image processor's settings (size, crop_size, resample, image_mean/std)."""
        size = getattr(processor, "size", None) if getattr(processor, "do_resize", True) else None
        shortest = _field(size, "shortest_edge")
        resize = None if shortest else _pair(size)
        crop = _pair(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if getattr(processor, "do_normalize", True):
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        modes = {0: "nearest", 2: "bilinear", 3: "bicubic"}
        resample = getattr(processor, "resample", 3)
        return cls(mean, std, shortest, resize, crop, modes.get(int(getattr(resample, "value", resample)), "bicubic"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> normalized model input (N, 3, h, w), float32."""
        x = (images.float() + 1) / 2
        height, width = x.shape[-2:]
        target = self.resize
        if self.shortest_edge:
            short, long = sorted((height, width))
            new_long = int(self.shortest_edge * long / short)
            target = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        if target is not None and tuple(target) != (height, width):
            antialias = self.mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=tuple(target), mode=self.mode, antialias=antialias, align_corners=None)
            x = x.clamp(0, 1)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crops (or zero-pads, as transformers does) the centre ``size`` (height, width) of (N, C, H, W)."""
    height, width = x.shape[-2:]
    ch, cw = size
    if ch > height or cw > width:
        pad_h, pad_w = max(ch - height, 0), max(cw - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = x.shape[-2:]
    top, left = int((height - ch) / 2), int((width - cw) / 2)
    return x[..., top : top + ch, left : left + cw]


def _field(size, key):
    if size is None or isinstance(size, int):
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _pair(size):
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    height, width = _field(size, "height"), _field(size, "width")
    return (int(height), int(width)) if height and width else None
