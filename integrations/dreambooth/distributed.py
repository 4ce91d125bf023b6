"""How weight samples relate across processes in multi-process (accelerate / DDP) training.

Policy: **one weight sample per global batch**. Every process draws the same posterior sample for a given
forward (it depends only on the run's seed and the forward's index), while data, noise and timesteps differ
per process. The averaged gradients then equal those of one process on the concatenated batch, so N processes
with per-process batch B train exactly the estimator of one process with batch N*B (and the KL, identical on
every process, is counted once per step by DDP's averaging). Per-process samples would lower the gradient
variance but make the result depend on the number of processes.

Launching on CPU: ``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate's simple launcher);
``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N`` starts N that train together over gloo
(without that variable each of them would train alone; :func:`check_launch` refuses that).

Layers draw their seeds from torch's default generator; :func:`shared_weight_sample` seeds a forked copy of it
from (seed, forward index) for the forward and restores the per-process stream afterwards.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from bayeslayers.rng import mix_seed


@contextmanager
def shared_weight_sample(seed: int, forward_index: int):
    """Within the block the default generators (CPU and the current CUDA device) are seeded from
    ``(seed, forward_index)`` alone, so every process draws the same weight samples; restored on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mix_seed(seed, forward_index))
        yield


def run_seed(accelerator, seed: int | None) -> int:
    """The seed of the weight samples: ``seed``, or one random draw of the main process shared with all."""
    if seed is not None:
        return seed
    from accelerate.utils import broadcast_object_list

    drawn = [int(torch.randint(0, 1 << 62, (1,)).item())]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn, from_process=0)
    return drawn[0]


def process_rng_states(accelerator) -> list[torch.Tensor]:
    """The torch CPU RNG state of every process (a collective: call it on all processes)."""
    state = torch.get_rng_state()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return [torch.as_tensor(s) for s in gather_object([state])]


def check_launch(accelerator) -> None:
    """RuntimeError when the launcher started several processes but accelerate set up fewer: each would train
    alone and all would write the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE) but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train alone into the same --output_dir. Without CUDA, "
            "launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N (gloo on CPU)"
        )
