"""peft LoRA adapters made Bayesian in place: training, peft's own tools, saving the mean through peft / diffusers
into stock models, the posterior through bayeslayers.save, and the fused LoRA kernel path."""

import contextlib

import pytest
import torch
import torch.nn as nn
from reference import TOLERANCE, relative_error
from tiny_models import tiny_llama, tiny_unet, unet_inputs

import bayeslayers
from bayeslayers.kernels import fusion

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bayeslayers.peft_lora import BayesPeftConv2d, BayesPeftLinear, PeftBayesLinear  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def peft_llama(adapter_seed: int = 5, **lora):
    """The tiny Llama (base seed 0) with a rank-4 peft adapter whose factors come from ``adapter_seed``."""
    model = tiny_llama(0)
    torch.manual_seed(adapter_seed)
    options = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS) | lora
    return get_peft_model(model, LoraConfig(**options))


def peft_unet(targets=UNET_TARGETS, adapter_seed: int = 5):
    unet = tiny_unet(0)
    torch.manual_seed(adapter_seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    return unet


def tokens(seed: int = 3):
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def llama_loss(model):
    ids = tokens()
    return model(input_ids=ids, labels=ids).loss


def unet_loss(unet):
    sample, timesteps, text = unet_inputs()
    return unet(sample, timesteps, text).sample.square().mean()


def train(model, loss_fn, steps: int = 3, lr: float = 1e-2, kl_weight: float = 1e-3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = loss_fn(model)
        if bayeslayers.posterior_layers(model):
            loss = loss + kl_weight * bayeslayers.kl_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens(4)).logits


def unet_out(unet):
    unet.eval()
    with torch.no_grad():
        return unet(*unet_inputs(seed=7)).sample


# ----------------------------------------------------------------------------------- transformers + get_peft_model
def test_causal_lm_preset_trains_and_saves_the_mean_through_peft_into_a_stock_model(tmp_path):
    model = peft_llama()
    stock_keys = set(get_peft_model_state_dict(model))
    bayeslayers.convert(model, preset="causal-lm-bnn-peft")
    converted = bayeslayers.bayesian_modules(model)
    assert len(converted) == 2 * len(LLAMA_TARGETS)
    assert all(isinstance(m, BayesPeftLinear) and isinstance(m, peft.tuners.lora.Linear) for _, m in converted)
    layer = converted[0][1]
    assert isinstance(layer.lora_A["default"], PeftBayesLinear) and type(layer.lora_B["default"]) is nn.Linear
    assert layer.lora_A["default"].weight_rho.requires_grad and layer.lora_A["default"].prior_mu is not None

    # sampling in training (each forward a fresh draw: B is no longer zero), the mean in eval, a KL with
    # gradients on rho
    train(model, llama_loss, steps=3)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=tokens()).logits, model(input_ids=tokens()).logits)
    assert torch.equal(logits(model), logits(model))
    kl = bayeslayers.kl_loss(model)
    kl.backward()
    assert kl > 0 and layer.lora_A["default"].weight_rho.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.abs().sum() > 0  # B (plain) was trained

    # peft's state dict: the stock keys (no rho, no prior), the posterior mean under "weight"
    state = get_peft_model_state_dict(model)
    assert set(state) == stock_keys
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    assert torch.equal(state[key], model.get_submodule(key[: -len(".lora_A.weight")]).lora_A["default"].weight_mu)

    model.save_pretrained(tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == stock_keys
    stock = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")
    assert not bayeslayers.bayesian_modules(stock)
    torch.testing.assert_close(logits(stock), logits(model), rtol=0, atol=0)


def test_peft_tools_keep_working_on_the_bayesian_adapter():
    model = train(peft_llama(), llama_loss, steps=2)
    base = logits(tiny_llama(0))
    bayeslayers.convert(model, mode="peft", bayesian_factors="AB", init_sigma=0.05)
    train(model, llama_loss, steps=2)
    mean = logits(model)
    assert relative_error(mean, base) > 1e-3

    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base)
    torch.testing.assert_close(logits(model), mean)

    torch.manual_seed(9)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    model.set_adapter("other")
    assert relative_error(logits(model), mean) > 1e-3
    bayes_rho = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight_rho
    assert not bayes_rho.requires_grad  # peft froze the inactive adapter, rho included
    model.set_adapter("default")
    assert bayes_rho.requires_grad
    torch.testing.assert_close(logits(model), mean)

    model.merge_adapter()
    torch.testing.assert_close(logits(model), mean, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), mean, rtol=1e-5, atol=1e-5)

    model.delete_adapter("other")
    plain = model.merge_and_unload()
    assert not bayeslayers.bayesian_modules(plain) and not any(isinstance(m, nn.ModuleDict) for m in plain.modules())
    torch.testing.assert_close(logits(plain), mean, rtol=1e-5, atol=1e-5)


