"""BayesConfig: one home for every option (convert, presets, checkpoints, command lines)."""

import argparse
import re

import pytest
import torch
import torch.nn as nn

import bayeslayers
from bayeslayers import BayesConfig
from bayeslayers.config import DEFAULTS, LORA_FIELDS, POSTERIOR_FIELDS, dtype_from_name, dtype_name, option_names


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
    with pytest.raises(ValueError, match="^pass either preset or config, not both$"):
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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(prior_sigma=float("nan")), "prior_sigma must be a positive finite number, got nan"),
        (dict(init_sigma=float("inf")), "init_sigma must be a positive finite number, got inf"),
        (dict(init_sigma=True), "init_sigma must be a positive finite number, got True"),
        (dict(prior_sigma="0.1"), "prior_sigma must be a positive finite number, got '0.1'"),
        (dict(prior_dtype=torch.int8), "prior_dtype must be one of"),
        (dict(rank=2.0), "rank must be a positive integer, got 2.0"),
        (dict(rank=-1), "rank must be a positive integer, got -1"),
        (dict(lora_alpha=0), "lora_alpha must be a positive number or None, got 0"),
        (dict(lora_alpha=True), "lora_alpha must be a positive number or None, got True"),
        (dict(lora_alpha="8"), "lora_alpha must be a positive number or None, got '8'"),
        (dict(bayesian_factors="BA"), "bayesian_factors must be one of"),
        (dict(mode="half"), "mode must be one of"),
    ],
)
def test_every_option_is_validated(options, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        BayesConfig(**options)


def test_valid_edge_values_pass_and_names_round_trip():
    config = BayesConfig(
        target_modules=["a", "b"],
        exclude_modules=["c"],
        rank=1,
        lora_alpha=0.5,
        init_sigma=1e-9,
        prior_dtype="torch.float16",
        bayesian_factors="",
    )
    assert config.target_modules == ("a", "b") and config.exclude_modules == ("c",)
    assert config.prior_dtype == torch.float16 and BayesConfig(target_modules="a|b").target_modules == "a|b"
    assert config.replace(rank=3).rank == 3 and config.replace().rank == 1
    assert config.layer_options(("rank", "lora_alpha")) == {"rank": 1, "lora_alpha": 0.5}
    with pytest.raises(TypeError, match=r"unknown BayesConfig option\(s\) \['a', 'b'\]; options: \['target_modules', "):
        config.replace(b=1, a=2)
    assert dtype_from_name("bfloat16", "x") is torch.bfloat16 and dtype_from_name("torch.float64", "x") is torch.float64
    with pytest.raises(ValueError, match="^my_arg must name a torch dtype such as 'bfloat16', got 'Tensor'$"):
        dtype_from_name("Tensor", "my_arg")
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(None) is None
    assert option_names()[:3] == ["target_modules", "exclude_modules", "mode"] and len(option_names()) == 15


def test_optimizer_options_on_the_command_line():
    from bayeslayers.config import OPTIMIZER_FIELDS

    parser = BayesConfig.add_arguments(argparse.ArgumentParser(), OPTIMIZER_FIELDS)
    assert vars(parser.parse_args([])) == {"rho_learning_rate": None, "sigma_space": False}
    given = parser.parse_args(["--rho_learning_rate", "2e-3", "--sigma_space"])
    assert BayesConfig.from_arguments(given, OPTIMIZER_FIELDS) == BayesConfig(rho_learning_rate=2e-3, sigma_space=True)
    assert parser.parse_args(["--sigma_space", "--no-sigma_space", "--rho_learning_rate", "none"]).sigma_space is False


def test_command_line_none_values_and_defaults():
    parser = BayesConfig.add_arguments(argparse.ArgumentParser(), ("prior_dtype", "lora_alpha", "init_sigma", "mode"))
    defaults = parser.parse_args([])
    assert (defaults.prior_dtype, defaults.lora_alpha, defaults.init_sigma, defaults.mode) == (None, None, 0.01, "full")
    # dtype names (JSON-friendly in saved arguments); BayesConfig turns them into torch dtypes
    for text, expected in (("none", None), ("float32", None), ("NONE", None), ("float16", "float16")):
        assert parser.parse_args(["--prior_dtype", text]).prior_dtype == expected
    args = parser.parse_args(["--prior_dtype", "torch.bfloat16"])
    assert BayesConfig.from_arguments(args, ("prior_dtype",)).prior_dtype == torch.bfloat16
    assert parser.parse_args(["--lora_alpha", "None"]).lora_alpha is None
    assert parser.parse_args(["--lora_alpha", "2.5"]).lora_alpha == 2.5
    assert parser.parse_args(["--mode", "lora"]).mode == "lora"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "half"])
    group = argparse.ArgumentParser().add_argument_group("bayes")
    assert BayesConfig.add_arguments(group, ("rank",)) is group
    wrapped = argparse.ArgumentParser()  # or its add_argument function
    BayesConfig.add_arguments(wrapped.add_argument, ("rank", "kl_direction"))
    assert vars(wrapped.parse_args(["--rank", "3", "--kl_direction", "pq"])) == {"rank": 3, "kl_direction": "pq"}
    config = BayesConfig.from_arguments(parser.parse_args(["--init_sigma", "0.2"]), ("init_sigma",), rank=2)
    assert (config.init_sigma, config.rank) == (0.2, 2)
