"""Curves and summary numbers of the study from its evaluation rows.

A row is one evaluation of one run: {"subject", "arm", "seed", "step", "fraction" (step / training steps),
metric columns...}, each metric the mean over that evaluation's images. A *curve* is one run's metric against
the fraction of training; the table reduces each curve to its best value, final value, where the best was
reached and the area of its dip, then averages over subjects and reports the spread over seeds.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StudyMetric:
    column: str
    label: str
    higher_is_better: bool


METRICS = (
    StudyMetric("judge_subject_similarity", "subject fidelity (judge cosine)", True),
    StudyMetric("judge_shape_accuracy", "class fidelity (judge reads the class shape)", True),
    StudyMetric("judge_prompt_accuracy", "prompt fidelity (judge reads what the prompt asks)", True),
    StudyMetric("corruption", "corruption (HF energy / training images')", False),
    StudyMetric("judge_diversity", "diversity (judge-feature distance within a prompt)", True),
    # the paper's metrics (bayeslayers-eval columns), for studies on a user's model
    StudyMetric("clip_i", "CLIP-I (subject fidelity)", True),
    StudyMetric("dino", "DINO (subject fidelity)", True),
    StudyMetric("clip_t", "CLIP-T (prompt fidelity)", True),
    StudyMetric("clip_iqa", "CLIP-IQA (quality)", True),
    StudyMetric("diversity", "diversity (DINO distance within a prompt)", True),
)


def dip_area(fraction: np.ndarray, values: np.ndarray, higher_is_better: bool = True) -> float:
    """Area between a curve and its running best, over the fraction of training (trapezoid rule).

    0 for a curve that never falls back from a value it reached; a corruption stage (fidelity rises, drops,
    recovers) gives the area of the drop. Units: metric x fraction of training."""
    order = np.argsort(fraction)
    fraction, values = np.asarray(fraction, float)[order], np.asarray(values, float)[order]
    best = np.maximum.accumulate(values) if higher_is_better else np.minimum.accumulate(values)
    gap = np.abs(best - values)
    return float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(fraction))) if len(values) > 1 else 0.0


def curves(rows: list[dict], column: str) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{(subject, arm, seed): (fractions, values)} sorted by step, rows without the column skipped."""
    grouped = defaultdict(list)
    for row in rows:
        value = row.get(column)
        if value is not None and value == value:  # not NaN
            grouped[(row["subject"], row["arm"], row["seed"])].append((float(row["fraction"]), float(value)))
    return {key: tuple(np.array(v) for v in zip(*sorted(points))) for key, points in grouped.items()}


def run_summary(fraction: np.ndarray, values: np.ndarray, higher_is_better: bool) -> dict[str, float]:
    """best, final, fraction_of_best, dip_area of one curve."""
    index = int(np.argmax(values) if higher_is_better else np.argmin(values))
    return {
        "best": float(values[index]),
        "final": float(values[-1]),
        "fraction_of_best": float(fraction[index]),
        "dip_area": dip_area(fraction, values, higher_is_better),
    }