def test_to_deterministic_gives_back_a_stock_peft_model_and_deleting_the_adapter_too():
    model = peft_llama()
    bayeslayers.convert(model, mode="peft", bayesian_factors="B", factor_prior="zero")
    train(model, llama_loss, steps=2)
    mean = logits(model)
    bayeslayers.to_deterministic(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer) is peft.tuners.lora.Linear and type(layer.lora_B["default"]) is nn.Linear
    assert layer.lora_B["default"].weight.requires_grad
    torch.testing.assert_close(logits(model), mean, rtol=0, atol=0)

    other = peft_llama()
    bayeslayers.convert(other, mode="peft")
    other.base_model.model.model.layers[0].self_attn.q_proj.delete_adapter("default")
    assert type(other.base_model.model.model.layers[0].self_attn.q_proj) is peft.tuners.lora.Linear
    assert len(bayeslayers.bayesian_modules(other)) == 2 * len(LLAMA_TARGETS) - 1


def test_posterior_resumes_exactly_through_bayeslayers_save(tmp_path):
    options = dict(
        mode="peft", bayesian_factors="AB", init_sigma=0.02, prior_sigma=0.05, kl_direction="pq", prior_dtype="bfloat16"
    )
    model = peft_llama()
    bayeslayers.convert(model, **options)
    train(model, llama_loss, steps=3)
    bayeslayers.save(model, tmp_path / "posterior.safetensors")

    fresh = peft_llama(adapter_seed=77)  # different adapter values, not converted
    reconverted = peft_llama(adapter_seed=78)  # converted with other (non-structural) options
    bayeslayers.convert(reconverted, mode="peft", bayesian_factors="AB", init_sigma=0.3, prior_sigma=1.0)
    for other in (fresh, reconverted):
        assert relative_error(logits(other), logits(model)) > 1e-4
        bayeslayers.load(other, tmp_path / "posterior.safetensors")
        torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)
        for (name, a), (_, b) in zip(bayeslayers.posterior_layers(model), bayeslayers.posterior_layers(other)):
            assert a.options() == b.options() and a.prior_mu.dtype == torch.bfloat16, name
            for tensor in ("weight_mu", "weight_rho", "prior_mu"):
                assert torch.equal(getattr(a, tensor), getattr(b, tensor)), (name, tensor)

    # one more identical step each: the same samples, the same updates
    states = []
    for m in (model, fresh):
        torch.manual_seed(21)
        train(m, llama_loss, steps=1)
        states.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])

    # model.state_dict() stays loadable into the converted model (the mean under peft's keys)
    fresh.load_state_dict(model.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------- diffusers + add_adapter
def test_unet_add_adapter_preset_trains_and_saves_through_diffusers_into_a_stock_unet(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet = peft_unet()
    with pytest.raises(ValueError, match="mode='peft'"):
        bayeslayers.convert(unet, preset="dreambooth-bnn-lora")
    bayeslayers.convert(unet, preset="dreambooth-bnn-peft")
    layers = bayeslayers.bayesian_modules(unet)
    adapted = [n for n, m in unet.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert [n for n, _ in layers] == adapted and all(n.endswith(tuple(UNET_TARGETS)) for n in adapted)
    b = layers[0][1].lora_B["default"]
    assert isinstance(b, PeftBayesLinear) and b.prior_mu is None  # the zero-mean prior
    train(unet, unet_loss, steps=2)
    assert b.weight_mu.abs().sum() > 0

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=state)
    stock = tiny_unet(0)
    stock.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", weight_name=LORA_FILE)
    torch.testing.assert_close(unet_out(stock), unet_out(unet), rtol=0, atol=0)

    unet.save_lora_adapter(tmp_path / "adapter")
    stock = tiny_unet(0)
    stock.load_lora_adapter(str(tmp_path / "adapter"), prefix=None, weight_name=LORA_FILE)
    torch.testing.assert_close(unet_out(stock), unet_out(unet), rtol=0, atol=0)


def test_conv2d_adapters_become_bayesian_and_save_and_resume(tmp_path):
    unet = peft_unet(targets=["conv1", "conv2"])
    bayeslayers.convert(unet, mode="peft", bayesian_factors="AB", factor_prior="zero", init_sigma=0.02)
    layers = bayeslayers.bayesian_modules(unet)
    assert layers and all(isinstance(m, BayesPeftConv2d) for _, m in layers)
    assert all(isinstance(m.lora_A["default"], bayeslayers.BayesConv2d) for _, m in layers)
    train(unet, unet_loss, steps=2)
    bayeslayers.save(unet, tmp_path / "posterior.safetensors")

    unet.save_lora_adapter(tmp_path / "adapter")
    stock = tiny_unet(0)
    stock.load_lora_adapter(str(tmp_path / "adapter"), prefix=None, weight_name=LORA_FILE)
    torch.testing.assert_close(unet_out(stock), unet_out(unet), rtol=0, atol=0)

    resumed = peft_unet(targets=["conv1", "conv2"], adapter_seed=40)
    bayeslayers.load(resumed, tmp_path / "posterior.safetensors")
    torch.testing.assert_close(unet_out(resumed), unet_out(unet), rtol=0, atol=0)
    with bayeslayers.sampling(unet, seed=3), bayeslayers.sampling(resumed, seed=3):
        torch.testing.assert_close(unet_out(resumed), unet_out(unet), rtol=0, atol=0)


def test_peft_mode_errors_name_the_argument():
    model = peft_llama()
    with pytest.raises(ValueError, match="matched no convertible .* holding the adapter 'nope'"):
        bayeslayers.convert(model, mode="peft", adapter_name="nope")
    with pytest.raises(ValueError, match="bayesian_factors"):
        bayeslayers.convert(model, mode="peft", bayesian_factors="")
    with pytest.raises(ValueError, match="factor_prior"):
        bayeslayers.convert(model, mode="peft", factor_prior="pretrained")
    dora = peft_llama(use_dora=True)
    with pytest.raises(ValueError, match="LoRA variant"):
        bayeslayers.convert(dora, mode="peft")
    bayeslayers.convert(model, mode="peft", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="is already a Bayesian layer"):
        bayeslayers.convert(model, mode="peft", target_modules=["q_proj"])
    bayeslayers.convert(model, mode="peft")  # the remaining layers
    assert len(bayeslayers.bayesian_modules(model)) == 2 * len(LLAMA_TARGETS)


# ------------------------------------------------------------------------------------------- the fused LoRA path
@pytest.fixture
def lora_calls(monkeypatch):
    import bayeslayers.kernels.triton.triton_ops as triton_ops

    calls, launch = [], triton_ops.lora_matmul
    monkeypatch.setattr(triton_ops, "lora_matmul", lambda *a, **k: calls.append("lora_matmul") or launch(*a, **k))
    return calls


def _peft_linear(dropout: float = 0.0):
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(67, 45)), LoraConfig(r=5, lora_alpha=8, target_modules=["0"], lora_dropout=dropout)
    )
    bayeslayers.convert(model, mode="peft", bayesian_factors="AB", init_sigma=0.05)
    with torch.no_grad():  # a trained-looking B, so every gradient is non-zero
        model.base_model.model[0].lora_B["default"].weight_mu.normal_()
    return model.train()


