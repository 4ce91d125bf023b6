"""Bayesian 2-D convolution with every nn.Conv2d option diffusers uses."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..config import DEFAULTS
from ..layer_maps import Conv2dMap
from .base import BayesianLayer


def _resolve_padding(padding, kernel_size, stride, dilation, padding_mode):
    """Splits a Conv2d padding spec into (numeric padding of the map, explicit F.pad amounts or None)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        left = [t // 2 for t in totals]
        if padding_mode == "zeros" and all(t % 2 == 0 for t in totals):
            return tuple(left), None
        # F.pad takes (w_left, w_right, h_left, h_right)
        return (0, 0), (left[1], totals[1] - left[1], left[0], totals[0] - left[0])
    padding = _pair(padding)
    if padding_mode == "zeros":
        return padding, None
    return (0, 0), (padding[1], padding[1], padding[0], padding[0])


class BayesConv2d(BayesianLayer):
    """Conv2d whose weight (out, in/groups, kh, kw) is sampled from N(weight_mu, softplus(weight_rho)^2).

    Input (N, C_in, H, W) or (C_in, H, W); ``bias`` is deterministic. Posterior/prior keywords as in
    :class:`BayesianLayer`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        device=None,
        **posterior,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}"
            )
        kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        super().__init__((out_channels, in_channels // groups, *kernel_size), device=device, **posterior)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation, self.groups = kernel_size, stride, dilation, groups
        self.padding, self.padding_mode = padding, padding_mode
        map_padding, self._pre_pad = _resolve_padding(padding, kernel_size, stride, dilation, padding_mode)
        self._layer_map = Conv2dMap(stride, map_padding, dilation, groups)
        self.bias = nn.Parameter(torch.empty(out_channels, device=device)) if bias else None
        self.export_dtype = torch.float32
        self.reset_mean()

    def reset_mean(self) -> None:
        """nn.Conv2d's default initialisation of the mean and bias."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight_mu[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def conv_options(self) -> dict:
        return dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    @classmethod
    def from_module(
        cls,
        module: nn.Conv2d,
        *,
        init_sigma=DEFAULTS.init_sigma,
        prior_sigma=DEFAULTS.prior_sigma,
        kl_direction=DEFAULTS.kl_direction,
        prior_dtype=DEFAULTS.prior_dtype,
        store_prior=DEFAULTS.store_prior,
    ) -> BayesConv2d:
        """Posterior mean = ``module.weight``; prior mean = a frozen copy of it; bias copied."""
        weight = module.weight.detach()
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device=weight.device,
            init_sigma=init_sigma,
            prior_sigma=prior_sigma,
            kl_direction=kl_direction,
            prior_mean=weight,
            prior_dtype=prior_dtype,
            store_prior=store_prior,
        )
        return layer._copy_from(module)

    def to_deterministic(self) -> nn.Conv2d:
        """A plain nn.Conv2d holding the posterior mean (in the dtype of the converted module)."""
        return self._export_into(
            nn.Conv2d(
                self.in_channels,
                self.out_channels,
                bias=self.bias is not None,
                device=self.weight_mu.device,
                dtype=self.export_dtype,
                **self.conv_options(),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"BayesConv2d: input x must be (N, C, H, W) or (C, H, W) with C=in_channels="
                f"{self.in_channels}, got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pre_pad, mode=mode)
        y = self._reparameterized(self._layer_map, x, self.bias)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.conv_options().items())
        return (
            f"{self.in_channels}, {self.out_channels}, {options}, bias={self.bias is not None}, {self.posterior_repr()}"
        )
