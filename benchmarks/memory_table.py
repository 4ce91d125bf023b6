"""Training memory of an SD1.5 UNet (859.5M parameters, random weights from ``sd15_unet.json``), full and LoRA
mode: parameters, gradients, optimizer state, prior and activations for plain fine-tuning, bayeslayers, and the
design of the seed paper's code (a full fp32 copy of the UNet as the prior, naive reparameterization).

    python -m benchmarks.memory_table [--resolutions 128 512] [--out benchmarks/results]

How each number is obtained (batch 1, AdamW, fp32 master weights as in the recipe):

* parameters, prior: bytes of the converted model's real tensors (``prior_mu`` buffers; the paper design's
  prior is a copy of every UNet parameter in fp32);
* gradients, optimizer state: trainable elements x 4 bytes (fp32 grads) and x 8 bytes (AdamW's two fp32
  moments) -- for LoRA mode also measured after a real backward + AdamW step;
* activations: bytes of the tensors autograd saves for backward during one real training forward on CPU
  (``saved_tensors_hooks``, counted once per storage, parameters and buffers excluded). The "naive" Bayesian
  path (the reference backend, as a hand-written layer or the paper's code) also saves eps, sigma and the
  sampled weight of every Bayesian layer; bayeslayers' fused backends save only the input and a seed.

These counts are device-independent: the same tensors exist on a GPU. A GPU run adds the CUDA context and
allocator slack (not included) and its attention kernel may save other tensors than CPU SDPA does.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import platform
import time
from pathlib import Path

import torch

import bayeslayers
from bayeslayers.optim import IVON, FusedBayesAdamW

SD15_CONFIG = Path(__file__).parent / "sd15_unet.json"
GIB = 2**30
COMPONENTS = ("parameters", "gradients", "optimizer", "prior", "activations")


def sd15_unet():
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(SD15_CONFIG.read_text()).items() if not k.startswith("_")}
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_bytes(unet, resolution: int) -> int:
    """Bytes autograd saves for backward in one forward at ``resolution`` px (latents resolution/8)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    keep = {t.untyped_storage().data_ptr() for t in list(unet.parameters()) + list(unet.buffers())}
    live: dict[int, StorageWeakRef] = {}
    total = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in keep or storage.device.type == "meta":
            return None
        known = live.get(pointer)
        if known is None or known.expired():  # a storage not counted yet (or a freed one's address reused)
            live[pointer] = StorageWeakRef(storage)
            total[0] += storage.nbytes()
        return None  # nothing is kept (backward never runs), so the measurement itself stays small

    size = resolution // 8
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, size, size, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    unet.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        out = unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    del out
    return total[0]


def measured_lora_step(unet, trainable, fused=False) -> tuple[int, int]:
    """(gradient bytes, optimizer state bytes) after one real step at 64 px (``fused``: FusedBayesAdamW, "ivon":
    IVON)."""
    if fused == "ivon":
        optimizer = IVON(unet, lr=1e-3, ess=1e7, weight_decay=1e-4 if layers_store_prior(unet) else 0.0, other_lr=1e-4)
    else:
        optimizer = (FusedBayesAdamW if fused else torch.optim.AdamW)(trainable, lr=1e-4)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    loss = unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample.square().mean()
    layers = bayeslayers.posterior_layers(unet)
    if layers and layers_store_prior(unet) and fused != "ivon":
        loss = loss + 1e-3 * bayeslayers.kl_loss(unet)
    loss.backward()
    optimizer.step()
    grads = nbytes(p.grad for p in trainable if p.grad is not None)
    state = nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    optimizer.zero_grad(set_to_none=True)
    return grads, state


def layers_store_prior(unet) -> bool:
    return all(layer.store_prior for _, layer in bayeslayers.posterior_layers(unet))


def configurations():
    """(mode, design, convert options or None, backend for activations, paper-style full prior copy, optimizer:
    False for AdamW, True for FusedBayesAdamW, "ivon" for IVON)."""
    fused = "FusedBayesAdamW"
    for mode, preset in (("full", "dreambooth-bnn"), ("lora", "dreambooth-bnn-lora")):
        plain = None if mode == "full" else {"preset": preset, "mode": "lora", "bayesian_factors": ""}
        bayes = {"preset": preset, "mode": mode}
        bf16, no_prior = {**bayes, "prior_dtype": torch.bfloat16}, {**bayes, "store_prior": False}
        yield mode, "plain fine-tuning", plain, "cpp", False, False
        yield mode, "bayeslayers", bayes, "cpp", False, False
        yield mode, "bayeslayers, prior_dtype=bfloat16", bf16, "cpp", False, False
        yield mode, "bayeslayers, store_prior=False", no_prior, "cpp", False, False
        yield mode, f"bayeslayers + {fused}", bayes, "cpp", False, True
        yield mode, f"bayeslayers + {fused}, prior_dtype=bfloat16", bf16, "cpp", False, True
        yield mode, f"bayeslayers + {fused}, store_prior=False (recipe default at KL 0)", no_prior, "cpp", False, True
        yield mode, "bayeslayers + IVON, prior_dtype=bfloat16", bf16, "cpp", False, "ivon"
        yield mode, "bayeslayers + IVON, weight_decay=0, store_prior=False", no_prior, "cpp", False, "ivon"
        yield mode, "paper code design (fp32 UNet copy as prior, naive layers)", bayes, "reference", True, False


