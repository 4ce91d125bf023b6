"""Command-line flags of the DreamBooth-BNN recipe (diffusers' train_dreambooth(_lora).py names and defaults,
plus the Bayesian method flags) and their validation."""

from __future__ import annotations

import argparse
import os
import sys

from .data import check_image_dir

# The seed paper's recipe: constant LR, 5e-6 full / 1e-4 LoRA, sigma init and prior 0.01; its shipped
# scripts train sigma by the diffusion loss alone (KL weight 0).
DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4}
DEFAULT_PRESET = {"full": "dreambooth-bnn", "lora": "dreambooth-bnn-lora"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DreamBooth fine-tuning with Bayesian layers (bayeslayers).")
    add = p.add_argument
    add("--pretrained_model_name_or_path", type=str, default=None,
        help="diffusers pipeline dir or hub id; default: the bundled tiny Stable Diffusion")
    add("--revision", type=str, default=None)
    add("--variant", type=str, default=None)
    add("--instance_data_dir", type=str, default=None, help="default: the bundled subject's images")
    add("--instance_prompt", type=str, default=None, help="default: the bundled subject's instance prompt")
    add("--class_data_dir", type=str, default=None)
    add("--class_prompt", type=str, default=None)
    add("--with_prior_preservation", action="store_true")
    add("--prior_loss_weight", type=float, default=1.0)
    add("--num_class_images", type=int, default=100)
    add("--sample_batch_size", type=int, default=4)
    add("--output_dir", type=str, default="dreambooth-bnn-model")
    add("--seed", type=int, default=None)
    add("--resolution", type=int, default=None,
        help="default: the model's native resolution (512 for SD1.5)")
    add("--center_crop", action="store_true")
    add("--train_batch_size", type=int, default=4)
    add("--max_train_steps", type=int, default=400)
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", type=str, default=None, help='a checkpoint dir name or "latest"')
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--learning_rate", type=float, default=None, help="default: 5e-6 (full) / 1e-4 (lora)")
    add("--lr_scheduler", type=str, default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    add("--report_to", type=str, default="tensorboard")
    add("--logging_dir", type=str, default="logs")
    add("--validation_prompt", type=str, default=None)
    add("--num_validation_images", type=int, default=4)
    add("--validation_steps", type=int, default=100)
    add("--num_inference_steps", type=int, default=25, help="for validation and class images")
    add("--guidance_scale", type=float, default=7.5, help="for validation and class images")
    add("--rank", type=int, default=4)
    # Bayesian method
    add("--train_mode", type=str, default="full", choices=["full", "lora"])
    add("--bayesian", action=argparse.BooleanOptionalAction, default=True,
        help="--no-bayesian trains the plain baseline with the same script")
    add("--bayes_preset", type=str, default=None, help="default: dreambooth-bnn (full) / dreambooth-bnn-lora")
    add("--bayes_target_modules", type=str, default=None, help="regex or comma-separated names; overrides preset")
    add("--init_sigma", type=float, default=0.01)
    add("--prior_sigma", type=float, default=0.01)
    add("--kl_weight", type=float, default=0.0)
    add("--kl_direction", type=str, default="qp", choices=["qp", "pq"])
    return p


def tiny_sd_defaults() -> dict:
    """Model, subject images and prompts of the bundled tiny Stable Diffusion."""
    try:
        from bayeslayers.integrations import tiny_sd
    except ImportError:
        raise FileNotFoundError("the bundled tiny Stable Diffusion is not installed; pass "
                                "--pretrained_model_name_or_path and --instance_data_dir") from None
    prompts = tiny_sd.subject_prompts()
    return {"pretrained_model_name_or_path": str(tiny_sd.pipeline_path()),
            "instance_data_dir": str(tiny_sd.subject_path()), "instance_prompt": prompts["instance_prompt"],
            "class_prompt": prompts["class_prompt"], "validation_prompt": prompts["validation_prompt"]}


def _fail(message: str):
    raise ValueError(message)


def parse_args(input_args=None) -> argparse.Namespace:
    """Parses and validates the flags (every check runs before any model is loaded)."""
    args = build_parser().parse_args(input_args if input_args is not None else sys.argv[1:])
    defaults = tiny_sd_defaults() if args.pretrained_model_name_or_path is None or args.instance_data_dir is None \
        else {}
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = defaults["pretrained_model_name_or_path"]
    if args.instance_data_dir is None:
        args.instance_data_dir = defaults["instance_data_dir"]
        args.instance_prompt = args.instance_prompt or defaults["instance_prompt"]
        args.class_prompt = args.class_prompt or defaults["class_prompt"]
        args.validation_prompt = args.validation_prompt or defaults["validation_prompt"]
    if args.instance_prompt is None:
        _fail("--instance_prompt is required with your own --instance_data_dir")
    args.instance_images = check_image_dir(args.instance_data_dir, "--instance_data_dir")
    if args.with_prior_preservation:
        if args.class_data_dir is None or args.class_prompt is None:
            _fail("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.train_mode]
    if args.bayes_preset is None:
        args.bayes_preset = DEFAULT_PRESET[args.train_mode]
    import bayeslayers

    if args.bayes_preset not in bayeslayers.available_presets():
        _fail(f"--bayes_preset must be one of {bayeslayers.available_presets()}, got {args.bayes_preset!r}")
    for flag in ("kl_weight", "prior_loss_weight"):
        if getattr(args, flag) < 0:
            _fail(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("init_sigma", "prior_sigma", "learning_rate"):
        if getattr(args, flag) <= 0:
            _fail(f"--{flag} must be > 0, got {getattr(args, flag)}")
    for flag in ("train_batch_size", "max_train_steps", "checkpointing_steps", "validation_steps", "rank",
                 "gradient_accumulation_steps", "num_validation_images"):
        if getattr(args, flag) < 1:
            _fail(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.resolution is not None and args.resolution < 8:
        _fail(f"--resolution must be a positive multiple of the VAE factor, got {args.resolution}")
    args.output_dir = os.path.abspath(args.output_dir)
    return args
