"""The autograd seam of every fused backend: y, kl = layer_map(x, mu + softplus(rho) * eps(seed), bias), KL(q, p).

One autograd Function, :class:`ReparameterizedFunction`, keeps the bookkeeping (what is saved, which gradients
are needed); *how* forward and backward are computed is a :class:`WeightPath` underneath:

* :class:`SampleThenMap` (any :class:`PosteriorKernels`: Triton, C++, plain torch): the sample+KL kernel writes w
  in x's dtype, then ``layer_map.forward`` (cuBLAS / cuDNN, or the CPU BLAS). Backward: ``layer_map.backward`` for
  dW and the bias gradient, one gradient pass that regenerates eps, forms d_mu and d_rho and (when dx is
  needed) writes w again, then ``layer_map.backward`` for dx. With ``weight_grad_epilogue`` (Linear, Triton)
  d_mu and d_rho come straight from the dW GEMM's epilogue.
* :class:`SampleInGemm` (Linear, Triton): the forward and input-gradient GEMMs build weight tiles in registers
  and d_mu / d_rho come from the dW epilogue: no weight sample is ever written.

Saved for backward on every path: x, the seed and references to the parameters (mu, rho, prior mean) -- never
eps, sigma or w. :class:`SampledWeightFunction` is the same seam for a weight sample on its own (LoRA factors).

``layer_map`` is any object with ``forward(x, w, b)`` and ``backward(dy, x, w, needs) -> (dx, dw, db)``
(``bayeslayers.layer_maps.LinearMap`` / ``Conv2dMap``); the kernels only see the weight as a flat array.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .kernel_ops import PosteriorKernels
from .posterior import Posterior
from .seeds import seed_tensor


class Needs(NamedTuple):
    """Which gradients the backward must form."""

    x: bool
    mu: bool
    rho: bool
    bias: bool

    @property
    def weight(self) -> bool:
        return self.mu or self.rho


class WeightPath:
    """How one path computes the forward ``(y, kl)`` and the backward ``(dx, d_mu, d_rho, d_bias)``."""

    kernels: PosteriorKernels

    def forward(self, layer_map, x, posterior: Posterior, bias, seed):
        raise NotImplementedError

    def backward(self, layer_map, dy, dkl, x, posterior: Posterior, seed, needs: Needs):
        raise NotImplementedError


class SampleThenMap(WeightPath):
    """Sample the weight in one pass, then the deterministic map (see the module docstring)."""

    def __init__(self, kernels: PosteriorKernels, weight_grad_epilogue: bool = False):
        if weight_grad_epilogue and kernels.weight_grad_gemm_op is None:
            raise ValueError("weight_grad_epilogue=True needs kernels with a weight_grad_gemm operator")
        self.kernels, self.weight_grad_epilogue = kernels, weight_grad_epilogue

    def forward(self, layer_map, x, posterior, bias, seed):
        w, kl = self.kernels.sample_weight(posterior, seed, x.dtype)
        return layer_map.forward(x, w, bias), kl

    def fuses_adamw(self, dy, needs) -> bool:
        """True when this backward can run AdamW inside its gradient pass (C++ kernels, no dW epilogue)."""
        return (
            self.kernels.reparameterization_grad_adamw_fn is not None
            and not self.weight_grad_epilogue
            and dy is not None
            and needs.mu
            and needs.rho
        )

    def backward(self, layer_map, dy, dkl, x, posterior, seed, needs, adamw=None):
        """``adamw``: :class:`AdamWArguments` when :meth:`fuses_adamw`: mu, rho and the moments are updated in the
        gradient pass and (None, None) is returned for d_mu, d_rho."""
        kernels = self.kernels
        need_weight, need_bias = needs.weight, needs.bias
        dx = d_w = d_bias = d_mu = d_rho = w = None
        if self.weight_grad_epilogue and dy is not None and need_weight:
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            mu, rho, prior_mu, prior_sigma, kl_direction = posterior
            d_mu, d_rho = kernels.weight_grad_gemm_op(dy2, x2, mu, rho, prior_mu, seed, dkl, prior_sigma, kl_direction)
            d_bias = dy2.sum(0) if need_bias else None
            need_weight = need_bias = False  # done
        if dy is not None and (need_weight or need_bias):
            # The weight's values are not read for dW / db; an uninitialised buffer gives the shape and dtype.
            shape_only = torch.empty(posterior.mu.shape, dtype=x.dtype, device=x.device)
            _, d_w, d_bias = layer_map.backward(dy, x, shape_only, (False, need_weight, need_bias))
        write_w = needs.x and dy is not None
        if adamw is not None:
            w_dtype = x.dtype if write_w else None
            w = kernels.reparameterization_grad_adamw(
                d_w, *posterior, w_dtype=w_dtype, adamw=adamw, seed=seed, g_kl=dkl
            )
        elif need_weight and (d_w is not None or dkl is not None):
            w_dtype = x.dtype if write_w else None
            d_mu, d_rho, w = kernels.reparameterization_grad(posterior, seed, d_w, dkl, w_dtype, d_w_is_temporary=True)
        if write_w:
            if w is None:
                w, _ = kernels.sample_weight(posterior, seed, x.dtype, with_kl=False)
            dx, _, _ = layer_map.backward(dy, x, w, (True, False, False))
        return dx, d_mu, d_rho, d_bias


class SampleInGemm(WeightPath):
    """Linear only: weight tiles built inside the forward and dx GEMMs, d_mu / d_rho in the dW epilogue."""

    def __init__(self, kernels: PosteriorKernels):
        if kernels.sampled_matmul_op is None or kernels.weight_grad_gemm_op is None:
            raise ValueError("SampleInGemm needs kernels with sampled_matmul and weight_grad_gemm operators")
        self.kernels = kernels

    def forward(self, layer_map, x, posterior, bias, seed):
        mu, rho, prior_mu, prior_sigma, kl_direction = posterior
        x2 = x.reshape(-1, x.shape[-1])
        y, kl = self.kernels.sampled_matmul_op(x2, mu, rho, prior_mu, seed, bias, True, prior_sigma, kl_direction, True)
        return y.reshape(*x.shape[:-1], mu.shape[0]), kl

    def backward(self, layer_map, dy, dkl, x, posterior, seed, needs):
        mu, rho, prior_mu, prior_sigma, kl_direction = posterior
        dx = d_mu = d_rho = d_bias = None
        dy2 = None if dy is None else dy.reshape(-1, dy.shape[-1])
        if needs.x and dy is not None:
            dx = self.kernels.sampled_matmul_op(dy2, mu, rho, None, seed, None, False, 1.0, "qp", False)[0]
            dx = dx.reshape(x.shape)
        if needs.weight and dy is not None:
            d_mu, d_rho = self.kernels.weight_grad_gemm_op(
                dy2, x.reshape(-1, x.shape[-1]), mu, rho, prior_mu, seed, dkl, prior_sigma, kl_direction
            )
        elif needs.weight and dkl is not None:  # only the KL was used
            d_mu, d_rho, _ = self.kernels.reparameterization_grad(posterior, seed, None, dkl)
        if needs.bias and dy is not None:
            d_bias = dy2.sum(0)
        return dx, d_mu, d_rho, d_bias


STEP_IN_BACKWARD = "_bayeslayers_step_in_backward"  # attribute an optimizer sets on a parameter it updates in
# backward: a weakref.WeakMethod of step(param, grad); the parameter's gradient then never reaches .grad


def steps_in_backward(*params):
    """``(step, param)`` per parameter: the in-backward optimizer step registered on it (None where none is) and
    the parameter itself, read when the forward runs (backward may see a detached alias of it, e.g. under
    activation checkpointing). A compiled graph reads none: its gradients reach ``.grad`` as usual."""
    if torch.compiler.is_compiling():
        return tuple((None, p) for p in params)
    return tuple((getattr(p, STEP_IN_BACKWARD, None), p) for p in params)


def apply_steps_in_backward(steps, grads):
    """Hands each gradient to its parameter's in-backward step (which consumes it: None is returned in its place);
    gradients of parameters without one pass through."""
    out = []
    for (step_ref, param), grad in zip(steps, grads):
        step = None if step_ref is None else step_ref()  # None once the optimizer is gone
        if step is None or grad is None:
            out.append(grad)
        else:
            step(param, grad)
            out.append(None)
    return out


def fused_adamw_arguments(steps):
    """:class:`AdamWArguments` for one gradient pass with AdamW fused in, from the optimizer that registered the
    in-backward steps of mu and rho (``fused_adamw_arguments(mu, rho)``: it counts the step as taken), or None
    when there is none or it cannot fuse this update."""
    (mu_step, mu), (rho_step, rho) = steps
    optimizer = None if mu_step is None or rho_step is None else getattr(mu_step(), "__self__", None)
    if optimizer is None or getattr(rho_step(), "__self__", None) is not optimizer:
        return None
    request = getattr(optimizer, "fused_adamw_arguments", None)
    return None if request is None else request(mu, rho)


class ReparameterizedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, rho, bias, prior_mu, seed, prior_sigma, kl_direction, layer_map, path):
        y, kl = path.forward(layer_map, x, Posterior(mu, rho, prior_mu, prior_sigma, kl_direction), bias, seed)
        ctx.steps = steps_in_backward(mu, rho)
        ctx.save_for_backward(x, mu, rho, prior_mu, seed)
        ctx.prior_sigma, ctx.kl_direction, ctx.layer_map, ctx.path = prior_sigma, kl_direction, layer_map, path
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y, kl

    @staticmethod
    def backward(ctx, dy, dkl):
        x, mu, rho, prior_mu, seed = ctx.saved_tensors
        need_x, need_mu, need_rho, need_bias = ctx.needs_input_grad[:4]
        needs = Needs(need_x, need_mu, need_rho, need_bias and ctx.has_bias)
        posterior = Posterior(mu, rho, prior_mu, ctx.prior_sigma, ctx.kl_direction)
        adamw = None
        if isinstance(ctx.path, SampleThenMap) and ctx.path.fuses_adamw(dy, needs):
            adamw = fused_adamw_arguments(ctx.steps)
        if adamw is not None:
            dx, d_mu, d_rho, d_bias = ctx.path.backward(ctx.layer_map, dy, dkl, x, posterior, seed, needs, adamw)
        else:
            dx, d_mu, d_rho, d_bias = ctx.path.backward(ctx.layer_map, dy, dkl, x, posterior, seed, needs)
        d_mu, d_rho = d_mu if need_mu else None, d_rho if need_rho else None
        d_mu, d_rho = apply_steps_in_backward(ctx.steps, (d_mu, d_rho))
        return (
            dx,
            d_mu,
            d_rho,
            d_bias if needs.bias else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class SampledWeightFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, rho, prior_mu, seed, prior_sigma, kl_direction, dtype, kernels):
        w, kl = kernels.sample_weight(Posterior(mu, rho, prior_mu, prior_sigma, kl_direction), seed, dtype)
        ctx.steps = steps_in_backward(mu, rho)
        ctx.save_for_backward(mu, rho, prior_mu, seed)
        ctx.prior_sigma, ctx.kl_direction, ctx.kernels = prior_sigma, kl_direction, kernels
        ctx.set_materialize_grads(False)
        return w, kl

    @staticmethod
    def backward(ctx, d_w, dkl):
        mu, rho, prior_mu, seed = ctx.saved_tensors
        d_mu = d_rho = None
        if d_w is not None or dkl is not None:
            posterior = Posterior(mu, rho, prior_mu, ctx.prior_sigma, ctx.kl_direction)
            d_mu, d_rho, _ = ctx.kernels.reparameterization_grad(posterior, seed, d_w, dkl)
            d_mu, d_rho = d_mu if ctx.needs_input_grad[0] else None, d_rho if ctx.needs_input_grad[1] else None
            d_mu, d_rho = apply_steps_in_backward(ctx.steps, (d_mu, d_rho))
        return d_mu, d_rho, None, None, None, None, None, None


def reparameterize(layer_map, x, posterior: Posterior, bias, seed, path: WeightPath):
    """Returns ``(y, kl)``: y = layer_map(x, w, bias) with w = mu + softplus(rho) * eps(seed) in x's dtype, and the
    summed closed-form KL (0-d float32, nats), computed along ``path``.

    x: compute dtype; bias: x's dtype or None; seed: Python int or one-element int64 tensor (see ``triton/philox.py``).
    """
    mu, rho, prior_mu, prior_sigma, kl_direction = posterior.checked(path.kernels.param_dtypes)
    return ReparameterizedFunction.apply(
        x, mu, rho, bias, prior_mu, seed_tensor(seed, mu.device), prior_sigma, kl_direction, layer_map, path
    )


def sample_weight(posterior: Posterior, seed, dtype: torch.dtype, kernels: PosteriorKernels):
    """Returns ``(w, kl)``: w = mu + softplus(rho) * eps(seed) in ``dtype`` and the summed KL (0-d float32), both
    differentiable w.r.t. mu and rho; eps is regenerated in backward, never stored."""
    mu, rho, prior_mu, prior_sigma, kl_direction = posterior.checked(kernels.param_dtypes)
    return SampledWeightFunction.apply(
        mu, rho, prior_mu, seed_tensor(seed, mu.device), prior_sigma, kl_direction, dtype, kernels
    )