def gradient_bytes(trainable, layers, fused: bool) -> int:
    """fp32 gradients of ``trainable``; with the fused optimizer the Bayesian layers' d_mu and d_rho exist only
    inside their layer's backward: the other gradients plus the largest layer's pair."""
    total = 4 * sum(p.numel() for p in trainable)
    if fused is not True or not layers:
        return total
    bayesian = [layer.weight_mu.numel() for _, layer in layers]
    return total - 8 * sum(bayesian) + 8 * max(bayesian)


def optimizer_bytes(trainable, layers, optimizer) -> int:
    """AdamW: two fp32 moments per trainable element. IVON: one (g_m) per Bayesian mean, none for rho (it holds
    the Hessian estimate), AdamW's two for the rest."""
    total = 8 * sum(p.numel() for p in trainable)
    if optimizer != "ivon":
        return total
    return total - 12 * sum(layer.weight_mu.numel() for _, layer in layers)


def measure(resolutions) -> list[dict]:
    base = sd15_unet()
    total_unet = sum(p.numel() for p in base.parameters())
    rows, activations = [], {}
    for mode, design, options, backend, full_prior, fused in configurations():
        started = time.perf_counter()
        unet = copy.deepcopy(base)
        if options is not None:
            bayeslayers.convert(unet, **options)
        bayeslayers.set_backend(backend)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        layers = bayeslayers.posterior_layers(unet)
        row = {
            "mode": mode,
            "design": design,
            "unet_parameters": total_unet,
            "trainable_elements": sum(p.numel() for p in trainable),
            "bayesian_weights": sum(layer.weight_mu.numel() for _, layer in layers),
            "parameters": nbytes(unet.parameters()),
            "gradients": gradient_bytes(trainable, layers, fused),
            "optimizer": optimizer_bytes(trainable, layers, fused),
            "prior": 4 * total_unet
            if full_prior
            else nbytes(layer.prior_mu for _, layer in layers if layer.prior_mu is not None),
        }
        # the prior and the optimizer do not change what a forward saves: measured once per model and backend
        model_key = json.dumps([mode, backend, {k: str(v) for k, v in (options or {}).items() if "prior" not in k}])
        for resolution in resolutions:
            key = (model_key, resolution)
            if key not in activations:
                activations[key] = activation_bytes(unet, resolution)
            row[f"activations_{resolution}px"] = activations[key]
        if mode == "lora":
            row["gradients_measured"], row["optimizer_measured"] = measured_lora_step(unet, trainable, fused)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({k: v for k, v in row.items()}), flush=True)
        rows.append(row)
        del unet, trainable, layers
        gc.collect()
    bayeslayers.set_backend(None)
    return rows


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown(rows, resolutions) -> str:
    environment = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    lines = [
        "# SD1.5 UNet training memory (GiB), batch 1, AdamW, fp32 master weights",
        "",
        f"Produced by `python -m benchmarks.memory_table` ({environment}). Parameters and prior: bytes of the "
        "model's tensors; gradients = trainable elements x 4 B, optimizer = x 8 B (AdamW moments; for LoRA "
        "mode also measured after a real step and equal); IVON keeps one moment per Bayesian mean and none for "
        "rho (4 B instead of AdamW's 16 B for the pair); with FusedBayesAdamW the Bayesian layers' d_mu and "
        "d_rho live only inside their layer's backward, so gradients = the other trainable elements x 4 B plus "
        "the largest Bayesian layer's pair; activations: bytes autograd saves in one CPU training forward. "
        "Device-independent: a GPU holds the same tensors (plus CUDA context and allocator slack; its attention "
        "kernel may save other tensors than CPU SDPA). x plain: total over plain fine-tuning's in the same mode.",
        "",
    ]
    header = ["mode", "design", "trainable (M)", "Bayesian weights (M)", *COMPONENTS[:4]]
    header += [f"activations {r}px" for r in resolutions] + [f"total {r}px" for r in resolutions]
    header += [f"x plain {r}px" for r in resolutions]
    plain_totals = {
        (row["mode"], r): sum(row[c] for c in COMPONENTS[:4]) + row[f"activations_{r}px"]
        for row in rows
        if row["design"] == "plain fine-tuning"
        for r in resolutions
    }
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        fixed = sum(row[c] for c in COMPONENTS[:4])
        cells = [
            row["mode"],
            row["design"],
            f"{row['trainable_elements'] / 1e6:.1f}",
            f"{row['bayesian_weights'] / 1e6:.1f}",
            *(gib(row[c]) for c in COMPONENTS[:4]),
        ]
        cells += [gib(row[f"activations_{r}px"]) for r in resolutions]
        cells += [gib(fixed + row[f"activations_{r}px"]) for r in resolutions]
        cells += [f"{(fixed + row[f'activations_{r}px']) / plain_totals[(row['mode'], r)]:.3f}" for r in resolutions]
        lines.append("| " + " | ".join(cells) + " |")
    lora = [r for r in rows if r["mode"] == "lora"]
    lines += [
        "",
        "LoRA mode, measured after one real backward + AdamW step: "
        + "; ".join(
            f"{r['design']}: gradients {r['gradients_measured'] / 2**20:.2f} MiB, optimizer "
            f"{r['optimizer_measured'] / 2**20:.2f} MiB"
            for r in lora
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="rebuild the table from the JSON lines a previous run printed instead of measuring",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.rows is None:
        rows = measure(args.resolutions)
    else:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.startswith("{")]
    args.out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(args.out / "memory_sd15.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args.resolutions)
    measured = args.out / "recipe_memory_sd15.md"  # written by benchmarks.recipe_memory
    if measured.exists():
        text += "\n" + measured.read_text().replace("# ", "## ", 1)
    (args.out / "memory_sd15.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
