"""Side-by-side microbenchmarks of Bayesian layers; appends rows to ``<out>/results.csv``.

    python -m benchmarks.run --ops linear,conv2d,lora,unet --device cpu --out benchmarks/results/ [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import subprocess
from pathlib import Path

import torch

from . import shapes as shape_sets
from .measure import mode_function, peak_memory, saved_bytes, time_call
from .providers import PROVIDERS, build, provider_available
from .unet_step import UNET_SHAPES, build_unet_step

FIELDS = ["op", "shape", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "ratio_to_deterministic",
          "ratio_to_reference", "ratio_to_bayesian_torch", "saved_bytes", "saved_bytes_per_weight", "peak_bytes",
          "device", "dtype", "torch", "triton", "commit", "date"]
MODES = ("forward", "backward", "full")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": datetime.date.today().isoformat()}


def measure_case(op, shape, device, dtype, min_run_time):
    """Rows for every available provider and mode of one (op, shape), with ratios from this same run."""
    rows = []
    for provider in PROVIDERS:
        if not provider_available(provider, op, device):
            continue
        if op == "unet":
            module, x, numel = build_unet_step(provider, shape, device, dtype)
        else:
            module, x, numel = build(provider, op, shape, device, dtype)
        stored = saved_bytes(module, x)
        for mode in MODES:
            fn = mode_function(module, x, mode)
            median, p20, p80 = time_call(fn, device, min_run_time)
            rows.append({"op": op, "shape": "x".join(map(str, shape)), "provider": provider, "mode": mode,
                         "median_ms": median, "p20_ms": p20, "p80_ms": p80, "saved_bytes": stored,
                         "saved_bytes_per_weight": stored / numel if numel else "",
                         "peak_bytes": peak_memory(fn, device) if mode == "full" else None,
                         "dtype": str(dtype).replace("torch.", "")})
    for row in rows:
        for base, column in (("deterministic", "ratio_to_deterministic"), ("reference", "ratio_to_reference"),
                             ("bayesian-torch", "ratio_to_bayesian_torch")):
            match = [r for r in rows if r["provider"] == base and r["mode"] == row["mode"]]
            row[column] = row["median_ms"] / match[0]["median_ms"] if match else ""
    return rows


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="linear,conv2d,lora,unet")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", default="benchmarks/results/")
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (checks the harness)")
    p.add_argument("--min_run_time", type=float, default=None, help="seconds per measurement")
    args = p.parse_args(input_args)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(args.ops) - {"linear", "conv2d", "lora", "unet"}
    if unknown:
        p.error(f"--ops: unknown {sorted(unknown)}")
    return args


def main(args) -> Path:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    table = shape_sets.QUICK if args.quick else (shape_sets.GPU if device.type == "cuda" else shape_sets.CPU)
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    env = environment(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("results_quick.csv" if args.quick else "results.csv")
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for op in args.ops:
            cases = UNET_SHAPES["quick" if args.quick else device.type] if op == "unet" else table[op]
            for shape in cases:
                for row in measure_case(op, shape, device, dtype, min_run_time):
                    writer.writerow({**row, **env})
                    print(f"{op:7s} {row['shape']:>16s} {row['provider']:>15s} {row['mode']:>8s} "
                          f"{row['median_ms']:9.3f} ms  x{row['ratio_to_deterministic']:.2f} det  "
                          f"saved {row['saved_bytes']} B")
                handle.flush()
    bayeslayers_reset_backend()
    return path


def bayeslayers_reset_backend():
    import bayeslayers

    bayeslayers.set_backend(None)


if __name__ == "__main__":
    main(parse_args())
