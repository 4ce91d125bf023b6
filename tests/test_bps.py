"""Bayesian Power Steering: shapes for the tiny and SD1.5 UNets, zero-init identity, gradients, attach/detach,
save/load, Bayesian convs, bad input."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import bayeslayers  # noqa: E402
from bayeslayers.integrations import tiny_sd  # noqa: E402
from bayeslayers.integrations.bps import PowerSteering  # noqa: E402

SD15_CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "sd15_unet.json"
FACTOR = 4  # the tiny pipeline's VAE factor


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tiny_sd.pipeline_path(), subfolder="unet").eval()
    return model.requires_grad_(False)


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(batch, 6, unet.config.cross_attention_dim, generator=g)
    condition = torch.rand(batch, 3, size * FACTOR, size * FACTOR, generator=g) * 2 - 1
    return sample, torch.tensor([10, 500][:batch]), text, condition


def _randomize_outputs(steering):
    """Non-zero output convs, so residuals are non-trivial."""
    with torch.no_grad():
        for name, p in steering.named_parameters():
            if "_out" in name:
                p.normal_(0, 0.05)


def _skip_and_up_shapes(unet, sample, timestep, text):
    """Shapes of the UNet's skip features (down side), its mid output and its up-block layer outputs."""
    shapes = {"up": []}

    def record_up(module, inputs, output):
        shapes["up"].append(tuple((output[0] if isinstance(output, tuple) else output).shape))

    from bayeslayers.integrations.bps.steer import _up_layers

    handles = [layer.register_forward_hook(record_up) for layer in _up_layers(unet)]
    handles.append(unet.mid_block.register_forward_hook(lambda m, i, o: shapes.__setitem__("mid", tuple(o.shape))))
    skips = []
    for block in unet.down_blocks:
        handles.append(block.register_forward_hook(lambda m, i, o: skips.extend(tuple(t.shape) for t in o[1])))
    handles.append(unet.conv_in.register_forward_hook(lambda m, i, o: skips.insert(0, tuple(o.shape))))
    with torch.no_grad():
        unet(sample, timestep, text)
    for h in handles:
        h.remove()
    shapes["down"] = skips
    return shapes


def test_residual_shapes_match_every_block_of_the_tiny_unet(unet):
    sample, timestep, text, condition = _inputs(unet)
    steering = PowerSteering.from_unet(unet, vae_scale_factor=FACTOR)
    temb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
    down, mid, up = steering(condition, temb)
    expected = _skip_and_up_shapes(unet, sample, timestep, text)
    assert [tuple(r.shape) for r in down] == expected["down"]
    assert tuple(mid.shape) == expected["mid"]
    assert [tuple(r.shape) for r in up] == expected["up"]


def test_residual_shapes_match_sd15_on_the_meta_device():
    from diffusers import UNet2DConditionModel

    config = json.loads(SD15_CONFIG.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        steering = PowerSteering.from_unet(unet)
        sample = torch.empty(1, 4, 64, 64)
        temb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=torch.tensor([1])))
        down, mid, up = steering(torch.empty(1, 3, 512, 512), temb)
    assert len(down) == 12 and len(up) == 12
    assert steering.down_scales[:3] == [16.0, 16.0, 1.0] and steering.mid_scale == 16.0
    assert [tuple(r.shape[1:]) for r in down[:4]] == [(320, 64, 64)] * 3 + [(320, 32, 32)]
    assert tuple(mid.shape[1:]) == (1280, 8, 8)
    assert tuple(up[0].shape[1:]) == (1280, 8, 8) and tuple(up[-1].shape[1:]) == (320, 64, 64)


