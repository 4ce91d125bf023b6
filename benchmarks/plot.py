"""PNG charts from a results CSV: time ratio and saved-bytes ratio to the deterministic layer, per shape.

    python -m benchmarks.plot [--csv benchmarks/results/results.csv]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def load_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def latest_run(rows: list[dict]) -> list[dict]:
    """Rows of the newest (commit, date, device) in the file."""
    key = lambda r: (r["date"], r["commit"], r["device"])  # noqa: E731
    newest = max(rows, key=key)
    return [r for r in rows if key(r) == key(newest)]


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op in sorted({r["op"] for r in rows}):
        op_rows = [r for r in rows if r["op"] == op and r["mode"] == "full"]
        shapes = list(dict.fromkeys(r["shape"] for r in op_rows))
        providers = [p for p in dict.fromkeys(r["provider"] for r in op_rows) if p != "deterministic"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        width = 0.8 / max(1, len(providers))
        baseline = {r["shape"]: r for r in op_rows if r["provider"] == "deterministic"}
        for i, provider in enumerate(providers):
            by_shape = {r["shape"]: r for r in op_rows if r["provider"] == provider}
            xs = [j + i * width for j in range(len(shapes))]
            time_ratio = [float(by_shape[s]["ratio_to_deterministic"] or "nan") if s in by_shape else float("nan")
                          for s in shapes]
            mem_ratio = [float(by_shape[s]["saved_bytes"]) / max(1.0, float(baseline[s]["saved_bytes"]))
                         if s in by_shape and s in baseline else float("nan") for s in shapes]
            axes[0].bar(xs, time_ratio, width, label=provider)
            axes[1].bar(xs, mem_ratio, width, label=provider)
        for ax, title in zip(axes, ("fwd+bwd time / deterministic", "saved-for-backward bytes / deterministic")):
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(shapes))], shapes, rotation=20,
                          fontsize=7)
            ax.set_title(f"{op}: {title}", fontsize=9)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{rows[0]['device']} | torch {rows[0]['torch']} | {rows[0]['date']}", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{op}_{rows[0]['device'].split()[0].lower()}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/results/results.csv")
    args = p.parse_args(input_args)
    rows = latest_run(load_rows(args.csv))
    for path in plot(rows, Path(args.csv).parent):
        print(path)


if __name__ == "__main__":
    main()
