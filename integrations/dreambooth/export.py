"""What a finished run leaves behind: the mean model for stock diffusers, the Bayesian state, plots, card."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

import bayeslayers

BAYESIAN_STATE = "bayesian_state.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_layers_state(unet) -> dict[str, torch.Tensor]:
    """peft-style LoRA keys (``<module>.lora_A.weight`` / ``lora_B.weight``) holding the posterior means.

    The scaling alpha/rank is folded into B, so the weights load with alpha = rank.
    """
    state = {}
    for name, module in bayeslayers.bayesian_modules(unet):
        if not hasattr(module, "lora_A"):
            continue
        a, b = module.lora_A, module.lora_B
        state[f"{name}.lora_A.weight"] = (a.weight_mu if hasattr(a, "weight_mu") else a.weight).detach().float()
        b_weight = (b.weight_mu if hasattr(b, "weight_mu") else b.weight).detach().float()
        state[f"{name}.lora_B.weight"] = b_weight * module.scaling
    return state


def export_model(unet, args) -> dict[str, str]:
    """Saves the Bayesian state, then the mean model: a UNet folder (full) or LoRA weights (lora)."""
    from diffusers import StableDiffusionPipeline

    out = Path(args.output_dir)
    written = {}
    if args.bayesian:
        bayeslayers.save(unet, out / BAYESIAN_STATE, metadata={"train_mode": args.train_mode})
        written["bayesian_state"] = str(out / BAYESIAN_STATE)
    if args.train_mode == "lora":
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=lora_layers_state(unet),
                                                  safe_serialization=True)
        written["lora_weights"] = str(out / LORA_WEIGHTS)
    else:
        if args.bayesian:
            bayeslayers.to_deterministic(unet)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        written["unet"] = str(out / "unet")
    return written


def plot_history(history: dict, path) -> None:
    """PNG with loss, KL and mean sigma over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "kl", "mean_sigma") if history.get(k)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(history["step"][: len(history[key])], history[key])
        ax.set_xlabel("step")
        ax.set_title(key)
        if key == "kl":
            ax.set_yscale("symlog", linthresh=1e-3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_model_card(args, metrics: dict, written: dict) -> None:
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    lines = [
        "# DreamBooth-BNN fine-tune", "",
        f"Base model: `{args.pretrained_model_name_or_path}`", f"Instance prompt: `{args.instance_prompt}`",
        f"Mode: {args.train_mode}, Bayesian: {args.bayesian}, preset: {args.bayes_preset}, "
        f"init_sigma {args.init_sigma}, prior_sigma {args.prior_sigma}, kl_weight {args.kl_weight}, "
        f"kl_direction {args.kl_direction}", "",
        "Command:", "", f"    {command}", "", "Final metrics:", "", "```", json.dumps(metrics, indent=2), "```", "",
        "Files:", "", *[f"- {k}: `{Path(v).name}`" for k, v in written.items()], "",
    ]
    Path(args.output_dir, "README.md").write_text("\n".join(lines))