def arm_table(rows: list[dict], arms: list[str], metrics=METRICS) -> list[dict]:
    """One row per (arm, metric): each summary averaged over subjects per seed, then mean and std over seeds."""
    table = []
    for metric in metrics:
        per_run = {
            key: run_summary(f, v, metric.higher_is_better) for key, (f, v) in curves(rows, metric.column).items()
        }
        for arm in arms:
            seeds = sorted({seed for (_, a, seed) in per_run if a == arm})
            if not seeds:
                continue
            entry = {"arm": arm, "metric": metric.column, "seeds": len(seeds)}
            for field in ("best", "final", "fraction_of_best", "dip_area"):
                per_seed = [
                    np.mean([s[field] for (_, a, sd), s in per_run.items() if a == arm and sd == seed])
                    for seed in seeds
                ]
                entry[field] = float(np.mean(per_seed))
                entry[f"{field}_std"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
            table.append(entry)
    return table


def mean_curves(rows: list[dict], column: str, arm: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fractions, mean, std over seeds) of the subject-averaged curve of ``arm``; fractions where every run of
    the arm was evaluated."""
    runs = {key: dict(zip(*curve)) for key, curve in curves(rows, column).items() if key[1] == arm}
    if not runs:
        return np.array([]), np.array([]), np.array([])
    shared = sorted(set.intersection(*(set(points) for points in runs.values())))
    seeds = sorted({seed for (_, _, seed) in runs})
    per_seed = np.array(
        [[np.mean([p[f] for (_, _, sd), p in runs.items() if sd == seed]) for f in shared] for seed in seeds]
    )
    std = per_seed.std(0, ddof=1) if len(seeds) > 1 else np.zeros(len(shared))
    return np.array(shared), per_seed.mean(0), std


def plot_curves(rows: list[dict], arms: list[str], path, metrics=METRICS, title: str = "") -> None:
    """One panel per metric (two rows when there are more than three): the subject-averaged curve of each arm,
    mean over seeds with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_of_panels = 2 if len(metrics) > 3 else 1
    columns = -(-len(metrics) // rows_of_panels)
    fig, axes = plt.subplots(
        rows_of_panels, columns, figsize=(3.6 * columns, 3.4 * rows_of_panels + 0.4), squeeze=False
    )
    for ax, metric in zip(axes.flat, metrics):
        for arm in arms:
            fraction, mean, std = mean_curves(rows, metric.column, arm)
            if len(fraction):
                (line,) = ax.plot(fraction, mean, label=arm, linewidth=1.6)
                ax.fill_between(fraction, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
        ax.set_title("\n".join(textwrap.wrap(metric.label, 36)), fontsize=10)
        ax.set_xlabel("fraction of training")
        ax.grid(alpha=0.3)
    spare = list(axes.flat[len(metrics) :])
    for ax in spare:
        ax.axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if spare:
        spare[0].legend(handles, labels, loc="center", fontsize=10, title="arm (mean over seeds, ±1 std band)")
    else:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(table: list[dict]) -> str:
    """The table as GitHub markdown: mean +- std over seeds."""
    lines = [
        "| metric | arm | best | final | best at (fraction) | dip area |",
        "|---|---|---|---|---|---|",
    ]
    for e in table:
        cells = [f"{e[f]:.3f} ± {e[f + '_std']:.3f}" for f in ("best", "final", "fraction_of_best", "dip_area")]
        lines.append(f"| {e['metric']} | {e['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SIGMA_STATS = ("mean", "p05", "p95")


def sigma_table(rows: list[dict], arms: list[str]) -> list[dict]:
    """Final sigma / sigma_0 of each arm's runs (columns ``sigma_ratio/all/<mean|p05|p95>`` the recipe reports at
    the end of training): per statistic, the mean and the min..max over runs (subjects x seeds)."""
    runs = {}
    for row in rows:
        if row.get("sigma_ratio/all/mean") not in (None, ""):
            runs.setdefault((row["arm"], row["subject"], row["seed"]), row)
    table = []
    for arm in arms:
        finals = [r for (a, _, _), r in runs.items() if a == arm]
        if not finals:
            continue
        entry = {"arm": arm, "runs": len(finals)}
        for stat in SIGMA_STATS:
            values = [float(r[f"sigma_ratio/all/{stat}"]) for r in finals]
            entry.update({stat: float(np.mean(values)), f"{stat}_min": min(values), f"{stat}_max": max(values)})
        table.append(entry)
    return table


def sigma_markdown(table: list[dict]) -> str:
    lines = [
        "| arm | runs | mean sigma/sigma_0 | 5th percentile | 95th percentile |",
        "|---|---|---|---|---|",
    ]
    for e in table:
        cells = [f"{e[s]:.4f} ({e[s + '_min']:.4f}..{e[s + '_max']:.4f})" for s in SIGMA_STATS]
        lines.append(f"| {e['arm']} | {e['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


UNCERTAINTY_TARGETS = ("judge_subject_similarity", "judge_shape_accuracy", "judge_prompt_accuracy", "corruption")


def uncertainty_summary(rows: list[dict]) -> list[dict]:
    """Per Bayesian arm and target metric: Spearman rho between per-image uncertainty and the metric, and the
    metric's mean over all images vs over the 75 % least uncertain; each computed per run, then mean and std over
    runs (subjects x seeds)."""
    from .uncertainty import filtering_gain, spearman

    runs = defaultdict(list)
    for row in rows:
        runs[(row["arm"], row["subject"], row["seed"])].append(row)
    summary = []
    for arm in sorted({key[0] for key in runs}):
        for target in UNCERTAINTY_TARGETS:
            rhos, gains, kept, everything = [], [], [], []
            for (a, _, _), images in runs.items():
                values = [r.get(target, float("nan")) for r in images]
                if a != arm or any(v != v for v in values):
                    continue
                uncertainty = [r["uncertainty"] for r in images]
                rho = spearman(uncertainty, values)
                if rho == rho:
                    rhos.append(rho)
                result = filtering_gain(uncertainty, values)
                gains.append(result["gain"])
                kept.append(result["kept"])
                everything.append(result["all"])
            if not gains:
                continue
            summary.append(
                {
                    "arm": arm,
                    "metric": target,
                    "runs": len(gains),
                    "spearman": float(np.mean(rhos)) if rhos else float("nan"),
                    "spearman_std": float(np.std(rhos, ddof=1)) if len(rhos) > 1 else 0.0,
                    "mean_all": float(np.mean(everything)),
                    "mean_kept": float(np.mean(kept)),
                    "gain": float(np.mean(gains)),
                    "gain_std": float(np.std(gains, ddof=1)) if len(gains) > 1 else 0.0,
                }
            )
    return summary


def uncertainty_markdown(summary: list[dict]) -> str:
    lines = [
        "| arm | metric | Spearman rho (uncertainty, metric) | mean, all images | mean, 75 % least uncertain | gain |",
        "|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['arm']} | {e['metric']} | {e['spearman']:.3f} ± {e['spearman_std']:.3f} | {e['mean_all']:.3f} | "
            f"{e['mean_kept']:.3f} | {e['gain']:+.3f} ± {e['gain_std']:.3f} |"
        )
    return "\n".join(lines)
