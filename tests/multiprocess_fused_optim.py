"""Run as ``python multiprocess_fused_optim.py RANK WORLD PORT OUT``: 3 training steps of a small Bayesian model
under DDP (gloo) with FusedBayesAdamW, each process on its shard of the global batch and all drawing the same
weight samples; rank 0 writes the trained parameters to OUT (torch.save)."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_optim import Net, convert_net

from bayeslayers.optim import FusedBayesAdamW, exclude_from_ddp

STEPS, GLOBAL_BATCH = 3, 4


def batches():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator)


def train(model, optimizer, x, y, forward=None):
    forward = forward or model
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # every process draws the same layer seeds
        F.mse_loss(forward(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def main(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = convert_net(Net())
    exclude_from_ddp(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = FusedBayesAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert optimizer.all_reduce
    x, y = batches()
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    train(model, optimizer, x[shard], y[shard], forward=ddp)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
