"""Multi-process training with accelerate (2 processes, gloo on CPU).

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher);
``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`` starts two through torchrun that
train together on CPU over gloo (without the variable, each trains alone: the recipe refuses that).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import recipe_argv

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*command, num_processes=2, timeout=600):
    """Runs ``accelerate launch`` with ``num_processes`` CPU processes (1 thread each)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *command,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{TESTS.parent}:{TESTS}",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
    }
    done = subprocess.run(cmd, cwd=TESTS, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.mark.slow
def test_two_processes_with_one_shared_weight_sample_average_to_the_one_process_gradients(tmp_path):
    out = tmp_path / "gradients.json"
    launch(str(TESTS / "multiprocess_gradients.py"), str(out))
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2
    # The recipe's policy: the averaged gradients of 2 x 2 samples are those of 1 process on the 4 samples,
    # KL term included once (it enters every process's loss with the full weight and DDP averages).
    assert result["shared"] < 1e-5, result
    # Per-process samples give other gradients (so the check above can fail).
    assert result["per_process"] > 1e-2, result
    # FSDP2 (torch's fully_shard, gloo on CPU): mu and rho are ordinary parameters and shard like any other.
    assert result["fsdp2_shared"] < 1e-5, result
    # FSDP1 (FullyShardedDataParallel, flat parameters): outside the wrapped forward mu is a shard of its flat
    # parameter, so kl_loss stops with a message naming the cause rather than a shape error deep in the KL.
    assert "sharded here (FSDP1" in result["fsdp1_error"], result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import recipe_workspace

    return recipe_workspace(tmp_path_factory.mktemp("multiprocess"))


def _recipe(workspace, out, *extra):
    flags = ("--train_batch_size", "1", "--kl_weight", "1e-2", "--checkpointing_steps", "2")
    flags += ("--checkpoints_total_limit", "1")
    return launch("-m", "bayeslayers.integrations.dreambooth", *recipe_argv(workspace, out, *flags, *extra))


@pytest.mark.slow
def test_recipe_on_two_processes_writes_one_checkpoint_and_export_and_resumes_exactly(workspace):
    from safetensors.torch import load_file

    root = workspace[0]
    _recipe(workspace, "straight", "--max_train_steps", "4")
    straight = root / "straight"
    names = sorted(p.name for p in straight.iterdir())
    assert [n for n in names if "checkpoint" in n] == ["checkpoint-4"], names  # no partial or duplicate copies
    assert {"unet", "bayesian_state.safetensors", "README.md"} <= set(names), names
    state = json.loads((straight / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["history"]["step"] == [1, 2, 3, 4]  # one entry per optimizer step, not per process
    rng = load_file(straight / "checkpoint-4" / "rng.safetensors")
    assert sorted(rng) == ["torch.0", "torch.1"] and not torch.equal(rng["torch.0"], rng["torch.1"])

    _recipe(workspace, "resumed", "--max_train_steps", "2")
    done = _recipe(workspace, "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert (done.stdout + done.stderr).count("resumed from") == 1  # printed by the main process only
    a, b = (
        load_file(straight / "bayesian_state.safetensors"),
        load_file(root / "resumed" / "bayesian_state.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(root / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_recipe_refuses_processes_that_would_each_train_alone(monkeypatch):
    from types import SimpleNamespace

    from bayeslayers.integrations.dreambooth.distributed import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(num_processes=1, distributed_type="NO")
    with pytest.raises(RuntimeError, match=r"2 processes were launched .* accelerate set up 1 .*ACCELERATE_USE_CPU"):
        check_launch(alone)
    check_launch(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(alone)
