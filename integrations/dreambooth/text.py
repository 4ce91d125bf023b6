"""The text side of the recipe: tokenizer (``--tokenizer_name``, ``--tokenizer_max_length``), prompt encoding
(``--text_encoder_use_attention_mask``, ``--pre_compute_text_embeddings``) and the trained, optionally Bayesian,
text encoder (``--train_text_encoder``, ``--bayes_text_encoder``)."""

from __future__ import annotations

import torch

import bayeslayers

from .args import posterior_options

# diffusers' train_dreambooth_lora.py puts text-encoder LoRA on these CLIP attention projections.
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load_tokenizer(args):
    """``--tokenizer_name`` (any name/path AutoTokenizer reads) or the pipeline's ``tokenizer/`` folder."""
    from transformers import AutoTokenizer

    if args.tokenizer_name:
        return AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
    return AutoTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision
    )


def tokenize(tokenizer, prompts, max_length: int | None = None):
    """input_ids and attention_mask (B, max_length), padded to ``max_length`` (default: model_max_length)."""
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        max_length=max_length or tokenizer.model_max_length,
    )


def encode(text_encoder, tokens, use_attention_mask: bool) -> torch.Tensor:
    """Last hidden state (B, T, D) of ``text_encoder`` for ``tokens``; the mask is passed only when asked."""
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if use_attention_mask else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


class PromptEncoder:
    """prompts -> text embeddings. With ``precompute`` the given prompts are encoded once at construction and
    the text encoder is released (``self.text_encoder`` is None afterwards), as ``--pre_compute_text_embeddings``."""

    def __init__(self, tokenizer, text_encoder, max_length=None, use_attention_mask=False, precompute=()):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.max_length, self.use_attention_mask = max_length, use_attention_mask
        self.cache = {}
        if precompute:
            with torch.no_grad():
                for prompt in dict.fromkeys(precompute):
                    self.cache[prompt] = self.encode([prompt])[0].detach()
            self.text_encoder = None

    def encode(self, prompts) -> torch.Tensor:
        if self.text_encoder is None:
            missing = [p for p in prompts if p not in self.cache]
            if missing:
                raise KeyError(f"prompt {missing[0]!r} was not pre-computed (--pre_compute_text_embeddings)")
            return torch.stack([self.cache[p] for p in prompts])
        return encode(self.text_encoder, tokenize(self.tokenizer, prompts, self.max_length), self.use_attention_mask)

    __call__ = encode


def prepare_text_encoder(text_encoder, args) -> None:
    """Makes the text encoder trainable as ``--train_text_encoder`` does in diffusers: full mode trains all its
    weights, LoRA mode adds rank-``--rank`` LoRA to its attention projections. With ``--bayes_text_encoder``
    the ``--bayes_text_encoder_preset`` layers (full) or the LoRA factors (lora) become Bayesian."""
    options = posterior_options(args)  # the UNet's posterior options
    text_encoder.to(dtype=torch.float32)
    if args.train_mode == "lora":
        unet_factors = bayeslayers.get_preset(args.bayes_preset).bayesian_factors
        bayeslayers.convert(
            text_encoder,
            target_modules=TEXT_ENCODER_LORA_TARGETS,
            mode="lora",
            rank=args.rank,
            bayesian_factors=unet_factors if args.bayes_text_encoder else "",
            **options,
        )
        return
    text_encoder.requires_grad_(True)
    if args.bayes_text_encoder:
        bayeslayers.convert(text_encoder, preset=args.bayes_text_encoder_preset, mode="full", **options)
