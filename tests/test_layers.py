"""Every layer type and backend against a float64 reference that uses the same eps."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import (
    BACKENDS,
    DTYPE_TOLERANCES,
    KL_WEIGHT,
    kl_reference,
    randomize_layer,
    relative_error,
    sampled_weight,
)

import bayeslayers
from bayeslayers.backends import BACKENDS as BACKEND_OBJECTS


def _make(kind, direction, prior_dtype):
    if kind == "linear":
        base = nn.Linear(37, 29)
        layer = bayeslayers.BayesLinear.from_module(
            base, kl_direction=direction, prior_sigma=0.03, prior_dtype=prior_dtype
        )
        # a non-contiguous (B, T, C) input, as attention code produces
        x = torch.randn(5, 3, 37).transpose(0, 1)
        return layer, x, (lambda x, w, b: F.linear(x, w, b))
    base = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1, groups=2)
    layer = bayeslayers.BayesConv2d.from_module(base, kl_direction=direction, prior_sigma=0.03, prior_dtype=prior_dtype)
    return layer, torch.randn(2, 6, 11, 9), (lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "tol"), DTYPE_TOLERANCES)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize(("direction", "prior_dtype"), [("qp", None), ("pq", torch.bfloat16)])
def test_layer_matches_float64_reference(poisoned, backend, dtype, tol, kind, direction, prior_dtype):
    """Output, KL and the gradients of x, bias, mu and rho against float64 autograd on the backend's own eps."""
    bayeslayers.set_backend(backend)
    layer, x, map64 = _make(kind, direction, prior_dtype)
    randomize_layer(layer)
    layer.fixed_seed = 987654321
    x = x.to(dtype).requires_grad_(True)
    y = layer(x)
    upstream = torch.randn(y.shape, dtype=torch.float64)
    loss = (y.double() * upstream).sum() + KL_WEIGHT * layer.kl()
    loss.backward()
    assert y.dtype == dtype

    eps = bayeslayers.materialize_eps(layer.fixed_seed, layer.weight_mu.shape)
    mu = layer.weight_mu.detach().double().requires_grad_(True)
    rho = layer.weight_rho.detach().double().requires_grad_(True)
    bias = layer.bias.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y64 = map64(x64, sampled_weight(mu, rho, eps), bias)
    kl64 = kl_reference(mu, rho, layer.prior_mu, layer.prior_sigma, direction)
    ((y64 * upstream).sum() + KL_WEIGHT * kl64).backward()

    assert relative_error(y, y64) < tol
    assert relative_error(layer.kl(), kl64) < 1e-5
    for actual, expected in (
        (x.grad, x64.grad),
        (layer.bias.grad, bias.grad),
        (layer.weight_mu.grad, mu.grad),
        (layer.weight_rho.grad, rho.grad),
    ):
        assert relative_error(actual, expected) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("factors", ["AB", "B"])
def test_lora_matches_float64_reference(backend, kind, factors):
    bayeslayers.set_backend(backend)
    if kind == "linear":
        base, x = nn.Linear(21, 13), torch.randn(4, 21)
        layer = bayeslayers.BayesLoRALinear(base, rank=3, lora_alpha=6, bayesian_factors=factors)
        op_a = op_b = lambda x, w: F.linear(x, w)
    else:
        base, x = nn.Conv2d(5, 7, 3, padding=1), torch.randn(2, 5, 9, 7)
        layer = bayeslayers.BayesLoRAConv2d(base, rank=3, lora_alpha=6, bayesian_factors=factors)
        op_a, op_b = (lambda x, w: F.conv2d(x, w, None, 1, 1)), (lambda x, w: F.conv2d(x, w))
    for factor in (layer.lora_A, layer.lora_B):
        if isinstance(factor, bayeslayers.BayesianLayer):
            randomize_layer(factor)
            factor.fixed_seed = 1000 + factor.weight_mu.shape[0]
        else:
            nn.init.normal_(factor.weight, 0, 0.3)
    x.requires_grad_(True)
    y = layer(x)
    upstream = torch.randn_like(y)
    ((y * upstream).sum() + KL_WEIGHT * bayeslayers.kl_loss(layer)).backward()

    def weight64(factor):
        if not isinstance(factor, bayeslayers.BayesianLayer):
            return factor.weight.detach().double().requires_grad_(True), None
        mu = factor.weight_mu.detach().double().requires_grad_(True)
        rho = factor.weight_rho.detach().double().requires_grad_(True)
        eps = bayeslayers.materialize_eps(factor.fixed_seed, mu.shape)
        return (mu, rho), sampled_weight(mu, rho, eps)

    (a_params, w_a), (b_params, w_b) = weight64(layer.lora_A), weight64(layer.lora_B)
    w_a = a_params if w_a is None else w_a
    w_b = b_params if w_b is None else w_b
    x64 = x.detach().double().requires_grad_(True)
    y64 = base.double()(x64) + layer.scaling * op_b(op_a(x64, w_a), w_b)
    kl64 = 0
    for factor, params in ((layer.lora_A, a_params), (layer.lora_B, b_params)):
        if isinstance(factor, bayeslayers.BayesianLayer):
            kl64 = kl64 + kl_reference(params[0], params[1], factor.prior_mu, factor.prior_sigma, "qp")
    ((y64 * upstream).sum() + KL_WEIGHT * kl64).backward()

    assert relative_error(y, y64) < 1e-5
    assert relative_error(x.grad, x64.grad) < 1e-5
    for factor, params in ((layer.lora_A, a_params), (layer.lora_B, b_params)):
        if isinstance(factor, bayeslayers.BayesianLayer):
            assert relative_error(factor.weight_mu.grad, params[0].grad) < 1e-5
            assert relative_error(factor.weight_rho.grad, params[1].grad) < 1e-5
        else:
            assert relative_error(factor.weight.grad, params.grad) < 1e-5
    assert base.weight.grad is None and not base.weight.requires_grad


