"""Mixed precision: every backend's layers under autocast (compute dtype follows autocast, parameters and their
gradients stay fp32, values match float64), the recipe with --mixed_precision bf16 on CPU and fp16 with a
GradScaler on a GPU."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from reference import check_layer
from tiny_models import recipe_argv

import bayeslayers

BACKENDS = ["reference", "torch", "cpp", "triton"]


def _randomize(module):
    with torch.no_grad():
        for layer in [m for m in module.modules() if isinstance(m, bayeslayers.BayesianLayer)]:
            layer.weight_mu.normal_(0, 0.2)
            layer.weight_rho.uniform_(-5, -2)
            if layer.prior_mu is not None:
                layer.prior_mu.copy_(layer.weight_mu + 0.05 * torch.randn_like(layer.weight_mu))
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0, 0.3)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.3)
    return module


def _layer(kind):
    if kind == "BayesLinear":
        return bayeslayers.BayesLinear.from_module(nn.Linear(19, 11)), torch.randn(3, 19)
    if kind == "BayesConv2d":
        return bayeslayers.BayesConv2d.from_module(nn.Conv2d(4, 6, 3, padding=1)), torch.randn(2, 4, 7, 5)
    if kind == "BayesLoRALinear":
        return bayeslayers.BayesLoRALinear(nn.Linear(19, 11), rank=3, lora_alpha=6), torch.randn(3, 19)
    return bayeslayers.BayesLoRAConv2d(nn.Conv2d(4, 6, 3, padding=1), rank=2), torch.randn(2, 4, 7, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["BayesLinear", "BayesConv2d", "BayesLoRALinear", "BayesLoRAConv2d"])
def test_layers_under_autocast_follow_its_dtype_and_keep_fp32_parameters_and_gradients(backend, dtype, kind):
    module, x = _layer(kind)
    _randomize(module)
    errors = check_layer(module, x, backend, compute_dtype=dtype, autocast=dtype)
    assert errors["y"] > 0  # really computed in low precision (an fp32 path would match to ~1e-7)


# ---- the recipe ----


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import recipe_workspace

    return recipe_workspace(tmp_path_factory.mktemp("mixed"))


def _reset_accelerate():
    """accelerate keeps one process-wide state; a run with another mixed precision needs a fresh one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    _reset_accelerate()
    yield
    _reset_accelerate()


def _run(workspace, out, *extra):
    from bayeslayers.integrations.dreambooth import main, parse_args

    _reset_accelerate()
    flags = ("--kl_weight", "1e-2", "--init_sigma", "0.02", "--checkpointing_steps", "1000")
    return main(parse_args(recipe_argv(workspace, out, *flags, *extra)))


def _history(result):
    import json
    from pathlib import Path

    (checkpoint,) = Path(result["unet"]).parent.glob("checkpoint-*")
    return json.loads((checkpoint / "trainer_state.json").read_text())["history"]


@pytest.mark.slow
def test_recipe_bf16_on_cpu_for_50_steps_is_finite_and_close_to_fp32(workspace):
    from safetensors.torch import load_file

    steps = ["--max_train_steps", "50", "--checkpointing_steps", "50"]
    fp32 = _run(workspace, "fp32", *steps)
    bf16 = _run(workspace, "bf16", *steps, "--mixed_precision", "bf16")
    h32, h16 = _history(fp32), _history(bf16)
    for key in ("loss", "kl", "mean_sigma"):
        assert len(h16[key]) == 50 and all(math.isfinite(v) for v in h16[key]), key
    # Same seed, data and noise: the bf16 run follows the fp32 one.
    mean32, mean16 = np.mean(h32["loss"]), np.mean(h16["loss"])
    print(
        f"\nmean loss over 50 steps: fp32 {mean32:.4f}, bf16 {mean16:.4f}; final KL {h32['kl'][-1]:.4g} vs "
        f"{h16['kl'][-1]:.4g}; final mean sigma {h32['mean_sigma'][-1]:.5g} vs {h16['mean_sigma'][-1]:.5g}"
    )
    assert abs(mean16 - mean32) < 0.05 * mean32, (mean32, mean16)
    assert abs(h16["kl"][-1] - h32["kl"][-1]) < 0.1 * h32["kl"][-1]
    assert abs(h16["mean_sigma"][-1] - h32["mean_sigma"][-1]) < 0.05 * h32["mean_sigma"][-1]
    state = load_file(bf16["bayesian_state"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for k, v in state.items() if "weight_" in k)
    assert h16["loss"] != h32["loss"]  # bf16 really took effect


@pytest.mark.gpu
def test_recipe_fp16_with_grad_scaler_on_gpu(workspace, monkeypatch):
    import accelerate

    scalers = []
    original = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        scalers.append(self.scaler)
        return original(self, loss, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)
    result = _run(
        workspace, "fp16", "--max_train_steps", "30", "--checkpointing_steps", "30", "--mixed_precision", "fp16"
    )
    assert scalers and all(s is not None for s in scalers)  # fp16 runs with a GradScaler
    history = _history(result)
    for key in ("loss", "kl", "mean_sigma"):
        assert all(math.isfinite(v) for v in history[key]), key
