"""Command-line flags of the DreamBooth-BNN recipe: every flag of diffusers' ``train_dreambooth.py`` and
``train_dreambooth_lora.py`` (same names, types and meaning), plus the Bayesian method flags, and their validation.

Defaults that differ from diffusers' (each for a reason the README gives): ``--learning_rate`` (the seed paper's
5e-6 full / 1e-4 LoRA), ``--lr_warmup_steps`` 0 (the paper's constant LR), ``--resolution`` (the model's native
size), ``--max_train_steps`` 400 when neither it nor ``--num_train_epochs`` is given, ``--output_dir``,
``--validation_scheduler`` accepts DDIMScheduler too.
"""

from __future__ import annotations

import argparse
import os
import sys

from bayeslayers.config import OPTIMIZER_FIELDS, POSTERIOR_FIELDS, BayesConfig

from .data import INTERPOLATION_MODES, check_image_dir

# The seed paper's recipe: constant LR, 5e-6 full / 1e-4 LoRA, sigma init and prior 0.01; its shipped
# scripts train sigma by the diffusion loss alone (KL weight 0).
DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4}
DEFAULT_PRESET = {"full": "dreambooth-bnn", "lora": "dreambooth-bnn-lora"}
DEFAULT_TEXT_ENCODER_PRESET = "clip-text-bnn"
DEFAULT_MAX_TRAIN_STEPS = 400
VALIDATION_SCHEDULERS = ["DPMSolverMultistepScheduler", "DDPMScheduler", "DDIMScheduler"]
PROG = "bayeslayers-dreambooth"


def _diffusers_flags(add) -> None:
    """The flags of diffusers' two DreamBooth scripts, in their order."""
    add(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="diffusers pipeline dir or hub id; default: the bundled tiny Stable Diffusion",
    )
    add("--revision", type=str, default=None)
    add("--variant", type=str, default=None)
    add("--tokenizer_name", type=str, default=None, help="tokenizer name or path if not the model's own")
    add("--instance_data_dir", type=str, default=None, help="default: the bundled subject's images")
    add("--class_data_dir", type=str, default=None)
    add("--instance_prompt", type=str, default=None, help="default: the bundled subject's instance prompt")
    add("--class_prompt", type=str, default=None)
    add("--with_prior_preservation", action="store_true")
    add("--prior_loss_weight", type=float, default=1.0)
    add("--num_class_images", type=int, default=100)
    add("--output_dir", type=str, default="dreambooth-bnn-model")
    add("--seed", type=int, default=None)
    add("--resolution", type=int, default=None, help="default: the model's native resolution (512 for SD1.5)")
    add("--center_crop", action="store_true")
    add(
        "--train_text_encoder",
        action="store_true",
        help="train the text encoder too (full: all its weights; lora: LoRA on its attention projections)",
    )
    add("--train_batch_size", type=int, default=4)
    add("--sample_batch_size", type=int, default=4)
    add(
        "--num_train_epochs",
        type=int,
        default=None,
        help="epochs of max(#instance, #class) images; used when --max_train_steps is not given",
    )
    add(
        "--max_train_steps",
        type=int,
        default=None,
        help=f"overrides --num_train_epochs; default {DEFAULT_MAX_TRAIN_STEPS} when neither is given",
    )
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", type=str, default=None, help='a checkpoint dir name or "latest"')
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--learning_rate", type=float, default=None, help="default: 5e-6 (full) / 1e-4 (lora)")
    add("--scale_lr", action="store_true", help="multiply the LR by #processes x accumulation x batch size")
    add("--lr_scheduler", type=str, default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts")
    add("--lr_power", type=float, default=1.0, help="power of the polynomial scheduler")
    add("--use_8bit_adam", action="store_true", help="AdamW8bit from bitsandbytes")
    add("--dataloader_num_workers", type=int, default=0, help="subprocesses that load and resize the images")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0, help="global gradient-norm clipping; 0: none")
    add("--push_to_hub", action="store_true", help="upload --output_dir to the Hugging Face Hub at the end")
    add("--hub_token", type=str, default=None)
    add("--hub_model_id", type=str, default=None, help="default: the name of --output_dir")
    add("--logging_dir", type=str, default="logs")
    add("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs")
    add("--report_to", type=str, default="tensorboard")
    add("--validation_prompt", type=str, default=None)
    add("--num_validation_images", type=int, default=4)
    add("--validation_steps", type=int, default=100)
    add(
        "--validation_epochs",
        type=int,
        default=None,
        help="validate every X epochs (the LoRA script's flag); overrides --validation_steps when given",
    )
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    add(
        "--prior_generation_precision",
        type=str,
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="dtype of class-image generation; default fp16 on a GPU, else fp32",
    )
    add("--local_rank", type=int, default=-1)
    add("--enable_xformers_memory_efficient_attention", action="store_true")
    add("--set_grads_to_none", action="store_true", help="optimizer.zero_grad(set_to_none=True)")
    add("--offset_noise", action="store_true", help="add 0.1 x per-channel noise (crosslabs' offset noise)")
    add("--snr_gamma", type=float, default=None, help="min-SNR loss weighting gamma (5.0 recommended)")
    add(
        "--pre_compute_text_embeddings",
        action="store_true",
        help="encode the prompts once and free the text encoder (not with --train_text_encoder)",
    )
    add("--tokenizer_max_length", type=int, default=None, help="default: the tokenizer's model_max_length")
    add("--text_encoder_use_attention_mask", action="store_true")
    add("--skip_save_text_encoder", action="store_true", help="do not export the trained text encoder")
    add(
        "--validation_images",
        default=None,
        nargs="+",
        help="images for image-conditioned pipelines; StableDiffusionPipeline takes none (rejected)",
    )
    add("--class_labels_conditioning", default=None, help='"timesteps" passes the timesteps as UNet class labels')
    add("--validation_scheduler", type=str, default="DPMSolverMultistepScheduler", choices=VALIDATION_SCHEDULERS)
    add("--rank", type=int, default=4, help="LoRA rank")
    add(
        "--image_interpolation_mode",
        type=str,
        default="bicubic",
        choices=sorted(INTERPOLATION_MODES),
        help="resampling filter for resizing training images",
    )