@pytest.mark.parametrize("direction", ["qp", "pq"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_torch_backend_gradcheck_float64(direction, kind):
    from bayeslayers.kernels import Posterior
    from bayeslayers.layer_maps import Conv2dMap, LinearMap

    backend = BACKEND_OBJECTS["torch"]
    if kind == "linear":
        layer_map, x, shape = LinearMap(), torch.randn(3, 4, dtype=torch.float64), (5, 4)
    else:
        layer_map = Conv2dMap((1, 1), (1, 1), (1, 1), 1)
        x, shape = torch.randn(1, 2, 4, 4, dtype=torch.float64), (3, 2, 3, 3)
    mu = (0.3 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    rho = torch.empty(shape, dtype=torch.float64).uniform_(-3, -1).requires_grad_(True)
    bias = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    prior = mu.detach() + 0.1 * torch.randn_like(mu)
    x.requires_grad_(True)

    def fn(x, mu, rho, bias):
        return backend.apply(layer_map, x, Posterior(mu, rho, prior, 0.2, direction), bias, 424242)

    assert torch.autograd.gradcheck(fn, (x, mu, rho, bias))


def test_backward_regenerates_the_forward_eps(monkeypatch):
    import bayeslayers.kernels.torch_impl as torch_ops

    calls = []
    original = torch_ops.torch_normal

    def recording_noise(seed, shape, device):
        eps = original(seed, shape, device)
        calls.append((int(seed.item()), eps.clone()))
        return eps

    monkeypatch.setattr(torch_ops, "torch_normal", recording_noise)
    bayeslayers.set_backend("torch")
    layer = bayeslayers.BayesLinear(33, 17)
    layer(torch.randn(2, 33)).sum().backward()
    assert len(calls) == 2
    (seed_fwd, eps_fwd), (seed_bwd, eps_bwd) = calls
    assert seed_fwd == seed_bwd
    assert torch.equal(eps_fwd, eps_bwd)
    assert 0.8 < float(eps_fwd.std()) < 1.2


def test_each_training_forward_draws_a_new_sample_and_eval_uses_the_mean():
    layer = bayeslayers.BayesLinear(16, 8, init_sigma=0.1)
    x = torch.randn(4, 16)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)
    assert layer.sampling_enabled is True and layer.fixed_seed is None
    layer.eval()
    assert layer.sampling_enabled is False
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight_mu, layer.bias), rtol=0, atol=0)


def test_sampling_context_fixes_one_sample_across_calls_and_layers_differ():
    model = nn.Sequential(bayeslayers.BayesLinear(8, 8, init_sigma=0.2), bayeslayers.BayesLinear(8, 8))
    model[0].layer_id, model[1].layer_id = 1, 2
    model.eval()
    x = torch.randn(3, 8)
    mean_out = model(x)
    with bayeslayers.sampling(model, seed=7):
        a, b = model(x), model(x)
    with bayeslayers.sampling(model, seed=8):
        c = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c) and not torch.allclose(a, mean_out)
    torch.testing.assert_close(model(x), mean_out, rtol=0, atol=0)


def test_autocast_bf16_uses_compute_dtype_and_keeps_fp32_parameters():
    layer = bayeslayers.BayesLinear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight_mu.dtype == torch.float32 and layer.weight_mu.grad.dtype == torch.float32


