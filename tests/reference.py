"""Float64 references the tests compare every backend against (independent of the library's code paths)."""

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

import bayeslayers


def sample_weight(mu, rho, eps):
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


# Philox4x32-10 and the eps stream of the RNG contract (kernels/triton/philox.py), independently in numpy.
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
    """eps per the RNG contract in kernels/triton/philox.py, in numpy (float32 uniforms, float64 transcendentals)."""
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
    w = sample_weight(mu, rho, eps)
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


# Float64 reference forward of any Bayesian layer type (BayesLinear, BayesConv2d, BayesLoRALinear,
# BayesLoRAConv2d) with the eps its backend draws, built from stock torch modules (nn.Linear / nn.Conv2d with the
# same options, weights passed by ``functional_call``), and a check of outputs, KL and every gradient.
FUZZ_SEED = 20261201


def _plain64(layer: nn.Module) -> nn.Module:
    """A float64 stock module with the layer's structure (its weights are passed in at call time)."""
    if isinstance(layer, bayeslayers.BayesLinear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
    if isinstance(layer, bayeslayers.BayesConv2d):
        return nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            bias=layer.bias is not None,
            dtype=torch.float64,
            **layer.conv_options(),
        )
    return copy.deepcopy(layer).double()


def _factor64(layer: nn.Module, backend: str, pairs: list, absolute: bool):
    """(plain float64 module, its weights dict, KL or 0) of a Bayesian or plain layer; records leaf/param pairs.
    ``absolute``: every weight, mean and eps replaced by its absolute value (see :func:`reference64`)."""
    weights = {}
    size = torch.abs if absolute else (lambda t: t)
    if isinstance(layer, bayeslayers.BayesianLayer):
        mu = size(layer.weight_mu.detach().double()).requires_grad_(True)
        rho = layer.weight_rho.detach().double().requires_grad_(True)
        eps = bayeslayers.materialize_eps(layer.fixed_seed, tuple(mu.shape), backend=backend)
        weights["weight"] = sample_weight(mu, rho, size(eps))
        kl = kl_reference(mu, rho, layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        pairs += [(mu, layer.weight_mu), (rho, layer.weight_rho)]
    else:
        leaf = size(layer.weight.detach().double()).requires_grad_(layer.weight.requires_grad)
        weights["weight"], kl = leaf, 0
        if layer.weight.requires_grad:
            pairs.append((leaf, layer.weight))
    if getattr(layer, "bias", None) is not None:
        bias = size(layer.bias.detach().double()).requires_grad_(layer.bias.requires_grad)
        weights["bias"] = bias
        if layer.bias.requires_grad:
            pairs.append((bias, layer.bias))
    return _plain64(layer), weights, kl


def reference64(module: nn.Module, x64: torch.Tensor, backend: str, absolute: bool = False):
    """(y64, kl64, [(float64 leaf, library parameter)]) for ``module`` inside ``bayeslayers.sampling``.

    ``absolute=True`` computes the same function of |x|, |weights|, |eps|: its outputs and gradients (without
    the KL term) are the sums of the absolute values of the terms every result adds up, the scale against which
    rounding errors of a low-precision computation are measured (cancellation makes max |result| useless)."""
    pairs = []
    if hasattr(module, "lora_A"):
        base, base_w, _ = _factor64(module.base_layer, backend, pairs, absolute)
        a, a_w, kl_a = _factor64(module.lora_A, backend, pairs, absolute)
        b, b_w, kl_b = _factor64(module.lora_B, backend, pairs, absolute)
        h = functional_call(a, a_w, (x64,))
        y = functional_call(base, base_w, (x64,)) + module.scaling * functional_call(b, b_w, (h,))
        return y, kl_a + kl_b, pairs
    plain, weights, kl = _factor64(module, backend, pairs, absolute)
    return functional_call(plain, weights, (x64,)), kl, pairs


def check_layer(
    module: nn.Module,
    x: torch.Tensor,
    backend: str,
    compute_dtype: torch.dtype,
    autocast=None,
    tolerance: float | None = None,
) -> dict:
    """Runs ``module`` on ``x`` (optionally under ``torch.autocast(cpu, autocast)``) with one fixed posterior
    sample, backpropagates sum(y * upstream) + KL_WEIGHT * KL, and compares y, KL and the gradients of x and
    every trainable parameter with the float64 reference. Returns the relative errors."""
    bayeslayers.set_backend(backend)
    x = x.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    with bayeslayers.sampling(module, FUZZ_SEED):
        if autocast is None:
            y = module(x)
        else:
            with torch.autocast("cpu", dtype=autocast):
                y = module(x)
        upstream = torch.randn(y.shape, dtype=torch.float64)
        kl = bayeslayers.kl_loss(module)
        ((y.double() * upstream).sum() + KL_WEIGHT * kl).backward()
        x64 = x.detach().double().requires_grad_(True)
        y64, kl64, pairs = reference64(module, x64, backend)
        x_abs = x.detach().double().abs().requires_grad_(True)
        y_abs, _, pairs_abs = reference64(module, x_abs, backend, absolute=True)
    ((y64 * upstream).sum() + KL_WEIGHT * kl64).backward()
    (y_abs * upstream.abs()).sum().backward()

    def error(actual, expected, magnitude):
        """max |actual - expected| over the scale of the summed terms (plus max |expected| for the KL part)."""
        actual, expected, magnitude = actual.detach().double(), expected.detach(), magnitude.detach()
        scale = max(float(magnitude.abs().max()) + float(expected.abs().max()), 1e-30)
        return float((actual - expected).abs().max()) / scale

    assert y.dtype == compute_dtype, (y.dtype, compute_dtype)
    assert y.shape == y64.shape, (y.shape, y64.shape)
    assert torch.isfinite(y).all()
    tol = TOLERANCE[compute_dtype] if tolerance is None else tolerance
    errors = {"y": error(y, y64, y_abs), "kl": relative_error(kl, kl64), "x.grad": error(x.grad, x64.grad, x_abs.grad)}
    assert x.grad.dtype == x.dtype
    for (leaf, param), (leaf_abs, _) in zip(pairs, pairs_abs):
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32
        errors[f"grad of {tuple(param.shape)}"] = error(param.grad, leaf.grad, leaf_abs.grad)
    for p in module.parameters():
        assert p.dtype == torch.float32 or not p.requires_grad  # trainable parameters stay fp32
    bad = {k: v for k, v in errors.items() if v > (1e-5 if k == "kl" else tol)}
    assert not bad, f"relative errors above {tol} ({compute_dtype}, backend {backend}): {bad}"
    return errors


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


# ---------------------------------------------------------------------------------- a user-defined backend
def _user_noise(seed, shape, device):
    """eps of the user backend: torch's CPU generator seeded with the (int64) seed, drawn in float64."""
    seed = int(seed.reshape(-1)[0]) if torch.is_tensor(seed) else int(seed)
    generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).float().to(device)


