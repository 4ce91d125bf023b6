"""Evaluation metrics for subject-driven generation, each per image: CLIP-T, CLIP-I, DINO, diversity, CLIP-IQA
(transformers models by hub id or local path; preprocessing in torch, no torchvision) and the bundled tiny
model's judge (offline). Images are float tensors (N, 3, H, W) in [-1, 1] (``tiny_sd.world.to_tensor``).

    from bayeslayers.integrations import metrics
    values = metrics.evaluate(images, prompts, references, metrics=["clip_t", "clip_i", "dino"])
    metrics.summarize(values)  # {"clip_t": {"mean": ..., "std": ..., "count": ...}, ...}
"""

from .clip import IQA_PROMPTS, clip_i, clip_image_features, clip_iqa, clip_t, clip_text_features
from .dino import dino, dino_features
from .diversity import dino_diversity, pairwise_diversity
from .images import Preprocessing, check_images, check_prompts, image_files, load_images
from .judge import judge_input, judge_metrics, judge_resolution, prompt_attributes
from .models import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, load_clip, load_dino
from .registry import (
    JUDGE_METRICS,
    METRIC_NAMES,
    PAPER_METRICS,
    FunctionMetric,
    Metric,
    build_metric,
    evaluate,
    parse_metric_names,
    summarize,
)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "IQA_PROMPTS",
    "JUDGE_METRICS",
    "METRIC_NAMES",
    "PAPER_METRICS",
    "FunctionMetric",
    "Metric",
    "Preprocessing",
    "build_metric",
    "check_images",
    "check_prompts",
    "clip_i",
    "clip_image_features",
    "clip_iqa",
    "clip_t",
    "clip_text_features",
    "dino",
    "dino_diversity",
    "dino_features",
    "evaluate",
    "image_files",
    "judge_input",
    "judge_metrics",
    "judge_resolution",
    "load_clip",
    "load_dino",
    "load_images",
    "pairwise_diversity",
    "parse_metric_names",
    "prompt_attributes",
    "summarize",
]
