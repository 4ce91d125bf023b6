"""KL values and reductions against torch.distributions; zero at posterior == prior."""

import math

import pytest
import torch
from reference import kl_reference, relative_error

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
