"""The bundled tiny Stable Diffusion (trained by the project on a synthetic captioned world), its judge and
few-shot subjects. Accessors return paths inside the installed package; diffusers loads only when a
pipeline is built. ``resolution`` picks the model size (``models.CONFIGS``): 32 (``tiny-sd-32``, the default)
or 64 (``tiny-sd-64``: a 16x16x4 latent and texture subjects, for the corruption-stage study).

    from diffusers import StableDiffusionPipeline
    from bayeslayers.integrations import tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.pipeline_path())
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def assets_dir(resolution: int = 32) -> Path:
    """Where a model size's assets live in the package: ``assets/`` (32 px), ``assets/tiny-sd-64/`` (64 px)."""
    from .models import get_config

    config = get_config(resolution)
    return ASSETS if resolution == 32 else ASSETS / config.name


def _asset(resolution: int, *parts) -> Path:
    path = assets_dir(resolution).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"bundled tiny-SD asset missing: {path}")
    return path


def pipeline_path(resolution: int = 32) -> Path:
    """Folder of the diffusers StableDiffusionPipeline (safetensors)."""
    return _asset(resolution, "pipeline")


def subject_path(name: str | None = None, resolution: int = 32) -> Path:
    """Folder of a few-shot subject's PNG images (names: ``subject.subjects(resolution)``; default: the model
    size's default subject)."""
    from .subject import DEFAULT_SUBJECTS, get_subject

    return _asset(resolution, "subjects", get_subject(name or DEFAULT_SUBJECTS[resolution], resolution).name)


def subject_prompts(name: str | None = None, resolution: int = 32) -> dict:
    """{'instance_prompt', 'class_prompt', 'validation_prompt', 'eval_prompts', 'look'} of a subject."""
    return json.loads((subject_path(name, resolution) / "prompts.json").read_text())


def judge_config(resolution: int = 32) -> dict:
    """The judge's architecture, attribute classes, clean-data reference and measured accuracy."""
    return json.loads(_asset(resolution, "judge_config.json").read_text())


def load_judge(resolution: int = 32):
    """The trained :class:`~bayeslayers.integrations.tiny_sd.judge.Judge` (eval mode) and its clean-data
    high-frequency reference (for :func:`~bayeslayers.integrations.tiny_sd.judge.corruption_score`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .judge import Judge

    path = _asset(resolution, "judge.safetensors")
    judge = Judge(resolution)
    judge.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as handle:
        reference = float(handle.metadata()["clean_high_frequency_energy"])
    return judge.eval(), reference
