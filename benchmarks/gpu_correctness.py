"""Correctness on one device: every backend path of every layer type against float64, and the Philox stream.

Layer check: a Bayesian layer (linear, conv2d, LoRA) with a fresh posterior, prior and bias runs forward and
backward of ``sum(y * upstream) + 0.37 * KL`` with one fixed posterior sample (input in the checked dtype,
under autocast to it); a float64 reference on the CPU,
built from stock ``F.linear`` / ``F.conv2d`` with ``w = mu + softplus(rho) * eps`` (eps: the backend's own draw
for that seed, ``bayeslayers.materialize_eps``) and the closed-form Gaussian KL, gives y, KL and the gradients of
x, mu and rho. The error is ``max |got - expected| / max |expected|`` per result; the check passes when every one
is under the dtype's tolerance. Paths: each backend's default, and on the Triton backend each fused path forced.

Philox check: the Triton kernel's eps and the C++ CPU twin's eps for the same seeds and sizes, bit for bit.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import bayeslayers
from bayeslayers.backends import BACKENDS
from bayeslayers.kernels.paths.fusion import set_fusion_policy

from .providers import FUSED_PROVIDERS

KL_WEIGHT = 0.37
SEED = 20261203
# fp32 GEMMs may run in TF32 on a GPU; errors are relative to the largest expected magnitude.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
GPU_SHAPES = {
    "linear": [(4096, 320, 320), (77, 768, 640), (333, 200, 136)],
    "conv2d": [(1, 320, 32)],
    "lora": [(1024, 640, 640, 4)],
}
DRY_RUN_SHAPES = {"linear": [(13, 24, 20)], "conv2d": [(1, 5, 6)], "lora": [(13, 24, 20, 2)]}
PHILOX_SIZES = [1, 3, 4, 1023, 640 * 320 + 5]  # the interpreter (dry run) takes the first four
PHILOX_SEEDS = [0, 1, 2**32 + 7, 2**63 - 1, 2**64 - 5]
FIELDS = ["check", "op", "shape", "backend", "path", "dtype", "max_error", "tolerance", "result", "seconds", "note"]


@dataclass
class Layer:
    module: nn.Module
    x: torch.Tensor


def build_layer(op: str, shape: tuple, device: torch.device, dtype: torch.dtype) -> Layer:
    """A Bayesian layer with a random posterior (sigma 0.002-0.05), prior near the mean and bias; input in dtype."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr((op, shape)).encode()))
    if op == "conv2d":
        batch, channels, size = shape
        plain, x = (
            nn.Conv2d(channels, channels, 3, padding=1),
            torch.randn(batch, channels, size, size, generator=generator),
        )
    else:
        m, k, n = shape[:3]
        plain, x = nn.Linear(k, n), torch.randn(m, k, generator=generator)
    with torch.no_grad():
        plain.weight.normal_(0, 0.2, generator=generator)
        plain.bias.normal_(0, 0.5, generator=generator)
    if op == "lora":
        module = bayeslayers.BayesLoRALinear(plain, rank=shape[3], init_sigma=0.01, prior_sigma=0.02)
    else:
        layer_type = bayeslayers.BayesLinear if op == "linear" else bayeslayers.BayesConv2d
        module = layer_type.from_module(plain, init_sigma=0.01, prior_sigma=0.02)
    for factor in (getattr(module, "lora_A", None), getattr(module, "lora_B", None)):
        if factor is not None and not isinstance(factor, bayeslayers.BayesianLayer):  # else from the global RNG
            with torch.no_grad():
                factor.weight.normal_(0, 0.3, generator=generator)
    for _, layer in bayeslayers.posterior_layers(module):
        with torch.no_grad():
            layer.weight_mu.normal_(0, 0.2, generator=generator)
            layer.weight_rho.uniform_(-6.0, -3.0, generator=generator)
            if layer.prior_mu is not None:
                layer.prior_mu.copy_(layer.weight_mu + 0.05 * torch.randn(layer.weight_mu.shape, generator=generator))
    return Layer(module.to(device), x.to(device=device, dtype=dtype))


def _kl64(mu, sigma, prior_mu, prior_sigma: float, direction: str):
    prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu.detach().cpu().double()
    if direction == "pq":  # KL(prior || posterior)
        mu, sigma, prior_mu, prior_sigma = prior_mu, torch.full_like(sigma, prior_sigma), mu, sigma
    else:
        prior_sigma = torch.full_like(sigma, prior_sigma)
    return (torch.log(prior_sigma / sigma) + (sigma**2 + (mu - prior_mu) ** 2) / (2 * prior_sigma**2) - 0.5).sum()


def _weight64(layer: nn.Module, backend: str, leaves: list):
    """(float64 CPU weight, KL) of a factor: sampled with the backend's eps if Bayesian, else the plain weight."""
    if not isinstance(layer, bayeslayers.BayesianLayer):
        return layer.weight.detach().cpu().double(), 0.0
    mu = layer.weight_mu.detach().cpu().double().requires_grad_(True)
    rho = layer.weight_rho.detach().cpu().double().requires_grad_(True)
    device = layer.weight_mu.device
    eps = bayeslayers.materialize_eps(layer.fixed_seed, tuple(mu.shape), device, backend=backend).cpu().double()
    sigma = F.softplus(rho)
    leaves += [(mu, layer.weight_mu), (rho, layer.weight_rho)]
    return mu + sigma * eps, _kl64(mu, sigma, layer.prior_mu, layer.prior_sigma, layer.kl_direction)


