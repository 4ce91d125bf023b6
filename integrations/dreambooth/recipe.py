"""The pieces of diffusers' DreamBooth scripts the training loop composes: training length, optimizer (AdamW or
8-bit AdamW), LR schedule, noise (offset noise), the loss (prior preservation, min-SNR weighting), xformers, TF32
and the Hub upload. Each does what the diffusers flag of the same name does."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bayeslayers.optim import SigmaAdamW, posterior_param_groups

OFFSET_NOISE_SCALE = 0.1  # diffusers' train_dreambooth.py
HUB_IGNORE_PATTERNS = ["step_*", "epoch_*", "checkpoint-*", ".tmp-*", ".old-*"]


def resolve_training_length(args, steps_per_epoch: int) -> None:
    """Sets ``max_train_steps`` (from ``num_train_epochs`` when not given, else the default), recomputes
    ``num_train_epochs`` from it (as diffusers does) and turns ``validation_epochs`` into ``validation_steps``."""
    from .args import DEFAULT_MAX_TRAIN_STEPS

    if args.max_train_steps is None:
        args.max_train_steps = (
            args.num_train_epochs * steps_per_epoch if args.num_train_epochs else DEFAULT_MAX_TRAIN_STEPS
        )
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.validation_epochs is not None:
        args.validation_steps = args.validation_epochs * steps_per_epoch


def scaled_learning_rate(args, num_processes: int, learning_rate: float | None = None) -> float:
    """``--scale_lr``: LR (``learning_rate``, default the flag's) x accumulation steps x batch size x processes;
    the LR unchanged otherwise."""
    learning_rate = args.learning_rate if learning_rate is None else learning_rate
    if not args.scale_lr:
        return learning_rate
    return learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes


def optimizer_class(use_8bit_adam: bool):
    """torch AdamW, or bitsandbytes' AdamW8bit for ``--use_8bit_adam`` (ImportError naming the package)."""
    if not use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("--use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit


def build_optimizer(params, args, num_processes: int, fused: bool = False, models=()):
    """AdamW (or AdamW8bit) over ``params``; ``fused``: bayeslayers' FusedBayesAdamW, which updates the Bayesian
    layers' mu and rho in their gradient pass. With ``--rho_learning_rate`` or ``--sigma_space`` the posteriors'
    rho of ``models`` form their own group (``bayeslayers.optim.SigmaAdamW`` steps it in sigma space with
    ``--sigma_space``). ``--optimizer ivon``: ``bayeslayers.optim.IVON`` on the Bayesian layers of ``models``."""
    lr = scaled_learning_rate(args, num_processes)
    if args.optimizer == "ivon":
        from bayeslayers.optim import IVON

        return IVON(
            models,
            lr=args.ivon_learning_rate,
            ess=args.ivon_ess,
            betas=(args.adam_beta1, args.ivon_beta2),
            weight_decay=args.ivon_weight_decay,
            clip_radius=args.ivon_clip_radius,
            hess_init=args.ivon_hess_init,
            params=params,
            other_lr=lr,
            other_betas=(args.adam_beta1, args.adam_beta2),
            other_eps=args.adam_epsilon,
            other_weight_decay=args.adam_weight_decay,
        )
    if fused:
        from bayeslayers.optim import FusedBayesAdamW

        cls = FusedBayesAdamW
    else:
        cls = optimizer_class(args.use_8bit_adam)
    groups = []
    if args.rho_learning_rate is not None or args.sigma_space:
        rho_lr = scaled_learning_rate(args, num_processes, args.rho_learning_rate)
        groups = posterior_param_groups(models, lr, rho_lr, args.sigma_space, params=params)
    if any("sigma_space" in group for group in groups):  # the models hold posteriors: rho in a group of its own
        params = groups
        if args.sigma_space:
            cls = SigmaAdamW
        else:
            for group in params:
                group.pop("sigma_space", None)
    return cls(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def build_lr_scheduler(args, optimizer, num_processes: int):
    """diffusers.optimization.get_scheduler with the warmup/length/cycles/power flags (steps x processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def sample_noise(latents: torch.Tensor, offset_noise: bool) -> torch.Tensor:
    """Standard normal noise like ``latents`` (B, C, H, W); ``offset_noise`` adds 0.1 x one draw per (B, C)."""
    noise = torch.randn_like(latents)
    if offset_noise:
        noise = noise + OFFSET_NOISE_SCALE * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
        )
    return noise


def snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per sample: min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v-prediction; shape (B,)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(pred, target, timesteps, noise_scheduler, args) -> torch.Tensor:
    """MSE of the UNet's prediction (B, C, H, W), fp32; with prior preservation the second half of the batch is
    the class half, weighted by ``prior_loss_weight``; ``snr_gamma`` weights the instance half per sample."""
    pred, target = pred.float(), target.float()
    prior = None
    if args.with_prior_preservation:
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps = timesteps.chunk(2)[0]
        prior = F.mse_loss(pred_prior, target_prior)
    if args.snr_gamma is None:
        loss = F.mse_loss(pred, target)
    else:
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))
        loss = (per_sample * snr_weights(noise_scheduler, timesteps, args.snr_gamma)).mean()
    return loss if prior is None else loss + args.prior_loss_weight * prior


def enable_xformers(unet) -> None:
    """``--enable_xformers_memory_efficient_attention``; ValueError naming the package when it is missing."""
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs the xformers package "
            "(pip install xformers); it is not installed"
        )
    unet.enable_xformers_memory_efficient_attention()


def allow_tf32() -> None:
    """``--allow_tf32``: TF32 matmuls and cuDNN convolutions on Ampere and newer GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def prior_generation_dtype(precision: str | None, device) -> torch.dtype:
    """dtype of class-image generation: ``--prior_generation_precision``, else fp16 on a GPU and fp32 elsewhere."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision in table:
        return table[precision]
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def create_hub_repo(args) -> str:
    """``--push_to_hub``: creates (or reuses) the model repo; returns its id."""
    import huggingface_hub

    return huggingface_hub.create_repo(
        repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
    ).repo_id


def upload_to_hub(args, repo_id: str):
    """Uploads ``output_dir`` (model, model card, grids; not the training checkpoints) to ``repo_id``."""
    import huggingface_hub

    return huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=HUB_IGNORE_PATTERNS,
        token=args.hub_token,
    )


def class_image_pipeline(args, device):
    """The base pipeline, freshly loaded in the ``--prior_generation_precision`` dtype, for class images."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        torch_dtype=prior_generation_dtype(args.prior_generation_precision, device),
        safety_checker=None,
        requires_safety_checker=False,
        revision=args.revision,
        variant=args.variant,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
