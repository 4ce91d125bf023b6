"""kl_loss(): the KL term of the variational objective, summed over a model's Bayesian layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from .convert import posterior_layers

REDUCTIONS = ("sum", "mean")


def kl_loss(model: nn.Module, reduction: str = "sum", check_finite: bool = True) -> torch.Tensor:
    """Closed-form KL between posterior and prior over all Bayesian weights of ``model`` (0-d fp32, nats).

    ``reduction="sum"`` adds every element's KL; ``"mean"`` divides that sum by the number of Bayesian weight
    elements (KL per weight). Reuses the KL each layer computed in its fused sampling pass when still valid.
    With ``check_finite`` a non-finite result raises a ValueError naming the first layer at fault. A layer that
    stores no prior (``store_prior=False``) raises a RuntimeError naming it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    layers = posterior_layers(model)
    if not layers:
        raise ValueError("kl_loss: the model has no Bayesian layers; call bayeslayers.convert first")
    for name, layer in layers:
        layer.check_prior(name)
    total = torch.stack([layer.kl().float() for _, layer in layers]).sum()
    if reduction == "mean":
        total = total / sum(layer.weight_mu.numel() for _, layer in layers)
    if check_finite and not bool(torch.isfinite(total)):
        for name, layer in layers:
            layer.check_finite(name)
        raise ValueError("kl_loss is not finite although every posterior is: check prior_sigma and prior_mu")
    return total
