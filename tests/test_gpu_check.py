"""``make gpu-check``'s script: without CUDA it refuses; ``--dry-run`` runs every step on CPU (tiny shapes, Triton
interpreter, wall-clock fusion choices) and writes the documented files. Checks the script, not speeds."""

import csv
import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_without_cuda_it_says_so_and_fails(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--skip-tests"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    assert gpu_check.main(["--dry-run", "--skip-tests", "--out", str(tmp_path), "--budget", "0.001"]) == 0
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    full = {(r["op"], r["provider"]) for r in rows if r["mode"] == "full"}
    for provider in ("triton", "triton:sample_then_gemm", "triton:sample_in_gemm", "triton:dw_epilogue"):
        assert ("linear", provider) in full
    assert ("lora", "triton:fused_lora") in full and ("conv2d", "bayesian-torch") in full
    assert {("unet", p) for p in gpu_check.DRY_RUN_UNET_PROVIDERS} <= full
    assert all("gpu-check dry run" in r["notes"] and r["date"] and r["torch"] for r in rows)
    choices = json.loads((tmp_path / "fusion_choices.json").read_text())
    assert choices["choices"] and all(len(t) >= 2 for t in choices["timings"].values())  # paths were timed
    report = (tmp_path / "GPU_CHECK.md").read_text()
    assert "| linear | 16x16x16 | triton:sample_in_gemm |" in report and "roofline / deterministic" in report
    assert (tmp_path / "RESULTS.md").exists() and list(tmp_path.glob("*.png"))


def test_roofline_predictions_for_benchmark_shapes():
    gpu = gpu_check.roofline_gpu("NVIDIA A100-SXM4-80GB")
    assert gpu == "a100" and gpu_check.roofline_gpu("NVIDIA H100 80GB HBM3") == "h100"
    from benchmarks.roofline import GPUS

    h100 = GPUS["h100"]
    forced = gpu_check.predicted_ratio("linear", (4096, 320, 320), "triton:sample_in_gemm", h100)
    best = gpu_check.predicted_ratio("linear", (4096, 320, 320), "triton", h100)
    assert forced > best > 1.0
    assert gpu_check.predicted_ratio("linear", (4096, 320, 320), "deterministic", h100) is None
    assert gpu_check.predicted_ratio("lora", (4096, 320, 320, 4), "triton:fused_lora", h100) < 1.0
