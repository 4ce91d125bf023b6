"""The common interface: a metric maps images (N, 3, H, W) in [-1, 1], their prompts and reference images to
per-image values {column: (N,) tensor}; :func:`evaluate` runs several, :func:`summarize` averages them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .images import check_images, check_prompts
from .models import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, feature_cache


class Metric(Protocol):
    name: str
    requires: tuple[str, ...]  # of "prompts", "references"

    def __call__(self, images: torch.Tensor, prompts: list[str], references) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class FunctionMetric:
    """A :class:`Metric` over a function ``fn(images, prompts, references) -> {column: (N,)}``."""

    name: str
    requires: tuple[str, ...]
    fn: Callable
    help: str = ""

    def __call__(self, images, prompts=None, references=None) -> dict[str, torch.Tensor]:
        for needed, value in (("prompts", prompts), ("references", references)):
            if needed in self.requires and value is None:
                raise ValueError(f"metric {self.name!r} needs {needed}")
        return self.fn(images, prompts, references)


METRIC_HELP = {
    "clip_t": "CLIP image-prompt cosine (raw, x100 for 'CLIP score')",
    "clip_i": "mean CLIP cosine to the reference images",
    "dino": "mean DINO CLS cosine to the reference images",
    "diversity": "mean DINO cosine distance to the other images of the prompt",
    "clip_iqa": "CLIP-IQA P('Good photo.' vs 'Bad photo.')",
    "judge": "tiny model's judge: subject similarity, attribute accuracy, corruption, diversity",
}
METRIC_NAMES = tuple(METRIC_HELP)
JUDGE_METRICS = ("judge",)  # the offline default for the bundled tiny model
PAPER_METRICS = ("clip_t", "clip_i", "dino", "diversity", "clip_iqa")


def build_metric(
    name: str,
    clip_model: str = DEFAULT_CLIP_MODEL,
    dino_model: str = DEFAULT_DINO_MODEL,
    device=None,
    batch_size: int = 32,
) -> Metric:
    """The metric ``name`` (one of :data:`METRIC_NAMES`) with its models (loaded on first call)."""
    from .clip import clip_i, clip_iqa, clip_t
    from .dino import dino
    from .diversity import dino_diversity
    from .judge import judge_metrics

    options = dict(device=device, batch_size=batch_size)
    functions = {
        "clip_t": (("prompts",), lambda i, p, r: {"clip_t": clip_t(i, p, clip_model, **options)}),
        "clip_i": (("references",), lambda i, p, r: {"clip_i": clip_i(i, r, clip_model, **options)}),
        "dino": (("references",), lambda i, p, r: {"dino": dino(i, r, dino_model, **options)}),
        "diversity": (
            ("prompts",),
            lambda i, p, r: {"diversity": dino_diversity(i, p, dino_model, **options)},
        ),
        "clip_iqa": ((), lambda i, p, r: {"clip_iqa": clip_iqa(i, clip_model, **options)}),
        "judge": (("prompts",), lambda i, p, r: judge_metrics(i, p, r)),
    }
    if name not in functions:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
    requires, fn = functions[name]
    return FunctionMetric(name, requires, fn, METRIC_HELP[name])


def parse_metric_names(names, flag: str = "--metrics") -> tuple[str, ...]:
    """'clip_t,dino' or a sequence -> validated names (duplicates dropped, order kept)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown or no metric {', '.join(unknown)!r}; choose from {', '.join(METRIC_NAMES)}")
    return names


def evaluate(
    images,
    prompts: Sequence[str] | str | None = None,
    references=None,
    metrics: Sequence[str | Metric] | str = JUDGE_METRICS,
    **options,
) -> dict[str, torch.Tensor]:
    """Runs ``metrics`` (names, or :class:`Metric` objects) on images (N, 3, H, W) in [-1, 1] with one prompt
    per image and reference images (M, 3, H', W'); ``options`` go to :func:`build_metric` (``clip_model``,
    ``dino_model``, ``device``, ``batch_size``). Returns {column: (N,) float tensor on the CPU}."""
    images = check_images(images)
    if prompts is not None:
        prompts = check_prompts(prompts, len(images))
    if references is not None:
        references = check_images(references, "references")
    if isinstance(metrics, str):
        metrics = parse_metric_names(metrics, "metrics")
    values = {}
    with feature_cache():
        for metric in metrics:
            metric = build_metric(metric, **options) if isinstance(metric, str) else metric
            for column, value in metric(images, prompts, references).items():
                values[column] = value.detach().float().cpu().reshape(len(images))
    return values


def summarize(values: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{column: {"mean", "std", "count"}} over the images where the value is defined (NaN = not defined)."""
    summary = {}
    for column, value in values.items():
        defined = value[~torch.isnan(value)]
        count = int(defined.numel())
        summary[column] = {
            "mean": float(defined.mean()) if count else math.nan,
            "std": float(defined.std()) if count > 1 else math.nan,
            "count": count,
        }
    return summary
