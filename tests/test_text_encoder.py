"""A trained, Bayesian CLIP text encoder in the DreamBooth recipe, on the bundled tiny Stable Diffusion: the
clip-text-bnn preset, its KL in the same loss, its posterior saved, exported for stock diffusers (full:
text_encoder/; LoRA: the text-encoder keys load_lora_weights reads) and restored on resume."""

import os
import signal

import numpy as np
import pytest
import torch

import bayeslayers
from bayeslayers.integrations import tiny_sd
from bayeslayers.integrations.dreambooth import main, parse_args

PROMPT = "a sks star on a black background"


def _args(tmp, out, *extra):
    return parse_args(
        [
            "--output_dir",
            str(tmp / out),
            "--train_batch_size",
            "1",
            "--seed",
            "0",
            "--report_to",
            "none",
            "--learning_rate",
            "1e-3",
            "--num_inference_steps",
            "3",
            "--kl_weight",
            "1e-3",
            "--train_text_encoder",
            "--bayes_text_encoder",
            *extra,
        ]
    )


def _image(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np").images


def _pipeline(**components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd.pipeline_path(), safety_checker=None, **components)


def test_clip_preset_selects_attention_and_mlp_of_every_encoder_layer():
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_sd.pipeline_path(), subfolder="text_encoder")
    layers = text_encoder.config.num_hidden_layers
    wanted = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    expected = sorted(
        n
        for n, m in text_encoder.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith(f"layers.{i}.{w}") for i in range(layers) for w in wanted)
    )
    assert len(expected) == 6 * layers
    bayeslayers.convert(text_encoder, preset="clip-text-bnn")
    assert sorted(name for name, _ in bayeslayers.bayesian_modules(text_encoder)) == expected
    # embeddings and norms stay plain and trainable
    embedding = next(m for n, m in text_encoder.named_modules() if n.endswith("token_embedding"))
    assert embedding.weight.requires_grad
    assert all(type(m) is torch.nn.LayerNorm for n, m in text_encoder.named_modules() if "layer_norm" in n)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("te-full")
    return tmp, main(
        _args(
            tmp,
            "full",
            "--max_train_steps",
            "3",
            "--validation_prompt",
            PROMPT,
            "--validation_steps",
            "2",
            "--num_validation_images",
            "2",
        )
    )


def test_text_encoder_kl_is_in_the_same_loss_and_reported_apart(full_run):
    _, result = full_run
    assert result["final_kl_unet"] > 0 and result["final_kl_text_encoder"] > 0
    assert result["final_kl"] == pytest.approx(result["final_kl_unet"] + result["final_kl_text_encoder"], rel=1e-5)
    assert result["final_mean_sigma_text_encoder"] > 0


@pytest.mark.slow
def test_full_export_loads_in_stock_diffusers_and_matches_the_mean_model(full_run):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    _, result = full_run
    stock = _pipeline(
        unet=UNet2DConditionModel.from_pretrained(result["unet"]),
        text_encoder=CLIPTextModel.from_pretrained(result["text_encoder"]),
    )
    assert not bayeslayers.bayesian_modules(stock.text_encoder)
    in_library = _pipeline(
        unet=UNet2DConditionModel.from_pretrained(result["unet"]),
        text_encoder=CLIPTextModel.from_pretrained(result["text_encoder"]),
    )
    bayeslayers.load(in_library.unet, result["bayesian_state"])
    bayeslayers.load(in_library.text_encoder, result["text_encoder_bayesian_state"])
    assert len(bayeslayers.bayesian_modules(in_library.text_encoder)) == 12
    in_library.unet.eval(), in_library.text_encoder.eval()
    np.testing.assert_allclose(_image(stock), _image(in_library), atol=2e-5)
    # the text encoder itself was trained: the base model with only the trained text encoder differs
    base = _image(_pipeline())
    only_text = _image(_pipeline(text_encoder=CLIPTextModel.from_pretrained(result["text_encoder"])))
    assert np.abs(only_text - base).max() > 1e-4


