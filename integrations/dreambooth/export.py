"""What a finished run leaves behind: the mean model for stock diffusers, the Bayesian state, plots, card."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

import bayeslayers

BAYESIAN_STATE = "bayesian_state.safetensors"
TEXT_ENCODER_BAYESIAN_STATE = "text_encoder_bayesian_state.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_layers_state(unet) -> dict[str, torch.Tensor]:
    """peft-style LoRA keys (``<module>.lora_A.weight`` / ``lora_B.weight``) holding the posterior means.

    The scaling alpha/rank is folded into B, so the weights load with alpha = rank.
    """
    state = {}
    for name, module in bayeslayers.bayesian_modules(unet):
        if not hasattr(module, "lora_A"):
            continue
        # .weight of a factor: the plain weight, or a Bayesian factor's posterior mean
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach().float()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach().float() * module.scaling
    return state


def export_model(unet, args, text_encoder=None) -> dict[str, str]:
    """Saves the Bayesian state, then the mean model: a UNet folder (full) or LoRA weights (lora).

    With ``--train_text_encoder`` the text encoder goes along: its posterior to ``text_encoder_bayesian_state``
    (``--bayes_text_encoder``), its mean to ``text_encoder/`` (full; skipped by ``--skip_save_text_encoder``)
    or to the text-encoder keys of the LoRA file that diffusers' ``load_lora_weights`` reads (lora).
    """
    from diffusers import StableDiffusionPipeline

    out = Path(args.output_dir)
    written = {}
    if args.bayesian:
        bayeslayers.save(unet, out / BAYESIAN_STATE, metadata={"train_mode": args.train_mode})
        written["bayesian_state"] = str(out / BAYESIAN_STATE)
    if text_encoder is not None and bayeslayers.posterior_layers(text_encoder):
        bayeslayers.save(text_encoder, out / TEXT_ENCODER_BAYESIAN_STATE, metadata={"train_mode": args.train_mode})
        written["text_encoder_bayesian_state"] = str(out / TEXT_ENCODER_BAYESIAN_STATE)
    if args.train_mode == "lora":
        text_layers = lora_layers_state(text_encoder) if text_encoder is not None else None
        StableDiffusionPipeline.save_lora_weights(
            out,
            unet_lora_layers=lora_layers_state(unet),
            text_encoder_lora_layers=text_layers or None,
            safe_serialization=True,
        )
        written["lora_weights"] = str(out / LORA_WEIGHTS)
    else:
        if args.bayesian:
            bayeslayers.to_deterministic(unet)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        written["unet"] = str(out / "unet")
        if text_encoder is not None and not args.skip_save_text_encoder:
            bayeslayers.to_deterministic(text_encoder)
            text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
            written["text_encoder"] = str(out / "text_encoder")
    return written


def plot_history(history: dict, path) -> None:
    """PNG with loss, KL (total, UNet, text encoder) and mean sigma over training steps; dotted vertical lines
    mark the steps where validation grids were written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", ["loss"]),
        ("KL", ["kl", "kl_unet", "kl_text_encoder"]),
        ("mean sigma", ["mean_sigma", "mean_sigma_text_encoder"]),
    ]
    panels = [(title, [k for k in keys if history.get(k)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    validation = history.get("validation_step", [])
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(history["step"][: len(history[key])], history[key], label=key)
        for i, step in enumerate(validation):
            ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="validation" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        if title == "mean sigma":
            ax.ticklabel_format(axis="y", useOffset=False)
        if title == "KL":
            ax.set_yscale("symlog", linthresh=1e-3)
        if len(keys) > 1 or validation:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def command_line(args) -> str:
    """The command that produced the run (``args.command`` from parse_args, else this process's argv)."""
    argv = getattr(args, "command", None) or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return shlex.join(argv)


def write_model_card(args, metrics: dict, written: dict, grid=None) -> Path:
    """``output_dir/README.md``: base model, prompts, method settings, the final grid, the exact command,
    final metrics and the files written."""
    out = Path(args.output_dir)
    lines = [
        "# DreamBooth-BNN fine-tune",
        "",
        f"Base model: `{args.pretrained_model_name_or_path}`",
        f"Instance prompt: `{args.instance_prompt}`",
        f"Mode: {args.train_mode}, Bayesian: {args.bayesian}, preset: {args.bayes_preset}, "
        f"init_sigma {args.init_sigma}, prior_sigma {args.prior_sigma}, kl_weight {args.kl_weight}, "
        f"kl_direction {args.kl_direction}",
        f"Text encoder trained: {args.train_text_encoder}, Bayesian: {args.bayes_text_encoder}",
        "",
    ]
    if grid is not None:
        relative = Path(grid).resolve().relative_to(out.resolve()).as_posix()
        lines += [
            f"Final validation grid (`{args.validation_prompt}`, mean weights):",
            "",
            f"![final validation grid]({relative})",
            "",
        ]
    lines += [
        "Command:",
        "",
        "```bash",
        command_line(args),
        "```",
        "",
        "Final metrics:",
        "",
        "```",
        json.dumps(metrics, indent=2),
        "```",
        "",
        "Files:",
        "",
        *[f"- {k}: `{Path(v).name}`" for k, v in written.items()],
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
