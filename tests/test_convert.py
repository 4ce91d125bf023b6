"""convert: a diffusers UNet2DConditionModel trained, saved, restored and exported; target semantics; the
argument checks; new layers starting like the plain layers they replace."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mixed_model import Mixed
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


def test_new_layers_start_like_the_plain_layers_they_replace():
    torch.manual_seed(0)
    for layer, fan_in in ((bayeslayers.BayesLinear(300, 200), 300), (bayeslayers.BayesConv2d(30, 200, 3), 270)):
        bound = 1 / fan_in**0.5  # nn.Linear / nn.Conv2d: kaiming_uniform(a=sqrt(5)) and the same bias bound
        for tensor in (layer.weight_mu, layer.bias):
            assert 0.98 * bound < float(tensor.detach().abs().max()) <= bound
    lora = bayeslayers.BayesLoRALinear(nn.Linear(300, 20), rank=64, bayesian_factors="AB", prior_sigma=0.2)
    assert 0.98 / 300**0.5 < float(lora.lora_A.weight_mu.detach().abs().max()) <= 1 / 300**0.5
    torch.testing.assert_close(lora.lora_A.prior_mu, lora.lora_A.weight_mu, rtol=0, atol=0)  # prior at A's start
    assert lora.lora_B.prior_mu is None and not bool(lora.lora_B.weight_mu.any())
    assert lora.lora_alpha == 64.0 and lora.scaling == 1.0
    assert not any(p.requires_grad for p in lora.base_layer.parameters())
    frozen_bias = nn.Linear(4, 3)
    frozen_bias.bias.requires_grad_(False)
    converted = bayeslayers.BayesLinear.from_module(frozen_bias)
    assert not converted.bias.requires_grad and converted.weight_mu.requires_grad
    assert not bayeslayers.BayesConv2d.from_module(nn.Conv2d(2, 2, 1, bias=False)).bias
    one_d = bayeslayers.BayesLinear(4, 3).eval()
    x = torch.randn(4)
    torch.testing.assert_close(one_d(x), F.linear(x, one_d.weight_mu, one_d.bias))
    conv = bayeslayers.BayesConv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2, bias=False)
    assert repr(conv).startswith(
        "BayesConv2d(2, 4, kernel_size=(3, 3), stride=(2, 2), padding=1, dilation=(2, 2), "
        "groups=2, padding_mode=zeros, bias=False, prior_mean=zero, prior_sigma=0.01"
    )
    assert "in_features=4, out_features=3, bias=True, prior_mean=zero" in repr(one_d)
    assert "rank=64, lora_alpha=64.0, bayesian_factors='AB'" in repr(lora)


def test_convert_checks_its_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        bayeslayers.convert({"a": 1}, target_modules=["a"])
    with pytest.raises(ValueError, match="convert needs target_modules or a preset"):
        bayeslayers.convert(Mixed())
    with pytest.raises(TypeError, match="config must be a bayeslayers.BayesConfig, got dict"):
        bayeslayers.convert(Mixed(), config={"target_modules": ["a"]})
    many = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(ValueError, match=r"candidates include: '0', '1', '2', '3', '4', '5', '6', '7'$"):
        bayeslayers.convert(many, target_modules=["x"])
    with pytest.raises(ValueError, match=r"matched no convertible module \(Linear/Conv2d\) in mode 'full'"):
        bayeslayers.convert(many, target_modules=["x"])
    model = bayeslayers.convert(
        Mixed(),
        target_modules=["a"],
        exclude_modules=["b"],
        config=bayeslayers.BayesConfig(target_modules=["b"], prior_sigma=0.3),
    )
    assert [n for n, _ in bayeslayers.bayesian_modules(model)] == ["a"] and model.a.prior_sigma == 0.3
    layer = bayeslayers.BayesLinear.from_module(nn.Linear(3, 2))
    plain = bayeslayers.to_deterministic(layer)
    assert type(plain) is nn.Linear and torch.equal(plain.weight, layer.weight_mu)
