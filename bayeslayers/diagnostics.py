"""summary(): per-layer statistics of a Bayesian model's posteriors."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .convert import posterior_layers
from .kl import kl_elementwise


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    numel: int
    mean_sigma: float
    kl: float  # summed over the layer's elements, nats
    snr: float  # mean |mu| / sigma over the elements


class Summary(list):
    """A list of :class:`LayerStats` that prints as a table."""

    def __str__(self) -> str:
        header = f"{'layer':<60} {'shape':>18} {'params':>10} {'mean sigma':>11} {'KL':>12} {'|mu|/sigma':>11}"
        lines = [header, "-" * len(header)]
        for s in self:
            lines.append(
                f"{s.name:<60} {str(s.shape):>18} {s.numel:>10} {s.mean_sigma:>11.3e} {s.kl:>12.4e} {s.snr:>11.3f}"
            )
        total_params = sum(s.numel for s in self)
        total_kl = sum(s.kl for s in self)
        lines.append(f"{len(self)} Bayesian layers, {total_params} Bayesian weights, total KL {total_kl:.4e}")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict]:
        return [asdict(s) for s in self]


@torch.no_grad()
def summary(model: nn.Module) -> Summary:
    """Shape, number of weights, mean sigma, KL and mean |mu|/sigma of every Bayesian layer of ``model``."""
    rows = Summary()
    for name, layer in posterior_layers(model):
        mu, sigma = layer.weight_mu, layer.weight_sigma
        kl = (
            kl_elementwise(mu, sigma, layer.prior_mu, layer.prior_sigma, layer.kl_direction).sum()
            if layer.store_prior
            else float("nan")  # no prior stored: no KL
        )
        rows.append(
            LayerStats(
                name, tuple(mu.shape), mu.numel(), float(sigma.mean()), float(kl), float((mu.abs() / sigma).mean())
            )
        )
    return rows


def saved_tensor_bytes(module: nn.Module, *inputs) -> int:
    """Bytes autograd saves for backward in one forward ``module(*inputs)``, beyond the module's own parameters
    and buffers (what a training step keeps alive per layer). Counted once per storage (views count once)."""
    owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return total
