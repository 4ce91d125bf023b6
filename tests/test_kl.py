"""KL values and reductions against torch.distributions; zero at posterior == prior."""

import math

import pytest
import torch
from mixed_model import SPECS, Mixed, convert_spec, mixed_inputs
from reference import kl_reference, randomize_bayesian_state, relative_error

import bayeslayers
from bayeslayers.kl import kl_elementwise, kl_grads


@pytest.mark.parametrize("direction", ["qp", "pq"])
def test_kl_elementwise_matches_torch_distributions(direction):
    mu, rho = torch.randn(40, 23, dtype=torch.float64), torch.randn(40, 23, dtype=torch.float64) - 3
    prior = mu + 0.1 * torch.randn_like(mu)
    sigma = torch.nn.functional.softplus(rho)
    ours = kl_elementwise(mu, sigma, prior, 0.07, direction).sum()
    assert relative_error(ours, kl_reference(mu, rho, prior, 0.07, direction)) < 1e-12


@pytest.mark.parametrize("direction", ["qp", "pq"])
def test_kl_grads_match_autograd(direction):
    mu = torch.randn(30, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(30, dtype=torch.float64) + 0.01).requires_grad_(True)
    prior = torch.randn(30, dtype=torch.float64)
    kl_elementwise(mu, sigma, prior, 0.5, direction).sum().backward()
    g_mu, g_sigma = kl_grads(mu.detach(), sigma.detach(), prior, 0.5, direction)
    assert relative_error(g_mu, mu.grad) < 1e-12
    assert relative_error(g_sigma, sigma.grad) < 1e-12


@pytest.mark.parametrize("direction", ["qp", "pq"])
def test_kl_is_zero_when_posterior_equals_prior(direction):
    layer = bayeslayers.BayesLinear.from_module(
        torch.nn.Linear(64, 32), init_sigma=0.02, prior_sigma=0.02, kl_direction=direction
    )
    assert abs(bayeslayers.kl_loss(layer).item()) < 1e-6
    layer(torch.randn(3, 64))  # the fused forward's KL too
    assert abs(layer.kl().item()) < 1e-6


def test_kl_loss_reductions_and_cache_invalidation():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    bayeslayers.convert(model, target_modules=["0", "2"], init_sigma=0.05, prior_sigma=0.01)
    total = bayeslayers.kl_loss(model)
    numel = sum(layer.weight_mu.numel() for _, layer in bayeslayers.posterior_layers(model))
    torch.testing.assert_close(bayeslayers.kl_loss(model, reduction="mean"), total / numel)
    per_element = math.log(0.01 / 0.05) + 0.05**2 / (2 * 0.01**2) - 0.5
    torch.testing.assert_close(total, torch.tensor(per_element * numel), rtol=1e-5, atol=0)

    model(torch.randn(2, 10))
    fused = bayeslayers.kl_loss(model)
    torch.testing.assert_close(fused, total, rtol=1e-6, atol=0)
    fused.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # parameters change: the cached KL is stale
    fresh = bayeslayers.kl_loss(model)
    assert float(fresh) < float(total)


