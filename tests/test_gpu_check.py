"""``make gpu-check``'s script: without CUDA it refuses; ``--dry-run`` runs every phase on CPU (tiny shapes, Triton
interpreter, wall-clock fusion choices) in a virtual environment that mimics a GPU image (the test environment's
packages less diffusers, bayesian-torch and any install of bayeslayers), first without wheels (it names what is
missing and skips by budget), then with a folder of wheels. Checks the script, not speeds."""

import csv
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import bayeslayers
from benchmarks import gpu_check, gpu_correctness

ROOT = Path(__file__).resolve().parents[1]
# What a GPU image lacks (and an install of bayeslayers: the image runs it from the tree).
NOT_ON_THE_IMAGE = re.compile(
    r"^(diffusers|bayesian_torch|importlib_metadata|bayeslayers|__editable__|torchvision)", re.I
)
WHEELS = ("diffusers", "bayesian-torch", "importlib_metadata")


def image_python(tmp_path: Path) -> Path:
    """A venv whose packages are this environment's, less ``NOT_ON_THE_IMAGE`` (linked in through a .pth file)."""
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    mirror = tmp_path / "image-site"
    mirror.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not NOT_ON_THE_IMAGE.match(entry.name) and entry.suffix != ".pth":
            (mirror / entry.name).symlink_to(entry)
    (site / "image.pth").write_text(f"{mirror}\n")
    return venv / "bin" / "python"


def repack_wheel(distribution: str, folder: Path) -> Path:
    """A wheel of an installed distribution rebuilt from its RECORD (what tools/fetch_wheels.sh downloads)."""
    dist = importlib.metadata.distribution(distribution)
    name = re.sub(r"[-.]+", "_", dist.metadata["Name"])
    path = folder / f"{name}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for file in dist.files:
            if not str(file).startswith("..") and "__pycache__" not in file.parts:
                wheel.write(dist.locate_file(file), str(file))
    return path


