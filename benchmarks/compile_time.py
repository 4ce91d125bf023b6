"""Compile time of a converted UNet against the plain one: the first torch.compile'd training step minus a
steady-state step, side by side in one run.

    python -m benchmarks.compile_time [--config tiny] [--backend auto] [--out benchmarks/results/]

Writes ``compile_time.csv`` (appends a row per model) and prints the ratio converted / plain.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

import bayeslayers

from .environment import environment
from .unet_step import build_unet

FIELDS = [
    "config",
    "model",
    "backend",
    "first_step_s",
    "steady_step_s",
    "compile_s",
    "ratio_to_plain",
    "device",
    "torch",
    "bayeslayers",
    "commit",
    "date",
]


def _train_step(case):
    out, kl = case.module(case.x)
    loss = out.float().square().mean() + (0.0 if kl is None else 1e-6 * kl)
    loss.backward()


def compile_seconds(provider: str, config: str, device: torch.device, steady_steps: int = 3) -> tuple[float, float]:
    """(first compiled step, median steady-state step) in seconds for a fresh compile of ``provider``."""
    torch._dynamo.reset()
    case = build_unet(provider, (1, 16 if config != "sd15" else 64, config), device)
    start = time.perf_counter()
    _train_step(case)
    first = time.perf_counter() - start
    steady = []
    for _ in range(steady_steps):
        start = time.perf_counter()
        _train_step(case)
        steady.append(time.perf_counter() - start)
    return first, sorted(steady)[len(steady) // 2]


def main(args) -> list[dict]:
    device = torch.device(args.device)
    bayeslayers.set_backend(args.backend)
    env = environment(device, "")
    from torch._inductor import config as inductor_config

    inductor_config.force_disable_caches = True  # every compile from scratch, as a user's first one
    rows = []
    compile_seconds("deterministic:compiled", "micro", device, steady_steps=1)  # Inductor's one-time start-up costs
    for provider, model in (("deterministic:compiled", "plain"), ("auto:compiled", "converted (dreambooth-bnn)")):
        first, steady = compile_seconds(provider, args.config, device)
        rows.append(
            {
                "config": args.config,
                "model": model,
                "backend": bayeslayers.get_backend(),
                "first_step_s": round(first, 2),
                "steady_step_s": round(steady, 4),
                "compile_s": round(first - steady, 2),
                **{k: env[k] for k in ("device", "torch", "bayeslayers", "commit", "date") if k in env},
            }
        )
    for row in rows:
        row["ratio_to_plain"] = round(row["compile_s"] / rows[0]["compile_s"], 3)
        print(
            f"{row['model']:>28s}: compile {row['compile_s']:7.1f} s  (x{row['ratio_to_plain']:.2f} plain), "
            f"steady step {row['steady_step_s'] * 1e3:8.1f} ms"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compile_time.csv"
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return rows


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=["micro", "tiny", "sd15"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="benchmarks/results/")
    return p.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
