"""DreamBooth-BNN recipe smoke tests on a random tiny pipeline: exports load in stock diffusers, resume is exact,
bad input fails before training."""

import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import RECIPE_PROMPT as PROMPT
from tiny_models import recipe_argv

import bayeslayers
from bayeslayers.integrations.dreambooth import main, parse_args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import recipe_workspace

    return recipe_workspace(tmp_path_factory.mktemp("dreambooth"))


def _args(workspace, out, *extra):
    return parse_args(recipe_argv(workspace, out, "--num_inference_steps", "3", *extra))


def _image(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_exported_model_loads_in_stock_diffusers_and_matches_the_mean_model(workspace, mode):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    root, pipe_path, _ = workspace
    out = root / f"out-{mode}"
    result = main(
        _args(
            workspace,
            f"out-{mode}",
            "--train_mode",
            mode,
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "2",
            "--checkpoints_total_limit",
            "1",
            "--kl_weight",
            "1e-3",
            "--validation_prompt",
            PROMPT,
            "--validation_steps",
            "2",
        )
    )
    assert os.path.exists(result["validation_grid"]) and os.path.exists(result["curves"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    card = (out / "README.md").read_text()
    assert "![final validation grid](validation/step-000004.png)" in card
    assert f"bayeslayers-dreambooth --pretrained_model_name_or_path {pipe_path}" in card
    grid = Image.open(result["validation_grid"])
    assert grid.width >= 4 * 256 and grid.height > 256  # 4 images of 16 px, upscaled, under a caption row

    if mode == "full":
        # The exported UNet holds the trained non-Bayesian layers too; the Bayesian state goes on top of it.
        stock = StableDiffusionPipeline.from_pretrained(
            pipe_path, unet=UNet2DConditionModel.from_pretrained(result["unet"]), safety_checker=None
        )
        in_library = StableDiffusionPipeline.from_pretrained(
            pipe_path, unet=UNet2DConditionModel.from_pretrained(result["unet"]), safety_checker=None
        )
    else:
        stock = StableDiffusionPipeline.from_pretrained(pipe_path, safety_checker=None)
        stock.load_lora_weights(str(out))
        in_library = StableDiffusionPipeline.from_pretrained(pipe_path, safety_checker=None)
    bayeslayers.load(in_library.unet, result["bayesian_state"])
    assert bayeslayers.bayesian_modules(in_library.unet) and not bayeslayers.bayesian_modules(stock.unet)
    in_library.unet.eval()
    base = _image(StableDiffusionPipeline.from_pretrained(pipe_path, safety_checker=None))
    ours, theirs = _image(in_library), _image(stock)
    np.testing.assert_allclose(theirs, ours, atol=2e-5)
    assert np.abs(ours - base).max() > 1e-4  # training changed the model


def test_use_peft_trains_a_peft_adapter_that_stock_diffusers_and_peft_tools_read(workspace):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    root, pipe_path, _ = workspace
    with pytest.raises(ValueError, match="--use_peft needs --train_mode lora"):
        _args(workspace, "out-peft-full", "--use_peft")
    flags = ("--train_mode", "lora", "--use_peft", "--max_train_steps", "3", "--kl_weight", "1e-3")
    result = main(_args(workspace, "out-peft", *flags))
    header = bayeslayers.read_metadata(result["bayesian_state"])
    assert {entry["type"] for entry in header["layers"].values()} == {"peft_lora_linear"}
    assert all(entry["options"]["bayesian_factors"] == "B" for entry in header["layers"].values())

    stock = StableDiffusionPipeline.from_pretrained(pipe_path, safety_checker=None)
    stock.load_lora_weights(str(root / "out-peft"))
    in_library = StableDiffusionPipeline.from_pretrained(pipe_path, safety_checker=None)
    targets = bayeslayers.get_preset("dreambooth-bnn-lora").target_modules
    in_library.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    bayeslayers.load(in_library.unet, result["bayesian_state"])
    assert len(bayeslayers.bayesian_modules(in_library.unet)) == len(header["layers"])
    in_library.unet.eval()
    base = _image(StableDiffusionPipeline.from_pretrained(pipe_path, safety_checker=None))
    ours, theirs = _image(in_library), _image(stock)
    np.testing.assert_allclose(theirs, ours, atol=2e-5)
    assert np.abs(ours - base).max() > 1e-4  # training changed the model
    in_library.unet.disable_adapters()  # a peft tool on the Bayesian UNet: back to the base model
    np.testing.assert_allclose(_image(in_library), base, atol=2e-5)


@pytest.mark.parametrize(
    "step_flags",
    [(), ("--sigma_space", "--rho_learning_rate", "1e-3"), ("--optimizer", "ivon", "--ivon_beta2", "0.9")],
    ids=["adamw", "sigma-space", "ivon"],
)
def test_interrupted_run_resumes_to_the_same_weights(workspace, step_flags):
    from safetensors.torch import load_file

    kl_weight = "0" if "ivon" in step_flags else "1e-2"  # IVON's prior is its weight decay

    def on_step(args, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    name = "-".join(["run", *step_flags])
    full = main(_args(workspace, f"straight{name}", "--max_train_steps", "5", "--kl_weight", kl_weight, *step_flags))
    stopped = main(
        _args(
            workspace,
            f"resumed{name}",
            "--max_train_steps",
            "5",
            "--kl_weight",
            kl_weight,
            "--checkpointing_steps",
            "100",
            *step_flags,
        ),
        step_callback=on_step,
    )
    assert stopped == {"interrupted": True, "step": 3}
    resumed = main(
        _args(
            workspace,
            f"resumed{name}",
            "--max_train_steps",
            "5",
            "--kl_weight",
            kl_weight,
            "--resume_from_checkpoint",
            "latest",
            *step_flags,
        )
    )
    assert resumed["steps"] == 5
    a, b = load_file(full["bayesian_state"]), load_file(resumed["bayesian_state"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_bad_input_fails_before_training(workspace, tmp_path):
    root, pipe, images = workspace
    base = ["--pretrained_model_name_or_path", pipe, "--instance_prompt", PROMPT]
    with pytest.raises(ValueError, match="--instance_data_dir must be an existing directory"):
        parse_args(base + ["--instance_data_dir", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        parse_args(base + ["--instance_data_dir", str(empty)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        parse_args(base + ["--instance_data_dir", str(broken)])
    with pytest.raises(ValueError, match="--bayes_preset must be one of"):
        parse_args(base + ["--instance_data_dir", images, "--bayes_preset", "nope"])
    with pytest.raises(ValueError, match="--kl_weight must be >= 0"):
        parse_args(base + ["--instance_data_dir", images, "--kl_weight", "-1"])
    with pytest.raises(ValueError, match="--resolution must be divisible by the VAE factor 2"):
        main(
            parse_args(
                base
                + [
                    "--instance_data_dir",
                    images,
                    "--resolution",
                    "15",
                    "--output_dir",
                    str(tmp_path / "o"),
                    "--report_to",
                    "none",
                ]
            )
        )


def test_posterior_sampling_writes_grid_and_std_map(workspace):
    from bayeslayers.integrations import sample

    root, pipe, _ = workspace
    main(_args(workspace, "for-sampling", "--max_train_steps", "2", "--init_sigma", "0.05"))
    args = sample.parse_args(
        [
            "--model_dir",
            str(root / "for-sampling"),
            "--pretrained_model_name_or_path",
            pipe,
            "--prompt",
            PROMPT,
            "--num_posterior_samples",
            "3",
            "--num_inference_steps",
            "3",
        ]
    )
    (row,) = sample.main(args)
    assert Image.open(row["grid"]).size[0] >= 3 * 256 and Image.open(row["std_map"]).size[0] >= 2 * 256
    assert row["mean_pixel_std"] > 0  # posterior samples differ
    with pytest.raises(ValueError, match="holds no bayesian_state.safetensors"):
        sample.parse_args(["--model_dir", str(root), "--prompt", PROMPT])


def test_fused_optimizer_trains_as_torch_adamw_and_resumes(workspace):
    """Without clipping the recipe takes FusedBayesAdamW (and, at KL weight 0, stores no prior): the same weights
    as torch AdamW, and exact across an interrupted run."""
    from safetensors.torch import load_file

    def on_step(args, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    flags = ("--max_train_steps", "4", "--max_grad_norm", "0", "--checkpointing_steps", "100")
    fused = main(_args(workspace, "fused", *flags))
    plain = main(_args(workspace, "unfused", *flags, "--no-fused_optimizer"))
    assert main(_args(workspace, "fused-resumed", *flags), step_callback=on_step) == {"interrupted": True, "step": 2}
    resumed = main(_args(workspace, "fused-resumed", *flags, "--resume_from_checkpoint", "latest"))
    a, b, c = (load_file(run["bayesian_state"]) for run in (fused, plain, resumed))
    assert a.keys() == b.keys() == c.keys() and not [k for k in a if k.endswith("prior_mu")]
    for key in a:
        # 1e-6 of the tensor's largest value: the C++ pass rounds AdamW's arithmetic its own way
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6 * float(b[key].abs().max()))
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=0)
    assert fused["final_kl"] is None  # no prior, so no KL to log
    assert (fused["optimizer"], plain["optimizer"], resumed["optimizer"]) == (
        "FusedBayesAdamW",
        "AdamW",
        "FusedBayesAdamW",
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--fused_optimizer"], "--max_grad_norm > 0 clips"),
        (["--fused_optimizer", "--max_grad_norm", "0", "--gradient_accumulation_steps", "2"], "accumulation"),
        (["--fused_optimizer", "--max_grad_norm", "0", "--mixed_precision", "fp16"], "bf16 works"),
        (["--fused_optimizer", "--max_grad_norm", "0", "--no-bayesian"], "--no-bayesian"),
    ],
)
def test_fused_optimizer_refuses_what_it_cannot_serve(workspace, extra, message):
    with pytest.raises(ValueError, match=f"--fused_optimizer cannot be used here: .*{message}"):
        _args(workspace, "refused", *extra)


def test_release_optimizer_state_drops_moments_and_gradients():
    from accelerate import Accelerator

    from bayeslayers.integrations.dreambooth.train import release_optimizer_state

    model = torch.nn.Linear(3, 2)
    optimizer = Accelerator(cpu=True).prepare(torch.optim.AdamW(model.parameters(), lr=1e-3))
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    model(torch.randn(4, 3)).square().sum().backward()
    assert len(optimizer.optimizer.state) == 2 and model.weight.grad is not None
    release_optimizer_state(optimizer)
    assert len(optimizer.optimizer.state) == 0 and model.weight.grad is None and model.bias.grad is None
