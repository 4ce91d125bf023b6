"""store_prior=False: no prior kept (training without the KL term), kl_loss refuses; training is unchanged."""

import pytest
import torch
from reference import assert_same_tensors, bayesian_state, randomize_bayesian_state

import bayeslayers
from bayeslayers.config import BayesConfig


def _model(store_prior, seed=0):
    torch.manual_seed(seed)
    plain = torch.nn.ModuleDict({"fc": torch.nn.Linear(12, 16), "conv": torch.nn.Conv2d(3, 5, 3)})
    return bayeslayers.convert(plain, target_modules=["fc", "conv"], store_prior=store_prior)


def _grads(model, backend):
    bayeslayers.set_backend(backend)
    try:
        torch.manual_seed(3)
        x, image = torch.randn(4, 12), torch.randn(2, 3, 7, 7)
        loss = model["fc"](x).square().mean() + model["conv"](image).square().mean()
        loss.backward()
    finally:
        bayeslayers.set_backend(None)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_no_prior_is_stored_and_kl_loss_says_why():
    model = _model(store_prior=False)
    for _, layer in bayeslayers.posterior_layers(model):
        assert layer.prior_mu is None and not layer.store_prior
        assert "prior_mu" not in layer.state_dict()
    with pytest.raises(RuntimeError, match=r"'fc' stores no prior.*store_prior=True"):
        bayeslayers.kl_loss(model)
    model["fc"](torch.randn(2, 12))  # a sampling forward computes no usable KL either
    with pytest.raises(RuntimeError, match="store_prior=True"):
        model["fc"].kl()


def test_lora_factors_store_no_prior_either():
    model = bayeslayers.convert(
        torch.nn.ModuleDict({"fc": torch.nn.Linear(12, 16)}), "fc", mode="lora", store_prior=False
    )
    assert model["fc"].options()["store_prior"] is False
    assert not [k for k in model.state_dict() if "prior_mu" in k]
    with pytest.raises(RuntimeError, match="stores no prior"):
        bayeslayers.kl_loss(model)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradients_without_the_prior_equal_those_with_it(backend):
    with_prior, without = _model(True), _model(False)
    without.load_state_dict(with_prior.state_dict(), strict=False)
    expected, actual = _grads(with_prior, backend), _grads(without, backend)
    assert_same_tensors(actual, expected)


def test_save_load_keeps_no_prior_and_drops_a_stored_one(tmp_path):
    source = randomize_bayesian_state(_model(False), seed=5)
    bayeslayers.save(source, tmp_path / "no_prior.safetensors")
    fresh = torch.nn.ModuleDict({"fc": torch.nn.Linear(12, 16), "conv": torch.nn.Conv2d(3, 5, 3)})
    bayeslayers.load(fresh, tmp_path / "no_prior.safetensors")
    assert_same_tensors(bayesian_state(fresh)[0], bayesian_state(source)[0])
    assert bayesian_state(fresh)[1] == bayesian_state(source)[1]
    converted = _model(True, seed=1)  # a stored prior, different values: loading drops the prior
    bayeslayers.load(converted, tmp_path / "no_prior.safetensors")
    assert_same_tensors(bayesian_state(converted)[0], bayesian_state(source)[0])
    bayeslayers.save(_model(True), tmp_path / "prior.safetensors")
    with pytest.raises(ValueError, match=r"'fc' holds tensors \['bias', 'weight_mu', 'weight_rho'\] in the model"):
        bayeslayers.load(_model(False), tmp_path / "prior.safetensors")  # a prior cannot come from nothing
    with pytest.raises(ValueError, match="store_prior=True but this layer was converted with store_prior=False"):
        _model(False)["fc"].apply_options(_model(True)["fc"].options())


def test_store_prior_must_be_a_bool():
    with pytest.raises(ValueError, match="store_prior must be True or False"):
        BayesConfig(store_prior="no")


def test_bf16_prior_halves_the_prior_bytes():
    full = bayeslayers.convert(torch.nn.ModuleDict({"fc": torch.nn.Linear(64, 32)}), "fc")
    half = bayeslayers.convert(torch.nn.ModuleDict({"fc": torch.nn.Linear(64, 32)}), "fc", prior_dtype="bfloat16")
    none = bayeslayers.convert(torch.nn.ModuleDict({"fc": torch.nn.Linear(64, 32)}), "fc", store_prior=False)

    def buffer_bytes(model):
        return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("prior_mu"))

    assert (buffer_bytes(full), buffer_bytes(half), buffer_bytes(none)) == (64 * 32 * 4, 64 * 32 * 2, 0)


def test_recipe_stores_a_prior_only_with_a_kl_weight(tmp_path):
    from PIL import Image

    from bayeslayers.integrations.dreambooth import parse_args
    from bayeslayers.integrations.dreambooth.args import posterior_options

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    base = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks dog", "--output_dir", str(tmp_path)]
    base += ["--pretrained_model_name_or_path", str(tmp_path)]
    assert posterior_options(parse_args(base))["store_prior"] is False  # the default KL weight is 0
    assert posterior_options(parse_args(base + ["--kl_weight", "1e-4"]))["store_prior"] is True
    assert posterior_options(parse_args(base + ["--store_prior"]))["store_prior"] is True
    with pytest.raises(ValueError, match="--no-store_prior needs --kl_weight 0"):
        parse_args(base + ["--kl_weight", "1e-4", "--no-store_prior"])
