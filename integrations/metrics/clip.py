"""CLIP metrics: CLIP-T (prompt fidelity), CLIP-I (subject fidelity) and CLIP-IQA (quality).

Values are raw cosines (CLIP-T, CLIP-I in [-1, 1], as DreamBooth's tables report them: 0.305 / 0.803 for its SD
backbone; multiply by 100 for the "CLIP score" convention) and a probability in [0, 1] (CLIP-IQA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .images import check_images, check_prompts
from .models import DEFAULT_CLIP_MODEL, LoadedModel, cached_features, load_clip, resolve_device

# CLIP-IQA (Wang et al., 2023): softmax over the two antonym prompts' similarities, scaled by CLIP's 100.
IQA_PROMPTS = ("Good photo.", "Bad photo.")
IQA_LOGIT_SCALE = 100.0


def _clip(model, device) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_clip(str(model), resolve_device(device))


@torch.no_grad()
def clip_image_features(images, model=DEFAULT_CLIP_MODEL, device=None, batch_size: int = 32) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (N, D) of images (N, 3, H, W) in [-1, 1]; on the CPU."""
    images = check_images(images)
    return cached_features("clip", model, images, lambda: _image_features(images, model, device, batch_size))


def _image_features(images, model, device, batch_size):
    clip = _clip(model, device)
    features = []
    for start in range(0, len(images), batch_size):
        pixels = clip.pixels(images[start : start + batch_size])
        pooled = clip.model.vision_model(pixel_values=pixels).pooler_output
        features.append(clip.model.visual_projection(pooled).float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


@torch.no_grad()
def clip_text_features(prompts, model=DEFAULT_CLIP_MODEL, device=None, batch_size: int = 64) -> torch.Tensor:
    """Unit-norm CLIP text embeddings (N, D) of N prompts (truncated to the text model's length); on the CPU."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    clip = _clip(model, device)
    length = min(clip.tokenizer.model_max_length, clip.model.config.text_config.max_position_embeddings)
    features = []
    for start in range(0, len(prompts), batch_size):
        tokens = clip.tokenizer(
            list(prompts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=length,
            return_tensors="pt",
        ).to(clip.device)
        pooled = clip.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        features.append(clip.model.text_projection(pooled).float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


def clip_t(images, prompts, model=DEFAULT_CLIP_MODEL, device=None, batch_size: int = 32) -> torch.Tensor:
    """CLIP-T (N,): cosine between each image's and its prompt's CLIP embedding (raw, not x100)."""
    images = check_images(images)
    prompts = check_prompts(prompts, len(images))
    unique = sorted(set(prompts))
    text = clip_text_features(unique, model, device)
    index = torch.tensor([unique.index(p) for p in prompts])
    return (clip_image_features(images, model, device, batch_size) * text[index]).sum(-1)


def clip_i(images, references, model=DEFAULT_CLIP_MODEL, device=None, batch_size: int = 32) -> torch.Tensor:
    """CLIP-I (N,): mean cosine between each image's CLIP embedding and those of the reference images."""
    images, references = check_images(images), check_images(references, "references")
    reference = clip_image_features(references, model, device, batch_size)
    return (clip_image_features(images, model, device, batch_size) @ reference.T).mean(-1)


def clip_iqa(
    images, model=DEFAULT_CLIP_MODEL, device=None, batch_size: int = 32, prompts: tuple[str, str] = IQA_PROMPTS
) -> torch.Tensor:
    """CLIP-IQA (N,) in [0, 1]: softmax(100 cos(image, positive), 100 cos(image, negative))[positive]."""
    if len(prompts) != 2:
        raise ValueError(f"prompts must be a (positive, negative) pair, got {prompts!r}")
    anchors = clip_text_features(list(prompts), model, device)
    logits = IQA_LOGIT_SCALE * clip_image_features(images, model, device, batch_size) @ anchors.T
    return logits.softmax(-1)[:, 0]
