"""Layer maps: the deterministic function a Bayesian layer applies with its weight, with an explicit backward.

Backends call ``forward(x, w, b)`` and ``backward(dy, x, w, needs)``; the autograd seam
(``bayeslayers.kernels.reparameterized``) uses the latter to form input and weight gradients without autograd
saving the sampled weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearMap:
    """y[..., out] = x[..., in] @ w[out, in]^T + b[out]."""

    def forward(self, x, w, b):
        return F.linear(x, w, b)

    def backward(self, dy, x, w, needs):
        """Returns (dx, dw, db); ``needs`` is a (dx, dw, db) tuple of bools."""
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy @ w) if needs[0] else None
        dw = (dy2.t() @ x.reshape(-1, x.shape[-1])) if needs[1] else None
        db = dy2.sum(0) if needs[2] else None
        return dx, dw, db


@dataclass(frozen=True)
class Conv2dMap:
    """2-D convolution with numeric zero padding (other padding is applied to x before the map)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def forward(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, dy, x, w, needs):
        bias_sizes = [w.shape[0]] if needs[2] else None
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy,
            x,
            w,
            bias_sizes,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            self.groups,
            list(needs),
        )
        return dx, dw, db