def test_skip_save_text_encoder_keeps_the_posterior_only(tmp_path):
    result = main(_args(tmp_path, "skip", "--max_train_steps", "1", "--skip_save_text_encoder"))
    assert "text_encoder" not in result and not (tmp_path / "skip" / "text_encoder").exists()
    assert os.path.exists(result["text_encoder_bayesian_state"])


def test_lora_export_holds_text_encoder_keys_that_stock_load_lora_weights_applies(tmp_path):
    from safetensors.torch import load_file

    result = main(_args(tmp_path, "lora", "--train_mode", "lora", "--max_train_steps", "3", "--learning_rate", "1e-2"))
    keys = load_file(result["lora_weights"]).keys()
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert text_keys and all(".self_attn." in k for k in text_keys)
    assert {k.rsplit(".", 3)[-3] for k in text_keys} == {"q_proj", "k_proj", "v_proj", "out_proj"}

    stock = _pipeline()
    stock.load_lora_weights(str(tmp_path / "lora"))
    in_library = _pipeline()
    bayeslayers.load(in_library.unet, result["bayesian_state"])
    bayeslayers.load(in_library.text_encoder, result["text_encoder_bayesian_state"])
    in_library.unet.eval(), in_library.text_encoder.eval()
    np.testing.assert_allclose(_image(stock), _image(in_library), atol=2e-5)
    # the text-encoder LoRA matters: without it the stock pipeline gives another image
    unet_only = _pipeline()
    bayeslayers.load(unet_only.unet, result["bayesian_state"])
    unet_only.unet.eval()
    assert np.abs(_image(unet_only) - _image(in_library)).max() > 1e-4


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_text_encoder_posterior(tmp_path):
    from safetensors.torch import load_file

    def on_step(args, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    straight = main(_args(tmp_path, "straight", "--max_train_steps", "3", "--skip_save_text_encoder"))
    stopped = main(
        _args(
            tmp_path, "resumed", "--max_train_steps", "3", "--checkpointing_steps", "100", "--skip_save_text_encoder"
        ),
        step_callback=on_step,
    )
    assert stopped == {"interrupted": True, "step": 2}
    saved = load_file(str(tmp_path / "resumed" / "checkpoint-2" / "params.safetensors"))
    assert any(k.startswith("text_encoder.") and k.endswith("weight_rho") for k in saved)
    resumed = main(
        _args(
            tmp_path,
            "resumed",
            "--max_train_steps",
            "3",
            "--resume_from_checkpoint",
            "latest",
            "--skip_save_text_encoder",
        )
    )
    a, b = load_file(straight["text_encoder_bayesian_state"]), load_file(resumed["text_encoder_bayesian_state"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_plain_train_text_encoder_trains_every_text_encoder_weight(tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    args = parse_args(
        [
            "--output_dir",
            str(tmp_path / "plain"),
            "--train_batch_size",
            "1",
            "--seed",
            "0",
            "--report_to",
            "none",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "2",
            "--train_text_encoder",
            "--no-bayesian",
        ]
    )
    result = main(args)
    assert "text_encoder_bayesian_state" not in result and "bayesian_state" not in result
    base = CLIPTextModel.from_pretrained(tiny_sd.pipeline_path(), subfolder="text_encoder").state_dict()
    trained = load_file(os.path.join(result["text_encoder"], "model.safetensors"))
    changed = [k for k in base if k in trained and not torch.equal(base[k], trained[k])]
    assert any("self_attn.q_proj.weight" in k for k in changed) and any("token_embedding" in k for k in changed)


def test_posterior_sampling_draws_the_text_encoder_posterior_too(full_run):
    from bayeslayers.integrations import sample

    tmp, _ = full_run
    args = sample.parse_args(
        [
            "--model_dir",
            str(tmp / "full"),
            "--prompt",
            PROMPT,
            "--num_posterior_samples",
            "3",
            "--num_inference_steps",
            "3",
        ]
    )
    pipe = sample.load_bayesian_pipeline(args)
    assert len(bayeslayers.bayesian_modules(pipe.text_encoder)) == 12
    (row,) = sample.main(args)
    assert row["mean_pixel_std"] > 0
