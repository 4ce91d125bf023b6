"""Bayesian LoRA adapters around a frozen base layer: y = base(x) + scaling * B(A(x)), scaling = alpha / rank.

Each factor is a Bayesian layer or, when left out of ``bayesian_factors``, a plain deterministic one. B's mean
starts at zero (so the adapted model equals the base model) with a zero-mean prior. A's mean starts at the
usual LoRA (Kaiming-uniform) initialisation and its prior is centred on that initial value: a zero-mean prior
of width prior_sigma on A would pull A, and with it the whole update B·A, towards zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..backends import resolve_backend
from ..config import DEFAULTS, BayesConfig, dtype_name
from .base import compute_dtype
from .conv import BayesConv2d
from .linear import BayesLinear


class _BayesLoRA(nn.Module):
    """Shared structure of the LoRA layer types; subclasses build the two factors and the merged update."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = DEFAULTS.rank,
        lora_alpha=DEFAULTS.lora_alpha,
        bayesian_factors: str = DEFAULTS.bayesian_factors,
        init_sigma=DEFAULTS.init_sigma,
        prior_sigma=DEFAULTS.prior_sigma,
        kl_direction=DEFAULTS.kl_direction,
        prior_dtype=DEFAULTS.prior_dtype,
        store_prior=DEFAULTS.store_prior,
    ):
        super().__init__()
        BayesConfig(
            mode="lora",
            rank=rank,
            lora_alpha=lora_alpha,
            bayesian_factors=bayesian_factors,
            init_sigma=init_sigma,
            prior_sigma=prior_sigma,
            kl_direction=kl_direction,
            prior_dtype=prior_dtype,
            store_prior=store_prior,
        )  # validates every option
        self.base_layer = base_layer.requires_grad_(False)
        self.rank = rank
        self.lora_alpha = float(rank if lora_alpha is None else lora_alpha)
        self.scaling = self.lora_alpha / rank
        self.bayesian_factors = bayesian_factors
        self.lora_prior_dtype = dtype_name(prior_dtype)
        self.store_prior = store_prior
        posterior = dict(
            init_sigma=init_sigma,
            prior_sigma=prior_sigma,
            kl_direction=kl_direction,
            prior_dtype=prior_dtype,
            store_prior=store_prior,
        )
        device = base_layer.weight.device
        lora_A = self._make_A(device)
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        if "A" in bayesian_factors:
            lora_A = self._bayesian(lora_A, prior_mean=lora_A.weight.detach(), **posterior)
        lora_B = self._make_B(device)
        nn.init.zeros_(lora_B.weight)
        if "B" in bayesian_factors:
            lora_B = self._bayesian(lora_B, prior_mean=None, **posterior)
        self.lora_A, self.lora_B = lora_A, lora_B

    def _make_A(self, device) -> nn.Module:
        raise NotImplementedError

    def _make_B(self, device) -> nn.Module:
        raise NotImplementedError

    def _bayesian(self, plain: nn.Module, prior_mean, **posterior) -> nn.Module:
        raise NotImplementedError

    def merged_delta(self) -> torch.Tensor:
        """scaling * B·A in the base weight's shape (fp32), from the posterior means."""
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, **options):
        return cls(module, **options)

    def _posteriors(self):
        return [f for f in (self.lora_A, self.lora_B) if isinstance(f, (BayesLinear, BayesConv2d))]

    def options(self) -> dict:
        """LoRA structure plus the factors' prior and KL options, JSON-friendly (saved with checkpoints)."""
        options = {"rank": self.rank, "lora_alpha": self.lora_alpha, "bayesian_factors": self.bayesian_factors}
        posteriors = self._posteriors()
        options.update(
            posteriors[0].options() if posteriors else DEFAULTS.layer_options(("prior_sigma", "kl_direction"))
        )
        options["prior_dtype"] = self.lora_prior_dtype
        options["store_prior"] = self.store_prior
        return options

    def apply_options(self, options: dict) -> None:
        """Sets alpha (and so the scaling) and the factors' prior options from :meth:`options` output; the
        structure (rank, Bayesian factors) must already match."""
        for name in ("rank", "bayesian_factors"):
            if options[name] != getattr(self, name):
                raise ValueError(
                    f"{name} is {getattr(self, name)!r} in this layer but {options[name]!r} in the options"
                )
        self.lora_alpha = float(options["lora_alpha"])
        self.scaling = self.lora_alpha / self.rank
        self.lora_prior_dtype = options.get("prior_dtype")
        self.store_prior = options.get("store_prior", True)
        factor_options = {**options, "prior_dtype": self.lora_prior_dtype or "float32"}  # None: float32 priors
        for factor in self._posteriors():
            factor.apply_options(factor_options)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Base GEMM and adapter as one kernel where the backend offers it; None otherwise."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        out = self.base_layer(x)
        delta = _apply_factor(self.lora_B, _apply_factor(self.lora_A, x))
        return out + (delta * self.scaling).to(out.dtype)

    def to_deterministic(self) -> nn.Module:
        """The base layer with the mean update merged into its weight (a plain module, no extra cost)."""
        base = self.base_layer
        with torch.no_grad():
            base.weight.copy_(base.weight.float() + self.merged_delta())  # copy_ rounds to the base's dtype
        return base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, lora_alpha={self.lora_alpha}, bayesian_factors={self.bayesian_factors!r}"


