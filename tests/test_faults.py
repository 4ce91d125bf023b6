"""Faults: a training process SIGKILLed while it writes a checkpoint, damaged files, checkpoints of another
model, write errors (a real EFBIG from the kernel via RLIMIT_FSIZE) and divergence (NaN/Inf)."""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from tiny_models import recipe_argv

import bayeslayers
from bayeslayers.integrations.dreambooth import main, parse_args
from bayeslayers.integrations.dreambooth.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import recipe_workspace

    return recipe_workspace(tmp_path_factory.mktemp("faults"))


def _argv(workspace, out, *extra):
    return recipe_argv(workspace, out, "--kl_weight", "1e-2", *extra)


# The child process trains with a checkpoint every 2 steps and SIGKILLs itself in the middle of writing
# checkpoint-4: after half of params.safetensors is on disk ("mid_file"), or with every file written and
# flushed just before the folder is renamed into place ("before_rename").
KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import bayeslayers.integrations.dreambooth.checkpoints as checkpoints
    from bayeslayers.integrations.dreambooth import main, parse_args

    where, argv = sys.argv[1], sys.argv[2:]
    real_save, real_fsync = checkpoints.save_file, checkpoints._fsync

    def save_file(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        if where == "mid_file" and "checkpoint-4" in path and path.endswith("params.safetensors"):
            size = os.path.getsize(path)
            with open(path, "r+b") as handle:
                handle.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def fsync(path):
        real_fsync(path)
        if where == "before_rename" and Path(path).name == ".tmp-checkpoint-4":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.save_file, checkpoints._fsync = save_file, fsync
    main(parse_args(argv))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid_file", "before_rename"])
def test_sigkill_while_checkpointing_then_resume_latest_gives_the_uninterrupted_weights(workspace, where):
    from safetensors.torch import load_file

    root = workspace[0]
    steps = ["--max_train_steps", "6", "--checkpointing_steps", "2"]
    straight = main(parse_args(_argv(workspace, "straight", *steps)))
    out = f"killed-{where}"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, where, *_argv(workspace, out, *steps)],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert (root / out / ".tmp-checkpoint-4").is_dir()  # the partial checkpoint is there ...
    assert [p.name for p in list_checkpoints(root / out)] == ["checkpoint-2"]  # ... and is not a checkpoint

    resumed = main(parse_args(_argv(workspace, out, *steps, "--resume_from_checkpoint", "latest")))
    assert resumed["steps"] == 6
    assert not (root / out / ".tmp-checkpoint-4").exists()
    a, b = load_file(straight["bayesian_state"]), load_file(resumed["bayesian_state"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    a = load_file(Path(straight["unet"], "diffusion_pytorch_model.safetensors"))
    b = load_file(Path(resumed["unet"], "diffusion_pytorch_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ---- damaged files and other models, on a small model (no diffusers) ----


class Small(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.a = nn.Linear(5, width)
        self.b = nn.Conv2d(2, 3, 3)


def _trained(width=6, steps=1):
    torch.manual_seed(width)
    model = Small(width)
    bayeslayers.convert(model, target_modules=["a", "b"])
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for _ in range(steps):
        loss = model.a(torch.randn(3, 5)).square().sum() + model.b(torch.randn(1, 2, 5, 5)).sum()
        (loss + bayeslayers.kl_loss(model)).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, named, optimizer, scheduler


def _snapshot(named):
    return {k: v.detach().clone() for k, v in named.items()}


@pytest.fixture
def two_checkpoints(tmp_path):
    model, named, optimizer, scheduler = _trained()
    save_checkpoint(tmp_path, 2, named, optimizer, scheduler, {"step": [2]}, None)
    first = _snapshot(named)
    with torch.no_grad():
        for p in named.values():
            p.add_(1.0)
    save_checkpoint(tmp_path, 4, named, optimizer, scheduler, {"step": [4]}, None)
    return tmp_path, named, optimizer, scheduler, first


def _check_loads(path, named, optimizer, scheduler, expected):
    with torch.no_grad():
        for p in named.values():
            p.zero_()
    step, _ = load_checkpoint(path, named, optimizer, scheduler)
    for key, value in expected.items():
        torch.testing.assert_close(named[key], value, rtol=0, atol=0)
    return step


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("truncate", r"\d+ bytes, expected \d+"),
        ("header", "CRC32 mismatch"),
        ("flip_data_byte", "CRC32 mismatch"),
        ("delete", "missing"),
        ("state_json", r"[^()]+: line 1 column \d+ \(char \d+\)"),
        ("truncate_without_manifest", r"Error while deserializing header: .+"),
    ],
)
def test_damaged_checkpoint_names_the_file_and_the_previous_one_still_loads(two_checkpoints, damage, reason):
    root, named, optimizer, scheduler, first = two_checkpoints
    target = root / "checkpoint-4" / ("trainer_state.json" if damage == "state_json" else "params.safetensors")
    data = target.read_bytes()
    if damage == "truncate_without_manifest":  # a checkpoint written before manifests: safetensors finds it
        state = json.loads((root / "checkpoint-4" / "trainer_state.json").read_text())
        del state["files"]
        (root / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
        target.write_bytes(data[: len(data) // 2])
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        target.write_bytes(b"\xff" * 16 + data[16:])
    elif damage == "flip_data_byte":
        target.write_bytes(data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_bytes(data[: len(data) // 2])
    before = _snapshot(named)
    with pytest.raises(
        ValueError,
        match=rf"^checkpoint file {target} is truncated or corrupted \({reason}\); resume from an earlier one, "
        r"e\.g\. --resume_from_checkpoint checkpoint-2$",
    ):
        load_checkpoint(root / "checkpoint-4", named, optimizer, scheduler)
    for key, value in before.items():  # nothing was half-loaded
        torch.testing.assert_close(named[key], value, rtol=0, atol=0)
    assert _check_loads(root / "checkpoint-2", named, optimizer, scheduler, first) == 2


def test_checkpoint_of_another_model_is_refused(two_checkpoints):
    root = two_checkpoints[0]
    _, named, optimizer, scheduler = _trained(width=7)  # same names, other shapes
    before = _snapshot(named)
    with pytest.raises(
        ValueError,
        match=r"is not from this model: a.weight_mu has shape \(6, 5\) there but "
        r"\(7, 5\) in the model",
    ):
        load_checkpoint(root / "checkpoint-4", named, optimizer, scheduler)
    for key, value in before.items():
        torch.testing.assert_close(named[key], value, rtol=0, atol=0)
    other = {f"renamed.{k}": v for k, v in named.items()}
    with pytest.raises(ValueError, match=r"is not from this model: it lacks trainable parameters \['renamed"):
        load_checkpoint(root / "checkpoint-4", other, optimizer, scheduler)


@contextlib.contextmanager
def file_size_limit(limit_bytes):
    """Writes past ``limit_bytes`` fail in the kernel with EFBIG, as on a full disk (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_write_error_names_the_file_and_keeps_the_previous_checkpoint(two_checkpoints):
    root, named, optimizer, scheduler, _ = two_checkpoints
    latest = _snapshot(named)
    with (
        file_size_limit(200),
        pytest.raises(
            OSError,
            match=r"could not write checkpoint file .*\.tmp-checkpoint-6/params\.safetensors .*"
            r"File too large.*the previous checkpoint .*checkpoint-4 is intact",
        ),
    ):
        save_checkpoint(root, 6, named, optimizer, scheduler, {"step": [6]}, 1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no partial, no pruning
    assert _check_loads(root / "checkpoint-4", named, optimizer, scheduler, latest) == 4


def test_bayeslayers_save_write_error_and_damaged_file(tmp_path):
    model, named, _, _ = _trained()
    path = tmp_path / "state.safetensors"
    bayeslayers.save(model, path)
    saved = _snapshot(named)
    with torch.no_grad():
        for p in named.values():
            p.add_(1.0)
    with (
        file_size_limit(200),
        pytest.raises(
            OSError,
            match=rf"save: could not write '{path}' .*File too large.*"
            "the existing file there is unchanged$",
        ),
    ):
        bayeslayers.save(model, path)
    assert sorted(os.listdir(tmp_path)) == ["state.safetensors"]
    bayeslayers.load(model, path)
    for key, value in saved.items():
        torch.testing.assert_close(named[key], value, rtol=0, atol=0)

    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(ValueError, match=rf"'{path}' is not a readable safetensors file, truncated or corrupted"):
        bayeslayers.load(model, path)


def test_bayeslayers_load_refuses_a_state_of_another_model(tmp_path):
    model, _, _, _ = _trained(width=6)
    bayeslayers.save(model, tmp_path / "six.safetensors")
    other, _, _, _ = _trained(width=7)
    with pytest.raises(
        ValueError,
        match=r"load: a.weight_mu has shape \(7, 5\) in the model but \(6, 5\) in the "
        "checkpoint",
    ):
        bayeslayers.load(other, tmp_path / "six.safetensors")


# ---- divergence ----


def test_huge_learning_rate_stops_with_a_clear_message_and_keeps_the_last_finite_checkpoint(workspace):
    from safetensors.torch import load_file

    root = workspace[0]
    args = parse_args(
        _argv(workspace, "diverged", "--max_train_steps", "6", "--checkpointing_steps", "1", "--learning_rate", "1e30")
    )
    with pytest.raises(
        FloatingPointError,
        match=r"training diverged at step \d: loss=nan.*the previous "
        r"checkpoint .*checkpoint-\d is intact",
    ):
        main(args)
    found = list_checkpoints(root / "diverged")
    assert found, "the first step's update is finite and checkpointed"
    for path in found:
        for key, value in load_file(path / "params.safetensors").items():
            assert torch.isfinite(value).all(), (path, key)
    assert not (root / "diverged" / "unet").exists() and not (root / "diverged" / "bayesian_state.safetensors").exists()


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    model, named, optimizer, scheduler = _trained()
    save_checkpoint(tmp_path, 1, named, optimizer, scheduler, {}, None)
    with torch.no_grad():
        named["b.weight_rho"][0, 0, 0, 0] = float("inf")
    with pytest.raises(
        FloatingPointError,
        match=r"parameter 'b.weight_rho' holds NaN or Inf after step 2; "
        r"checkpoint-2 was not written and the previous checkpoint "
        r".*checkpoint-1 is intact",
    ):
        save_checkpoint(tmp_path, 2, named, optimizer, scheduler, {}, None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_the_only_checkpoint_damaged_names_no_earlier_one(tmp_path):
    _, named, optimizer, scheduler = _trained()
    path = save_checkpoint(tmp_path, 2, named, optimizer, scheduler, {"step": [2]}, None)
    (path / "rng.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rng\.safetensors is truncated or corrupted \(missing\)$"):
        load_checkpoint(path, named, optimizer, scheduler)
