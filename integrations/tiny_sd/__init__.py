"""The bundled tiny Stable Diffusion (trained by the project on a synthetic captioned world), its judge and
few-shot subjects. Accessors return paths inside the installed package; diffusers loads only when a
pipeline is built.

    from diffusers import StableDiffusionPipeline
    from bayeslayers.integrations import tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.pipeline_path())
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def _asset(*parts) -> Path:
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"bundled tiny-SD asset missing: {path}")
    return path


def pipeline_path() -> Path:
    """Folder of the diffusers StableDiffusionPipeline (safetensors)."""
    return _asset("pipeline")


def subject_path(name: str = "checker_star") -> Path:
    """Folder of a few-shot subject's PNG images (names: ``subject.SUBJECTS``)."""
    from .subject import get_subject

    return _asset("subjects", get_subject(name).name)


def subject_prompts(name: str = "checker_star") -> dict:
    """{'instance_prompt', 'class_prompt', 'validation_prompt', 'eval_prompts', 'look'} of a subject."""
    return json.loads((subject_path(name) / "prompts.json").read_text())


def judge_config() -> dict:
    """The judge's architecture, attribute classes, clean-data reference and measured accuracy."""
    return json.loads(_asset("judge_config.json").read_text())


def load_judge():
    """The trained :class:`~bayeslayers.integrations.tiny_sd.judge.Judge` (eval mode) and its clean-data
    high-frequency reference (for :func:`~bayeslayers.integrations.tiny_sd.judge.corruption_score`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .judge import Judge

    path = _asset("judge.safetensors")
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as handle:
        reference = float(handle.metadata()["clean_high_frequency_energy"])
    return judge.eval(), reference
