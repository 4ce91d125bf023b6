"""to_deterministic: every layer type with non-default options against the Bayesian layer in eval mode."""

import pytest
import torch
import torch.nn as nn
from mixed_model import (
    BF16,
    FP16,
    SPECS,
    Mixed,
    convert_spec,
    mixed_inputs,
    mixed_outputs,
)
from reference import (
    randomize_bayesian_state,
    relative_error,
)

import bayeslayers


# to_deterministic: every layer type, non-default options, against the Bayesian layer in eval mode.
def _deterministic_cases():
    linear64 = nn.Linear(7, 5).double()
    return {
        "linear-no-bias-bf16-prior": (
            lambda: bayeslayers.BayesLinear.from_module(
                nn.Linear(7, 5, bias=False), prior_dtype=BF16, kl_direction="pq"
            ),
            (3, 7),
        ),
        "linear-float64": (lambda: bayeslayers.BayesLinear.from_module(linear64, prior_sigma=0.2), (3, 7)),
        "conv-strided-dilated-grouped-reflect": (
            lambda: bayeslayers.BayesConv2d.from_module(
                nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"), prior_dtype=FP16
            ),
            (2, 4, 9, 8),
        ),
        "conv-same-circular": (
            lambda: bayeslayers.BayesConv2d.from_module(
                nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="circular", bias=False)
            ),
            (2, 3, 6, 7),
        ),
        "lora-linear-A": (
            lambda: bayeslayers.BayesLoRALinear(
                nn.Linear(7, 5), rank=3, lora_alpha=7, bayesian_factors="A", prior_dtype=BF16
            ),
            (3, 7),
        ),
        "lora-linear-B": (
            lambda: bayeslayers.BayesLoRALinear(
                nn.Linear(7, 5, bias=False), rank=2, lora_alpha=0.5, bayesian_factors="B"
            ),
            (3, 7),
        ),
        "lora-linear-plain": (
            lambda: bayeslayers.BayesLoRALinear(nn.Linear(7, 5), rank=4, lora_alpha=2, bayesian_factors=""),
            (2, 3, 7),
        ),
        "lora-conv-AB": (
            lambda: bayeslayers.BayesLoRAConv2d(
                nn.Conv2d(4, 6, 3, stride=2, padding=1), rank=2, lora_alpha=5, kl_direction="pq"
            ),
            (2, 4, 7, 6),
        ),
        "conv-same-even-kernel": (
            lambda: bayeslayers.BayesConv2d.from_module(nn.Conv2d(3, 4, (3, 4), padding="same")),
            (2, 3, 6, 7),
        ),
        "lora-conv-dilated-positional": (
            lambda: bayeslayers.BayesLoRAConv2d(nn.Conv2d(3, 4, 3, padding=2, dilation=2), 2, 3, "A"),
            (1, 3, 7, 6),
        ),
        "lora-conv-B": (
            lambda: bayeslayers.BayesLoRAConv2d(nn.Conv2d(3, 5, 3, padding=1), rank=2, bayesian_factors="B"),
            (1, 3, 6, 6),
        ),
        "lora-conv-A-reflect": (
            lambda: bayeslayers.BayesLoRAConv2d(
                nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), rank=3, lora_alpha=1, bayesian_factors="A"
            ),
            (1, 3, 6, 6),
        ),
    }


@pytest.mark.parametrize("case", sorted(_deterministic_cases()))
def test_to_deterministic_matches_the_eval_output_of_every_layer_type(case):
    make, shape = _deterministic_cases()[case]
    layer = randomize_bayesian_state(make(), seed=4)
    base = getattr(layer, "base_layer", None)
    dtype = torch.float64 if case == "linear-float64" else torch.float32
    x = torch.randn(shape, dtype=dtype)
    before = None if base is None else base(x).detach()
    layer.eval()
    expected = layer(x).detach()
    if hasattr(layer, "bias") and layer.bias is not None:
        layer.bias.requires_grad_(False)
    plain = bayeslayers.to_deterministic(nn.Sequential(layer))[0]
    assert type(plain) in (nn.Linear, nn.Conv2d)
    assert plain.weight.dtype == dtype
    if isinstance(plain, nn.Conv2d):
        source = base if base is not None else layer
        assert (plain.stride, plain.padding, plain.dilation, plain.groups, plain.padding_mode) == (
            source.stride,
            source.padding,
            source.dilation,
            source.groups,
            source.padding_mode,
        )
    if base is None:
        assert (plain.bias is None) == (layer.bias is None)
        if plain.bias is not None:
            assert not plain.bias.requires_grad
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
        assert relative_error(expected, before) > 1e-3  # the adapter changed the output: it was merged


def test_to_deterministic_of_a_model_leaves_only_stock_modules():
    model = randomize_bayesian_state(convert_spec(Mixed(), SPECS["mixed"]), seed=2).eval()
    inputs = mixed_inputs()
    expected = mixed_outputs(model, inputs)
    assert bayeslayers.to_deterministic(model) is model
    assert not bayeslayers.bayesian_modules(model)
    assert all(type(m).__module__.startswith("torch") for m in model.modules() if m is not model)
    torch.testing.assert_close(mixed_outputs(model, inputs), expected, rtol=1e-5, atol=1e-6)
