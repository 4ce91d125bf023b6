"""Float64 reference forward of any Bayesian layer type (BayesLinear, BayesConv2d, BayesLoRALinear,
BayesLoRAConv2d) with the eps its backend draws, built from stock torch modules (nn.Linear / nn.Conv2d with the
same options, weights passed by ``functional_call``), and a check of outputs, KL and every gradient."""

import copy

import torch
import torch.nn as nn
from reference import TOLERANCE, kl_reference, relative_error, sampled_weight
from torch.func import functional_call

import bayeslayers

KL_WEIGHT = 0.37
SEED = 20261201


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
        weights["weight"] = sampled_weight(mu, rho, size(eps))
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
    with bayeslayers.sampling(module, SEED):
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
