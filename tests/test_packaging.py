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
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, cwd=out)
    return next(out.glob("bayeslayers-*.whl"))


def test_wheel_has_no_top_level_kernels_or_integrations(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"bayeslayers"}
    assert "bayeslayers/kernels/__init__.py" in names
    assert "bayeslayers/integrations/presets.py" in names


def test_import_from_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import bayeslayers, bayeslayers.kernels, bayeslayers.integrations, sys; "
            "assert bayeslayers.__file__.startswith(sys.argv[1]), bayeslayers.__file__; "
            "assert bayeslayers.kernels.__file__.startswith(sys.argv[1]); "
            "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules; "
            "print(bayeslayers.available_presets())")
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=True)
    assert "dreambooth-bnn" in result.stdout


def test_import_bayeslayers_stays_light():
    code = "import bayeslayers, bayeslayers.integrations, sys; print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'benchmarks') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
