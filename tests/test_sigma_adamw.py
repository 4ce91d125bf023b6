"""SigmaAdamW: the seed paper's direct-sigma AdamW, step for step, on rho = softplus^-1(sigma)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import bayeslayers
from bayeslayers.optim import SigmaAdamW, posterior_param_groups
from bayeslayers.optim.sigma_adamw import inverse_softplus


def _loss(mu, sigma, x, eps):
    """A Bayesian linear layer's loss with a fixed noise draw: w = mu + sigma * eps."""
    return ((x @ (mu + sigma * eps).T).tanh() - 0.3).pow(2).mean()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2, 0.5])
def test_equals_adamw_on_sigma(weight_decay, foreach):
    """Ten steps of SigmaAdamW on (mu, rho) equal torch AdamW on (mu, sigma) with sigma the parameter."""
    g = torch.Generator().manual_seed(0)
    mu0 = torch.randn(7, 5, generator=g) * 0.3
    sigma0 = torch.rand(7, 5, generator=g) * 0.05 + 0.012  # sigmoid(rho) 0.012 .. 0.06; none reaches 0
    mu, rho = mu0.clone().requires_grad_(), inverse_softplus(sigma0).requires_grad_()
    mu_ref, sigma_ref = mu0.clone().requires_grad_(), sigma0.clone().requires_grad_()
    lr, rho_lr = 1e-2, 1e-3
    options = dict(betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay, foreach=foreach)
    ours = SigmaAdamW([{"params": [mu]}, {"params": [rho], "lr": rho_lr, "sigma_space": True}], lr=lr, **options)
    reference = torch.optim.AdamW([{"params": [mu_ref]}, {"params": [sigma_ref], "lr": rho_lr}], lr=lr, **options)
    for _ in range(10):
        x, eps = torch.randn(16, 5, generator=g), torch.randn(7, 5, generator=g)
        for opt, (m, s) in ((ours, (mu, F.softplus(rho))), (reference, (mu_ref, sigma_ref))):
            opt.zero_grad()
            _loss(m, s, x, eps).backward()
            opt.step()
        torch.testing.assert_close(mu, mu_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(F.softplus(rho), sigma_ref, rtol=2e-5, atol=1e-9)
    moved = (sigma_ref - sigma0).abs() / sigma0
    assert moved.median() > 0.05  # not vacuous: sigma moved by ~rho_lr per step (rho-space AdamW: ~30x less)
    for key in ("exp_avg", "exp_avg_sq"):  # the moments live in sigma space
        torch.testing.assert_close(ours.state[rho][key], reference.state[sigma_ref][key], rtol=1e-4, atol=1e-12)


def test_rho_space_group_is_plain_adamw():
    """A group without sigma_space is torch AdamW bit for bit."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(4, 3, generator=g)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    ours, ref = SigmaAdamW([a], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        target = torch.randn(4, 3, generator=g)
        for opt, p in ((ours, a), (ref, b)):
            opt.zero_grad()
            (p - target).pow(2).sum().backward()
            opt.step()
    assert torch.equal(a, b)


def test_sigma_stays_positive():
    """A step that would drive sigma below zero leaves it at min_sigma (rho finite)."""
    rho = inverse_softplus(torch.full((10,), 1e-3)).requires_grad_()
    opt = SigmaAdamW([{"params": [rho], "sigma_space": True, "min_sigma": 1e-6}], lr=1.0, weight_decay=0.0)
    F.softplus(rho).sum().backward()
    opt.step()
    assert torch.isfinite(rho).all()
    torch.testing.assert_close(F.softplus(rho), torch.full((10,), 1e-6), rtol=1e-5, atol=0)


def test_state_dict_round_trip():
    """A fresh optimizer loading the state dict continues exactly as the original (options included)."""
    torch.manual_seed(2)
    layer = bayeslayers.convert(torch.nn.Sequential(torch.nn.Linear(6, 4)), target_modules=["0"], init_sigma=0.02)
    groups = posterior_param_groups(layer, lr=1e-2, rho_lr=5e-3, sigma_space=True)
    opt = SigmaAdamW(groups, lr=1e-2, weight_decay=0.05, min_sigma=1e-5)
    x = torch.randn(8, 6)

    def step(o, model):
        o.zero_grad()
        model(x).pow(2).mean().backward()
        o.step()

    for _ in range(3):
        step(opt, layer)
    twin = bayeslayers.convert(torch.nn.Sequential(torch.nn.Linear(6, 4)), target_modules=["0"], init_sigma=0.5)
    twin.load_state_dict(layer.state_dict())
    twin[0].noise_id.copy_(layer[0].noise_id)  # the same weight samples under bayeslayers.sampling
    fresh = SigmaAdamW(posterior_param_groups(twin, lr=1.0, sigma_space=False), lr=1.0)  # other options
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: torch would share the tensors
    assert fresh.param_groups[1]["sigma_space"] and fresh.param_groups[1]["lr"] == 5e-3
    assert fresh.param_groups[1]["min_sigma"] == 1e-5
    for i, p in enumerate(twin.parameters()):
        original = opt.state[list(layer.parameters())[i]]
        for key, value in fresh.state[p].items():
            assert torch.equal(value, original[key])
    state = opt.state_dict()
    for _ in range(3):
        with bayeslayers.sampling(layer, seed=7):
            step(opt, layer)
        with bayeslayers.sampling(twin, seed=7):
            step(fresh, twin)
    for p, q in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert state["param_groups"][1]["sigma_space"] is True


def test_param_groups_and_errors():
    model = bayeslayers.convert(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)), target_modules=["1"])
    groups = posterior_param_groups(model, lr=1e-4, rho_lr=1e-2, sigma_space=True)
    assert [len(g["params"]) for g in groups] == [4, 1]
    assert groups[1]["params"][0] is model[1].weight_rho and groups[1]["lr"] == 1e-2 and groups[1]["sigma_space"]
    with pytest.raises(ValueError, match="min_sigma"):
        SigmaAdamW(groups, min_sigma=0.0)
    with pytest.raises(ValueError, match="fused"):
        SigmaAdamW(groups, fused=True)


def test_a_torch_adamw_state_dict_loads_as_plain_groups():
    """Checkpoints written with torch AdamW resume under SigmaAdamW unchanged (their groups are rho-space)."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    plain = torch.optim.AdamW([a], lr=0.1)
    a.sum().backward()
    plain.step()
    ours = SigmaAdamW([b], lr=0.5, sigma_space=True)
    ours.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert ours.param_groups[0]["sigma_space"] is False and ours.param_groups[0]["lr"] == 0.1
    with torch.no_grad():
        b.copy_(a)
    for opt, p in ((plain, a), (ours, b)):
        p.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.equal(a, b)
