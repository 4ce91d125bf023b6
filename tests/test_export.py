"""Export (integrations/dreambooth/export.py) -> stock diffusers -> the Bayesian model's mean outputs, and what
an export writes for each kind of run."""

import pytest
import torch
from mixed_model import (
    BF16,
    SPECS,
    Mixed,
    convert_spec,
)
from reference import (
    randomize_bayesian_state,
    relative_error,
)

import bayeslayers


# export (integrations/dreambooth/export.py) -> stock diffusers -> the Bayesian model's mean outputs
@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("export") / "pipe")


def _pipeline(path, **components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, **components)


def _unet_and_text_outputs(unet, text_encoder):
    from tiny_models import unet_inputs

    sample, timesteps, text = unet_inputs()
    ids = torch.tensor([[49, 3, 7, 11, 50, 50], [49, 20, 2, 50, 50, 50]])
    with torch.no_grad():
        return unet(sample, timesteps, encoder_hidden_states=text).sample, text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_loads_in_stock_diffusers_with_the_mean_outputs(tiny_pipeline, tmp_path, mode):
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from bayeslayers.integrations.dreambooth.export import BAYESIAN_STATE, TEXT_ENCODER_BAYESIAN_STATE, export_model

    pipe = _pipeline(tiny_pipeline)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    if mode == "full":
        bayeslayers.convert(unet, preset="dreambooth-bnn", prior_dtype=BF16)
        bayeslayers.convert(text_encoder, preset="clip-text-bnn", kl_direction="pq")
        with torch.no_grad():  # a trained non-Bayesian layer goes along in the exported UNet
            unet.conv_in.bias.add_(0.3)
    else:  # alpha != rank: the exported B carries the scaling
        bayeslayers.convert(unet, preset="dreambooth-bnn-lora", rank=2, lora_alpha=5, bayesian_factors="AB")
        bayeslayers.convert(
            text_encoder,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            mode="lora",
            rank=3,
            lora_alpha=1.5,
            bayesian_factors="B",
        )
    for model in (unet, text_encoder):
        randomize_bayesian_state(model, seed=12, rho_range=(-6.0, -5.0)).eval()
    expected_unet, expected_text = _unet_and_text_outputs(unet, text_encoder)
    base_unet, base_text = _unet_and_text_outputs(*(lambda p: (p.unet, p.text_encoder))(_pipeline(tiny_pipeline)))
    assert relative_error(expected_unet, base_unet) > 1e-2 and relative_error(expected_text, base_text) > 1e-2

    args = SimpleNamespace(output_dir=str(tmp_path), bayesian=True, train_mode=mode, skip_save_text_encoder=False)
    written = export_model(unet, args, text_encoder)
    assert written["bayesian_state"] == str(tmp_path / BAYESIAN_STATE)
    assert written["text_encoder_bayesian_state"] == str(tmp_path / TEXT_ENCODER_BAYESIAN_STATE)
    for key in ("bayesian_state", "text_encoder_bayesian_state"):
        assert bayeslayers.read_metadata(written[key])["train_mode"] == mode
    if mode == "full":
        assert sorted(written) == ["bayesian_state", "text_encoder", "text_encoder_bayesian_state", "unet"]
        for folder in ("unet", "text_encoder"):  # checkpoints are safetensors
            assert [p.suffix for p in (tmp_path / folder).iterdir() if p.suffix != ".json"] == [".safetensors"]
        stock = _pipeline(
            tiny_pipeline,
            unet=UNet2DConditionModel.from_pretrained(written["unet"]),
            text_encoder=CLIPTextModel.from_pretrained(written["text_encoder"]),
        )
    else:
        assert sorted(written) == ["bayesian_state", "lora_weights", "text_encoder_bayesian_state"]
        assert written["lora_weights"] == str(tmp_path / "pytorch_lora_weights.safetensors")
        stock = _pipeline(tiny_pipeline)
        stock.load_lora_weights(str(tmp_path))
    assert not bayeslayers.posterior_layers(stock.unet) and not bayeslayers.posterior_layers(stock.text_encoder)
    stock_unet, stock_text = _unet_and_text_outputs(stock.unet, stock.text_encoder)
    torch.testing.assert_close(stock_unet, expected_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stock_text, expected_text, rtol=1e-4, atol=1e-5)

    # the posterior goes along: loaded into the pretrained model it gives the same mean model again
    again = _pipeline(tiny_pipeline)
    bayeslayers.load(again.unet, written["bayesian_state"])
    bayeslayers.load(again.text_encoder, written["text_encoder_bayesian_state"])
    if mode == "full":
        with torch.no_grad():
            again.unet.conv_in.bias.add_(0.3)
    again_unet, again_text = _unet_and_text_outputs(again.unet.eval(), again.text_encoder.eval())
    torch.testing.assert_close(again_unet, expected_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again_text, expected_text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_writes_what_the_run_trained(tiny_pipeline, tmp_path, mode):
    """A deterministic run exports no posterior; a plain text-encoder LoRA exports no text-encoder posterior."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from bayeslayers.integrations.dreambooth.export import export_model, lora_layers_state

    pipe = _pipeline(tiny_pipeline)
    if mode == "full":
        args = SimpleNamespace(output_dir=str(tmp_path), bayesian=False, train_mode="full", skip_save_text_encoder=True)
        assert sorted(export_model(pipe.unet, args, pipe.text_encoder)) == ["unet"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
        return
    bayeslayers.convert(pipe.unet, preset="dreambooth-bnn-lora", rank=2, lora_alpha=3)
    bayeslayers.convert(pipe.text_encoder, target_modules=["q_proj"], mode="lora", rank=2, bayesian_factors="")
    randomize_bayesian_state(pipe.unet, seed=1), randomize_bayesian_state(pipe.text_encoder, seed=2)
    args = SimpleNamespace(output_dir=str(tmp_path), bayesian=True, train_mode="lora", skip_save_text_encoder=False)
    assert sorted(export_model(pipe.unet, args, pipe.text_encoder)) == ["bayesian_state", "lora_weights"]
    weights = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    state = lora_layers_state(pipe.unet)
    name, module = bayeslayers.bayesian_modules(pipe.unet)[0]
    torch.testing.assert_close(state[f"{name}.lora_A.weight"], module.lora_A.weight)
    torch.testing.assert_close(state[f"{name}.lora_B.weight"], module.lora_B.weight_mu * 1.5)
    text_layers = len(bayeslayers.bayesian_modules(pipe.text_encoder))
    assert sum(k.startswith("text_encoder.") for k in weights) == 2 * text_layers
    assert len(weights) == len(state) + 2 * text_layers
    assert lora_layers_state(bayeslayers.convert(Mixed(), target_modules=["a"])) == {}  # no LoRA layers, no keys
    mixed = lora_layers_state(convert_spec(Mixed(), SPECS["mixed"]))  # a full layer first, then LoRA layers
    assert sorted(mixed) == ["b.lora_A.weight", "b.lora_B.weight", "conv2.lora_A.weight", "conv2.lora_B.weight"]
    unet_only = tmp_path / "unet-only"
    unet_only.mkdir()
    args = SimpleNamespace(output_dir=str(unet_only), bayesian=True, train_mode="lora", skip_save_text_encoder=False)
    assert sorted(export_model(pipe.unet, args)) == ["bayesian_state", "lora_weights"]
    unet_keys = load_file(str(unet_only / "pytorch_lora_weights.safetensors"))
    assert unet_keys and not any(k.startswith("text_encoder.") for k in unet_keys)
