"""Instance/class image folders: validation, loading (PIL + torch, no torchvision) and class image generation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
METADATA_SUFFIXES = {".json", ".txt", ".md"}
# --image_interpolation_mode names (torchvision's InterpolationMode names that PIL implements).
INTERPOLATION_MODES = {
    "nearest": Image.NEAREST,
    "nearest_exact": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def check_image_dir(directory, flag: str) -> list[Path]:
    """Sorted image files of ``directory``; ValueError naming the flag or the offending file otherwise."""
    if directory is None or not os.path.isdir(directory):
        raise ValueError(f"{flag} must be an existing directory of images, got {directory!r}")
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith("."))
    images = []
    for path in files:
        if path.suffix.lower() in METADATA_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{flag}: {path} is not a readable image ({error})") from None
        images.append(path)
    if not images:
        raise ValueError(f"{flag} {directory!r} holds no images")
    return images


def load_image(path, resolution: int, center_crop: bool, interpolation: str = "bicubic") -> torch.Tensor:
    """(3, resolution, resolution) float tensor in [-1, 1]: shorter side resized, then cropped."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, INTERPOLATION_MODES[interpolation])
        if center_crop:
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        else:
            left = top = 0
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, resolution, center_crop, interpolation):
        self.paths, self.options = list(paths), (resolution, center_crop, interpolation)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], *self.options)


def load_images(paths, resolution, center_crop, interpolation="bicubic", num_workers: int = 0) -> torch.Tensor:
    """(N, 3, resolution, resolution) tensor of ``paths``, decoded by ``num_workers`` subprocesses (0: here)."""
    files = _ImageFiles(paths, resolution, center_crop, interpolation)
    loader = torch.utils.data.DataLoader(files, batch_size=max(1, len(files)), num_workers=num_workers)
    return torch.cat(list(loader))


class DreamBoothData:
    """Instance images with their prompt, optionally class images with theirs, as preloaded tensors.

    An epoch (``--num_train_epochs``) is ``len(self)`` = max(#instance, #class) images, as in diffusers.
    """

    def __init__(
        self,
        instance_images,
        instance_prompt,
        resolution,
        center_crop,
        class_images=(),
        class_prompt=None,
        interpolation="bicubic",
        num_workers=0,
    ):
        options = (resolution, center_crop, interpolation, num_workers)
        self.instance = load_images(instance_images, *options)
        self.instance_prompt = instance_prompt
        self.classes = load_images(class_images, *options) if class_images else None
        self.class_prompt = class_prompt

    def __len__(self):
        return max(len(self.instance), 0 if self.classes is None else len(self.classes))

    def steps_per_epoch(self, batch_size: int, accumulation: int) -> int:
        """Optimizer steps per epoch: ceil(ceil(len / batch_size) / accumulation)."""
        return math.ceil(math.ceil(len(self) / batch_size) / accumulation)

    def batch(self, batch_size: int):
        """Random batch (drawn from torch's default generator): (pixels, prompts); class half appended."""
        idx = torch.randint(0, len(self.instance), (batch_size,))
        pixels, prompts = [self.instance[idx]], [self.instance_prompt] * batch_size
        if self.classes is not None:
            cidx = torch.randint(0, len(self.classes), (batch_size,))
            pixels.append(self.classes[cidx])
            prompts += [self.class_prompt] * batch_size
        return torch.cat(pixels), prompts


def count_images(directory) -> int:
    """Image files in ``directory`` (0 when it does not exist)."""
    if not os.path.isdir(directory):
        return 0
    return len([p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])


def generate_class_images(pipeline, class_prompt, class_dir, num_images, batch_size, resolution, steps, guidance, seed):
    """Fills ``class_dir`` up to ``num_images`` images of ``class_prompt`` generated by ``pipeline`` (the base
    model; a callable returning it is called only when images are missing)."""
    os.makedirs(class_dir, exist_ok=True)
    existing = count_images(class_dir)
    if existing >= num_images:
        return
    if callable(pipeline) and not hasattr(pipeline, "unet"):
        pipeline = pipeline()
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    while existing < num_images:
        count = min(batch_size, num_images - existing)
        images = pipeline(
            [class_prompt] * count,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
        ).images
        for image in images:
            image.save(Path(class_dir) / f"class_{existing:05d}.png")
            existing += 1