def run_gpu_check(python: Path, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [str(python), "-m", "benchmarks.gpu_check", "--dry-run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def phase_status(report: str, phase: str) -> str:
    return re.search(rf"^\| {phase} \| [^|]* \| ([^|]*) \|", report, re.M).group(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_without_cuda_it_says_so_and_fails(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--skip-tests"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_on_an_image_without_the_wheels_it_names_what_is_missing_and_skips_by_budget(tmp_path):
    python = image_python(tmp_path)
    probe = "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('diffusers', 'bayesian_torch', 'peft')])"
    assert (
        subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip() == "[False, False, True]"
    )
    out = tmp_path / "out"
    run = run_gpu_check(python, "--out", str(out), "--wheels", str(tmp_path / "no-wheels"), "--budget-seconds", "2")
    report = (out / "GPU_CHECK.md").read_text()
    why = f"not installed and no diffusers wheel in {tmp_path / 'no-wheels'}"
    assert f"missing diffusers (the SD1.5 UNet step and the diffusers-based tests skipped): {why}" in report
    assert "missing bayesian_torch" in report and "nothing checked" in report
    for phase in ("correctness", "micro", "roofline"):
        assert phase_status(report, phase).startswith("skipped: needs ~"), phase
    assert phase_status(report, "unet").startswith("skipped: diffusers missing")
    assert "bayeslayers 0.1.0" in report and "dry run" in run.stdout  # imported from the tree: nothing installed
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.FILES)


@pytest.mark.slow
def test_dry_run_on_an_image_with_the_wheels_runs_every_phase(tmp_path):
    python = image_python(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for distribution in WHEELS:
        repack_wheel(distribution, wheels)
    out = tmp_path / "out"
    run = run_gpu_check(python, "--out", str(out), "--wheels", str(wheels), "--budget-seconds", "900")
    report = (out / "GPU_CHECK.md").read_text()
    assert "installed from wheels" in report and "diffusers-" in report and "missing" not in report, run.stdout
    for phase in ("correctness", "micro", "unet", "roofline"):
        assert phase_status(report, phase) == "ran", (phase, report)
    assert report.count("**pass**") == 1 and "C++ CPU kernels: built and loaded" in report
    files = list(out.iterdir())
    assert sorted(p.name for p in files) == sorted(gpu_check.FILES)
    assert len(files) <= 8 and all(p.stat().st_size < 1 << 20 for p in files)

    with open(out / "correctness.csv", newline="") as handle:
        checks = list(csv.DictReader(handle))
    ran = {(r["op"], r["backend"], r["path"]) for r in checks if r["result"] == "pass"}
    for backend in ("reference", "torch", "cpp", "triton"):
        assert {("linear", backend, "default"), ("conv2d", backend, "default"), ("lora", backend, "default")} <= ran
    assert {("linear", "triton", p) for p in ("sample_then_map", "sample_in_gemm", "weight_grad_epilogue")} <= ran
    assert ("lora", "triton", "fused_lora") in ran and not [r for r in checks if r["result"] == "FAIL"]
    assert [r["result"] for r in checks if r["check"] == "philox"] == ["pass"]

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    full = {(r["op"], r["provider"]) for r in rows if r["mode"] == "full"}
    for provider in ("triton", "triton:sample_then_map", "triton:sample_in_gemm", "triton:weight_grad_epilogue"):
        assert ("linear", provider) in full
    assert ("lora", "triton:fused_lora") in full and ("conv2d", "bayesian-torch") in full
    assert {("unet", p) for p in gpu_check.DRY_RUN_UNET_PROVIDERS} <= full
    assert all("gpu-check dry run" in r["notes"] and r["date"] and r["torch"] for r in rows)
    unet = [r for r in rows if r["op"] == "unet" and r["mode"] == "full" and r["provider"] == "cpp"]
    assert float(unet[0]["ratio_to_deterministic"]) > 0  # ratios across providers measured one by one
    choices = json.loads((out / "fusion_choices.json").read_text())
    assert choices["choices"] and all(len(t) >= 2 for t in choices["timings"].values())  # paths were timed
    with open(out / "roofline.csv", newline="") as handle:
        roofline = {(r["op"], r["provider"]): r for r in csv.DictReader(handle)}
    assert float(roofline[("linear", "triton:sample_in_gemm")]["roofline_ratio"]) > 1
    assert "| linear | 16x16x16 | triton:sample_in_gemm |" in report


def test_the_float64_check_catches_a_wrong_sample(monkeypatch):
    device = torch.device("cpu")
    assert gpu_correctness.check_layer("linear", (13, 24, 20), "torch", {}, device, torch.float32) < 1e-5
    draw = bayeslayers.materialize_eps
    # 5 % off: the LoRA layer's output moves least (only its up factor is sampled), about 5e-3 there
    monkeypatch.setattr(bayeslayers, "materialize_eps", lambda *a, **k: draw(*a, **k) * 1.05)
    for op, shape in (("linear", (13, 24, 20)), ("conv2d", (1, 5, 6)), ("lora", (13, 24, 20, 2))):
        error = gpu_correctness.check_layer(op, shape, "torch", {}, device, torch.float32)
        assert error > gpu_correctness.TOLERANCE[torch.float32], op


def test_roofline_predictions_for_benchmark_shapes():
    gpu = gpu_check.roofline_gpu("NVIDIA A100-SXM4-80GB")
    assert gpu == "a100" and gpu_check.roofline_gpu("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_check.roofline_gpu("NVIDIA H200") == "h200"
    from benchmarks.roofline import GPUS

    h100 = GPUS["h100"]
    forced = gpu_check.predicted_ratio("linear", (4096, 320, 320), "triton:sample_in_gemm", h100)
    best = gpu_check.predicted_ratio("linear", (4096, 320, 320), "triton", h100)
    assert forced > best > 1.0
    assert gpu_check.predicted_ratio("linear", (4096, 320, 320), "deterministic", h100) is None
    assert gpu_check.predicted_ratio("lora", (4096, 320, 320, 4), "triton:fused_lora", h100) < 1.0
