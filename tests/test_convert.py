"""convert / to_deterministic / save / load on a diffusers UNet2DConditionModel, and target semantics."""

import pytest
import torch
import torch.nn as nn
from tiny_models import tiny_unet, unet_inputs

import bayeslayers


def _out(unet, inputs):
    sample, timesteps, text = inputs
    return unet(sample, timesteps, encoder_hidden_states=text).sample


def _preset_names(unet):
    return [name for name, _ in bayeslayers.bayesian_modules(unet)]


def test_dreambooth_preset_selects_self_attention_and_ff_in_blocks():
    unet = bayeslayers.convert(tiny_unet(), preset="dreambooth-bnn")
    names = _preset_names(unet)
    assert names and len(names) % 6 == 0
    for name in names:
        assert name.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")
        assert ".attn1." in name or ".ff.net." in name
    assert not any(".attn2." in n or "conv" in n or "time_emb" in n for n in names)
    assert isinstance(unet.get_submodule(names[0]), bayeslayers.BayesLinear)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_unet_training_export_and_checkpoint_round_trip(mode, tmp_path):
    inputs = unet_inputs()
    original = tiny_unet()
    with torch.no_grad():
        reference_out = _out(original.eval(), inputs)
    preset = "dreambooth-bnn" if mode == "full" else "dreambooth-bnn-lora"
    unet = bayeslayers.convert(tiny_unet(), preset=preset, init_sigma=0.05)
    if mode == "lora":
        trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    with torch.no_grad():
        torch.testing.assert_close(_out(unet.eval(), inputs), reference_out, rtol=1e-5, atol=1e-6)
        unet.train()
        assert not torch.allclose(_out(unet, inputs), reference_out, atol=1e-4)

    # Only the Bayesian layers train here, so their saved state alone reproduces the model.
    bayesian = [p for _, m in bayeslayers.bayesian_modules(unet) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(bayesian, lr=1e-3)
    for _ in range(3):
        loss = _out(unet, inputs).square().mean() + 1e-4 * bayeslayers.kl_loss(unet)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    unet.eval()
    with torch.no_grad():
        bayes_eval = _out(unet, inputs)
    assert not torch.allclose(bayes_eval, reference_out, atol=1e-5)

    path = tmp_path / "posterior.safetensors"
    bayeslayers.save(unet, path)
    restored = bayeslayers.load(tiny_unet(), path).eval()  # an unconverted model is converted like the saved one
    with torch.no_grad():
        torch.testing.assert_close(_out(restored, inputs), bayes_eval, rtol=0, atol=0)
        with bayeslayers.sampling(unet, seed=3), bayeslayers.sampling(restored, seed=3):
            torch.testing.assert_close(_out(restored, inputs), _out(unet, inputs), rtol=0, atol=0)

    plain = bayeslayers.to_deterministic(unet)
    assert not bayeslayers.bayesian_modules(plain)
    assert all(type(m).__module__.startswith(("torch", "diffusers")) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(_out(plain, inputs), bayes_eval, rtol=1e-5, atol=1e-6)


def test_load_into_mismatched_model_names_the_first_mismatch(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bayeslayers.convert(model, target_modules=["0", "2"])
    path = tmp_path / "m.safetensors"
    bayeslayers.save(model, path)

    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    bayeslayers.convert(other, target_modules=["0", "2"])
    with pytest.raises(ValueError, match=r"2\.weight_mu has shape \(3, 8\) in the model but \(2, 8\)"):
        bayeslayers.load(other, path)

    partial = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bayeslayers.convert(partial, target_modules=["0"])
    with pytest.raises(ValueError, match="checkpoint layer '2' is not a Bayesian layer"):
        bayeslayers.load(partial, path)

    lora = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bayeslayers.convert(lora, target_modules=["0", "2"], mode="lora")
    with pytest.raises(ValueError, match="'lora_linear' in the model but 'linear'"):
        bayeslayers.load(lora, path)

    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors' is not a readable safetensors file"):
        bayeslayers.load(model, tmp_path / "bad.safetensors")


def test_save_keeps_the_previous_checkpoint_when_it_fails(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8))
    bayeslayers.convert(model, target_modules=["0"])
    path = tmp_path / "m.safetensors"
    bayeslayers.save(model, path)
    before = path.read_bytes()
    with torch.no_grad():
        model[0].weight_rho[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_rho of layer '0' holds NaN"):
        bayeslayers.save(model, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.proj = nn.Linear(4, 4)
        self.block.attn = nn.Linear(4, 4)
        self.conv = nn.Conv2d(2, 2, 1)


class SubclassedLinear(nn.Linear):
    pass


def test_target_and_exclude_semantics_follow_peft():
    names = lambda m: sorted(n for n, _ in bayeslayers.bayesian_modules(m))  # noqa: E731
    assert names(bayeslayers.convert(Net(), target_modules=["proj"])) == ["block.proj", "proj"]
    assert names(bayeslayers.convert(Net(), target_modules=["block.proj"])) == ["block.proj"]
    assert names(bayeslayers.convert(Net(), target_modules="block\\..*")) == ["block.attn", "block.proj"]
    assert names(bayeslayers.convert(Net(), target_modules="proj")) == ["proj"]  # full match only
    assert names(bayeslayers.convert(Net(), target_modules=["proj", "attn"], exclude_modules=["block.proj"])) == [
        "block.attn",
        "proj",
    ]
    assert names(bayeslayers.convert(Net(), target_modules=["conv"])) == ["conv"]
    sub = nn.Sequential(SubclassedLinear(3, 3))
    assert isinstance(bayeslayers.convert(sub, target_modules=["0"])[0], bayeslayers.BayesLinear)


def test_full_mode_keeps_requires_grad_and_lora_mode_freezes():
    net = Net()
    net.block.attn.requires_grad_(False)
    bayeslayers.convert(net, target_modules=["proj"])
    assert not net.block.attn.weight.requires_grad and net.conv.weight.requires_grad
    assert net.proj.weight_mu.requires_grad and net.proj.weight_rho.requires_grad
    lora = bayeslayers.convert(Net(), target_modules=["proj"], mode="lora", rank=2)
    assert not lora.conv.weight.requires_grad and not lora.proj.base_layer.weight.requires_grad
    assert lora.proj.lora_B.weight_mu.requires_grad


def test_convert_errors_are_clear():
    with pytest.raises(ValueError, match="matched no convertible module.*candidates include: 'proj'"):
        bayeslayers.convert(Net(), target_modules=["nothing"])
    net = bayeslayers.convert(Net(), target_modules=["proj"])
    with pytest.raises(
        ValueError,
        match=r"^module 'proj' is already a Bayesian layer \(BayesLinear\); converting it again is not supported$",
    ):
        bayeslayers.convert(net, target_modules=["proj"])
    lora = bayeslayers.convert(Net(), target_modules=["proj"], mode="lora")
    with pytest.raises(
        ValueError,
        match=r"^module 'proj\.base_layer' is already part of the Bayesian layer 'proj'; converting it again is not "
        "supported$",
    ):
        bayeslayers.convert(lora, target_modules=["proj.base_layer"])
    with pytest.raises(ValueError, match=r"in mode 'full'; candidates include: none$"):
        bayeslayers.convert(nn.Sequential(nn.GELU()), target_modules=["0"])
    with pytest.raises(
        ValueError, match="^convert needs target_modules or a preset naming the modules to make Bayesian$"
    ):
        bayeslayers.convert(Net())
    with pytest.raises(ValueError, match="unknown preset 'nope'; available presets: .*dreambooth-bnn"):
        bayeslayers.convert(Net(), preset="nope")
    with pytest.raises(ValueError, match="mode must be one of"):
        bayeslayers.convert(Net(), target_modules=["proj"], mode="half")
    with pytest.raises(ValueError, match="init_sigma must be a positive finite number, got 0"):
        bayeslayers.convert(Net(), target_modules=["proj"], init_sigma=0)
    with pytest.raises(ValueError, match="prior_sigma must be a positive finite number, got -1"):
        bayeslayers.convert(Net(), target_modules=["proj"], prior_sigma=-1)
    with pytest.raises(ValueError, match="kl_direction must be one of"):
        bayeslayers.convert(Net(), target_modules=["proj"], kl_direction="both")
    with pytest.raises(ValueError, match="target_modules is not a valid regular expression"):
        bayeslayers.convert(Net(), target_modules="(")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        bayeslayers.convert(Net(), target_modules=["proj"], mode="lora", rank=0)


def test_a_second_convert_call_may_exclude_a_layer_converted_before():
    net = bayeslayers.convert(Net(), target_modules=["proj"])
    bayeslayers.convert(net, target_modules=["proj", "conv"], exclude_modules=["proj"], prior_sigma=0.2)
    assert isinstance(net.conv, bayeslayers.BayesConv2d) and net.conv.prior_sigma == 0.2
    assert net.proj.prior_sigma == 0.01
    bayeslayers.convert(net, target_modules=".*(attn|proj)", exclude_modules="proj|block.proj")
    assert isinstance(net.block.attn, bayeslayers.BayesLinear)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_converted_layers_take_over_the_training_flag(mode):
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    reference = {name: p.clone() for name, p in model.state_dict().items()}
    x = torch.randn(3, 6)
    expected = model(x)
    bayeslayers.convert(model, target_modules=["0", "2"], mode=mode, init_sigma=0.3)
    assert not any(m.training for m in model.modules())  # nested LoRA factors included
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the mean (LoRA: B = 0), no sample drawn
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items() if k in reference)
    model.train()
    assert all(m.training for m in model.modules())


def test_layers_built_directly_get_distinct_noise_ids():
    lora = bayeslayers.BayesLoRALinear(nn.Linear(8, 8), rank=8, bayesian_factors="AB", init_sigma=0.5)
    assert lora.lora_A.layer_id != lora.lora_B.layer_id
    a, b = bayeslayers.BayesLinear(8, 8), bayeslayers.BayesLinear(8, 8)
    assert len({a.layer_id, b.layer_id, lora.lora_A.layer_id, lora.lora_B.layer_id}) == 4
    with bayeslayers.sampling(nn.ModuleList([a, b]), seed=3):
        assert a.fixed_seed != b.fixed_seed