def test_three_dimensional_and_non_contiguous_inputs():
    layer = bayeslayers.BayesLinear(12, 6)
    layer.fixed_seed = 5
    x = torch.randn(12, 7, 2).permute(2, 1, 0)  # (B, T, C), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "padding,padding_mode,stride,dilation",
    [
        ("same", "zeros", 1, 1),
        ("same", "zeros", 1, (1, 2)),
        ((2, 1), "reflect", 1, 1),
        ("valid", "zeros", 2, 1),
        (1, "circular", (2, 1), 2),
    ],
)
def test_conv_options_match_nn_conv2d_in_eval(padding, padding_mode, stride, dilation):
    kernel = (3, 2) if padding == "same" else 3
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    layer = bayeslayers.BayesConv2d.from_module(conv).eval()
    x = torch.randn(2, 4, 10, 9)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer(x[0]), conv(x[0]))
    torch.testing.assert_close(layer.to_deterministic()(x), conv(x))
    layer.train()
    y = layer(x)
    assert y.shape == conv(x).shape
    y.sum().backward()
    assert layer.weight_rho.grad is not None


@pytest.mark.parametrize(
    "kind,args",
    [
        ("linear", (5, 7)),
        ("linear", (1, 3)),
        ("linear", (0, 4)),
        ("conv2d", (3, 4, 3)),
        ("conv2d", (3, 1, (2, 3))),
        ("conv2d", (0, 2, 3)),
        ("conv2d", (1, 2, 1)),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_layers_built_directly_start_like_the_plain_layer_with_its_defaults(kind, args):
    """Same seed, same weight and bias as nn.Linear / nn.Conv2d (zero-size inputs too), and the same defaults."""
    plain_type, layer_type = (
        (nn.Linear, bayeslayers.BayesLinear) if kind == "linear" else (nn.Conv2d, bayeslayers.BayesConv2d)
    )
    torch.manual_seed(3)
    plain = plain_type(*args)
    torch.manual_seed(3)
    layer = layer_type(*args).eval()
    torch.testing.assert_close(layer.weight_mu, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, plain.bias, rtol=0, atol=0)
    if args[0]:
        x = torch.randn(2, args[0]) if kind == "linear" else torch.randn(2, args[0], 7, 6)
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)


def test_parameters_and_exports_stay_float32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layers = [bayeslayers.BayesLinear(4, 3), bayeslayers.BayesConv2d(2, 3, 3)]
    finally:
        torch.set_default_dtype(default)
    for layer in layers:
        assert layer.weight_mu.dtype == layer.weight_rho.dtype == torch.float32
        torch.set_default_dtype(torch.float64)
        try:
            plain = layer.to_deterministic()
        finally:
            torch.set_default_dtype(default)
        assert plain.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_deterministic_returns_the_converted_modules_dtype(dtype):
    for plain in (nn.Linear(5, 4).to(dtype), nn.Conv2d(2, 3, 3, padding=1).to(dtype)):
        model = bayeslayers.convert(nn.Sequential(plain), target_modules=["0"])
        assert isinstance(model[0], bayeslayers.BayesianLayer) and model[0].weight_mu.dtype == torch.float32
        back = bayeslayers.to_deterministic(model)[0]
        assert type(back) is type(plain) and back.weight.dtype == back.bias.dtype == dtype
        torch.testing.assert_close(back.weight, plain.weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kernel,padding_mode",
    [(3, "reflect"), (4, "zeros"), ((2, 4), "zeros"), ((2, 3), "replicate"), (3, "circular")],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_conv_same_padding_matches_nn_conv2d_for_every_kernel_parity_and_padding_mode(kernel, padding_mode):
    conv = nn.Conv2d(3, 4, kernel, padding="same", padding_mode=padding_mode)
    layer = bayeslayers.BayesConv2d.from_module(conv).eval()
    x = torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer.to_deterministic()(x), conv(x))


def test_conv_keeps_a_batch_of_one_batched():
    layer = bayeslayers.BayesConv2d(3, 4, 3).eval()
    assert layer(torch.randn(1, 3, 6, 6)).shape == (1, 4, 4, 4)
    assert layer(torch.randn(3, 6, 6)).shape == (4, 4, 4)


@pytest.mark.parametrize("factors", ["AB", ""])
def test_lora_on_a_bfloat16_base_returns_bfloat16_without_autocast(factors):
    cases = [
        (nn.Linear(6, 5), torch.randn(3, 6), bayeslayers.BayesLoRALinear),
        (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5), bayeslayers.BayesLoRAConv2d),
    ]
    for base, x, lora_type in cases:
        merged = copy.deepcopy(base)  # fp32: base + the merged update, the output's reference
        layer = lora_type(base.to(torch.bfloat16), rank=2, lora_alpha=3, bayesian_factors=factors).eval()
        with torch.no_grad():
            layer.lora_B.weight.normal_()
            merged.weight.add_(layer.merged_delta())
        y = layer(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert relative_error(y.float(), merged(x)) < 3e-2
