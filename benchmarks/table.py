"""Markdown results table (fwd+bwd incl. KL) generated from a results CSV.

    python -m benchmarks.table [--csv benchmarks/results/results.csv] > benchmarks/results/RESULTS.md
"""

from __future__ import annotations

import argparse

from .plot import latest_run, load_rows


def _ratio(value: str) -> str:
    return f"{float(value):.2f}x" if value else "-"


def markdown(rows: list[dict]) -> str:
    full = [r for r in rows if r["mode"] == "full" and r["provider"] != "deterministic"]
    head = rows[0]
    lines = [f"Measured {head['date']} on {head['device']}, torch {head['torch']}, triton {head['triton'] or '-'}, "
             f"{head['dtype']}, commit {head['commit']}. Training step = forward + backward incl. KL.", "",
             "| op | shape | provider | median ms | / deterministic | / reference | / bayesian-torch | "
             "saved B per Bayesian weight |", "|---|---|---|---|---|---|---|---|"]
    for r in full:
        per_weight = f"{float(r['saved_bytes_per_weight']):.2f}" if r["saved_bytes_per_weight"] else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {float(r['median_ms']):.2f} | "
                     f"{_ratio(r['ratio_to_deterministic'])} | {_ratio(r['ratio_to_reference'])} | "
                     f"{_ratio(r['ratio_to_bayesian_torch'])} | {per_weight} |")
    return "\n".join(lines) + "\n"


def main(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/results/results.csv")
    args = p.parse_args(input_args)
    print(markdown(latest_run(load_rows(args.csv))), end="")


if __name__ == "__main__":
    main()
