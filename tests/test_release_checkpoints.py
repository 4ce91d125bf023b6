"""Checkpoints written by bayeslayers 0.1.0 (tests/data/release_0_1_0_*) still load and give the same model.

The fixtures hold a small model converted with non-default options (bf16 priors, both KL directions, LoRA with
alpha != rank and only A Bayesian), its posterior moved away from the initial values, and the outputs that
release computed (posterior mean, one fixed-seed posterior sample, the KL).
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import bayeslayers

DATA = Path(__file__).parent / "data"


def _model():
    return nn.ModuleDict(
        {
            "mlp": nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 5)),
            "conv": nn.Conv2d(3, 4, 3, padding=1),
            "head": nn.Linear(5, 3, bias=False),
        }
    )


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("converted_first", [False, True])
def test_release_checkpoint_loads_with_its_options_and_outputs(mode, converted_first):
    expected = load_file(str(DATA / f"release_0_1_0_{mode}_expected.safetensors"))
    header = bayeslayers.read_metadata(DATA / f"release_0_1_0_{mode}.safetensors")
    model = _model()  # fresh weights; the deterministic ones are set from the fixture, the Bayesian from the file
    base = {k[len("base.") :].replace(".base_layer", ""): v for k, v in expected.items() if k.startswith("base.")}
    missing = model.load_state_dict(base, strict=False).missing_keys
    assert {k.rsplit(".", 1)[0] for k in missing} <= set(header["layers"])
    if converted_first:  # same structure, other options (alpha, prior, KL): the checkpoint's options win
        for name, entry in header["layers"].items():
            structure = {}
            if "lora" in entry["type"]:
                structure = {
                    "mode": "lora",
                    "rank": entry["options"]["rank"],
                    "lora_alpha": 1.0,
                    "bayesian_factors": entry["options"]["bayesian_factors"],
                }
            bayeslayers.convert(model, target_modules=[name], prior_sigma=0.5, kl_direction="qp", **structure)
    bayeslayers.set_backend("cpp")
    bayeslayers.load(model, DATA / f"release_0_1_0_{mode}.safetensors")
    assert header["note"] == "fixture"
    assert sorted(n for n, _ in bayeslayers.bayesian_modules(model)) == sorted(header["layers"])
    for name, entry in header["layers"].items():
        assert model.get_submodule(name).options() == {"store_prior": True, **entry["options"]}  # older: default
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model["mlp"](expected["x"]), expected["mlp_mean"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model["conv"](expected["image"]), expected["conv_mean"], rtol=1e-6, atol=1e-7)
        with bayeslayers.sampling(model, seed=11):
            torch.testing.assert_close(model["mlp"](expected["x"]), expected["mlp_sample"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(model["conv"](expected["image"]), expected["conv_sample"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bayeslayers.kl_loss(model).reshape(1), expected["kl"], rtol=1e-6, atol=0)
