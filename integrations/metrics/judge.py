"""The bundled tiny model's judge behind the metrics interface (offline stand-ins for CLIP-I/DINO, CLIP-T and a
quality score on the synthetic world of shapes; see ``integrations/tiny_sd/judge.py``)."""

from __future__ import annotations

import re
from functools import lru_cache

import torch
import torch.nn.functional as F

from .diversity import pairwise_diversity
from .images import check_images, check_prompts

JUDGE_RESOLUTION = 32  # the bundled 32 px model's judge: every image size without a judge of its own


@lru_cache(maxsize=2)
def _judge(resolution: int = JUDGE_RESOLUTION):
    from bayeslayers.integrations.tiny_sd import load_judge

    return load_judge(resolution)


def judge_resolution(images: torch.Tensor) -> int:
    """The judge that scores ``images`` (N, 3, H, W): the bundled model size's whose side they have (64x64 images
    and the 64 px model's judge, so its fine textures are not resized away), else the 32 px judge."""
    from bayeslayers.integrations import tiny_sd
    from bayeslayers.integrations.tiny_sd.models import RESOLUTIONS

    side = images.shape[-1]
    if images.shape[-2] == side and side in RESOLUTIONS and (tiny_sd.assets_dir(side) / "judge.safetensors").exists():
        return side
    return JUDGE_RESOLUTION


def prompt_attributes(prompt: str) -> dict[str, str]:
    """The judge attributes a prompt names: {"shape": "star", "background": "black", ...}. An attribute is named
    when exactly one of its values appears as a word ("a sks star on a black background" names shape and
    background; the colour of a patterned subject is not named)."""
    from bayeslayers.integrations.tiny_sd.judge import ATTRIBUTES

    words = re.findall(r"[a-z]+", prompt.lower())
    background = re.search(r"on an? (\w+) background", prompt.lower())
    named = {}
    for attribute, values in ATTRIBUTES.items():
        if attribute == "background":
            found = [background.group(1)] if background and background.group(1) in values else []
        else:
            scope = words[: words.index("on")] if background and "on" in words else words
            found = sorted({w for w in scope if w in values})
        if len(found) == 1:
            named[attribute] = found[0]
    return named


def judge_input(images: torch.Tensor, resolution: int = JUDGE_RESOLUTION) -> torch.Tensor:
    """images (N, 3, H, W) in [-1, 1] resized (bicubic, antialiased) to the judge's ``resolution`` square."""
    images = check_images(images)
    if images.shape[-2:] != (resolution, resolution):
        size = (resolution, resolution)
        images = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True).clamp(-1, 1)
    return images.float().cpu()


@torch.no_grad()
def judge_metrics(images, prompts, references=None) -> dict[str, torch.Tensor]:
    """Per-image judge metrics, each (N,):

    - ``judge_subject_similarity``: cosine between the image's judge embedding and the normalised mean of the
      references' unit embeddings (``tiny_sd.fidelity``'s definition; needs ``references``),
    - ``judge_{colour,shape,size,background}_accuracy``: 1/0 whether the judge reads the attribute the prompt
      names, NaN where the prompt names none; ``judge_prompt_accuracy``: their mean over the named ones,
    - ``judge_corruption``: high-frequency energy over clean renders' (1 = clean, noisy patterns >> 1),
    - ``judge_diversity``: judge-embedding cosine distance to the other images of the same prompt.

    The judge is :func:`judge_resolution`'s: images and references are resized to its side."""
    from bayeslayers.integrations.tiny_sd.judge import ATTRIBUTES, corruption_score

    resolution = judge_resolution(check_images(images))
    images = judge_input(images, resolution)
    prompts = check_prompts(prompts, len(images))
    judge, clean_energy = _judge(resolution)
    embedding = judge.embedding(images)
    result = {}
    if references is not None:
        references = judge_input(check_images(references, "references"), resolution)
        reference = F.normalize(F.normalize(judge.embedding(references), dim=1).mean(0), dim=0)
        result["judge_subject_similarity"] = F.normalize(embedding, dim=1) @ reference
    predicted = judge.predict(images)
    asked = [prompt_attributes(p) for p in prompts]
    correct = []
    for attribute in ATTRIBUTES:
        values = [
            float(predicted[attribute][i] == named[attribute]) if attribute in named else float("nan")
            for i, named in enumerate(asked)
        ]
        result[f"judge_{attribute}_accuracy"] = torch.tensor(values)
        correct.append(result[f"judge_{attribute}_accuracy"])
    result["judge_prompt_accuracy"] = torch.stack(correct, 1).nanmean(1)
    result["judge_corruption"] = corruption_score(images, clean_energy)
    result["judge_diversity"] = pairwise_diversity(embedding, prompts)
    return result
