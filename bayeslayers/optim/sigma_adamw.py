"""AdamW whose step on a posterior's ``weight_rho`` is taken in sigma space (sigma = softplus(rho)).

AdamW moves each parameter by about its learning rate per step whatever the gradient's scale, so with rho as the
parameter sigma moves by ~sigmoid(rho) * lr: about 0.01 * lr at sigma = 0.01. The seed paper's code keeps sigma
itself as the parameter; there AdamW moves sigma by ~lr, ~100x more. A param group with ``sigma_space=True``
reproduces that step for step: per step and per element,

    sigma = softplus(rho);  g_sigma = g_rho / sigmoid(rho)          (chain rule: d sigma / d rho = sigmoid(rho))
    sigma <- AdamW(sigma, g_sigma)                                   (torch's AdamW: moments, decoupled decay)
    sigma <- max(sigma, min_sigma);  rho <- softplus^-1(sigma)       (the exact inverse, kept positive)

The moments (``exp_avg``, ``exp_avg_sq``) live in sigma space; the state dict is torch AdamW's. Other groups are
plain torch AdamW.

    groups = posterior_param_groups(model, lr=5e-6, rho_lr=None, sigma_space=True)
    optimizer = SigmaAdamW(groups, lr=5e-6, weight_decay=1e-2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_SIGMA = 1e-7  # the seed paper's clamp on sigma


def inverse_softplus(sigma: torch.Tensor) -> torch.Tensor:
    """rho with softplus(rho) == sigma (elementwise, stable for small sigma > 0)."""
    return sigma + torch.log(-torch.expm1(-sigma))


class SigmaAdamW(torch.optim.AdamW):
    """torch AdamW; groups with ``sigma_space=True`` hold rho parameters and are stepped in sigma space.

    Extra group options: ``sigma_space`` (default False), ``min_sigma`` (default 1e-7, sigma's floor after the
    step). After :meth:`step`, the ``.grad`` of a sigma-space parameter holds d loss / d sigma.
    """

    def __init__(self, params, lr=1e-3, *, sigma_space: bool = False, min_sigma: float = MIN_SIGMA, **kwargs):
        for option in ("fused", "capturable", "differentiable"):
            if kwargs.get(option):
                raise ValueError(f"SigmaAdamW does not support {option}=True")
        self._sigma_defaults = {"sigma_space": sigma_space, "min_sigma": min_sigma}  # read by add_param_group
        super().__init__(params, lr=lr, **kwargs)
        self.defaults.update(self._sigma_defaults)

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self._sigma_defaults.items():
            param_group.setdefault(key, value)
        if not param_group["min_sigma"] > 0:
            raise ValueError(f"min_sigma must be positive, got {param_group['min_sigma']!r}")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch AdamW state dict: plain groups
            group.setdefault("sigma_space", False)
            group.setdefault("min_sigma", MIN_SIGMA)

    def _sigma_params(self):
        return [p for g in self.param_groups if g["sigma_space"] for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sigma_params = [p for p in self._sigma_params() if p.grad is not None]
        for p in sigma_params:  # to sigma space: parameter sigma, gradient d loss / d sigma
            if p.grad.is_sparse:
                raise ValueError("SigmaAdamW: sparse gradients are not supported in sigma-space groups")
            p.grad.div_(torch.sigmoid(p))
            p.copy_(F.softplus(p))
        super().step()
        floors = {id(p): g["min_sigma"] for g in self.param_groups if g["sigma_space"] for p in g["params"]}
        for p in sigma_params:  # back to rho
            p.copy_(inverse_softplus(p.clamp_(min=floors[id(p)])))
        return loss


def posterior_param_groups(
    model, lr: float, rho_lr: float | None = None, sigma_space: bool = False, params=None
) -> list[dict]:
    """Param groups of ``params`` (default: ``model``'s trainable parameters): everything but rho at ``lr``; every
    posterior's ``weight_rho`` in ``model`` (a module, or several) at ``rho_lr`` (default ``lr``), stepped in sigma
    space when ``sigma_space`` (for :class:`SigmaAdamW`). Empty groups are left out."""
    from bayeslayers.convert import posterior_layers

    models = [model] if isinstance(model, torch.nn.Module) else [m for m in model if m is not None]
    rho_ids = {id(layer.weight_rho) for m in models for _, layer in posterior_layers(m)}
    if params is None:
        params = [p for m in models for p in m.parameters() if p.requires_grad]
    rho = [p for p in params if id(p) in rho_ids]
    rest = [p for p in params if id(p) not in rho_ids]
    groups = [{"params": rest, "lr": lr}]
    groups.append({"params": rho, "lr": lr if rho_lr is None else rho_lr, "sigma_space": sigma_space})
    return [g for g in groups if g["params"]]