def _step(model, x, fused: bool):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with fusion(fused_lora=fused), bayeslayers.sampling(model, seed=11):
        y = model(x)
        kl = bayeslayers.kl_loss(model)
    (y.float().square().sum() + 0.3 * kl).backward()
    return y.detach(), kl.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bayesian_peft_linear_takes_the_fused_lora_kernel_and_matches_peft_forward(lora_calls, dtype):
    bayeslayers.set_backend("triton")
    model = _peft_linear()
    x = torch.randn(2, 19, 67)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        want = _step(model, x, fused=False)
        assert lora_calls == []
        got = _step(model, x, fused=True)
    assert lora_calls == ["lora_matmul", "lora_matmul"]  # forward, input gradient
    assert relative_error(got[0], want[0]) < TOLERANCE[dtype] and relative_error(got[1], want[1]) < 2e-5
    assert relative_error(got[2], want[2]) < TOLERANCE[dtype]
    assert got[3].keys() == want[3].keys() and len(want[3]) == 4  # mu and rho of A and B
    for name in want[3]:
        assert relative_error(got[3][name], want[3][name]) < TOLERANCE[dtype], name


def test_fused_lora_is_left_to_peft_with_dropout_or_a_disabled_adapter(lora_calls):
    bayeslayers.set_backend("triton")
    model = _peft_linear(dropout=0.1)
    with fusion(fused_lora=True):
        model(torch.randn(3, 67))
        assert lora_calls == []
        model.eval()
        model(torch.randn(3, 67))  # dropout is the identity in eval: fused
        assert lora_calls == ["lora_matmul"]
        with model.disable_adapter():
            y = model(torch.randn(3, 67))
        assert lora_calls == ["lora_matmul"] and y.shape == (3, 45)