def reference(op: str, module: nn.Module, x64: torch.Tensor, backend: str):
    """(y, KL, [(float64 leaf, library parameter)]) in float64 on the CPU."""
    leaves = []
    if op == "lora":
        base = module.base_layer
        a, kl_a = _weight64(module.lora_A, backend, leaves)
        b, kl_b = _weight64(module.lora_B, backend, leaves)
        bias = base.bias.detach().cpu().double()
        y = F.linear(x64, base.weight.detach().cpu().double(), bias) + module.scaling * F.linear(F.linear(x64, a), b)
        return y, kl_a + kl_b, leaves
    w, kl = _weight64(module, backend, leaves)
    bias = module.bias.detach().cpu().double()
    if op == "linear":
        y = F.linear(x64, w, bias)
    else:
        options = {k: v for k, v in module.conv_options().items() if k in ("stride", "padding", "dilation", "groups")}
        y = F.conv2d(x64, w, bias, **options)
    return y, kl, leaves


def relative_error(got, expected) -> float:
    got, expected = got.detach().cpu().double(), expected.detach().double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def check_layer(op: str, shape: tuple, backend: str, fusion: dict, device, dtype) -> float:
    """Largest relative error of y, KL and every gradient against float64 (see the module docstring)."""
    case = build_layer(op, shape, device, dtype)
    module, x = case.module, case.x.requires_grad_(True)
    bayeslayers.set_backend(backend)
    set_fusion_policy(None, **fusion)
    try:
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with bayeslayers.sampling(module, SEED):
            with autocast:  # as in mixed-precision training: stock modules (LoRA's base layer) take x too
                y = module(x)
            kl = bayeslayers.kl_loss(module)
            upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
            ((y.double() * upstream.to(device)).sum() + KL_WEIGHT * kl).backward()
            x64 = x.detach().cpu().double().requires_grad_(True)
            y64, kl64, leaves = reference(op, module, x64, backend)
    finally:
        bayeslayers.set_backend(None)
        set_fusion_policy(None)
    ((y64 * upstream).sum() + KL_WEIGHT * kl64).backward()
    errors = [relative_error(y, y64), relative_error(kl, kl64), relative_error(x.grad, x64.grad)]
    errors += [relative_error(param.grad, leaf.grad) for leaf, param in leaves]
    return max(errors)


def layer_cases(device: torch.device, dry_run: bool):
    """(op, shape, backend, path, fusion policy changes) for every backend path that runs on ``device``."""
    shapes = DRY_RUN_SHAPES if dry_run else GPU_SHAPES
    for name, backend in BACKENDS.items():
        if not backend.is_available(device):
            yield None, None, name, "default", backend.unavailable_reason(device)
            continue
        for op, op_shapes in shapes.items():
            paths = [("default", {})]
            if name == "triton":
                paths += [
                    (p.split(":")[1], changes) for p, (fused_op, changes) in FUSED_PROVIDERS.items() if fused_op == op
                ]
            for shape in op_shapes:
                for path, changes in paths:
                    yield op, shape, name, path, changes


def run_layer_checks(device: torch.device, dtypes, dry_run: bool, deadline: float) -> list[dict]:
    rows = []
    for op, shape, backend, path, changes in layer_cases(device, dry_run):
        if op is None:
            rows.append(_row("layer", "", "", backend, path, "", None, None, "skipped", 0.0, changes))
            continue
        for dtype in dtypes:
            label = "x".join(map(str, shape))
            if time.perf_counter() > deadline:
                rows.append(_row("layer", op, label, backend, path, dtype, None, None, "skipped", 0.0, "budget"))
                continue
            start = time.perf_counter()
            try:
                error = check_layer(op, shape, backend, changes, device, dtype)
                result, note = ("pass" if error < TOLERANCE[dtype] else "FAIL"), ""
            except Exception as exc:  # a crash is a failed check, reported with its message
                error, result, note = None, "FAIL", f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            seconds = time.perf_counter() - start
            rows.append(_row("layer", op, label, backend, path, dtype, error, TOLERANCE[dtype], result, seconds, note))
    return rows


def run_philox_check(device: torch.device, dry_run: bool = False) -> list[dict]:
    """The Triton eps on ``device`` equal to the C++ twin's, bit for bit, for every seed and size."""
    from bayeslayers.kernels import cpu

    start = time.perf_counter()
    if cpu.unavailable_reason():
        return [
            _row("philox", "", "", "triton vs cpp", "", "float32", None, 0, "skipped", 0.0, cpu.unavailable_reason())
        ]
    from bayeslayers.kernels.triton.philox import philox_normal

    mismatched, sizes = [], PHILOX_SIZES[:4] if dry_run else PHILOX_SIZES
    for seed in PHILOX_SEEDS:
        for size in sizes:
            if not torch.equal(philox_normal(seed, (size,), device).cpu(), cpu.philox_normal(seed, (size,))):
                mismatched.append(f"seed {seed} size {size}")
    result = "FAIL" if mismatched else "pass"
    note = "; ".join(mismatched[:5]) or f"{len(PHILOX_SEEDS)} seeds x {len(sizes)} sizes bit-identical"
    shapes = ",".join(map(str, sizes))
    return [
        _row("philox", "", shapes, "triton vs cpp", "", "float32", 0.0, 0, result, time.perf_counter() - start, note)
    ]


def _row(check, op, shape, backend, path, dtype, error, tolerance, result, seconds, note) -> dict:
    return {
        "check": check,
        "op": op,
        "shape": shape,
        "backend": backend,
        "path": path,
        "dtype": str(dtype).removeprefix("torch."),
        "max_error": "" if error is None else f"{error:.3g}",
        "tolerance": "" if tolerance is None else f"{tolerance:g}",
        "result": result,
        "seconds": f"{seconds:.2f}",
        "note": note,
    }
