"""The bundled tiny Stable Diffusion (trained by the project on a synthetic captioned world), its judge and a
held-out few-shot subject. Accessors return paths inside the installed package; diffusers loads only when a
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


def subject_path() -> Path:
    """Folder of the held-out subject's PNG images."""
    return _asset("subject")


def subject_prompts() -> dict[str, str]:
    """{'instance_prompt', 'class_prompt', 'validation_prompt'} for the held-out subject."""
    return json.loads(_asset("subject", "prompts.json").read_text())


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