def test_zero_init_identity_and_detach_restores_the_unet(unet):
    sample, timestep, text, condition = _inputs(unet)
    with torch.no_grad():
        frozen = unet(sample, timestep, text).sample
    steering = PowerSteering.from_unet(unet, vae_scale_factor=FACTOR)
    steerer = steering.attach(unet)
    with torch.no_grad(), steerer.conditioned(condition):
        assert torch.equal(unet(sample, timestep, text).sample, frozen)  # zero convs: exactly the frozen UNet
    _randomize_outputs(steering)
    with torch.no_grad(), steerer.conditioned(condition):
        steered = unet(sample, timestep, text).sample
    assert not torch.allclose(steered, frozen, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(unet(sample, timestep, text).sample, frozen)  # no condition: not steered
    steering.detach()
    with torch.no_grad():
        assert torch.equal(unet(sample, timestep, text).sample, frozen)
    assert not unet._forward_pre_hooks and not any(m._forward_hooks for m in unet.modules())


def test_only_steering_parameters_receive_gradients_and_cfg_batches_work(unet):
    sample, timestep, text, condition = _inputs(unet, batch=2)
    steering = PowerSteering.from_unet(unet, vae_scale_factor=FACTOR)
    _randomize_outputs(steering)
    steerer = steering.attach(unet)
    try:
        with steerer.conditioned(condition[:1]):  # one condition for a doubled (guidance) batch
            unet(sample, timestep, text).sample.square().mean().backward()
    finally:
        steering.detach()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in steering.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_save_and_load_round_trip(unet, tmp_path):
    steering = PowerSteering.from_unet(unet, vae_scale_factor=FACTOR, width=0.5, up_scales=[2.0] * 6)
    _randomize_outputs(steering)
    steering.save_pretrained(tmp_path / "steering")
    assert (tmp_path / "steering" / "diffusion_pytorch_model.safetensors").exists()
    restored = PowerSteering.from_pretrained(tmp_path / "steering")
    assert restored.up_scales == [2.0] * 6
    for (name, a), (_, b) in zip(steering.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name


def test_bayesian_steering_samples_in_training_and_uses_the_mean_in_eval(unet):
    sample, timestep, text, condition = _inputs(unet)
    steering = PowerSteering.from_unet(unet, vae_scale_factor=FACTOR)
    bayeslayers.convert(steering, target_modules=steering.conv_names(), init_sigma=0.01, prior_sigma=0.1)
    assert bayeslayers.bayesian_modules(steering)
    steerer = steering.attach(unet)
    try:
        with torch.no_grad():
            frozen = unet(sample, timestep, text).sample
            with steerer.conditioned(condition):
                steering.eval()
                assert torch.equal(unet(sample, timestep, text).sample, frozen)  # posterior mean = zero convs
                steering.train()
                assert not torch.equal(unet(sample, timestep, text).sample, frozen)
        assert float(bayeslayers.kl_loss(steering)) > 0
    finally:
        steering.detach()


def test_bad_input_is_named(unet):
    sample, timestep, text, condition = _inputs(unet)
    steering = PowerSteering.from_unet(unet, vae_scale_factor=FACTOR)
    steerer = steering.attach(unet)
    try:
        with pytest.raises(ValueError, match=r"condition must be 32x32 pixels for 8x8 latents"):
            with steerer.conditioned(condition[..., :16, :16]):
                unet(sample, timestep, text)
        with pytest.raises(ValueError, match=r"condition must be \(batch, 3, height, width\)"):
            with steerer.conditioned(condition[:, :1]):
                unet(sample, timestep, text)
        with pytest.raises(RuntimeError, match="already attached"):
            steering.attach(unet)
    finally:
        steering.detach()
    with pytest.raises(ValueError, match="down_scales must hold"):
        PowerSteering.from_unet(unet, vae_scale_factor=FACTOR, down_scales=[1.0])


def test_recipe_trains_checkpoints_resumes_and_evaluates(tmp_path):
    from bayeslayers.integrations.bps import train

    common = [
        "--output_dir",
        str(tmp_path),
        "--num_train_images",
        "32",
        "--train_batch_size",
        "4",
        "--num_validation_images",
        "2",
        "--num_inference_steps",
        "3",
        "--eval_images",
        "4",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "3",
        "--bayesian",
        "--steering_width",
        "0.5",
        "--num_posterior_samples",
        "2",
        "--init_sigma",
        "0.05",
        "--rho_learning_rate",
        "0.01",
        "--sigma_space",  # SigmaAdamW's state through a checkpoint and resume
    ]
    first = train.main(train.parse_args(common + ["--max_train_steps", "2"]))
    assert first["steps"] == 2 and (tmp_path / "checkpoint-2" / "params.safetensors").exists()
    resumed = train.main(train.parse_args(common + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]))
    assert resumed["steps"] == 3
    assert (tmp_path / "validation" / "step-000003.png").exists() and (tmp_path / "training_curves.png").exists()
    evaluation = resumed["evaluation"]
    assert set(evaluation) == {"steered", "frozen", "real_renders"}
    assert 0.9 < evaluation["real_renders"]["condition_adherence"] <= 1 + 1e-9  # edges of their own images
    assert set(evaluation["steered"]["accuracy"]) == {"colour", "shape", "size", "background"}
    assert evaluation["steered"]["frechet_distance"] >= 0
    posterior = resumed["posterior_samples"]
    assert Path(posterior["grid"]).exists() and posterior["mean_pixel_std"] > 0  # the samples differ
    restored = bayeslayers.load(
        PowerSteering.from_config(PowerSteering.load_config(tmp_path / "steering")),
        tmp_path / "steering_posterior.safetensors",
    )
    assert bayeslayers.bayesian_modules(restored)


def test_recipe_rejects_bad_flags(capsys):
    from bayeslayers.integrations.bps import train

    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--train_batch_size", "0"])
    assert "--train_batch_size must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--condition", "depth"])
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--num_posterior_samples", "1"])
    assert "--num_posterior_samples must be 0 or at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--rho_learning_rate", "0"])
    assert "--rho_learning_rate must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--bayesian", "--fused_optimizer"])
    assert "--fused_optimizer cannot be used here: --max_grad_norm > 0 clips" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--fused_optimizer", "--max_grad_norm", "0"])
    assert "it updates Bayesian layers: pass --bayesian" in capsys.readouterr().err
    args = train.parse_args(["--output_dir", "x", "--bayesian", "--fused_optimizer", "--max_grad_norm", "0"])
    assert args.fused_optimizer and not train.fused_optimizer_blocker(args)
    args = train.parse_args(["--output_dir", "x", "--bayesian", "--sigma_space", "--rho_learning_rate", "1e-3"])
    assert args.sigma_space is True and args.rho_learning_rate == 1e-3
    assert train.parse_args(["--output_dir", "x"]).sigma_space is False


