"""IVON against the paper's equations in float64 on the same weight samples; its state, refusals and behaviour."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import randomize_bayesian_state
from test_optim import Net

import bayeslayers
from bayeslayers.optim import IVON

BACKENDS = ["reference", "torch", "cpp", "triton"]  # triton under TRITON_INTERPRET=1 on CPU


@pytest.fixture(autouse=True)
def _backend_reset():
    yield
    bayeslayers.set_backend(None)


def _linear(init_sigma=0.02, seed=0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5))
    bayeslayers.convert(model, target_modules=["0"], init_sigma=init_sigma, **options)
    with torch.no_grad():  # mean away from the prior mean (the pretrained weight), sigma per element
        layer = model[0]
        layer.weight_mu.add_(0.05 * torch.randn_like(layer.weight_mu))
        layer.weight_rho.add_(0.3 * torch.randn_like(layer.weight_rho))
    return model


def _reference(model, backend, steps, lr, ess, betas, delta, radius, other_lr):
    """The paper's IVON on the Bayesian weight (h stored explicitly) and AdamW on the bias, all in float64, with
    the noise the backend draws for each step's fixed seed."""
    layer = model[0]
    mu = layer.weight_mu.detach().double().clone()
    sigma = F.softplus(layer.weight_rho.detach().double())
    h = 1 / (ess * sigma**2) - delta
    prior = layer.prior_mu.detach().double()
    bias = layer.bias.detach().double().clone()
    g_m, m_b, v_b = torch.zeros_like(mu), torch.zeros_like(bias), torch.zeros_like(bias)
    beta1, beta2 = betas
    for t in range(1, steps + 1):
        x, target = _batch(t)
        eps = bayeslayers.materialize_eps(1000 + t, mu.shape, backend=backend).double()
        sigma = (ess * (h + delta)).rsqrt()
        w = (mu + sigma * eps).requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        loss = F.mse_loss(x.double() @ w.T + b, target.double())
        g, g_b = torch.autograd.grad(loss, (w, b))
        h_hat = g * eps / sigma
        g_m = beta1 * g_m + (1 - beta1) * g
        h = beta2 * h + (1 - beta2) * h_hat + 0.5 * (1 - beta2) ** 2 * (h - h_hat) ** 2 / (h + delta)
        step = ((g_m / (1 - beta1**t) + delta * (mu - prior)) / (h + delta)).clamp(-radius, radius)
        mu = mu - lr * step
        bias = bias * (1 - other_lr * 1e-2)  # AdamW, decoupled weight decay 1e-2
        m_b = 0.9 * m_b + 0.1 * g_b
        v_b = 0.999 * v_b + 0.001 * g_b**2
        bias = bias - other_lr * (m_b / (1 - 0.9**t)) / ((v_b / (1 - 0.999**t)).sqrt() + 1e-8)
    return mu, (ess * (h + delta)).rsqrt(), bias


