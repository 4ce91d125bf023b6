"""PNG charts from a results CSV, one per op and device: fwd+bwd time, saved bytes and peak memory as ratios to
the deterministic layer, per shape and provider (newest run of each device).

    python -m benchmarks.plot [--csv benchmarks/results/results.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

PANELS = (
    ("median_ms", "fwd+bwd+KL time"),
    ("saved_bytes", "bytes saved for backward"),
    ("peak_bytes", "peak memory of the step"),
)


def load_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of the newest run (date) of each device."""
    newest = {}
    for row in rows:
        newest[row["device"]] = max(newest.get(row["device"], ""), row["date"])
    return {device: [r for r in rows if r["device"] == device and r["date"] == date] for device, date in newest.items()}


def _ratio(row: dict | None, base: dict | None, column: str) -> float:
    try:
        return float(row[column]) / float(base[column])
    except (TypeError, ValueError, ZeroDivisionError, KeyError):
        return math.nan


def plot_op(rows: list[dict], op: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["op"] == op and r["mode"] == "full"]
    shapes = list(dict.fromkeys(r["shape"] for r in full))
    providers = [p for p in dict.fromkeys(r["provider"] for r in full) if p != "deterministic"]
    cell = {(r["provider"], r["shape"]): r for r in full}
    width = 0.8 / max(1, len(providers))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for ax, (column, title) in zip(axes, PANELS):
        for i, provider in enumerate(providers):
            values = [_ratio(cell.get((provider, s)), cell.get(("deterministic", s)), column) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(
            [j + width * (len(providers) - 1) / 2 for j in range(len(shapes))], shapes, rotation=20, fontsize=7
        )
        ax.set_title(f"{op}: {title} / deterministic", fontsize=9)
    axes[0].legend(fontsize=7)
    head = full[0]
    fig.suptitle(
        f"{head['device']} | {head['dtype']} | torch {head['torch']} | {head['commit']} | {head['date']}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def device_tag(device: str) -> str:
    """File-name tag of a device: ``cpu-<vendor>`` for CPUs ("AMD EPYC, 2 threads" -> ``cpu-amd``), so runs of
    two CPU machines do not overwrite each other's charts; the model's last word for GPUs."""
    if "threads" in device:
        return "cpu-" + device.split()[0].lower().replace("(r)", "").strip(",")
    return device.split()[-1].lower().replace("/", "-")


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (device, op) of the newest run of each device; returns the paths."""
    written = []
    for device, run_rows in latest_runs(rows).items():
        for op in dict.fromkeys(r["op"] for r in run_rows):
            written.append(plot_op(run_rows, op, Path(out_dir) / f"{op}_{device_tag(device)}.png"))
    return written


def main(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/results/results.csv")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = p.parse_args(input_args)
    for path in plot(load_rows(args.csv), Path(args.out or Path(args.csv).parent)):
        print(path)


if __name__ == "__main__":
    main()
