"""Bayesian fully connected layer."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import DEFAULTS
from ..layer_maps import LinearMap
from .base import BayesianLayer

_LINEAR = LinearMap()


class BayesLinear(BayesianLayer):
    """y[..., out] = x[..., in] @ w^T + bias with w ~ N(weight_mu, softplus(weight_rho)^2) of shape (out, in).

    ``bias`` is a deterministic parameter. Extra keyword arguments (init_sigma, prior_sigma, kl_direction,
    prior_mean, prior_dtype, store_prior) configure the posterior and prior (see :class:`BayesianLayer`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, **posterior):
        super().__init__((out_features, in_features), device=device, **posterior)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.export_dtype = torch.float32
        self.reset_mean()

    def reset_mean(self) -> None:
        """nn.Linear's default initialisation of the mean and bias."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        *,
        init_sigma=DEFAULTS.init_sigma,
        prior_sigma=DEFAULTS.prior_sigma,
        kl_direction=DEFAULTS.kl_direction,
        prior_dtype=DEFAULTS.prior_dtype,
        store_prior=DEFAULTS.store_prior,
    ) -> BayesLinear:
        """Posterior mean = ``module.weight``; prior mean = a frozen copy of it; bias copied."""
        weight = module.weight.detach()
        layer = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            init_sigma=init_sigma,
            prior_sigma=prior_sigma,
            kl_direction=kl_direction,
            prior_mean=weight,
            prior_dtype=prior_dtype,
            store_prior=store_prior,
        )
        return layer._copy_from(module)

    def to_deterministic(self) -> nn.Linear:
        """A plain nn.Linear holding the posterior mean (in the dtype of the converted module)."""
        return self._export_into(
            nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=self.weight_mu.device,
                dtype=self.export_dtype,
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"BayesLinear: input x must have last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        return self._reparameterized(_LINEAR, x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.posterior_repr()}"
        )