def _batch(t):
    generator = torch.Generator().manual_seed(t)
    return torch.randn(6, 7, generator=generator), torch.randn(6, 5, generator=generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "betas, delta, radius",
    [((0.9, 0.99999), 1e-4, math.inf), ((0.8, 0.9), 3e-2, math.inf), ((0.9, 0.5), 1e-3, 2e-2)],
    ids=["defaults", "fast-hessian", "clipped"],
)
def test_ten_steps_match_the_float64_equations(backend, betas, delta, radius):
    bayeslayers.set_backend(backend)
    model = _linear()
    lr, ess, other_lr = 0.05, 1e4, 1e-2
    expected_mu, expected_sigma, expected_bias = _reference(
        copy.deepcopy(model), backend, 10, lr, ess, betas, delta, radius, other_lr
    )
    start = model[0].weight_mu.detach().double().clone()
    opt = IVON(model, lr=lr, ess=ess, betas=betas, weight_decay=delta, clip_radius=radius, other_lr=other_lr)
    layer = model[0]
    for t in range(1, 11):
        x, target = _batch(t)
        layer.fixed_seed = 1000 + t
        F.mse_loss(model(x), target).backward()
        opt.step()
        opt.zero_grad()
    moved = layer.weight_mu.detach().double() - start
    torch.testing.assert_close(moved, expected_mu - start, rtol=2e-4, atol=1e-7)  # fp32 mu: ulp 6e-8
    assert (moved - (expected_mu - start)).abs().max() < 1e-3 * (expected_mu - start).abs().max()
    torch.testing.assert_close(F.softplus(layer.weight_rho.detach().double()), expected_sigma, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.bias.detach().double(), expected_bias, rtol=1e-5, atol=1e-7)
    if radius < math.inf:  # the clip bound the steps
        assert moved.abs().max() >= 0.99 * lr * radius * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layer_type_steps_by_the_equations(backend):
    """Conv2d, Linear and a LoRA factor: one step from the gradients they produced, in float64."""
    bayeslayers.set_backend(backend)
    net = Net()
    bayeslayers.convert(net, target_modules=["conv", "proj"], init_sigma=0.05)
    bayeslayers.convert(net, target_modules=["head"], mode="lora", rank=2, init_sigma=0.05)
    for module in (net.conv, net.proj):
        module.requires_grad_(True)
    randomize_bayesian_state(net, seed=3, rho_range=(-4.0, -3.0))
    ess, lr, delta, (beta1, beta2) = 3e3, 0.1, 1e-3, (0.9, 0.99)
    opt = IVON(net, lr=lr, ess=ess, betas=(beta1, beta2), weight_decay=delta, other_lr=1e-3)
    torch.manual_seed(4)
    for _ in range(2):  # the second step starts from a non-zero moment
        before = {}
        for name, layer in bayeslayers.posterior_layers(net):
            state = opt.state.get(layer.weight_mu, {})
            before[name] = [
                t.detach().double().clone() if t is not None else None
                for t in (layer.weight_mu, layer.weight_rho, state.get("exp_avg"), layer.prior_mu)
            ]
        net(torch.randn(2, 3, 5, 5)).square().mean().backward()
        layers = bayeslayers.posterior_layers(net)
        grads = {n: (layer.weight_mu.grad.double(), layer.weight_rho.grad.double()) for n, layer in layers}
        step = opt.state[net.conv.weight_mu]["step"] + 1 if opt.state.get(net.conv.weight_mu) else 1
        opt.step()
        opt.zero_grad()
        for name, layer in bayeslayers.posterior_layers(net):
            mu, rho, g_m, prior = before[name]
            g, g_rho = grads[name]
            sigma = F.softplus(rho)
            h_hat = g_rho / (torch.sigmoid(rho) * sigma)
            h = 1 / (ess * sigma**2) - delta
            g_m = (1 - beta1) * g if g_m is None else beta1 * g_m + (1 - beta1) * g
            h = beta2 * h + (1 - beta2) * h_hat + 0.5 * (1 - beta2) ** 2 * (h - h_hat) ** 2 / (h + delta)
            m0 = 0 if prior is None else prior
            mu = mu - lr * (g_m / (1 - beta1 ** float(step)) + delta * (mu - m0)) / (h + delta)
            assert (h > 0).all()
            torch.testing.assert_close(layer.weight_mu.detach().double(), mu, rtol=1e-5, atol=1e-7, msg=name)
            sigma = F.softplus(layer.weight_rho.detach().double())
            torch.testing.assert_close(sigma, (ess * (h + delta)).rsqrt(), rtol=1e-5, atol=0, msg=name)


def test_hessian_stays_positive_when_the_estimates_are_negative():
    model = _linear()
    model[0].bias.requires_grad_(False)
    opt = IVON(model, lr=1e-3, ess=1e4, betas=(0.9, 0.5), weight_decay=1e-4)
    for t in range(20):  # a concave loss: every curvature estimate is negative on average
        (-model(_batch(t)[0]).square().sum()).backward()
        opt.step()
        opt.zero_grad()
        h = opt.hessian(model[0])
        assert torch.isfinite(h).all() and (h > 0).all()