def _apply_factor(factor: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One LoRA factor on ``h``. A plain factor keeps fp32 weights like the Bayesian ones, so it computes in
    ``h``'s compute dtype (a bf16/fp16 base without autocast feeds it half-precision activations)."""
    if isinstance(factor, (BayesLinear, BayesConv2d)):
        return factor(h)
    dtype = compute_dtype(h)
    h, weight = h.to(dtype), factor.weight.to(dtype)
    if isinstance(factor, nn.Conv2d):
        return factor._conv_forward(h, weight, None)
    return nn.functional.linear(h, weight)


def _factor_weight(factor: nn.Module) -> torch.Tensor:
    return factor.weight.float()  # a Bayesian factor's .weight is its posterior mean


def _factor_draw(factor: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The factor's weight for one forward: a posterior draw (Bayesian factor) or the plain weight."""
    return factor.draw_weight(dtype) if isinstance(factor, BayesLinear) else factor.weight.to(dtype)


def fused_lora_linear(x, base: nn.Module, lora_A: nn.Module, lora_B: nn.Module, scaling: float):
    """base(x) + scaling * B(A(x)) as one kernel (the backend's fused LoRA GEMM), each factor a posterior draw or
    its plain weight; None where the backend does not fuse on ``x``'s device or ``base`` is not a plain nn.Linear.

    x (..., in) in any float dtype, computed in its compute dtype; base (out, in); A (rank, in); B (out, rank).
    """
    if type(base) is not nn.Linear or not x.is_floating_point():
        return None
    backend = resolve_backend(x.device)
    if not backend.fuses_lora(x.device):
        return None
    dtype = compute_dtype(x)
    a, b = _factor_draw(lora_A, dtype), _factor_draw(lora_B, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return backend.lora_linear(
            x.to(dtype),
            base.weight.to(dtype),
            None if base.bias is None else base.bias.to(dtype),
            a,
            b,
            scaling,
        )


class BayesLoRALinear(_BayesLoRA):
    """Bayesian LoRA on an nn.Linear: A (rank, in) and B (out, rank)."""

    def _make_A(self, device):
        return nn.Linear(self.base_layer.in_features, self.rank, bias=False, device=device)

    def _make_B(self, device):
        return nn.Linear(self.rank, self.base_layer.out_features, bias=False, device=device)

    def _bayesian(self, plain, prior_mean, **posterior):
        layer = BayesLinear(
            plain.in_features,
            plain.out_features,
            bias=False,
            device=plain.weight.device,
            prior_mean=prior_mean,
            **posterior,
        )
        with torch.no_grad():
            layer.weight_mu.copy_(plain.weight)
        return layer

    def merged_delta(self):
        return self.scaling * (_factor_weight(self.lora_B) @ _factor_weight(self.lora_A))

    def _fused_forward(self, x):
        return fused_lora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling)


class BayesLoRAConv2d(_BayesLoRA):
    """Bayesian LoRA on an nn.Conv2d (groups=1): A is a conv like the base with ``rank`` outputs, B is 1x1."""

    def __init__(self, base_layer: nn.Conv2d, *args, **kwargs):
        if base_layer.groups != 1:
            raise ValueError(f"BayesLoRAConv2d needs a base conv with groups=1, got groups={base_layer.groups}")
        super().__init__(base_layer, *args, **kwargs)

    def _make_A(self, device):
        base = self.base_layer
        return nn.Conv2d(
            base.in_channels,
            self.rank,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            device=device,
        )

    def _make_B(self, device):
        return nn.Conv2d(self.rank, self.base_layer.out_channels, 1, bias=False, device=device)

    def _bayesian(self, plain, prior_mean, **posterior):
        layer = BayesConv2d(
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size,
            plain.stride,
            plain.padding,
            plain.dilation,
            plain.groups,
            False,
            plain.padding_mode,
            device=plain.weight.device,
            prior_mean=prior_mean,
            **posterior,
        )
        with torch.no_grad():
            layer.weight_mu.copy_(plain.weight)
        return layer

    def merged_delta(self):
        b = _factor_weight(self.lora_B)[:, :, 0, 0]
        return self.scaling * torch.einsum("or,rihw->oihw", b, _factor_weight(self.lora_A))
