"""Options: what ``options()`` records for every convert option, each layer type taking each posterior option,
and layers built directly validating and keeping theirs."""

import pytest
import torch
import torch.nn as nn
from mixed_model import (
    BF16,
    FP16,
    SPECS,
    Mixed,
    convert_spec,
)
from reference import (
    randomize_layer,
)

import bayeslayers


def test_options_record_every_convert_option():
    model = convert_spec(Mixed(), SPECS["mixed"])
    assert model.a.options() == {
        "prior_sigma": 0.01,
        "kl_direction": "pq",
        "prior_dtype": "bfloat16",
        "store_prior": True,
    }
    assert model.b.options() == {
        "rank": 2,
        "lora_alpha": 7.0,
        "bayesian_factors": "A",
        "prior_sigma": 0.3,
        "kl_direction": "qp",
        "prior_dtype": None,
        "store_prior": True,
    }
    assert model.conv2.options()["lora_alpha"] == 2.0 and model.conv2.scaling == pytest.approx(2 / 3)
    plain = bayeslayers.convert(
        Mixed(), target_modules=["a"], mode="lora", bayesian_factors="", prior_sigma=0.4, kl_direction="pq"
    )
    assert plain.a.options() == {
        "rank": 4,
        "lora_alpha": 4.0,
        "bayesian_factors": "",
        "prior_sigma": 0.01,
        "kl_direction": "qp",
        "prior_dtype": None,
        "store_prior": True,
    }
    assert bayeslayers.convert(Mixed(), target_modules=["a"], prior_dtype=FP16).a.options()["prior_dtype"] == "float16"


def test_convert_gives_every_layer_type_each_posterior_option():
    options = dict(init_sigma=0.07, prior_sigma=0.3, kl_direction="pq", prior_dtype=BF16)
    full = bayeslayers.convert(Mixed(), target_modules=["a", "conv1"], **options)
    lora = bayeslayers.convert(Mixed(), target_modules=["b", "conv2"], mode="lora", rank=2, **options)
    factors = [lora.b.lora_A, lora.b.lora_B, lora.conv2.lora_A, lora.conv2.lora_B]
    for layer in [full.a, full.conv1, *factors]:
        torch.testing.assert_close(layer.weight_sigma, torch.full_like(layer.weight_sigma, 0.07))
        assert (layer.prior_sigma, layer.kl_direction) == (0.3, "pq")
    pretrained = Mixed()
    for layer, weight in ((full.a, pretrained.a.weight), (full.conv1, pretrained.conv1.weight)):
        assert layer.prior_mu.dtype == BF16
        torch.testing.assert_close(layer.prior_mu, weight.detach().to(BF16), rtol=0, atol=0)
    assert lora.b.lora_A.prior_mu.dtype == lora.conv2.lora_A.prior_mu.dtype == BF16
    assert lora.b.lora_B.prior_mu is None and lora.conv2.lora_B.prior_mu is None


def test_layers_built_directly_validate_and_keep_their_options():
    layer = bayeslayers.BayesLinear(
        4, 3, init_sigma=0.2, prior_sigma=0.4, kl_direction="pq", prior_mean=torch.ones(3, 4), prior_dtype=FP16
    )
    torch.testing.assert_close(layer.weight_sigma, torch.full((3, 4), 0.2))
    assert layer.weight is layer.weight_mu  # code reading .weight sees the posterior mean
    assert layer.prior_mu.dtype == FP16 and bool((layer.prior_mu == 1).all())
    assert layer.options() == {"prior_sigma": 0.4, "kl_direction": "pq", "prior_dtype": "float16", "store_prior": True}
    assert "prior_mean=pretrained, prior_sigma=0.4, kl_direction='pq'" in repr(layer)
    assert "prior_mean=zero" in repr(bayeslayers.BayesConv2d(2, 2, 1))
    with pytest.raises(ValueError, match="in_channels=3 and out_channels=4 must be divisible by groups=2"):
        bayeslayers.BayesConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be"):
        bayeslayers.BayesConv2d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        bayeslayers.BayesConv2d(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        bayeslayers.BayesConv2d(2, 2, 3, padding="full")
    with pytest.raises(ValueError, match="BayesLoRAConv2d needs a base conv with groups=1"):
        bayeslayers.BayesLoRAConv2d(nn.Conv2d(2, 2, 3, groups=2))
    positional = bayeslayers.BayesLoRAConv2d(nn.Conv2d(2, 2, 3), 2, 3, "A", 0.2, 0.4, "pq", BF16)
    assert positional.options() == {
        "rank": 2,
        "lora_alpha": 3.0,
        "bayesian_factors": "A",
        "prior_sigma": 0.4,
        "kl_direction": "pq",
        "prior_dtype": "bfloat16",
        "store_prior": True,
    }
    torch.testing.assert_close(positional.lora_A.weight_sigma, torch.full_like(positional.lora_A.weight_sigma, 0.2))
    assert not any(name.endswith("bias") for name, _ in positional.named_parameters() if "lora" in name)
    for plain_lora in (  # plain factors are bias-free too: the adapter trains exactly A and B
        bayeslayers.BayesLoRAConv2d(nn.Conv2d(2, 3, 3), bayesian_factors=""),
        bayeslayers.BayesLoRALinear(nn.Linear(2, 3), bayesian_factors=""),
    ):
        trainable = sorted(name for name, p in plain_lora.named_parameters() if p.requires_grad)
        assert trainable == ["lora_A.weight", "lora_B.weight"]
    with pytest.raises(TypeError, match="fixed_seed must be an int or None, got float"):
        layer.fixed_seed = 1.5
    layer.fixed_seed = (1 << 64) - 3  # seeds are 64-bit: stored wrapped, read back unsigned
    assert layer.fixed_seed == (1 << 64) - 3
    with pytest.raises(ValueError, match="weight_rho of layer 'x' holds NaN or Inf"):
        with torch.no_grad():
            layer.weight_rho[0, 0] = float("inf")
        layer.check_finite("x")
    randomize_layer(layer)
    layer.check_finite()
