"""Float64 references the tests compare every backend against (independent of the library's code paths)."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence


def sampled_weight(mu, rho, eps):
    """w = mu + softplus(rho) * eps in float64."""
    return mu.double() + F.softplus(rho.double()) * eps.double()


def kl_reference(mu, rho, prior_mu, prior_sigma, direction):
    """Summed KL from torch.distributions (float64); prior_mu None = zero mean."""
    mu, sigma = mu.double(), F.softplus(rho.double())
    prior_mean = torch.zeros_like(mu) if prior_mu is None else prior_mu.double()
    q, p = Normal(mu, sigma), Normal(prior_mean, torch.full_like(mu, prior_sigma))
    return (kl_divergence(q, p) if direction == "qp" else kl_divergence(p, q)).sum()


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


# Philox4x32-10 and the eps stream of the RNG contract (kernels/philox.py), independently in numpy.
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counters, key):
    """Independent Philox4x32-10 (Salmon et al. 2011, Random123): ``counters`` uint64 [n, 4] of 32-bit words,
    ``key`` (k0, k1); returns uint64 [n, 4]."""
    c = [counters[:, i].astype(np.uint64) & MASK32 for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & MASK32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & MASK32, (k1 + np.uint64(0xBB67AE85)) & MASK32
    return np.stack(c, axis=1)


def reference_normals(seed, numel):
    """eps per the RNG contract in kernels/philox.py, in numpy (float32 uniforms, float64 transcendentals)."""
    seed &= (1 << 64) - 1
    groups = (numel + 3) // 4
    counters = np.zeros((groups, 4), dtype=np.uint64)
    counters[:, 0] = np.arange(groups, dtype=np.uint64)
    words = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.uint32)
    u = words[:, 0::2].astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
    theta = words[:, 1::2].view(np.int32).astype(np.float32) * np.float32(math.pi / 2.0**31)
    radius = np.sqrt(-2.0 * np.log(u.astype(np.float64)))
    theta = theta.astype(np.float64)
    eps = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=2)  # [groups, pair, cos/sin]
    return torch.from_numpy(eps.reshape(-1)[:numel].copy())


def kl_and_grads64(mu, rho, prior_mu, prior_sigma, direction, d_w, g_kl, eps):
    """float64 (w, kl, d_mu, d_rho) of L = sum(d_w * w) + g_kl * KL by autograd."""
    mu = mu.detach().double().requires_grad_(True)
    rho = rho.detach().double().requires_grad_(True)
    w = sampled_weight(mu, rho, eps)
    kl = kl_reference(mu, rho, prior_mu, prior_sigma, direction)
    ((w * d_w.double()).sum() + g_kl * kl).backward()
    return w.detach(), kl.detach(), mu.grad, rho.grad


def posterior(shape, prior_dtype=torch.float32, generator_seed=0, device="cpu"):
    """(mu, rho, prior mean or None) with sigma from 1e-4 to 1.3 and the prior near mu, on ``device``."""
    g = torch.Generator().manual_seed(generator_seed)
    mu = 0.2 * torch.randn(shape, generator=g)
    rho = torch.empty(shape).uniform_(-9, 1, generator=g)
    prior = None if prior_dtype is None else (mu + 0.05 * torch.randn(shape, generator=g)).to(prior_dtype)
    return mu.to(device), rho.to(device), None if prior is None else prior.to(device)


# Shared test helpers: every test module takes these from here (tests import no other test module).
KL_WEIGHT = 0.37  # an upstream gradient of the KL that is neither 0 nor 1
BACKENDS = ["reference", "torch", "cpp", "triton"]  # triton runs under TRITON_INTERPRET=1 on CPU
DTYPE_TOLERANCES = [(dtype, TOLERANCE[dtype]) for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def randomize_layer(layer, mu_std=0.2, rho_range=(-6.0, -3.0)):
    """Fresh non-trivial posterior, prior and bias values (never zeros) in a Bayesian layer, in place."""
    with torch.no_grad():
        layer.weight_mu.normal_(0, mu_std)
        layer.weight_rho.uniform_(*rho_range)
        if layer.prior_mu is not None:
            layer.prior_mu.copy_(layer.weight_mu + 0.05 * torch.randn_like(layer.weight_mu))
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_(0, 0.5)
    return layer


def randomize_bayesian_state(model, seed, rho_range=(-4.0, -1.5)):
    """Moves every Bayesian layer of ``model`` away from its initial state, in place: each posterior (mu, rho,
    prior mean, bias) via :func:`randomize_layer` and the plain factors of LoRA layers (so that B != 0), all
    from ``seed``. Returns ``model``."""
    import bayeslayers

    torch.manual_seed(seed)
    for _, module in bayeslayers.bayesian_modules(model):
        for factor in (getattr(module, "lora_A", None), getattr(module, "lora_B", None)):
            if factor is not None and not isinstance(factor, bayeslayers.BayesianLayer):
                with torch.no_grad():
                    factor.weight.normal_(0, 0.3)
    for _, layer in bayeslayers.posterior_layers(model):
        randomize_layer(layer, rho_range=rho_range)
    return model


def bayesian_state(model):
    """{name: tensor clone} of everything :func:`bayeslayers.save` stores, plus each layer's options."""
    import bayeslayers

    tensors, options = {}, {}
    for name, module in bayeslayers.bayesian_modules(model):
        options[name] = module.options()
        for key, tensor in module.state_dict().items():
            if not key.startswith("base_layer."):
                tensors[f"{name}.{key}"] = tensor.detach().clone()
    return tensors, options


def assert_same_tensors(actual: dict, expected: dict):
    """Same keys, dtypes, shapes and values (bit for bit)."""
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)
