"""Side-by-side benchmarks of Bayesian layers; appends rows to ``<out>/results.csv`` (``results_quick.csv``).

    python -m benchmarks.run --ops linear,conv2d,lora,unet --device cpu|cuda --out benchmarks/results/ [--quick]

On CPU the providers of one shape are timed in interleaved rounds, so drifting background load hits all alike.
"""

from __future__ import annotations

import argparse
import csv
import gc
from pathlib import Path

import torch

import bayeslayers
from bayeslayers.kernels.paths.fusion import set_fusion_policy

from .environment import environment
from .measure import MODES, peak_bytes, sample_times, saved_bytes, state_bytes, step_function, summarize
from .providers import COMPILED_PROVIDERS, build, providers, unavailable_reason
from .shapes import shape_sets
from .unet_step import build_unet

OPS = ("linear", "conv2d", "lora", "unet")
RATIO_BASES = {
    "deterministic": "ratio_to_deterministic",
    "reference": "ratio_to_reference",
    "bayesian-torch": "ratio_to_bayesian_torch",
}
FIELDS = [
    "op",
    "shape",
    "provider",
    "mode",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "samples",
    *RATIO_BASES.values(),
    "saved_bytes",
    "saved_bytes_per_weight",
    "extra_saved_bytes_per_weight",
    "peak_bytes",
    "state_bytes",
    "bayesian_weights",
    "dtype",
    "device",
    "torch",
    "triton",
    "bayeslayers",
    "commit",
    "date",
    "notes",
]


def build_case(provider, op, shape, device):
    return build_unet(provider, shape, device) if op == "unet" else build(provider, op, shape, device)


def measure_group(names, op, shape, device, dtype, budget_s, rounds) -> list[dict]:
    """Rows of the providers ``names`` for one shape; their timings interleave over ``rounds`` rounds."""
    cases = {name: build_case(name, op, shape, device) for name in names}
    memory = {
        name: {
            "saved_bytes": "" if case.compiled else saved_bytes(case.module, case.x, dtype),
            "state_bytes": state_bytes(case.module),
            "bayesian_weights": case.bayesian_weights,
        }
        for name, case in cases.items()
    }
    rows = []
    for mode in MODES:
        fns = {name: step_function(case.module, case.x, mode, dtype) for name, case in cases.items()}
        times = {name: [] for name in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name] += sample_times(fns[name], device, budget_s / rounds)
        for name in names:
            median, p20, p80 = summarize(times[name])
            rows.append(
                {
                    "op": op,
                    "shape": "x".join(map(str, shape)),
                    "provider": name,
                    "mode": mode,
                    "median_ms": median,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "samples": len(times[name]),
                    "peak_bytes": peak_bytes(fns[name], device) if mode == "full" else "",
                    "dtype": str(dtype).replace("torch.", ""),
                    **memory[name],
                }
            )
        del fns
    del cases
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Time ratios to the baselines' rows of the same mode, and saved bytes per Bayesian weight."""
    by_key = {(r["provider"], r["mode"]): r for r in rows}
    for row in rows:
        for base, column in RATIO_BASES.items():
            other = by_key.get((base, row["mode"]))
            row[column] = row["median_ms"] / other["median_ms"] if other else ""
        plain = by_key.get(("deterministic", row["mode"]))
        n = row["bayesian_weights"]
        counted = row["saved_bytes"] != "" and plain is not None and plain["saved_bytes"] != ""
        row["saved_bytes_per_weight"] = row["saved_bytes"] / n if n and row["saved_bytes"] != "" else ""
        row["extra_saved_bytes_per_weight"] = (row["saved_bytes"] - plain["saved_bytes"]) / n if n and counted else ""
    return rows


def measure_shape(op, shape, device, dtype, budget_s, rounds, only=None) -> list[dict]:
    """Rows of every available provider (or of those in ``only``) for one shape."""
    names = []
    for name in providers():
        if only is not None and name not in only:
            continue
        reason = unavailable_reason(name, op, device)
        if reason:
            print(f"skip {name} for {op}: {reason}")
        else:
            names.append(name)
    # A full-size UNet per provider at once would not fit next to the others: measure those one by one.
    groups = [[name] for name in names] if op == "unet" and device.type == "cuda" else [names]
    rows = [row for group in groups for row in measure_group(group, op, shape, device, dtype, budget_s, rounds)]
    return add_ratios(rows)


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (autocast; parameters stay fp32). Default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--out", default="benchmarks/results/")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings (keeps the harness alive)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per provider, mode and shape")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: 3 on cpu, 1 cuda)")
    p.add_argument("--notes", default="", help="free text stored with every row (e.g. machine state)")
    p.add_argument("--shapes", default="", help="comma-separated shapes to keep, as the CSV writes them (1024x320x320)")
    p.add_argument("--providers", default="", help="comma-separated providers to time (default: every available one)")
    args = p.parse_args(input_args)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.shapes = {s.strip() for s in args.shapes.split(",") if s.strip()}
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {OPS}")
    return args


def main(args) -> Path:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    budget_s = args.budget or (0.02 if args.quick else 1.5)
    rounds = args.rounds or (3 if device.type == "cpu" and not args.quick else 1)
    shapes = shape_sets(device.type, args.quick)
    env = environment(device, args.notes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("results_quick.csv" if args.quick else "results.csv")
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        try:
            for op in args.ops:
                for shape in shapes[op]:
                    if args.shapes and "x".join(map(str, shape)) not in args.shapes:
                        continue
                    # --quick keeps the harness alive: the compiled providers' Inductor builds take minutes
                    only = [p for p in providers() if p not in COMPILED_PROVIDERS] if args.quick else None
                    if args.providers:
                        only = [p for p in (only or providers()) if p in args.providers]
                    for row in measure_shape(op, shape, device, dtype, budget_s, rounds, only):
                        writer.writerow({**row, **env})
                        print(
                            f"{op:6s} {row['shape']:>15s} {row['provider']:>14s} {row['mode']:>8s} "
                            f"{row['median_ms']:9.3f} ms  x{row['ratio_to_deterministic']:.2f} det  "
                            f"saved {row['saved_bytes'] or '-':>10} B  peak {row['peak_bytes'] or '-':>10} B"
                        )
                    handle.flush()
        finally:
            bayeslayers.set_backend(None)
            set_fusion_policy(None)
    return path


if __name__ == "__main__":
    print(main(parse_args()))
