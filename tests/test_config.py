"""BayesConfig: one home for every option (convert, presets, checkpoints, command lines)."""

import argparse

import pytest
import torch
import torch.nn as nn

import bayeslayers
from bayeslayers import BayesConfig
from bayeslayers.config import DEFAULTS, LORA_FIELDS, POSTERIOR_FIELDS


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))


def test_layers_and_convert_take_their_defaults_from_the_config():
    layer = bayeslayers.BayesLinear(3, 2)
    assert layer.prior_sigma == DEFAULTS.prior_sigma and layer.kl_direction == DEFAULTS.kl_direction
    torch.testing.assert_close(layer.weight_sigma, torch.full((2, 3), DEFAULTS.init_sigma))
    lora = bayeslayers.BayesLoRALinear(nn.Linear(3, 2))
    assert lora.rank == DEFAULTS.rank and lora.bayesian_factors == DEFAULTS.bayesian_factors


def test_config_options_reach_every_converted_layer():
    config = BayesConfig(
        target_modules=["0", "2"],
        mode="lora",
        rank=3,
        lora_alpha=6,
        bayesian_factors="A",
        init_sigma=0.02,
        prior_sigma=0.05,
        kl_direction="pq",
        prior_dtype=torch.bfloat16,
    )
    model = bayeslayers.convert(_mlp(), config=config)
    for index in (0, 2):
        layer = model[index]
        assert isinstance(layer, bayeslayers.BayesLoRALinear)
        assert (layer.rank, layer.scaling, layer.bayesian_factors) == (3, 2.0, "A")
        factor = layer.lora_A
        assert (factor.prior_sigma, factor.kl_direction, factor.prior_mu.dtype) == (0.05, "pq", torch.bfloat16)
        torch.testing.assert_close(factor.weight_sigma, torch.full_like(factor.weight_mu, 0.02))
        assert not isinstance(layer.lora_B, bayeslayers.BayesianLayer)


def test_explicit_arguments_override_the_config_and_the_preset():
    config = BayesConfig(target_modules=["0"], prior_sigma=0.2)
    model = bayeslayers.convert(_mlp(), config=config, prior_sigma=0.3, target_modules=["2"])
    assert isinstance(model[2], bayeslayers.BayesLinear) and not isinstance(model[0], bayeslayers.BayesLinear)
    assert model[2].prior_sigma == 0.3
    bayeslayers.register_preset("test-mlp", {"target_modules": ["0"], "kl_direction": "pq"})
    assert bayeslayers.get_preset("test-mlp") == BayesConfig(target_modules=("0",), kl_direction="pq")
    model = bayeslayers.convert(_mlp(), preset="test-mlp", kl_direction="qp")
    assert model[0].kl_direction == "qp"


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="init_sigma must be a positive finite number"):
        BayesConfig(init_sigma=0)
    with pytest.raises(ValueError, match="kl_direction must be one of"):
        BayesConfig(kl_direction="kl")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        BayesConfig(rank=True)
    with pytest.raises(ValueError, match="prior_dtype must name a torch dtype"):
        BayesConfig(prior_dtype="float33")
    with pytest.raises(TypeError, match="target_modules must be a regex string"):
        BayesConfig(target_modules=3)
    with pytest.raises(TypeError, match=r"unknown BayesConfig option\(s\) \['prior_mean'\]"):
        bayeslayers.convert(_mlp(), target_modules=["0"], prior_mean=0.0)
    with pytest.raises(ValueError, match="either preset or config"):
        bayeslayers.convert(_mlp(), preset="dreambooth-bnn", config=BayesConfig(target_modules=["0"]))


def test_command_line_flags_come_from_the_fields():
    parser = BayesConfig.add_arguments(argparse.ArgumentParser(), POSTERIOR_FIELDS + LORA_FIELDS, defaults={"rank": 8})
    args = parser.parse_args(
        ["--init_sigma", "0.03", "--kl_direction", "pq", "--prior_dtype", "bfloat16", "--lora_alpha", "16"]
    )
    config = BayesConfig.from_arguments(args, POSTERIOR_FIELDS + LORA_FIELDS, mode="lora")
    assert config == BayesConfig(
        mode="lora", init_sigma=0.03, kl_direction="pq", prior_dtype=torch.bfloat16, rank=8, lora_alpha=16.0
    )
    assert "prior std" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kl_direction", "kl"])
