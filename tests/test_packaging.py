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
    for model in ("", "tiny-sd-64/"):  # both bundled model sizes, weights included
        folder = f"bayeslayers/integrations/tiny_sd/assets/{model}"
        assert f"{folder}pipeline/unet/diffusion_pytorch_model.safetensors" in names
        assert f"{folder}judge.safetensors" in names


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


def _distribution_closure(names):
    """The installed distributions ``names`` need, transitively (markers evaluated, extras left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = {}, list(names)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = requirement.name.lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = metadata.distribution(requirement.name)
        todo.extend(seen[key].requires or [])
    return seen.values()


def _site_with_only(distributions, site):
    """Links the top-level files of ``distributions`` (their code and .dist-info) into ``site``."""
    site.mkdir(parents=True)
    for distribution in distributions:
        base = Path(distribution.locate_file(""))
        for top in {Path(f).parts[0] for f in distribution.files or ()}:
            if top in ("..", "bin") or (site / top).exists() or not (base / top).exists():
                continue
            (site / top).symlink_to(base / top)


CLEAN_VENV_FLOW = """
import os, sys, torch, bayeslayers
from torch import nn
assert bayeslayers.__file__.startswith(sys.prefix), bayeslayers.__file__
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
before = [p.detach().clone() for p in model.parameters()]
bayeslayers.convert(model, target_modules=r".*", init_sigma=0.02, prior_dtype="bfloat16")
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
loss = model(torch.randn(4, 6)).square().mean() + 1e-3 * bayeslayers.kl_loss(model)
loss.backward(); optimizer.step()
path = os.path.join(sys.argv[1], "posterior.safetensors")
bayeslayers.save(model, path)
fresh = bayeslayers.convert(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)), target_modules=r".*")
bayeslayers.load(fresh, path)
x = torch.randn(5, 6)
model.eval(); fresh.eval()
assert torch.equal(model(x), fresh(x))
plain = bayeslayers.to_deterministic(fresh)
assert not bayeslayers.posterior_layers(plain) and torch.equal(plain(x), model(x))
assert not torch.equal(plain[0].weight, before[0])
print("flow ok")
"""


@pytest.mark.slow
def test_wheel_in_a_clean_venv_with_only_torch_runs_the_whole_flow(wheel, tmp_path):
    """The wheel's install_requires are enough: a venv holding torch (with its own requirements) and the wheel's
    declared requirements, nothing else, runs convert -> train step -> save -> load -> to_deterministic."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    declared = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    declared = [r for r in declared if "extra ==" not in r]
    assert any(r.startswith("safetensors") for r in declared), declared
    _site_with_only(_distribution_closure(["torch", *declared]), tmp_path / "deps")
    (site / "deps.pth").write_text(str(tmp_path / "deps") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CLEAN_VENV_FLOW, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flow ok" in result.stdout