def _extra_flags(add) -> None:
    add("--num_inference_steps", type=int, default=25, help="for validation and class images")
    add("--guidance_scale", type=float, default=7.5, help="for validation and class images")
    add("--eval_steps", type=int, default=None, help="score a fixed evaluation set every N steps (and at 0, end)")
    add(
        "--eval_prompts",
        type=str,
        default=None,
        help="text file (one prompt a line) or JSON list; default: the bundled subject's evaluation prompts, "
        "else --validation_prompt / --instance_prompt",
    )
    add("--num_eval_images", type=int, default=4, help="images per evaluation prompt (seeds fixed)")
    add(
        "--eval_num_inference_steps",
        type=int,
        default=None,
        help="denoising steps of the evaluation images (their cost); default: --num_inference_steps",
    )
    add(
        "--eval_reference_dir",
        type=str,
        default=None,
        help="the subject's reference images for CLIP-I / DINO / judge similarity; default: --instance_data_dir",
    )
    add(
        "--eval_metrics",
        type=str,
        default=None,
        help="comma-separated bayeslayers-eval metrics; default: judge (bundled tiny model), else "
        "clip_t,clip_i,dino,diversity,clip_iqa",
    )
    add(
        "--eval_clip_model",
        type=str,
        default=None,
        help="CLIP hub id or folder (default openai/clip-vit-large-patch14)",
    )
    add("--eval_dino_model", type=str, default=None, help="DINO hub id or folder (default facebook/dino-vits16)")