def test_recipe_starts_from_a_trained_steering_network(tmp_path, unet):
    """--steering_model_name_or_path: the Bayesian posterior starts at, and its prior is centred on, the given
    network's weights; a network shaped for another UNet is refused naming the flag."""
    from bayeslayers.integrations.bps import train

    trained = PowerSteering.from_unet(unet, condition_channels=1, vae_scale_factor=FACTOR, width=0.5)
    _randomize_outputs(trained)
    trained.save_pretrained(tmp_path / "trained")
    args = train.parse_args(
        [
            "--output_dir",
            str(tmp_path / "run"),
            "--steering_model_name_or_path",
            str(tmp_path / "trained"),
            "--bayesian",
        ]
    )
    steering = train.initial_steering(args, unet, FACTOR)
    bayeslayers.convert(steering, target_modules=steering.conv_names())
    for name, module in trained.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            converted = steering.get_submodule(name)
            assert torch.equal(converted.weight_mu, module.weight) and torch.equal(converted.prior_mu, module.weight)

    other = PowerSteering(
        block_out_channels=(16, 32),
        layers_per_block=1,
        temb_channels=64,
        condition_channels=1,
        vae_scale_factor=FACTOR,
        norm_num_groups=8,
    )
    other.save_pretrained(tmp_path / "other")
    args = train.parse_args(
        ["--output_dir", str(tmp_path / "run"), "--steering_model_name_or_path", str(tmp_path / "other")]
    )
    with pytest.raises(ValueError, match="--steering_model_name_or_path .*block_out_channels"):
        train.initial_steering(args, unet, FACTOR)


@pytest.mark.parametrize("kind", ["edges", "layout"])
def test_condition_adherence_tells_matching_from_mismatched_conditions(kind):
    from bayeslayers.integrations.bps.conditions import make_condition
    from bayeslayers.integrations.bps.metrics import condition_adherence
    from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor

    images, scenes = make_dataset(64, 3, resolution=32)
    images = to_tensor(images)
    conditions = make_condition(kind, images, scenes)
    own = condition_adherence(conditions, images, kind)
    shuffled = condition_adherence(conditions.roll(1, 0), images, kind)
    assert own > 0.85 and own > shuffled + 0.3
    with pytest.raises(ValueError, match="kind must be"):
        condition_adherence(conditions, images, "depth")
