"""The layers compared side by side: each provider builds a module for an op/shape and a step function.

Providers: ``deterministic`` (nn.Linear / nn.Conv2d / peft LoRA: the floor), ``reference`` (bayeslayers'
naive eager backend, what hand-written Bayesian layers do), ``bayesian-torch`` (the public package's
reparameterization layers), ``torch`` (bayeslayers' seed-regenerating backend), ``triton`` (GPU kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import bayeslayers

SIGMA = 0.01
RHO = math.log(math.expm1(SIGMA))
PROVIDERS = ("deterministic", "reference", "bayesian-torch", "torch", "triton")


def provider_available(provider: str, op: str, device: torch.device) -> bool:
    if provider == "bayesian-torch":
        if op not in ("linear", "conv2d"):
            return False
        try:
            import bayesian_torch  # noqa: F401
        except ImportError:
            return False
    if provider == "triton":
        from bayeslayers.backends import BACKENDS

        return device.type == "cuda" and BACKENDS["triton"].is_available(device)
    return True


def _bayesian_torch(plain: nn.Module) -> nn.Module:
    from bayesian_torch.layers import Conv2dReparameterization, LinearReparameterization

    common = dict(prior_mean=0.0, prior_variance=SIGMA**2, posterior_mu_init=0.0, posterior_rho_init=RHO)
    if isinstance(plain, nn.Linear):
        layer = LinearReparameterization(plain.in_features, plain.out_features, bias=True, **common)
    else:
        layer = Conv2dReparameterization(plain.in_channels, plain.out_channels, plain.kernel_size[0],
                                         plain.stride[0], plain.padding[0], bias=True, **common)
    mean = layer.mu_weight if isinstance(plain, nn.Linear) else layer.mu_kernel
    with torch.no_grad():
        mean.copy_(plain.weight)
    return layer


class BayesianTorchStep(nn.Module):
    """bayesian-torch's forward returns (out, kl); this wraps it as out + KL."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out, kl = self.layer(x, return_kl=True)
        return out, kl


class BayesStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), bayeslayers.kl_loss(self.model, check_finite=False)


class PlainStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), None


def build(provider: str, op: str, shape: tuple, device: torch.device, dtype: torch.dtype):
    """(module returning (output, kl or None), input tensor, number of Bayesian weights)."""
    torch.manual_seed(0)
    if op == "linear":
        m, n, k = shape
        plain, x = nn.Linear(k, n), torch.randn(m, k)
    elif op == "conv2d":
        batch, channels, size = shape
        plain, x = nn.Conv2d(channels, channels, 3, padding=1), torch.randn(batch, channels, size, size)
    elif op.startswith("lora"):
        m, n, k, rank = shape
        plain, x = nn.Linear(k, n), torch.randn(m, k)
    else:
        raise ValueError(f"unknown op {op!r}")
    plain, x = plain.to(device), x.to(device, dtype).requires_grad_(True)
    if op.startswith("lora"):
        if provider == "deterministic":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(nn.Sequential(plain), LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"],
                                                                    init_lora_weights="gaussian"))
            return PlainStep(model), x, 0
        bayeslayers.set_backend(provider)
        layer = bayeslayers.BayesLoRALinear(plain, rank=rank).to(device)
        return BayesStep(layer), x, sum(f.weight_mu.numel() for _, f in bayeslayers.posterior_layers(layer))
    if provider == "deterministic":
        return PlainStep(plain), x, 0
    if provider == "bayesian-torch":
        return BayesianTorchStep(_bayesian_torch(plain).to(device)), x, plain.weight.numel()
    bayeslayers.set_backend(provider)
    layer_type = bayeslayers.BayesLinear if op == "linear" else bayeslayers.BayesConv2d
    return BayesStep(layer_type.from_module(plain).to(device)), x, plain.weight.numel()