# kl_loss
def _kl64(model):
    return sum(
        kl_reference(layer.weight_mu, layer.weight_rho, layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        for _, layer in bayeslayers.posterior_layers(model)
    )


def test_kl_loss_sums_and_averages_over_every_posterior_with_its_own_options():
    model = randomize_bayesian_state(convert_spec(Mixed(), SPECS["mixed"]), seed=6, rho_range=(-5.0, -3.0))
    total = bayeslayers.kl_loss(model)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert relative_error(total, _kl64(model)) < 1e-5
    numel = sum(layer.weight_mu.numel() for _, layer in bayeslayers.posterior_layers(model))
    assert numel == 36 + 2 * 6 + 81 + 3 * 27 + 3 * 3  # a, b.lora_A, conv1, conv2.lora_A, conv2.lora_B
    mean = bayeslayers.kl_loss(model, reduction="mean")
    assert relative_error(mean, _kl64(model) / numel) < 1e-5
    for name, layer in bayeslayers.posterior_layers(model):
        assert (
            relative_error(
                layer.kl(),
                kl_reference(layer.weight_mu, layer.weight_rho, layer.prior_mu, layer.prior_sigma, layer.kl_direction),
            )
            < 1e-5
        ), name


def test_kl_loss_reuses_the_fused_value_only_while_it_is_valid():
    model = randomize_bayesian_state(convert_spec(Mixed(), SPECS["mixed"]), seed=8, rho_range=(-5.0, -3.0))
    model.requires_grad_(True)
    layers = [layer for _, layer in bayeslayers.posterior_layers(model)]
    with torch.no_grad():
        model(*mixed_inputs())  # train mode, no grad: a cached KL without a graph
    kl = bayeslayers.kl_loss(model)
    assert kl.requires_grad  # recomputed: the cached value cannot carry gradients
    kl.backward()
    grads = [(layer.weight_mu.grad.clone(), layer.weight_rho.grad.clone()) for layer in layers]
    mu64 = [layer.weight_mu.detach().double().requires_grad_(True) for layer in layers]
    rho64 = [layer.weight_rho.detach().double().requires_grad_(True) for layer in layers]
    sum(
        kl_reference(m, r, layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        for m, r, layer in zip(mu64, rho64, layers)
    ).backward()
    for (g_mu, g_rho), m, r in zip(grads, mu64, rho64):
        assert relative_error(g_mu, m.grad) < 1e-5 and relative_error(g_rho, r.grad) < 1e-5
    model.zero_grad()

    model(*mixed_inputs())  # with grad: the fused KL is reused, gradients included
    fused = bayeslayers.kl_loss(model)
    assert all(layer._kl_cache is not None for layer in layers)
    assert relative_error(fused, _kl64(model)) < 1e-5
    with torch.no_grad():
        assert not bayeslayers.kl_loss(model).requires_grad
    fused.backward()
    for (g_mu, g_rho), layer in zip(grads, layers):
        assert relative_error(layer.weight_mu.grad, g_mu) < 1e-4 and relative_error(layer.weight_rho.grad, g_rho) < 1e-4

    for change in ("weight_mu", "weight_rho", "prior_mu"):  # any in-place change makes the cached value stale
        model(*mixed_inputs())
        with torch.no_grad():
            getattr(model.a, change).add_(0.5)
        assert relative_error(bayeslayers.kl_loss(model), _kl64(model)) < 1e-5, change
    model(*mixed_inputs())
    model.a.apply_options({"prior_sigma": 0.5, "kl_direction": "qp", "prior_dtype": "bfloat16"})
    assert model.a.prior_sigma == 0.5 and model.a.kl_direction == "qp"
    assert relative_error(bayeslayers.kl_loss(model), _kl64(model)) < 1e-5

    # while valid, the fused pass's value itself comes back (no second pass over the weights), with or without
    # grad, and also when only sigma is trained
    model(*mixed_inputs())
    assert all(layer.kl() is layer._kl_cache[0] for layer in layers)
    with torch.no_grad():
        model(*mixed_inputs())
        assert all(layer.kl() is layer._kl_cache[0] for layer in layers)
    model.a.weight_mu.requires_grad_(False)
    model(*mixed_inputs())
    assert model.a.kl() is model.a._kl_cache[0] and model.a.kl().requires_grad


def test_kl_loss_check_finite_can_be_turned_off():
    model = bayeslayers.convert(Mixed(), target_modules=["a"])
    with torch.no_grad():
        model.a.weight_mu[0, 0] = float("nan")
    assert torch.isnan(bayeslayers.kl_loss(model, check_finite=False))
    with pytest.raises(ValueError, match="weight_mu of layer 'a' holds NaN"):
        bayeslayers.kl_loss(model)
    model = bayeslayers.convert(Mixed(), target_modules=["a"])
    model.a.prior_sigma = 1e-300  # finite posterior, KL overflows
    with pytest.raises(
        ValueError, match="^kl_loss is not finite although every posterior is: check prior_sigma and prior_mu$"
    ):
        bayeslayers.kl_loss(model)
