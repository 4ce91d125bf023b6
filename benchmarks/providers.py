"""The layers compared side by side; each provider builds a step module for one (op, shape).

Providers: ``deterministic`` (nn.Linear / nn.Conv2d / peft LoRA / plain UNet: the floor), ``reference``
(bayeslayers' naive eager backend: what a hand-written Bayesian layer does), ``bayesian-torch`` (the public
package's LinearReparameterization / Conv2dReparameterization), then every other bayeslayers backend
(``torch``: seed-regenerating autograd Function; ``triton``: GPU kernels; any backend registered later), then
the Triton backend with one path forced (``triton:sample_then_gemm``, ``triton:sample_in_gemm`` and
``triton:dw_epilogue`` for linear and the UNet, ``triton:fused_lora`` for lora) next to ``triton``, whose
paths are chosen by measurement on CUDA (kernels/fusion.py).

Every Bayesian provider gets the same posterior and prior: mean = the plain layer's weight, sigma = 0.01
(softplus(rho)), prior N(plain weight, 0.01^2) (LoRA factors: bayeslayers' defaults). A step module returns
``(output, kl)``, kl None for deterministic providers.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import bayeslayers
from bayeslayers.backends import BACKENDS
from bayeslayers.kernels.paths.fusion import set_fusion_policy

SIGMA = 0.01
RHO = math.log(math.expm1(SIGMA))
BAYESIAN_TORCH_OPS = ("linear", "conv2d", "unet")
# provider -> (op it applies to, fixed fusion policy of the triton backend); plain ``triton`` measures the paths
# on CUDA and keeps the fastest per shape (kernels/fusion.py), the others force one path. The linear paths also
# apply to the UNet step.
FUSED_PROVIDERS = {
    "triton:sample_then_gemm": ("linear", {"sample_in_gemm_max_rows": 0}),
    "triton:sample_in_gemm": ("linear", {"sample_in_gemm_max_rows": 2**31 - 1}),
    "triton:dw_epilogue": ("linear", {"weight_grad_epilogue": True}),
    "triton:fused_lora": ("lora", {"fused_lora": True}),
}


# UNet-step providers run under torch.compile (Inductor): the plain UNet, and bayeslayers on the device's
# default backend ("auto").
COMPILED_PROVIDERS = ("deterministic:compiled", "auto:compiled")
# Set by ``gpu_check --dry-run``: the triton providers run on CPU under TRITON_INTERPRET=1 (to exercise the
# harness, never to time it).
INTERPRETED_TRITON = False


def providers() -> list[str]:
    """Provider names in display order: the three baselines, bayeslayers' other backends, the fused paths,
    the compiled UNet steps."""
    return [
        "deterministic",
        "reference",
        "bayesian-torch",
        *[name for name in BACKENDS if name != "reference"],
        *FUSED_PROVIDERS,
        *COMPILED_PROVIDERS,
    ]


def unavailable_reason(provider: str, op: str, device: torch.device) -> str:
    """Why ``provider`` cannot run ``op`` on ``device`` ('' when it can)."""
    if provider in COMPILED_PROVIDERS:
        return "" if op == "unet" else "compiled providers time the UNet step"
    if provider == "deterministic":
        return "peft is not installed" if op == "lora" and not importlib.util.find_spec("peft") else ""
    if provider == "bayesian-torch":
        if op not in BAYESIAN_TORCH_OPS:
            return f"bayesian-torch has no {op} layer"
        return "" if importlib.util.find_spec("bayesian_torch") else "bayesian-torch is not installed"
    if provider in FUSED_PROVIDERS:
        fused_op = FUSED_PROVIDERS[provider][0]
        if op != fused_op and not (op == "unet" and fused_op == "linear"):
            return f"{provider} is a {fused_op} path"
    backend = BACKENDS[provider.split(":")[0]]
    if backend.name == "triton" and device.type != "cuda" and not INTERPRETED_TRITON:
        return "GPU only (the CPU interpreter is for correctness tests, not timing)"
    return backend.unavailable_reason(device) if not backend.is_available(device) else ""


@dataclass
class Case:
    """A provider's step module, its input, and how many weight elements are Bayesian (0 for plain layers)."""

    module: nn.Module
    x: torch.Tensor
    bayesian_weights: int
    compiled: bool = False  # under torch.compile: saved bytes are not counted (hooks would retrace)


class PlainStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), None


class BayesianTorchStep(nn.Module):
    """bayesian-torch layers compute their KL in the forward (mean reduction)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, return_kl=True)


class BayesStep(nn.Module):
    """A bayeslayers model run with one provider ('backend' or 'triton:<fused path>'); KL from
    bayeslayers.kl_loss (reuses the forward's fused KL)."""

    def __init__(self, model: nn.Module, provider: str):
        super().__init__()
        self.model, self.backend = model, provider.split(":")[0]
        self.fusion = FUSED_PROVIDERS[provider][1] if provider in FUSED_PROVIDERS else {}

    def forward(self, x):
        bayeslayers.set_backend(self.backend)
        set_fusion_policy(None, **self.fusion)  # the autograd Functions record their path for the backward
        return self.model(x), bayeslayers.kl_loss(self.model, check_finite=False)


def bayesian_weights(model: nn.Module) -> int:
    return sum(layer.weight_mu.numel() for _, layer in bayeslayers.posterior_layers(model))


def _bayesian_torch_layer(plain: nn.Module) -> nn.Module:
    """bayesian-torch's layer with the plain layer's weight as posterior and prior mean, sigma 0.01 everywhere.

    bayesian-torch's ``prior_variance`` argument is used as the prior *standard deviation* (it fills
    prior_weight_sigma); its bias is Bayesian too (sampled, with KL).
    """
    from bayesian_torch.layers import Conv2dReparameterization, LinearReparameterization

    has_bias = plain.bias is not None
    common = dict(prior_mean=0.0, prior_variance=SIGMA, posterior_mu_init=0.0, posterior_rho_init=RHO, bias=has_bias)
    if isinstance(plain, nn.Linear):
        layer = LinearReparameterization(plain.in_features, plain.out_features, **common)
        mu, rho, prior = layer.mu_weight, layer.rho_weight, layer.prior_weight_mu
    else:
        layer = Conv2dReparameterization(
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size[0],
            stride=plain.stride[0],
            padding=plain.padding[0],
            **common,
        )
        mu, rho, prior = layer.mu_kernel, layer.rho_kernel, layer.prior_weight_mu
    with torch.no_grad():
        mu.copy_(plain.weight)
        prior.copy_(plain.weight)
        rho.fill_(RHO)
        if has_bias:
            layer.mu_bias.copy_(plain.bias)
            layer.rho_bias.fill_(RHO)
            layer.prior_bias_mu.copy_(plain.bias)
    return layer


def _peft_lora(plain: nn.Linear, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(nn.Sequential(plain), LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))


def _plain_layer(op: str, shape: tuple) -> tuple[nn.Module, torch.Tensor]:
    if op == "conv2d":
        batch, channels, size = shape
        return nn.Conv2d(channels, channels, 3, padding=1), torch.randn(batch, channels, size, size)
    m, k, n = shape[:3]
    return nn.Linear(k, n), torch.randn(m, k)


def build(provider: str, op: str, shape: tuple, device: torch.device) -> Case:
    """The step module of ``provider`` for a linear, conv2d or lora ``shape`` (fp32 parameters and input)."""
    torch.manual_seed(0)
    plain, x = _plain_layer(op, shape)
    x = x.to(device).requires_grad_(True)
    if op == "lora":
        rank = shape[3]
        if provider == "deterministic":
            return Case(PlainStep(_peft_lora(plain, rank)).to(device), x, 0)
        layer = bayeslayers.BayesLoRALinear(plain, rank=rank, init_sigma=SIGMA, prior_sigma=SIGMA)
        return Case(BayesStep(layer, provider).to(device), x, bayesian_weights(layer))
    if provider == "deterministic":
        return Case(PlainStep(plain).to(device), x, 0)
    if provider == "bayesian-torch":
        return Case(BayesianTorchStep(_bayesian_torch_layer(plain)).to(device), x, plain.weight.numel())
    layer_type = bayeslayers.BayesLinear if op == "linear" else bayeslayers.BayesConv2d
    layer = layer_type.from_module(plain, init_sigma=SIGMA, prior_sigma=SIGMA)
    return Case(BayesStep(layer, provider).to(device), x, plain.weight.numel())
