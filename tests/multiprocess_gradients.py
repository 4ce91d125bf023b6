"""Run with ``accelerate launch --cpu --num_processes N``: gradients of one training step of a small Bayesian
model (full Linear, Conv2d and a Bayesian LoRA) under DDP, each process on its shard of a global batch, against
one process on the whole batch. Writes {policy: max |difference| / max |gradient|} as JSON to argv[1].

Also "fsdp2_shared": the shared policy with torch's FSDP2 (``fully_shard``) sharding instead of DDP, and
"fsdp1_error": the message ``kl_loss`` raises under FSDP1 (``FullyShardedDataParallel``), whose flat parameters
are shards outside the wrapped forward.

Policies: "shared" (the recipe's: every process draws the same weight sample via shared_weight_sample) and
"per_process" (each process draws its own sample), which must differ from the one-process gradients.
"""

import copy
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

import bayeslayers
from bayeslayers.integrations.dreambooth.distributed import shared_weight_sample

KL_WEIGHT = 0.5
GLOBAL_BATCH = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4 * 5 * 5, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = F.silu(self.conv(x)).flatten(1)
        return self.head(F.silu(self.proj(h)))


def build():
    torch.manual_seed(0)
    net = Net()
    bayeslayers.convert(net, target_modules=["conv", "proj"], init_sigma=0.05)
    bayeslayers.convert(net, target_modules=["head"], mode="lora", rank=2, init_sigma=0.05)
    for module in (net.conv, net.proj):  # LoRA mode froze the rest of the model: train these layers in full
        module.requires_grad_(True)
    with torch.no_grad():
        net.head.lora_B.weight_mu.normal_(0, 0.1)
    return net


def loss_of(model, raw, x, y):
    return F.mse_loss(model(x), y) + KL_WEIGHT * bayeslayers.kl_loss(raw)


def gradients(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def fsdp2_difference(single, x, y, shard):
    """The shared-sample step with torch's FSDP2 (``fully_shard``: mu, rho, prior-free parameters sharded per
    layer) against one process on the whole batch; the gradient shards are gathered for the comparison."""
    from torch.distributed.fsdp import fully_shard

    net = copy.deepcopy(single)
    for module in (net.conv, net.proj, net.head):
        fully_shard(module)
    fully_shard(net)
    with shared_weight_sample(seed=7, forward_index=0):
        loss_of(net, net, x[shard], y[shard]).backward()
    sharded = {n: p.grad.full_tensor() for n, p in net.named_parameters() if p.grad is not None}
    reference = copy.deepcopy(single)
    with shared_weight_sample(seed=7, forward_index=0):
        loss_of(reference, reference, x, y).backward()
    expected = gradients(reference)
    assert sharded.keys() == expected.keys(), (sorted(sharded), sorted(expected))
    return max(float((sharded[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def fsdp1_error(single, x, y, shard) -> str:
    """The error of the shared-sample step under FSDP1 (FullyShardedDataParallel on CPU/gloo): after the
    forward, each rank's parameters are views of its flat shard, so the KL cannot be computed there."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    net = copy.deepcopy(single)
    for name in ("conv", "proj", "head"):
        setattr(net, name, FSDP(getattr(net, name), use_orig_params=True, device_id=torch.device("cpu")))
    model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    try:
        with shared_weight_sample(seed=7, forward_index=0):
            loss_of(model, model, x[shard], y[shard]).backward()
    except RuntimeError as error:
        return str(error)
    return ""


def main(out):
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    data = torch.Generator().manual_seed(123)
    x, y = torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=data), torch.randn(GLOBAL_BATCH, 2, generator=data)
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    single = build()
    results = {}
    for policy in ("shared", "per_process"):
        net = copy.deepcopy(single)
        model = accelerator.prepare(net)
        raw = accelerator.unwrap_model(model)
        torch.manual_seed(1000 + rank)  # the per-process stream (data, noise in the recipe)
        if policy == "shared":
            with shared_weight_sample(seed=7, forward_index=0):
                loss = loss_of(model, raw, x[shard], y[shard])
        else:
            loss = loss_of(model, raw, x[shard], y[shard])
        accelerator.backward(loss)
        averaged = gradients(raw)

        reference = copy.deepcopy(single)
        if policy == "shared":
            with shared_weight_sample(seed=7, forward_index=0):
                loss_of(reference, reference, x, y).backward()
        else:
            torch.manual_seed(1000)
            loss_of(reference, reference, x, y).backward()
        expected = gradients(reference)
        assert averaged.keys() == expected.keys(), (sorted(averaged), sorted(expected))
        assert {"conv.weight_rho", "proj.weight_mu", "head.lora_A.weight_rho"} <= set(expected), sorted(expected)
        results[policy] = max(
            float((averaged[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected
        )
    results["fsdp2_shared"] = fsdp2_difference(single, x, y, shard)
    results["fsdp1_error"] = fsdp1_error(single, x, y, shard)
    if accelerator.is_main_process:
        results["num_processes"] = world
        with open(out, "w") as handle:
            json.dump(results, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
