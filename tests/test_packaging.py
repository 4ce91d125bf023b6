"""The built wheel installs one namespace, bayeslayers, with kernels and integrations inside it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    return next(out.glob("bayeslayers-*.whl"))


def test_wheel_has_no_top_level_kernels_or_integrations(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"bayeslayers"}
    assert "bayeslayers/kernels/__init__.py" in names
    assert "bayeslayers/integrations/presets.py" in names
    assert "bayeslayers/kernels/cpu/csrc/reparameterization_cpu.cpp" in names  # the C++ kernels build from the wheel


def test_import_from_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import bayeslayers, bayeslayers.kernels, bayeslayers.integrations, sys; "
        "assert bayeslayers.__file__.startswith(sys.argv[1]), bayeslayers.__file__; "
        "assert bayeslayers.kernels.__file__.startswith(sys.argv[1]); "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules; "
        "print(bayeslayers.available_presets())"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert "dreambooth-bnn" in result.stdout


def test_import_bayeslayers_stays_light():
    heavy = ("diffusers", "transformers", "peft", "benchmarks", "triton")
    code = f"import bayeslayers, bayeslayers.integrations, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_top_level_kernels_probe_from_the_repo_root_registers_nothing():
    """transformers imports any top-level ``kernels`` it finds; from the repo root that is this folder, and a
    second registration of the custom ops used to leave the first ones dangling (crash in backward)."""
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, bayeslayers, bayeslayers.kernels as k\n"
        "import importlib; probed = importlib.import_module('kernels')\n"
        "assert probed.__file__ == k.__file__ and probed.__all__ == [], probed.__all__\n"
        "import transformers.integrations.hub_kernels\n"
        "mu = torch.randn(37, 29); rho = torch.full_like(mu, -3.0); mu.requires_grad_(True)\n"
        "from bayeslayers.layer_maps import LinearMap\n"
        "path = k.SampleThenMap(k.TRITON_KERNELS)\n"
        "y, kl = k.reparameterize(LinearMap(), torch.randn(5, 29), k.Posterior(mu, rho, None, 1.0, 'qp'), None, 7,"
        " path)\n"
        "(y.sum() + kl).backward(); assert torch.isfinite(mu.grad).all()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
