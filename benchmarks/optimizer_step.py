"""Wall time of one whole training step (forward, backward, optimizer step) of the SD1.5-architecture UNet (random
weights, 859.5M parameters) on CPU: plain AdamW fine-tuning against the Bayesian designs, one after the other in
one process.

    python -m benchmarks.optimizer_step [--resolution 128] [--steps 3] [--out benchmarks/results]

Every design: batch 1, latents resolution/8, the diffusion MSE only (KL weight 0, as the recipe's default), the
paper preset (``dreambooth-bnn``, 198.2M Bayesian weights) on the ``cpp`` backend, one warm-up step then
``--steps`` timed steps (median reported), 2 torch threads. Memory-heavy (~12 GiB): run it alone.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bayeslayers
from bayeslayers.optim import IVON, FusedBayesAdamW
from benchmarks.memory_table import sd15_unet

LR = 1e-5


def _adamw(unet):
    return torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=LR)


def _fused(unet):
    return FusedBayesAdamW([p for p in unet.parameters() if p.requires_grad], lr=LR)


def _ivon(unet):
    return IVON(unet, lr=1e-3, ess=1e7, betas=(0.9, 0.999), weight_decay=1e-4, other_lr=LR)


# design: (convert options or None, optimizer factory)
DESIGNS = {
    "plain fine-tuning, AdamW": (None, _adamw),
    "Bayesian, AdamW, no prior": ({"store_prior": False}, _adamw),
    "Bayesian, FusedBayesAdamW, no prior": ({"store_prior": False}, _fused),
    "Bayesian, IVON, bf16 prior": ({"prior_dtype": torch.bfloat16}, _ivon),
}


def step_times(unet, optimizer, resolution: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps after one warm-up step."""
    generator = torch.Generator().manual_seed(0)
    size = resolution // 8
    latents = torch.randn(1, 4, size, size, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    unet.train()
    times = []
    for index in range(steps + 1):
        started = time.perf_counter()
        pred = unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
        F.mse_loss(pred, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:
            times.append(time.perf_counter() - started)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.resolution % 64 or args.steps < 1:
        parser.error("--resolution must be a multiple of 64 and --steps positive")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bayeslayers.set_backend("cpp")
    base = sd15_unet()
    rows = []
    for design, (options, make_optimizer) in DESIGNS.items():
        unet = copy.deepcopy(base)
        if options is not None:
            bayeslayers.convert(unet, preset="dreambooth-bnn", **options)
        optimizer = make_optimizer(unet)
        times = step_times(unet, optimizer, args.resolution, args.steps)
        rows.append(
            {
                "design": design,
                "optimizer": type(optimizer).__name__,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
            }
        )
        print(rows[-1], flush=True)
        del unet, optimizer
        gc.collect()
    bayeslayers.set_backend(None)
    plain = rows[0]["median_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "optimizer_step_sd15.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Training step with the optimizer: SD1.5 UNet, {args.resolution} px, batch 1, CPU",
        "",
        f"Produced by `python -m benchmarks.optimizer_step --resolution {args.resolution} --steps {args.steps}` "
        f"(torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "threads, `cpp` backend; forward + backward + optimizer step, median of the timed steps after one warm-up).",
        "",
        "| design | optimizer | median step (s) | min..max (s) | x plain |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['design']} | {row['optimizer']} | {row['median_s']:.2f} | {row['min_s']:.2f}..{row['max_s']:.2f} "
            f"| {row['median_s'] / plain:.2f}x |"
        )
    (args.out / "optimizer_step_sd15.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
