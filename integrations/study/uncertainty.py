"""The posterior as a quality signal: does a Bayesian fine-tune's epistemic uncertainty about an image predict
how good that image is?

For each evaluation image (mean weights, one prompt, one initial-noise seed) its uncertainty is the per-pixel
std over K posterior weight samples that share that image's initial noise, summed over the image (the
``bayeslayers-sample`` map, summed). Against the judge's per-image fidelity and corruption this gives a rank
correlation, and the gain in mean fidelity from discarding the most uncertain quarter of the images.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch

import bayeslayers


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1], image i from initial-noise seed ``seeds[i]``."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    images = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt"
    ).images
    return images * 2 - 1


@torch.no_grad()
def image_uncertainty(pipe, prompts, seeds, num_samples: int, steps: int, guidance: float) -> torch.Tensor:
    """(N,) summed per-pixel std (images in [0, 1], std over ``num_samples`` weight samples, mean over RGB)."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a std, got {num_samples}")
    modules = [m for m in (pipe.unet, pipe.text_encoder) if m is not None and bayeslayers.posterior_layers(m)]
    if not modules:
        raise ValueError("pipe has no Bayesian layers: uncertainty needs a Bayesian fine-tune")
    samples = []
    for k in range(num_samples):
        with ExitStack() as stack:
            for module in modules:
                stack.enter_context(bayeslayers.sampling(module, seed=k))
            samples.append((generate(pipe, prompts, seeds, steps, guidance) + 1) / 2)
    return torch.stack(samples).std(0).mean(1).sum((-2, -1))


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != len(b):
        raise ValueError(f"spearman: lengths differ ({len(a)} vs {len(b)})")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def filtering_gain(uncertainty, quality, drop: float = 0.25) -> dict[str, float]:
    """Mean ``quality`` of all images and of those kept after dropping the ``drop`` most uncertain."""
    uncertainty, quality = np.asarray(uncertainty, float), np.asarray(quality, float)
    keep = np.argsort(uncertainty, kind="stable")[: max(1, int(round(len(quality) * (1 - drop))))]
    return {
        "all": float(quality.mean()),
        "kept": float(quality[keep].mean()),
        "gain": float(quality[keep].mean() - quality.mean()),
    }
