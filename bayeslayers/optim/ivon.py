"""IVON: natural-gradient variational learning whose curvature estimate is the posterior's variance.

Improved Variational Online Newton (Shen et al. 2024, arXiv 2402.17641) on bayeslayers' layers. A Bayesian
weight's posterior is N(m, sigma^2) with m = ``weight_mu`` and sigma^2 = 1 / (ess * (h + delta)), h the running
estimate of the loss's diagonal Hessian. h is not stored: it is read from the layer's sigma = softplus(rho), so
rho takes the place of Adam's second moment, and a Bayesian weight holds m, its gradient, one moment g_m, rho and
rho's gradient (20 B) where an AdamW weight holds 16 B; the prior mean (when stored) adds 2-4 B.

One step, per Bayesian weight, from g = d loss / d m and g_rho = d loss / d rho at the sample w = m + sigma * eps
that the layer's forward drew (the loss a mean over the data; with several sampling forwards per step, e.g.
gradient accumulation, g and g_rho are their means and h_hat is the mean of their estimates):

    h_hat = g * eps / sigma = g_rho / (sigmoid(rho) * sigma)          reparameterisation estimate of the Hessian
    h     = 1 / (ess * sigma^2) - delta
    g_m  <- beta1 * g_m + (1 - beta1) * g
    h    <- beta2 * h + (1 - beta2) * h_hat + (1 - beta2)^2 / 2 * (h - h_hat)^2 / (h + delta)    (stays > 0)
    m    <- m - lr * clip((g_m / (1 - beta1^t) + delta * (m - m_0)) / (h + delta), +-clip_radius)
    sigma = 1 / sqrt(ess * (h + delta)),   rho = softplus^-1(sigma)

m_0 is the layer's prior mean (the pretrained weight, or 0 for a zero-mean prior): delta is the prior's precision
per unit of ess (prior N(m_0, 1 / (ess * delta))); a layer converted with ``store_prior=False`` needs delta = 0.
The loss must not hold a KL term (the prior enters through delta). Every other trainable parameter (biases, plain
weights) is stepped by torch's AdamW in the same object, so a training loop keeps ``loss.backward(); opt.step();
opt.zero_grad()`` and LR schedulers.

    opt = IVON(unet, lr=1e-3, ess=1e7, betas=(0.9, 0.999), other_lr=2e-4)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fused_adamw import adamw_state, adamw_update
from .sigma_adamw import inverse_softplus


def _check_positive(value, name: str, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"IVON: {name} must be a positive number, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"IVON: {name} must be finite, got {value!r}")
    return float(value)


def _check_betas(betas, name: str) -> tuple[float, float]:
    if len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
        raise ValueError(f"IVON: {name} must be two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _check_delta(weight_decay) -> float:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"IVON: weight_decay (delta) must be a number >= 0, got {weight_decay!r}")
    return float(weight_decay)


class IVON(torch.optim.Optimizer):
    """IVON over the Bayesian layers of ``models`` (a module or several); torch AdamW over the other parameters.

    lr: IVON's learning rate (a Newton step's fraction: its scale is not AdamW's). ess: the effective sample size
    lambda (sets the posterior's width: sigma^2 = 1 / (ess (h + delta))). betas: (beta1 for the gradient's moment,
    beta2 for the Hessian's). weight_decay: delta, the prior precision per unit of ess. clip_radius: bound on each
    element's Newton step (inf: none). hess_init: h at the start, written into every layer's sigma (None: h read
    from the sigma the layers hold, e.g. ``convert``'s ``init_sigma``). params: the trainable parameters (default:
    every parameter of ``models`` with ``requires_grad``); those outside Bayesian layers go to AdamW with
    ``other_lr`` (required when there are any), ``other_betas``, ``other_eps``, ``other_weight_decay``.

    ``param_groups[0]`` holds the Bayesian layers' (weight_mu, weight_rho) pairs (``"ivon": True``), the next
    group (when present) the rest. State: ``step`` and ``exp_avg`` (g_m) per weight_mu; weight_rho holds h.
    """

    def __init__(
        self,
        models,
        lr: float,
        ess: float,
        *,
        betas=(0.9, 0.99999),
        weight_decay: float = 1e-4,
        clip_radius: float = math.inf,
        hess_init: float | None = None,
        params=None,
        other_lr: float | None = None,
        other_betas=(0.9, 0.999),
        other_eps: float = 1e-8,
        other_weight_decay: float = 1e-2,
    ):
        from bayeslayers.convert import posterior_layers

        models = [models] if isinstance(models, torch.nn.Module) else [m for m in models if m is not None]
        layers = [(name, layer) for model in models for name, layer in posterior_layers(model)]
        if not layers:
            raise ValueError("IVON: models hold no Bayesian layer; convert them first (bayeslayers.convert)")
        if params is None:
            params = [p for model in models for p in model.parameters() if p.requires_grad]
        params = list(params)
        trainable = {id(p) for p in params}
        pairs, self._layers, self._names = [], [], []
        for name, layer in layers:
            mu, rho = layer.weight_mu, layer.weight_rho
            if id(mu) not in trainable:
                continue
            if id(rho) not in trainable or not rho.requires_grad:
                raise ValueError(
                    f"IVON: layer {name!r} trains weight_mu but not weight_rho; IVON reads its Hessian estimate "
                    "from weight_rho's gradient, so rho must require grad and be among params"
                )
            if _check_delta(weight_decay) > 0 and not layer.store_prior:
                raise ValueError(
                    f"IVON: layer {name!r} stores no prior (store_prior=False), so weight_decay (delta, the prior's "
                    "precision) has no centre: convert with store_prior=True (the prior mean is the pretrained "
                    "weight), or pass weight_decay=0"
                )
            pairs += [mu, rho]
            self._layers.append(layer)
            self._names.append(name)
        if not pairs:
            raise ValueError("IVON: no Bayesian layer's weight_mu is among params")
        paired = {id(p) for p in pairs}
        others = [p for p in params if id(p) not in paired]
        defaults = {
            "lr": _check_positive(lr, "lr"),
            "ess": _check_positive(ess, "ess"),
            "betas": _check_betas(betas, "betas"),
            "weight_decay": _check_delta(weight_decay),
            "clip_radius": _check_positive(clip_radius, "clip_radius", allow_inf=True),
        }
        groups = [{"params": pairs, "ivon": True}]
        if others:
            if other_lr is None:
                names = ", ".join(
                    n for m in models for n, p in m.named_parameters() if id(p) in {id(q) for q in others}
                )
                raise ValueError(
                    f"IVON: {len(others)} trainable parameters are outside Bayesian layers ({names[:200]}); give "
                    "other_lr, their AdamW learning rate (IVON's lr has another scale), or freeze them"
                )
            groups.append(
                {
                    "params": others,
                    "ivon": False,
                    "lr": _check_positive(other_lr, "other_lr"),
                    "betas": _check_betas(other_betas, "other_betas"),
                    "eps": _check_positive(other_eps, "other_eps"),
                    "weight_decay": float(other_weight_decay),
                }
            )
        super().__init__(groups, defaults)
        if hess_init is not None:
            self.reset_hessian(_check_positive(hess_init, "hess_init"))
        self._check_hessian()

    @torch.no_grad()
    def reset_hessian(self, hess_init: float) -> None:
        """Sets h = ``hess_init`` for every Bayesian weight: sigma = 1 / sqrt(ess (hess_init + delta))."""
        group = self.param_groups[0]
        sigma = 1.0 / math.sqrt(group["ess"] * (hess_init + group["weight_decay"]))
        for layer in self._layers:
            layer.weight_rho.fill_(sigma + math.log(-math.expm1(-sigma)))

    def _check_hessian(self) -> None:
        """h = 1 / (ess sigma^2) - delta must be positive for every weight at the start."""
        group = self.param_groups[0]
        for name, layer in zip(self._names, self._layers):
            sigma_max = float(F.softplus(layer.weight_rho.detach()).max())
            if not group["ess"] * sigma_max**2 * group["weight_decay"] < 1:
                raise ValueError(
                    f"IVON: layer {name!r} has sigma up to {sigma_max:.3g}, so h = 1 / (ess sigma^2) - delta <= 0 "
                    f"with ess={group['ess']:g}, weight_decay={group['weight_decay']:g}: need ess * sigma^2 * "
                    "weight_decay < 1 (a larger ess or hess_init, or a smaller weight_decay or init_sigma)"
                )

    def _pairs(self, group):
        params = group["params"]
        return zip(params[0::2], params[1::2], self._layers)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["ivon"]:
                self._ivon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _ivon_step(self, group) -> None:
        beta1, beta2 = group["betas"]
        lr, ess, delta, radius = group["lr"], group["ess"], group["weight_decay"], group["clip_radius"]
        for mu, rho, layer in self._pairs(group):
            if mu.grad is None and rho.grad is None:
                continue
            if mu.grad is None or rho.grad is None:
                missing = "weight_mu" if mu.grad is None else "weight_rho"
                raise RuntimeError(
                    f"IVON: a Bayesian layer's {missing} has no gradient while its pair has one; IVON needs both "
                    "from the same sampling forward (a KL or another loss on one of them alone cannot be used)"
                )
            if mu.grad.is_sparse or rho.grad.is_sparse:
                raise ValueError("IVON: sparse gradients are not supported")
            state = self.state[mu]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(mu, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            sigma = F.softplus(rho)
            h_hat = rho.grad / (torch.sigmoid(rho) * sigma)
            h = (ess * sigma.square_()).reciprocal_().sub_(delta)
            del sigma
            exp_avg = state["exp_avg"]
            exp_avg.lerp_(mu.grad, 1 - beta1)
            # h <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 / 2 (h - h_hat)^2 / (h + delta)
            spread = (h - h_hat).square_().div_(h + delta).mul_(0.5 * (1 - beta2) ** 2)
            h.mul_(beta2).add_(h_hat, alpha=1 - beta2).add_(spread)
            del spread, h_hat
            h.add_(delta)  # h + delta from here on
            direction = exp_avg / (1 - beta1**step)
            if delta:
                prior = layer.prior_mu
                direction.add_(mu if prior is None else mu - prior.to(mu.dtype), alpha=delta)
            direction.div_(h)
            if not math.isinf(radius):
                direction.clamp_(-radius, radius)
            mu.add_(direction, alpha=-lr)
            del direction
            rho.copy_(inverse_softplus((h.mul_(ess)).rsqrt_()))

    def _adamw_step(self, group) -> None:
        for param in group["params"]:
            if param.grad is not None:
                adamw_update(param, param.grad, adamw_state(self.state[param], param), group)

    def hessian(self, layer) -> torch.Tensor:
        """The Hessian estimate h that ``layer``'s sigma holds: 1 / (ess sigma^2) - delta."""
        group = self.param_groups[0]
        return (group["ess"] * F.softplus(layer.weight_rho.detach()).square()).reciprocal() - group["weight_decay"]