def test_state_dict_resumes_bit_identically_into_an_optimizer_built_otherwise():
    def run(model, opt, steps):
        for t in steps:
            model[0].fixed_seed = 50 + t
            x, target = _batch(t)
            F.mse_loss(model(x), target).backward()
            opt.step()
            opt.zero_grad()

    options = dict(lr=0.02, ess=1e4, betas=(0.9, 0.9), weight_decay=1e-3, clip_radius=0.5, other_lr=1e-2)
    straight = _linear()
    opt = IVON(straight, **options)
    run(straight, opt, range(6))

    first = _linear()
    opt = IVON(first, **options)
    run(first, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = _linear(seed=9)  # other weights, other options until loaded
    assert not torch.equal(resumed[0].weight_mu, saved_model["0.weight_mu"])
    opt2 = IVON(resumed, lr=1.0, ess=1e3, betas=(0.5, 0.5), weight_decay=0.0, other_lr=1.0)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["ess"] == 1e4 and opt2.param_groups[0]["clip_radius"] == 0.5
    run(resumed, opt2, range(3, 6))
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_lr_schedulers_drive_both_groups():
    model = _linear()
    opt = IVON(model, lr=0.1, ess=1e4, other_lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 5e-3]


def test_hess_init_sets_sigma():
    model = _linear()
    IVON(model, lr=0.1, ess=1e4, weight_decay=1e-4, hess_init=0.5, other_lr=1e-3)
    sigma = F.softplus(model[0].weight_rho.detach().double())
    torch.testing.assert_close(sigma, torch.full_like(sigma, 1 / math.sqrt(1e4 * (0.5 + 1e-4))), rtol=1e-6, atol=0)


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="no Bayesian layer"):
        IVON(nn.Linear(3, 2), lr=0.1, ess=10)
    model = _linear()
    with pytest.raises(ValueError, match="other_lr"):
        IVON(model, lr=0.1, ess=1e4)
    with pytest.raises(ValueError, match="ess must be a positive"):
        IVON(model, lr=0.1, ess=0, other_lr=1e-3)
    with pytest.raises(ValueError, match="betas"):
        IVON(model, lr=0.1, ess=1e4, betas=(0.9, 1.0), other_lr=1e-3)
    with pytest.raises(ValueError, match=r"ess \* sigma\^2 \* weight_decay < 1"):
        IVON(model, lr=0.1, ess=1e8, weight_decay=1.0, other_lr=1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        IVON(model, lr=0.1, ess=1e4, weight_decay=-1.0, other_lr=1e-3)
    no_prior = _linear(store_prior=False)
    with pytest.raises(ValueError, match=r"stores no prior .* weight_decay=0"):
        IVON(no_prior, lr=0.1, ess=1e4, other_lr=1e-3)
    IVON(no_prior, lr=0.1, ess=1e4, weight_decay=0.0, other_lr=1e-3)
    model[0].weight_rho.requires_grad_(False)
    with pytest.raises(ValueError, match="weight_rho"):
        IVON(model, lr=0.1, ess=1e4, other_lr=1e-3)
    model[0].weight_rho.requires_grad_(True)
    opt = IVON(model, lr=0.1, ess=1e4, other_lr=1e-3)
    model[0].weight_mu.square().sum().backward()  # a loss on mu alone: no Hessian estimate
    with pytest.raises(RuntimeError, match="weight_rho has no gradient"):
        opt.step()


def test_posterior_learns_its_width_from_the_curvature():
    """Linear regression whose inputs differ in scale by 30x per column: IVON's sigma follows 1 / sqrt(ess h),
    smaller where the loss curves more (h ~ x_j^2), and moves far from its initial value."""
    torch.manual_seed(0)
    model = _linear(init_sigma=0.05)
    scale = torch.tensor([0.1, 3.0] * 3 + [1.0])
    ess = 1e3
    opt = IVON(model, lr=0.2, ess=ess, betas=(0.9, 0.99), weight_decay=1e-3, other_lr=1e-2)
    sigma_0 = F.softplus(model[0].weight_rho.detach()).clone()
    true_w = torch.randn(5, 7)
    for _ in range(600):
        x = torch.randn(32, 7) * scale
        F.mse_loss(model(x), x @ true_w.T, reduction="none").sum(1).mean().backward()
        opt.step()
        opt.zero_grad()
    sigma = F.softplus(model[0].weight_rho.detach())
    narrow, wide = sigma[:, 1:6:2].mean(), sigma[:, 0:6:2].mean()
    assert wide / narrow > 10  # 1 / sqrt(ess (2 x_j^2 + delta)) gives ~23x between the scales
    # h is biased upwards by the positivity term (1 - beta2)^2 / 2 (h - h_hat)^2 / (h + delta) under noisy
    # estimates, so sigma sits at or below 1 / sqrt(ess (2 x_j^2 + delta)), within a small factor
    expected = (ess * (2 * 9.0 + 1e-3)) ** -0.5
    assert 0.3 < float(narrow) / expected < 1.1
    assert (sigma / sigma_0 - 1).abs().median() > 0.3