def _bayesian_flags(add) -> None:
    add("--train_mode", type=str, default="full", choices=["full", "lora"])
    add(
        "--bayesian",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-bayesian trains the plain baseline with the same script",
    )
    add(
        "--use_peft",
        action="store_true",
        help="lora mode: add the LoRA with peft (unet.add_adapter) and make its factors Bayesian in place, so the "
        "trained UNet is a peft model (disable_adapter, merging, get_peft_model_state_dict work on it)",
    )
    add("--bayes_preset", type=str, default=None, help="default: dreambooth-bnn (full) / dreambooth-bnn-lora")
    add("--bayes_target_modules", type=str, default=None, help="regex or comma-separated names; overrides preset")
    add(
        "--bayes_text_encoder",
        action="store_true",
        help="with --train_text_encoder: make the text encoder Bayesian too (KL in the same loss)",
    )
    add(
        "--bayes_text_encoder_preset",
        type=str,
        default=DEFAULT_TEXT_ENCODER_PRESET,
        help="full mode: which text-encoder layers become Bayesian (lora mode: its LoRA up factors)",
    )
    # --init_sigma, --prior_sigma, --kl_direction, --prior_dtype, --store_prior (default: only with --kl_weight > 0)
    BayesConfig.add_arguments(add, POSTERIOR_FIELDS, defaults={"store_prior": None})
    BayesConfig.add_arguments(add, OPTIMIZER_FIELDS)  # --rho_learning_rate, --sigma_space (docs/posterior.md)
    add("--kl_weight", type=float, default=0.0)
    add(
        "--optimizer",
        type=str,
        default="adamw",
        choices=["adamw", "ivon"],
        help="adamw: torch AdamW (or FusedBayesAdamW, AdamW8bit); ivon: bayeslayers.optim.IVON on the Bayesian "
        "layers (sigma is its Hessian estimate; the prior enters through --ivon_weight_decay, so --kl_weight 0), "
        "AdamW at --learning_rate on the rest (docs/optim.md)",
    )
    add("--ivon_learning_rate", type=float, default=1e-3, help="IVON's learning rate (its own scale, not AdamW's)")
    add("--ivon_ess", type=float, default=1e7, help="IVON's effective sample size: sigma^2 = 1 / (ess (h + delta))")
    add("--ivon_beta2", type=float, default=0.999, help="IVON's Hessian averaging (its first moment: --adam_beta1)")
    add(
        "--ivon_weight_decay",
        type=float,
        default=1e-4,
        help="IVON's delta: prior precision per unit of ess, centred on the pretrained weights (a stored prior)",
    )
    add("--ivon_hess_init", type=float, default=None, help="IVON's initial h (default: from --init_sigma)")
    add("--ivon_clip_radius", type=float, default=float("inf"), help="bound on each weight's IVON step")
    add(
        "--fused_optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update mu and rho inside each Bayesian layer's gradient pass (bayeslayers.optim.FusedBayesAdamW: no "
        "gradient tensors for them); default: wherever it applies (not with --max_grad_norm > 0, gradient "
        "accumulation, fp16, --use_8bit_adam, or several processes)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="DreamBooth fine-tuning with Bayesian layers (bayeslayers).")
    _diffusers_flags(p.add_argument)
    _extra_flags(p.add_argument)
    _bayesian_flags(p.add_argument)
    return p


def tiny_sd_defaults() -> dict:
    """Model, subject images and prompts of the bundled tiny Stable Diffusion."""
    try:
        from bayeslayers.integrations import tiny_sd
    except ImportError:
        raise FileNotFoundError(
            "the bundled tiny Stable Diffusion is not installed; pass "
            "--pretrained_model_name_or_path and --instance_data_dir"
        ) from None
    prompts = tiny_sd.subject_prompts()
    return {
        "pretrained_model_name_or_path": str(tiny_sd.pipeline_path()),
        "instance_data_dir": str(tiny_sd.subject_path()),
        "instance_prompt": prompts["instance_prompt"],
        "class_prompt": prompts["class_prompt"],
        "validation_prompt": prompts["validation_prompt"],
        "eval_prompts": prompts.get("eval_prompts"),
    }


def posterior_options(args) -> dict:
    """The posterior's ``BayesConfig`` options as the flags set them (``--init_sigma`` ... ``--store_prior``;
    ``--store_prior`` unset: a prior only with ``--kl_weight`` > 0 or ``--optimizer ivon``, since nothing else
    reads it)."""
    options = {name: getattr(args, name) for name in POSTERIOR_FIELDS}
    if options["store_prior"] is None:  # IVON centres its prior (weight decay) on the stored one
        options["store_prior"] = args.kl_weight > 0 or args.optimizer == "ivon"
    return options


def _fail(message: str):
    raise ValueError(message)


def _check_ranges(args) -> None:
    for flag in ("kl_weight", "prior_loss_weight", "adam_weight_decay", "max_grad_norm"):
        if getattr(args, flag) < 0:
            _fail(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("init_sigma", "prior_sigma", "learning_rate", "lr_power"):
        if getattr(args, flag) <= 0:
            _fail(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.rho_learning_rate is not None and args.rho_learning_rate <= 0:
        _fail(f"--rho_learning_rate must be > 0, got {args.rho_learning_rate}")
    for flag in (
        "train_batch_size",
        "checkpointing_steps",
        "validation_steps",
        "rank",
        "sample_batch_size",
        "gradient_accumulation_steps",
        "num_validation_images",
        "lr_num_cycles",
        "max_train_steps",
        "num_train_epochs",
        "validation_epochs",
        "tokenizer_max_length",
        "eval_steps",
        "num_eval_images",
        "eval_num_inference_steps",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            _fail(f"--{flag} must be a positive integer, got {value}")
    for flag in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, flag) < 0:
            _fail(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.store_prior is False and args.kl_weight > 0:
        _fail(f"--no-store_prior needs --kl_weight 0 (the KL reads the prior), got --kl_weight {args.kl_weight}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        _fail(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.resolution is not None and args.resolution < 8:
        _fail(f"--resolution must be a positive multiple of the VAE factor, got {args.resolution}")


def fused_optimizer_blocker(args, num_processes: int = 1) -> str:
    """Why ``--fused_optimizer`` cannot serve this run, naming the flag to change ('' when it can)."""
    reasons = [
        (not args.bayesian, "--no-bayesian trains no Bayesian layers"),
        (args.max_grad_norm > 0, "--max_grad_norm > 0 clips by the norm of all gradients (--max_grad_norm 0: off)"),
        (args.gradient_accumulation_steps > 1, "--gradient_accumulation_steps > 1 needs the summed gradients"),
        (args.mixed_precision == "fp16", "--mixed_precision fp16 needs GradScaler's inf check first (bf16 works)"),
        (args.use_8bit_adam, "--use_8bit_adam is another optimizer"),
        (args.sigma_space, "--sigma_space steps sigma with SigmaAdamW"),
        (args.optimizer != "adamw", f"--optimizer {args.optimizer} is another optimizer"),
        (num_processes > 1, "several processes (DDP) are not supported by it yet"),
    ]
    return next((reason for blocked, reason in reasons if blocked), "")


def use_fused_optimizer(args, num_processes: int) -> bool:
    """``--fused_optimizer`` resolved: on where it applies unless turned off; a ValueError when asked for where it
    does not apply."""
    reason = fused_optimizer_blocker(args, num_processes)
    if args.fused_optimizer and reason:
        _fail(f"--fused_optimizer cannot be used here: {reason}; pass --no-fused_optimizer")
    return args.fused_optimizer is not False and not reason


def _check_combinations(args) -> None:
    if args.fused_optimizer:
        use_fused_optimizer(args, 1)  # fails early when a flag rules it out
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        _fail("--train_text_encoder cannot be used with --pre_compute_text_embeddings")
    if args.bayes_text_encoder and not args.train_text_encoder:
        _fail("--bayes_text_encoder needs --train_text_encoder (a frozen text encoder has no posterior to learn)")
    if args.bayes_text_encoder and not args.bayesian:
        _fail("--bayes_text_encoder cannot be used with --no-bayesian")
    if args.use_peft and args.train_mode != "lora":
        _fail("--use_peft needs --train_mode lora (it adds the LoRA adapter with peft)")
    if args.use_peft and args.train_text_encoder:
        _fail("--use_peft trains the UNet's adapter only; drop --train_text_encoder or --use_peft")
    if args.optimizer == "ivon":
        _check_ivon(args)
    if args.sigma_space and args.use_8bit_adam:
        _fail("--sigma_space steps sigma with SigmaAdamW (fp32 moments); it cannot be used with --use_8bit_adam")
    if args.validation_images is not None:
        _fail(
            "--validation_images is for image-conditioned pipelines (e.g. DeepFloyd IF super-resolution); "
            "the Stable Diffusion text-to-image pipeline this recipe trains takes no input image"
        )
    if args.class_labels_conditioning not in (None, "timesteps"):
        _fail(f"--class_labels_conditioning must be 'timesteps', got {args.class_labels_conditioning!r}")
    if args.hub_token is not None and args.report_to == "wandb":
        _fail(
            "--hub_token together with --report_to=wandb would expose the token in the wandb logs; "
            "log in with `hf auth login` instead"
        )


def _check_ivon(args) -> None:
    for flag in ("ivon_learning_rate", "ivon_ess", "ivon_clip_radius"):
        if not getattr(args, flag) > 0:
            _fail(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if not 0 <= args.ivon_beta2 < 1:
        _fail(f"--ivon_beta2 must be in [0, 1), got {args.ivon_beta2}")
    if args.ivon_weight_decay < 0:
        _fail(f"--ivon_weight_decay must be >= 0, got {args.ivon_weight_decay}")
    conflicts = [
        (not args.bayesian, "--no-bayesian (IVON steps Bayesian layers)"),
        (args.kl_weight > 0, "--kl_weight > 0 (IVON's prior is --ivon_weight_decay: pass --kl_weight 0)"),
        (args.sigma_space, "--sigma_space (IVON sets sigma itself)"),
        (args.rho_learning_rate is not None, "--rho_learning_rate (IVON sets sigma itself)"),
        (args.use_8bit_adam, "--use_8bit_adam"),
        (bool(args.fused_optimizer), "--fused_optimizer"),
        (
            args.store_prior is False and args.ivon_weight_decay > 0,
            "--no-store_prior and --ivon_weight_decay > 0 (the prior is its centre; --ivon_weight_decay 0: none)",
        ),
    ]
    for conflict, flag in conflicts:
        if conflict:
            _fail(f"--optimizer ivon cannot be used with {flag}")


def _resolve_evaluation(args, bundled_prompts) -> None:
    """``args.eval_prompt_list`` and the ``--eval_metrics`` default; names are checked here, models load later."""
    from bayeslayers.integrations.metrics.models import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
    from bayeslayers.integrations.metrics.registry import JUDGE_METRICS, PAPER_METRICS, parse_metric_names

    from .evaluation import is_bundled_model, read_eval_prompts

    args.eval_prompt_list = None
    if args.eval_steps is None:
        return
    if args.eval_prompts is not None:
        args.eval_prompt_list = read_eval_prompts(args.eval_prompts)
    else:
        args.eval_prompt_list = list(bundled_prompts or [args.validation_prompt or args.instance_prompt])
    if args.eval_metrics is None:
        bundled = is_bundled_model(args.pretrained_model_name_or_path)
        args.eval_metrics = ",".join(JUDGE_METRICS if bundled else PAPER_METRICS)
    args.eval_metrics = ",".join(parse_metric_names(args.eval_metrics, "--eval_metrics"))
    args.eval_num_inference_steps = args.eval_num_inference_steps or args.num_inference_steps
    args.eval_reference_dir = args.eval_reference_dir or args.instance_data_dir
    args.eval_reference_images = check_image_dir(args.eval_reference_dir, "--eval_reference_dir")
    args.eval_clip_model = args.eval_clip_model or DEFAULT_CLIP_MODEL
    args.eval_dino_model = args.eval_dino_model or DEFAULT_DINO_MODEL


def parse_args(input_args=None) -> argparse.Namespace:
    """Parses and validates the flags (every check runs before any model is loaded).

    ``args.command`` records the command line (``bayeslayers-dreambooth`` + the flags) for the model card.
    """
    argv = list(input_args) if input_args is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.command = [PROG, *argv]
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    defaults = (
        tiny_sd_defaults() if args.pretrained_model_name_or_path is None or args.instance_data_dir is None else {}
    )
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

    presets = bayeslayers.available_presets()
    if args.bayes_preset not in presets:
        _fail(f"--bayes_preset must be one of {presets}, got {args.bayes_preset!r}")
    if args.bayes_text_encoder and args.bayes_text_encoder_preset not in presets:
        _fail(f"--bayes_text_encoder_preset must be one of {presets}, got {args.bayes_text_encoder_preset!r}")
    _check_ranges(args)
    _check_combinations(args)
    _resolve_evaluation(
        args, defaults.get("eval_prompts") if args.instance_data_dir == defaults.get("instance_data_dir") else None
    )
    args.output_dir = os.path.abspath(args.output_dir)
    return args
