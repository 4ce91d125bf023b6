"""Peak RSS of the DreamBooth recipe on an SD1.5-architecture pipeline (random weights, 859.5M-parameter UNet),
full mode, 2 steps on CPU: plain fine-tuning against the Bayesian designs, each run a subprocess measured alone.

    python -m benchmarks.recipe_memory [--resolution 128] [--out benchmarks/results]

Every run: batch 1, AdamW (torch's, or FusedBayesAdamW) or IVON, no gradient clipping (``--max_grad_norm 0``, which the
fused optimizer needs), KL weight 0 (the recipe's default), no checkpoint, the final export included. The peak is
the child process's own ``ru_maxrss`` (``os.wait4``). Memory-heavy (~19 GiB): run it alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.sd15_pipeline import save_sd15_pipeline

GIB = 2**30
DESIGNS = {
    "plain fine-tuning": ["--no-bayesian"],
    "bayeslayers, torch AdamW, fp32 prior (before)": ["--no-fused_optimizer", "--store_prior"],
    "bayeslayers, FusedBayesAdamW, fp32 prior": ["--fused_optimizer", "--store_prior"],
    "bayeslayers, FusedBayesAdamW, no prior (default at KL 0)": ["--fused_optimizer"],
    "bayeslayers, IVON, bf16 prior": ["--optimizer", "ivon", "--prior_dtype", "bfloat16"],
    "bayeslayers, IVON, no prior": ["--optimizer", "ivon", "--no-store_prior", "--ivon_weight_decay", "0"],
}


def run(pipe: str, images: str, out: Path, resolution: int, flags: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, the optimizer the run reported) of one recipe run."""
    argv = [sys.executable, "-m", "bayeslayers.integrations.dreambooth", "--pretrained_model_name_or_path", pipe]
    argv += ["--instance_data_dir", images, "--instance_prompt", "a sks star", "--output_dir", str(out)]
    argv += ["--resolution", str(resolution), "--train_batch_size", "1", "--seed", "0", "--report_to", "none"]
    argv += ["--train_mode", "full", "--max_train_steps", "2", "--checkpointing_steps", "1000"]
    argv += ["--max_grad_norm", "0", *flags]
    started = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"recipe run failed: {' '.join(argv)}\n{Path(f'{out}.log').read_text()[-3000:]}")
    card = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    optimizer = re.search(r'"optimizer": "(\w+)"', card)  # the model card's final metrics
    return time.perf_counter() - started, usage.ru_maxrss * 1024, optimizer.group(1) if optimizer else "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    import numpy as np
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = save_sd15_pipeline(root)
        images = root / "instance"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray((rng.random((72, 80, 3)) * 255).astype("uint8")).save(images / f"{i}.png")
        for index, (design, flags) in enumerate(DESIGNS.items()):
            seconds, peak, optimizer = run(pipe, str(images), root / f"run{index}", args.resolution, flags)
            row = {"design": design, "flags": " ".join(flags), "optimizer": optimizer}
            row.update(peak_rss_bytes=peak, seconds=round(seconds, 1), resolution=args.resolution)
            print(json.dumps(row), flush=True)
            rows.append(row)
            subprocess.run(["rm", "-rf", str(root / f"run{index}")], check=True)  # ~4 GB of export per run
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "recipe_memory_sd15.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plain = rows[0]["peak_rss_bytes"]
    lines = [
        f"# Measured peak RSS: DreamBooth recipe, SD1.5 architecture, full mode, 2 steps, {args.resolution} px, CPU",
        "",
        f"Produced by `python -m benchmarks.recipe_memory --resolution {args.resolution}` (torch {torch.__version__}, "
        f"{platform.machine()}; every run `--max_grad_norm 0 --kl_weight 0`, batch 1, the final export included).",
        "",
        "| design | flags | optimizer | peak RSS (GiB) | vs plain | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['design']} | `{row['flags']}` | {row['optimizer']} | {row['peak_rss_bytes'] / GIB:.2f} | "
            f"{row['peak_rss_bytes'] / plain:.3f}x | {row['seconds']:.0f} |"
        )
    (args.out / "recipe_memory_sd15.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
