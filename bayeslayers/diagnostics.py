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


QUANTILE_LIMIT = 2**24


def layer_group(name: str) -> str:
    """A posterior's group for movement statistics: the first component of its module name
    ('down_blocks', 'mid_block', 'up_blocks', 'text_model', ...)."""
    return name.split(".", 1)[0] or "model"


@torch.no_grad()
def sigma_movement(model: nn.Module, sigma_0: float, samples_per_layer: int = 65536) -> dict[str, dict[str, float]]:
    """Mean, 5th and 95th percentile of sigma / sigma_0 per layer group (:func:`layer_group`) and over all
    ("all"): ``{group: {"mean", "p05", "p95"}}``. The mean is exact; percentiles come from at most
    ``samples_per_layer`` evenly strided elements per layer (all of them in layers up to that size)."""
    groups: dict[str, tuple[list, list, list]] = {}
    for name, layer in posterior_layers(model):
        sigma = layer.weight_sigma.detach().float().flatten()
        for key in (layer_group(name), "all"):
            sums, counts, picked = groups.setdefault(key, ([], [], []))
            sums.append(sigma.sum())
            counts.append(sigma.numel())
            # a copy: a strided view would keep every layer's whole sigma alive until the concatenation
            picked.append(sigma[:: max(1, sigma.numel() // samples_per_layer)].clone())
    stats = {}
    for key, (sums, counts, picked) in groups.items():
        sample = torch.cat(picked) / sigma_0
        sample = sample[:: sample.numel() // QUANTILE_LIMIT + 1]  # torch.quantile takes at most 2**24 elements
        low, high = torch.quantile(sample, torch.tensor([0.05, 0.95], device=sample.device)).tolist()
        stats[key] = {"mean": torch.stack(sums).sum().item() / sum(counts) / sigma_0, "p05": low, "p95": high}
    return stats
