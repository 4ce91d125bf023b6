"""Trains the judge on fresh renders of the whole world (held-out colour/shape pairs included: the judge must
recognise every combination the generator is asked for).

    python -m bayeslayers.integrations.tiny_sd.train_judge --output judge.safetensors [--resolution 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .judge import ATTRIBUTES, Judge, high_frequency_energy, targets
from .world import RESOLUTION, make_dataset, to_tensor


def world_sample(n: int, seed: int, resolution: int = RESOLUTION):
    """n scenes from the whole world: train and held-out pairs mixed in proportion to their frequency."""
    train_images, train_scenes = make_dataset(n - n // 6, seed, resolution=resolution)
    held_images, held_scenes = make_dataset(n // 6, seed + 1, split="heldout", resolution=resolution)
    return to_tensor(np.concatenate([train_images, held_images])), train_scenes + held_scenes


def accuracy(judge: Judge, images: torch.Tensor, scenes) -> dict[str, float]:
    judge.eval()
    predicted = judge.predict(images)
    return {
        name: float(np.mean([p == getattr(s, name) for p, s in zip(predicted[name], scenes)])) for name in ATTRIBUTES
    }


def train_judge(
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 100,
    threads: int = 2,
    resolution: int = RESOLUTION,
    num_images: int = 6000,
):
    """(judge, accuracy on 1200 fresh renders, their mean high-frequency energy) after ``steps`` AdamW steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, scenes = world_sample(num_images, seed, resolution)
    labels = targets(scenes)
    judge = Judge(resolution)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,))
        batch = images[index] + 0.03 * torch.randn(batch_size, 3, resolution, resolution)  # robust to generator noise
        logits = judge(batch)
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    test_images, test_scenes = world_sample(1200, seed + 50, resolution)
    clean_energy = float(high_frequency_energy(test_images).mean())
    return judge.eval(), accuracy(judge, test_images, test_scenes), clean_energy


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--resolution", type=int, default=RESOLUTION, choices=(32, 64))
    args = parser.parse_args(input_args)
    judge, acc, clean_energy = train_judge(args.steps, resolution=args.resolution)
    save_file(
        judge.state_dict(),
        args.output,
        metadata={"clean_high_frequency_energy": repr(clean_energy), "held_out_accuracy": repr(acc)},
    )
    print({"accuracy": acc, "clean_high_frequency_energy": clean_energy})


if __name__ == "__main__":
    main()
