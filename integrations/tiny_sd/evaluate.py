"""Measures the tiny model with its judge: prompt accuracy on held-out colour/shape pairs, corruption score,
seconds per image, and a sample grid for a fixed prompt list."""

from __future__ import annotations

import time

import numpy as np
import torch

from .world import BACKGROUNDS, SIZES, Scene, held_out, to_tensor

GRID_PROMPTS = (
    "a large red circle on a black background",
    "a small green square on a white background",
    "a large blue triangle on a gray background",
    "a large yellow star on a black background",
    "a small purple circle on a gray background",
    "a large orange square on a black background",
    "a large red triangle on a white background",
    "a large blue star on a gray background",
)


def held_out_prompts(rng: np.random.Generator, n: int) -> list[Scene]:
    """n scenes whose colour/shape pair never appeared in training, with random size and background."""
    from .world import COLOURS, SHAPES

    pairs = [(c, s) for c in COLOURS for s in SHAPES if held_out(Scene(s, c, "small", "black", 0.5, 0.5))]
    return [
        Scene(
            pairs[i % len(pairs)][1],
            pairs[i % len(pairs)][0],
            str(rng.choice(tuple(SIZES))),
            str(rng.choice(tuple(BACKGROUNDS))),
            0.5,
            0.5,
        )
        for i in range(n)
    ]


@torch.no_grad()
def generate(pipe, prompts, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """(N, 3, R, R) images in [-1, 1] (R: the pipeline's resolution)."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np"
    ).images
    return to_tensor((np.clip(images, 0, 1) * 255).round().astype(np.uint8))


def prompt_accuracy(
    pipe, judge, clean_energy, n: int = 384, steps: int = 25, guidance: float = 3.0, seed: int = 0, batch: int = 32
) -> dict:
    """Judge-read accuracy of ``n`` images generated from held-out colour/shape prompts.

    Returns {attribute: fraction correct}, "corruption_score" (mean; lower is cleaner, 1 = as clean renders),
    "shape_by_prompt" {"red triangle": fraction of right shapes, ...}, "shape_by_size" {"small": ..., "large": ...}
    and "shape_confusion" {asked shape: {read shape: count}}."""
    from .judge import corruption_score

    scenes = held_out_prompts(np.random.default_rng(seed), n)
    images = torch.cat(
        [
            generate(pipe, [s.caption for s in scenes[i : i + batch]], steps, guidance, seed + i)
            for i in range(0, n, batch)
        ]
    )
    predicted = judge.predict(images)
    result = {
        name: float(np.mean([p == getattr(s, name) for p, s in zip(predicted[name], scenes)]))
        for name in ("colour", "shape", "size", "background")
    }
    result["corruption_score"] = float(corruption_score(images, clean_energy).mean())
    by_prompt, by_size, confusion = {}, {}, {}
    for read, scene in zip(predicted["shape"], scenes):
        by_prompt.setdefault(f"{scene.colour} {scene.shape}", []).append(read == scene.shape)
        by_size.setdefault(scene.size, []).append(read == scene.shape)
        counts = confusion.setdefault(scene.shape, {})
        counts[read] = counts.get(read, 0) + 1
    result["shape_by_prompt"] = {k: float(np.mean(v)) for k, v in by_prompt.items()}
    result["shape_by_size"] = {k: float(np.mean(v)) for k, v in by_size.items()}
    result["shape_confusion"] = confusion
    return result


def seconds_per_image(pipe, steps: int = 25, repeats: int = 3) -> float:
    """Wall seconds to generate one image (batch 1, guidance 3), mean of ``repeats`` after a warm-up."""
    generate(pipe, [GRID_PROMPTS[0]], steps, 3.0, 0)
    started = time.perf_counter()
    for i in range(repeats):
        generate(pipe, [GRID_PROMPTS[i % len(GRID_PROMPTS)]], steps, 3.0, i)
    return (time.perf_counter() - started) / repeats


def sample_grid(pipe, path, per_prompt: int = 4, steps: int = 25, guidance: float = 3.0) -> None:
    """Rows = GRID_PROMPTS, columns = seeds; upscaled to 128 pixels per image for viewing."""
    from PIL import Image

    rows = []
    for i, prompt in enumerate(GRID_PROMPTS):
        images = generate(pipe, [prompt] * per_prompt, steps, guidance, 1000 + i)
        rows.append(torch.cat(list(images), dim=2))
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    scale = max(1, 128 // images.shape[-1])
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
