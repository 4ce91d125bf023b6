"""Loading the metric models (transformers CLIPModel / ViTModel, by hub id or local path) once per process."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

from .images import Preprocessing

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # CLIP-T / CLIP-I / CLIP-IQA of DreamBooth and the BNN paper
DEFAULT_DINO_MODEL = "facebook/dino-vits16"  # DINO of DreamBooth and the BNN paper
CLIP_FLAG = "--clip_model (recipe: --eval_clip_model)"  # named in loading errors
DINO_FLAG = "--dino_model (recipe: --eval_dino_model)"


@dataclass
class LoadedModel:
    """A metric model in eval mode on ``device`` with its preprocessing (and tokenizer for CLIP)."""

    model: torch.nn.Module
    preprocess: Preprocessing
    tokenizer: object = None
    device: torch.device = torch.device("cpu")

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocess(images.to(self.device))


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _image_processor(name_or_path: str, flag: str):
    transformers = _quiet_transformers()
    try:
        return transformers.AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise OSError(f"{flag} {name_or_path!r}: cannot read its image processor config ({error})") from error


@lru_cache(maxsize=4)
def load_clip(name_or_path: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> LoadedModel:
    """CLIPModel + tokenizer + preprocessing from a hub id or a folder (``save_pretrained`` layout)."""
    transformers = _quiet_transformers()
    try:
        model = transformers.CLIPModel.from_pretrained(name_or_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise OSError(f"{CLIP_FLAG} {name_or_path!r}: cannot load a CLIP model and tokenizer ({error})") from error
    preprocess = Preprocessing.from_processor(_image_processor(name_or_path, CLIP_FLAG))
    return LoadedModel(model.eval().requires_grad_(False).to(device), preprocess, tokenizer, torch.device(device))


@lru_cache(maxsize=4)
def load_dino(name_or_path: str = DEFAULT_DINO_MODEL, device: str = "cpu") -> LoadedModel:
    """ViTModel (no pooler: the CLS token is the feature) + preprocessing from a hub id or a folder."""
    transformers = _quiet_transformers()
    try:
        model = transformers.ViTModel.from_pretrained(name_or_path, add_pooling_layer=False)
    except (OSError, ValueError) as error:
        raise OSError(f"{DINO_FLAG} {name_or_path!r}: cannot load a ViT model ({error})") from error
    preprocess = Preprocessing.from_processor(_image_processor(name_or_path, DINO_FLAG))
    return LoadedModel(model.eval().requires_grad_(False).to(device), preprocess, None, torch.device(device))


def resolve_device(device=None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


_FEATURES: dict | None = None  # while evaluate() runs: (kind, model, id(images)) -> (images, features)


@contextmanager
def feature_cache():
    """Within the block, image features of the same tensor and model are computed once (CLIP-T, CLIP-I and
    CLIP-IQA share the CLIP image embeddings; DINO and diversity the DINO ones)."""
    global _FEATURES
    outer, _FEATURES = _FEATURES, {} if _FEATURES is None else _FEATURES
    try:
        yield
    finally:
        _FEATURES = outer


def cached_features(kind: str, model, images, compute):
    """``compute()`` once per (kind, model, images tensor) inside :func:`feature_cache`, every time outside."""
    if _FEATURES is None or not isinstance(model, str):
        return compute()
    key = (kind, model, id(images))
    if key not in _FEATURES:
        _FEATURES[key] = (images, compute())  # keeps the tensor alive, so its id stays its own
    return _FEATURES[key][1]
