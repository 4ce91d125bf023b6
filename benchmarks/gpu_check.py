"""The whole GPU verification in one command (``make gpu-check``): tests, benchmarks, UNet step, roofline ratios.

    python -m benchmarks.gpu_check [--out benchmarks/results] [--budget 0.25] [--dry-run]

On a CUDA machine: the ``gpu``-marked tests; linear / conv2d / LoRA benchmarks at the SD1.5 shapes of batch 1
(every provider: deterministic, reference, bayesian-torch, torch, triton with the measured fusion policy, triton
with each path forced); the SD1.5-architecture UNet training step (random weights, 512 px, batch 1, bf16
autocast) for the same providers; rows appended to ``<out>/results.csv`` with device, driver, versions and date;
plots, ``RESULTS.md``, the README summary, the measured fusion choices (``fusion_choices.json``) and
``GPU_CHECK.md``: each Bayesian provider's time ratio to the deterministic one next to the roofline's
prediction for the same shape (``benchmarks/roofline.py``, forward + backward). Budget: under 8 minutes on
one H100. Without CUDA it says so and exits with status 2.

``--dry-run`` runs the same steps on CPU with tiny shapes, the Triton kernels under TRITON_INTERPRET=1, a
wall-clock timer for the fusion choices and ``--out`` defaulting to a scratch folder: it checks the script, not
speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("linear", "conv2d", "lora", "unet")
GPU_TESTS = ["tests/"]
DRY_RUN_TESTS = ["tests/test_fused_gemm.py"]
# Dry run: one Triton program per kernel (the interpreter's cost is per program), and on the UNet only the
# baselines and the measured triton policy (each forced path takes seconds per interpreted UNet step).
DRY_RUN_SHAPES = {"linear": [(16, 16, 16)], "conv2d": [(1, 4, 4)], "lora": [(16, 16, 16, 2)], "unet": [(1, 4, "nano")]}
DRY_RUN_UNET_PROVIDERS = ("deterministic", "bayesian-torch", "triton")


def gpu_shapes() -> dict:
    """Batch-1 SD1.5 shapes (benchmarks/shapes.py) and the 512 px UNet."""
    from .shapes import GPU

    linear = [s for s in GPU["linear"] if s[0] in (4096, 1024, 256, 77)]
    return {
        "linear": linear,
        "conv2d": [s for s in GPU["conv2d"] if s[0] == 1],
        "lora": [s for s in GPU["lora"] if s[0] in (4096, 1024, 256) and s[3] == 4],
        "unet": [(1, 64, "sd15")],
    }


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def run_gpu_tests(dry_run: bool) -> tuple[int, str]:
    """``pytest -m gpu``; returns (exit status, last summary line)."""
    files = DRY_RUN_TESTS if dry_run else GPU_TESTS
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return run.returncode, lines[-1] if lines else run.stderr[-500:]


def roofline_gpu(device_name: str) -> str:
    name = device_name.lower()
    return "a100" if "a100" in name else "4090" if "4090" in name else "h100"


FORWARD_BACKWARD = ("forward", "backward")


def predicted_ratio(op: str, shape: tuple, provider: str, gpu) -> float | None:
    """Roofline ratio (forward + backward) of ``provider`` to the deterministic layer at a benchmark shape."""
    from . import roofline
    from .providers import FUSED_PROVIDERS

    path = {"triton": "fastest", **{p: p.split(":")[1] for p in FUSED_PROVIDERS}}.get(provider)
    if path is None:
        return None

    def seconds(kernels):
        return sum(k.time(gpu) for k in kernels if k.phase in FORWARD_BACKWARD)

    if op == "linear" and path in (*roofline.LINEAR_PATHS, "fastest"):
        m, k, n = shape
        paths = roofline.LINEAR_PATHS if path == "fastest" else [path]
        bayes = min(seconds(roofline.bayesian_linear(m, n, k, p, 4)) for p in paths)
        return bayes / seconds(roofline.deterministic_linear(m, n, k))
    if op == "lora" and path == "fastest":
        m, k, n, rank = shape
        bayes = min(seconds(roofline.lora_linear(m, n, k, rank, p, prior_bytes=4)) for p in roofline.LORA_PATHS)
        return bayes / seconds(roofline.lora_linear(m, n, k, rank, "unfused_lora", bayesian_b=False))
    if op == "lora" and path == "fused_lora":
        m, k, n, rank = shape
        return seconds(roofline.lora_linear(m, n, k, rank, "fused_lora", prior_bytes=4)) / seconds(
            roofline.lora_linear(m, n, k, rank, "unfused_lora", bayesian_b=False)
        )
    return None


def unet_predicted_ratio(provider: str, gpu, shape: tuple) -> float | None:
    from . import roofline
    from .providers import FUSED_PROVIDERS

    path = {"triton": None, **{p: p.split(":")[1] for p in FUSED_PROVIDERS}}.get(provider, "missing")
    if path == "missing" or shape[2] != "sd15":
        return None
    layers = roofline.unet_layers("sd15", "dreambooth-bnn", shape[1] * 8, shape[0])

    def seconds(layer, p):
        return sum(k.time(gpu) for k in roofline.layer_kernels(layer, p, False) if k.phase in FORWARD_BACKWARD)

    floor = sum(seconds(layer, None) for layer in layers)
    paths = [path] if path else list(roofline.LINEAR_PATHS)
    bayes = sum(min(seconds(layer, p) for p in paths) if layer.converted else seconds(layer, None) for layer in layers)
    return bayes / floor


def summary_table(rows: list[dict], device_name: str) -> str:
    from . import roofline

    gpu = roofline.GPUS[roofline_gpu(device_name)]
    lines = [
        f"| op | shape | provider | fwd+bwd+KL ms | measured / deterministic | roofline / deterministic "
        f"({gpu.name}) | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["mode"] != "full":
            continue
        shape = tuple(int(v) if v.isdigit() else v for v in row["shape"].split("x"))
        if row["op"] == "unet":
            predicted = unet_predicted_ratio(row["provider"], gpu, shape)
        else:
            predicted = predicted_ratio(row["op"], shape, row["provider"], gpu)
        measured = row.get("ratio_to_deterministic", "")
        peak = int(row.get("peak_bytes") or 0)
        cells = [
            row["op"],
            row["shape"],
            row["provider"],
            f"{float(row['median_ms']):.3f}",
            f"{float(measured):.2f}" if measured != "" else "–",
            f"{predicted:.2f}" if predicted else "–",
            f"{peak / 2**20:.1f}" if peak else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/results, or a scratch folder with --dry-run)",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per provider, mode and shape")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {OPS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before bayeslayers loads them
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it needs one (make gpu-check DRY_RUN=1 checks the script on CPU)")
        return 2
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.dry_run and "bayeslayers.kernels.triton.philox" in sys.modules and not interpreted:
        print("gpu-check --dry-run: the kernels were imported without TRITON_INTERPRET=1")
        return 2

    import bayeslayers
    from bayeslayers.kernels.paths import timing as path_timing
    from bayeslayers.kernels.paths.fusion import set_fusion_policy

    from . import plot, providers, table
    from .environment import environment
    from .run import FIELDS, measure_shape

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.dry_run else ROOT / "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (0.01 if args.dry_run else 0.25)
    shapes = DRY_RUN_SHAPES if args.dry_run else gpu_shapes()
    env = environment(device, f"gpu-check{' dry run' if args.dry_run else ''}; driver {driver_version() or '?'}")
    print(f"gpu-check on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['notes']})")

    status = 0
    if not args.skip_tests:
        code, line = run_gpu_tests(args.dry_run)
        print(f"gpu tests: {line}")
        status |= code not in (0, 5)  # 5: nothing collected

    if args.dry_run:  # the measured policy, timed by the wall clock (the default selector times CUDA only)

        def wall_clock(path, step):
            begin = time.perf_counter()
            step()
            return time.perf_counter() - begin

        selector = path_timing.PathSelector(
            timer=wall_clock,
            cache_dir=out,
            may_time=lambda d, grad: grad and torch.is_grad_enabled() and not torch.compiler.is_compiling(),
        )
    else:
        selector = path_timing.path_selector()
    providers.INTERPRETED_TRITON = args.dry_run
    csv_path = out / "results.csv"
    new = not csv_path.exists()
    rows = []
    try:
        with open(csv_path, "a", newline="") as handle, path_timing.using_path_selector(selector):
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for op in args.ops:
                for shape in shapes[op]:
                    only = DRY_RUN_UNET_PROVIDERS if args.dry_run and op == "unet" else None
                    for row in measure_shape(op, shape, device, dtype, budget, 1, only):
                        row = {**row, **env}
                        writer.writerow(row)
                        rows.append(row)
                    handle.flush()
                    print(
                        f"{op} {'x'.join(map(str, shape))}: "
                        + ", ".join(
                            f"{r['provider']} {float(r['median_ms']):.2f} ms"
                            for r in rows
                            if r["mode"] == "full" and r["op"] == op and r["shape"] == "x".join(map(str, shape))
                        )
                    )
    finally:
        providers.INTERPRETED_TRITON = False
        bayeslayers.set_backend(None)
        set_fusion_policy(None)
    (out / "fusion_choices.json").write_text(
        json.dumps(
            {"device": env["device"], "choices": selector.choices, "timings": selector.timings},
            indent=1,
            sort_keys=True,
        )
    )
    all_rows = plot.load_rows(csv_path)
    plot.plot(all_rows, out)
    (out / "RESULTS.md").write_text(table.markdown(all_rows))
    readme = ROOT / "README.md"
    if not args.dry_run and readme.exists():
        readme.write_text(table.replace_readme_block(readme.read_text(), table.summary(all_rows)))
    report = (
        f"# gpu-check: {env['device']}\n\n{env['date']} · driver {driver_version() or '?'} · torch "
        f"{env['torch']} · triton {env['triton']} · bayeslayers {env['bayeslayers']} · commit {env['commit']}"
        f" · {str(dtype).removeprefix('torch.')}\n\n"
        + summary_table(rows, env["device"])
        + f"\nMeasured fusion choices: {len(selector.choices)} shape classes ({out / 'fusion_choices.json'}).\n"
    )
    (out / "GPU_CHECK.md").write_text(report)
    print(report)
    print(
        f"gpu-check {'dry run ' if args.dry_run else ''}finished in {time.perf_counter() - start:.0f} s; "
        f"results in {out}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
