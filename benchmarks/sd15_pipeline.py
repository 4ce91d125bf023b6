"""A random-weight StableDiffusionPipeline with the SD1.5 architecture (configs in tests/data/sd15, 859.5M-parameter
UNet), saved with save_pretrained as a user's SD1.5 folder: what the SD1.5-scale test and the recipe memory
benchmark train on."""

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "sd15"


def save_sd15_pipeline(path) -> str:
    """Random-weight SD1.5-architecture pipeline (fp32) with a character-level offline CLIP tokenizer."""
    import string

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    source = path / "tokenizer_src"
    source.mkdir(parents=True, exist_ok=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(source, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "unet.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((CONFIGS / "vae.json").read_text()))
    text_encoder = CLIPTextModel(CLIPTextConfig(**json.loads((CONFIGS / "text_encoder.json").read_text())))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "pipe")
    return str(path / "pipe")