def _user_sample(mu, rho, prior_mu, seed, prior_sigma, kl_direction, out_dtype, with_kl):
    w = sample_weight(mu, rho, _user_noise(seed, mu.shape, mu.device)).to(out_dtype)
    kl = kl_reference(mu, rho, prior_mu, prior_sigma, kl_direction).float() if with_kl else mu.new_empty(0)
    return w, kl


def _user_grad(d_w, mu, rho, prior_mu, seed, g_kl, prior_sigma, kl_direction, w_dtype):
    """d_mu = dW + g_kl dKL/dmu, d_rho = (dW eps + g_kl dKL/dsigma) sigmoid(rho), in float64; eps drawn again."""
    mu64, rho64 = mu.double(), rho.double()
    eps = _user_noise(seed, mu.shape, mu.device).double()
    sigma, diff = F.softplus(rho64), mu64 - (0.0 if prior_mu is None else prior_mu.double())
    d_w = torch.zeros_like(mu64) if d_w is None else d_w.double()
    g = 0.0 if g_kl is None else g_kl.double()
    if kl_direction == "qp":  # KL(q || p)
        dkl_dmu, dkl_dsigma = diff / prior_sigma**2, sigma / prior_sigma**2 - 1 / sigma
    else:  # KL(p || q)
        dkl_dmu, dkl_dsigma = diff / sigma**2, 1 / sigma - (prior_sigma**2 + diff**2) / sigma**3
    d_mu = d_w + g * dkl_dmu
    d_rho = (d_w * eps + g * dkl_dsigma) * torch.sigmoid(rho64)
    w = None if w_dtype is None else (mu64 + sigma * eps).to(w_dtype)
    return d_mu.float(), d_rho.float(), w


USER_KERNELS = bayeslayers.register_posterior_kernels("user_test_", _user_sample, _user_grad)


class UserBackend(bayeslayers.KernelBackend):
    """A backend written outside the library from its public names: float64 kernels on torch's CPU generator."""

    name = "user"
    priorities = {}  # never chosen by 'auto' unless a test claims a priority

    def kernels(self):
        return USER_KERNELS

    def noise(self, seed, shape, device):
        return _user_noise(seed, shape, device)


bayeslayers.register_backend(UserBackend())
LAYER_BACKENDS = [*BACKENDS, "user"]  # the layer-vs-float64 tests run the user-defined backend too
