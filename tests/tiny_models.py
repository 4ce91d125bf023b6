"""Small diffusers models built from configs (random weights, no download), and the recipe tests' workspace."""

from pathlib import Path

import torch


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def unet_inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    return sample, timesteps, text


def save_tiny_pipeline(path, seed: int = 0) -> str:
    """Writes a random-weight tiny StableDiffusionPipeline (16x16 px, 8x8x4 latents) with a character-level
    offline CLIP tokenizer to ``path``; returns the path."""
    import json
    import string

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = str(path)
    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer_dir = f"{path}/tokenizer_src"
    import os

    os.makedirs(tokenizer_dir, exist_ok=True)
    with open(f"{tokenizer_dir}/vocab.json", "w") as handle:
        json.dump(vocab, handle)
    with open(f"{tokenizer_dir}/merges.txt", "w") as handle:
        handle.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=16)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


RECIPE_PROMPT = "a sks star"


def run_argv(output_dir, *extra) -> list[str]:
    """The flags every recipe test runs with: output in ``output_dir``, batch 2, seed 0, lr 1e-3, no trackers;
    ``extra`` flags come last (a repeated flag overrides these)."""
    common = ["--output_dir", str(output_dir), "--train_batch_size", "2", "--seed", "0", "--report_to", "none"]
    return [*common, "--learning_rate", "1e-3", *extra]


def recipe_argv(workspace, out, *extra) -> list[str]:
    """The bayeslayers-dreambooth command line every recipe test on a workspace starts from: its tiny pipeline
    and instance images, ``RECIPE_PROMPT``, output in ``root / out``, then :func:`run_argv`'s flags and
    ``extra``."""
    root, pipe, images = workspace[:3]
    model = ["--pretrained_model_name_or_path", str(pipe), "--instance_data_dir", str(images)]
    return [*model, "--instance_prompt", RECIPE_PROMPT, *run_argv(Path(root) / out, *extra)]


def recipe_workspace(root):
    """(root, tiny pipeline dir, instance image dir with 3 random 20x24 images) for the recipe tests."""
    import numpy as np
    from PIL import Image

    pipe = save_tiny_pipeline(root / "pipe")
    images = root / "instance"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(images / f"{i}.png")
    return root, pipe, str(images)


def _char_tokenizer_dir(path, max_length: int = 16):
    """A character-level CLIP tokenizer folder (vocab.json + merges.txt) that loads offline; returns the vocab."""
    import json
    import os
    import string

    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/vocab.json", "w") as handle:
        json.dump(vocab, handle)
    with open(f"{path}/merges.txt", "w") as handle:
        handle.write("#version: 0.2\n")
    return vocab


def save_tiny_clip(path, seed: int = 0) -> str:
    """A random-weight CLIPModel (32 px images, 16-d projection) with tokenizer and image processor (shortest
    edge 32, center crop 32), saved with ``save_pretrained`` to ``path``; returns the path."""
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = str(path)
    vocab = _char_tokenizer_dir(f"{path}/tokenizer_src")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPTokenizer.from_pretrained(f"{path}/tokenizer_src", model_max_length=64).save_pretrained(path)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def save_tiny_vit(path, seed: int = 0) -> str:
    """A random-weight ViTModel (DINO-style, 32 px, no pooler) with an image processor (resize 36x36, center crop
    32, ImageNet mean/std), saved to ``path``; returns the path."""
    import transformers
    from transformers import ViTConfig, ViTModel

    path = str(path)
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    transformers.ViTImageProcessorPil(
        size={"height": 36, "width": 36},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


def tiny_llama(seed: int = 0, vocab_size: int = 64):
    """A random-weight 2-layer LlamaForCausalLM (hidden 32, 4 heads, 2 KV heads, MLP 64), no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()
