"""Training checkpoints (integrations/dreambooth/checkpoints.py) and the run's other outputs (export.py): a
checkpoint restores parameters, optimizer, LR schedule, RNG and history into a model that moved on; pruning,
saving one step again, finding checkpoints, divergence checks; the model card, command line and curves."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from reference import randomize_bayesian_state

import bayeslayers
from bayeslayers.integrations.dreambooth.checkpoints import (
    STATE_FILE,
    check_finite_metrics,
    check_finite_parameters,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from bayeslayers.integrations.dreambooth.export import command_line, plot_history, write_model_card


def _training(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    bayeslayers.convert(model, target_modules=["0"], init_sigma=0.05)
    randomize_bayesian_state(model, seed)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, named, optimizer, scheduler


def _step(model, optimizer, scheduler):
    loss = model(torch.randn(4, 5)).square().mean() + 1e-3 * bayeslayers.kl_loss(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def _snapshot(named, optimizer, scheduler):
    state = optimizer.state_dict()["state"]
    return (
        {k: v.detach().clone() for k, v in named.items()},
        {(i, k): v.clone() if torch.is_tensor(v) else v for i, s in state.items() for k, v in s.items()},
        scheduler.state_dict(),
        optimizer.param_groups[0]["lr"],
    )


def test_a_checkpoint_restores_parameters_optimizer_schedule_rng_and_history(tmp_path):
    model, named, optimizer, scheduler = _training()
    for _ in range(2):
        _step(model, optimizer, scheduler)
    history = {"step": [1, 2], "loss": [0.5, 0.25]}
    other_rng = torch.Generator().manual_seed(5).get_state()
    torch.manual_seed(77)
    path = save_checkpoint(
        tmp_path, 2, named, optimizer, scheduler, history, None, rng_states=[torch.get_rng_state(), other_rng]
    )
    assert path == tmp_path / "checkpoint-2" and (path / STATE_FILE).exists()
    expected_params, expected_state, expected_schedule, expected_lr = _snapshot(named, optimizer, scheduler)
    expected_draw = torch.rand(3)
    manifest = json.loads((path / STATE_FILE).read_text())["files"]
    assert sorted(manifest) == ["optimizer.safetensors", "params.safetensors", "rng.safetensors"]
    assert all(entry["bytes"] == (path / name).stat().st_size for name, entry in manifest.items())

    for _ in range(3):  # the run moves on; everything changes
        _step(model, optimizer, scheduler)
    torch.manual_seed(1)
    step, restored_history = load_checkpoint(path, named, optimizer, scheduler)
    assert (step, restored_history) == (2, history)
    params, state, schedule, lr = _snapshot(named, optimizer, scheduler)
    assert schedule == expected_schedule and lr == expected_lr == pytest.approx(1e-2 * 0.25)
    assert sorted(state) == sorted(expected_state) and len(state) == 3 * len(named)  # step, exp_avg, exp_avg_sq
    for key, value in expected_state.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
        else:
            assert state[key] == value, key
    for key, value in expected_params.items():
        torch.testing.assert_close(params[key], value, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # the RNG continues as it would have

    load_checkpoint(path, named, optimizer, scheduler, process_index=1)  # each process gets its own state back
    torch.testing.assert_close(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)), rtol=0, atol=0)
    assert tuple(optimizer.param_groups[0]["betas"]) == (0.8, 0.95)  # JSON gives a list back


def test_pruning_keeps_the_newest_and_saving_a_step_again_replaces_it(tmp_path):
    model, named, optimizer, scheduler = _training()
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, named, optimizer, scheduler, {"step": [step]}, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]  # numeric order
    _step(model, optimizer, scheduler)
    new_values = {k: v.detach().clone() for k, v in named.items()}
    save_checkpoint(tmp_path, 10, named, optimizer, scheduler, {"step": [10, 10]}, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3"]  # no .old / .tmp left
    with torch.no_grad():
        for p in named.values():
            p.zero_()
    assert load_checkpoint(tmp_path / "checkpoint-10", named, optimizer, scheduler) == (10, {"step": [10, 10]})
    for key, value in new_values.items():
        torch.testing.assert_close(named[key], value, rtol=0, atol=0)
    save_checkpoint(tmp_path, 11, named, optimizer, scheduler, {}, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-11"]


def test_finding_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    _, named, optimizer, scheduler = _training()
    for step in (4, 12, 7):
        save_checkpoint(tmp_path, step, named, optimizer, scheduler, {}, None)
    (tmp_path / "checkpoint-20").mkdir()  # no trainer_state.json: not complete
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-x" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-30").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-7", "checkpoint-12"]
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-12"
    assert resolve_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    assert resolve_checkpoint(tmp_path / "elsewhere", str(tmp_path / "checkpoint-4")) == tmp_path / "checkpoint-4"
    with pytest.raises(FileNotFoundError, match=rf"--resume_from_checkpoint: {tmp_path}/checkpoint-20 is not a "):
        resolve_checkpoint(tmp_path, "checkpoint-20")
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint latest: no checkpoint in"):
        resolve_checkpoint(tmp_path / "empty", "latest")


def test_divergence_checks_name_the_value_and_the_last_good_checkpoint(tmp_path):
    check_finite_metrics({"loss": 0.5, "kl": 2.0, "mean_sigma": float("nan"), "lr": 1e-4}, tmp_path, 3)
    check_finite_metrics({"loss": 0.5, "note": "text"}, tmp_path, 3)
    with pytest.raises(
        FloatingPointError,
        match=r"^training diverged at step 3: kl=inf; nothing was saved for this "
        r"step and no earlier checkpoint exists\. Lower --learning_rate and resume from it$",
    ):
        check_finite_metrics({"loss": 0.5, "kl": math.inf}, tmp_path, 3)
    _, named, optimizer, scheduler = _training()
    save_checkpoint(tmp_path, 2, named, optimizer, scheduler, {}, None)
    with pytest.raises(
        FloatingPointError,
        match=r"step 5: loss=nan, mean_sigma=inf; .*the previous checkpoint "
        rf"{tmp_path}/checkpoint-2 is intact",
    ):
        check_finite_metrics({"loss": float("nan"), "mean_sigma": math.inf}, tmp_path, 5)
    check_finite_parameters(named, tmp_path, 3)
    with torch.no_grad():
        named["2.bias"][1] = float("-inf")
    with pytest.raises(
        FloatingPointError,
        match=r"^training diverged: parameter '2\.bias' holds NaN or Inf after "
        r"step 3; checkpoint-3 was not written and the previous checkpoint .*checkpoint-2 is intact\. "
        r"Lower --learning_rate \(or raise --max_grad_norm's strictness\) and resume from it$",
    ):
        check_finite_parameters(named, tmp_path, 3)


def _run_args(tmp_path, **changes):
    args = dict(
        output_dir=str(tmp_path),
        pretrained_model_name_or_path="tiny/sd",
        instance_prompt="a sks star",
        train_mode="lora",
        bayesian=True,
        bayes_preset="dreambooth-bnn-lora",
        init_sigma=0.02,
        prior_sigma=0.03,
        kl_weight=0.5,
        kl_direction="pq",
        train_text_encoder=True,
        bayes_text_encoder=False,
        validation_prompt="a sks star on grass",
        command=["bayeslayers-dreambooth", "--instance_prompt", "a sks star", "--rank", "4"],
    )
    args.update(changes)
    return SimpleNamespace(**args)


def test_model_card_holds_the_settings_grid_command_metrics_and_files(tmp_path):
    (tmp_path / "grids").mkdir()
    grid = tmp_path / "grids" / "final.png"
    grid.write_bytes(b"png")
    written = {"bayesian_state": str(tmp_path / "bayesian_state.safetensors"), "lora_weights": "/x/weights.bin"}
    path = write_model_card(_run_args(tmp_path), {"final_kl": 1.5}, written, grid)
    assert path == tmp_path / "README.md"
    assert path.read_text().split("\n") == [  # the whole card, blank lines included (Markdown needs them)
        "# DreamBooth-BNN fine-tune",
        "",
        "Base model: `tiny/sd`",
        "Instance prompt: `a sks star`",
        "Mode: lora, Bayesian: True, preset: dreambooth-bnn-lora, init_sigma 0.02, prior_sigma 0.03, "
        "kl_weight 0.5, kl_direction pq",
        "Text encoder trained: True, Bayesian: False",
        "",
        "Final validation grid (`a sks star on grass`, mean weights):",
        "",
        "![final validation grid](grids/final.png)",
        "",
        "Command:",
        "",
        "```bash",
        "bayeslayers-dreambooth --instance_prompt 'a sks star' --rank 4",
        "```",
        "",
        "Final metrics:",
        "",
        "```",
        "{",
        '  "final_kl": 1.5',
        "}",
        "```",
        "",
        "Files:",
        "",
        "- bayesian_state: `bayesian_state.safetensors`",
        "- lora_weights: `weights.bin`",
        "",
    ]
    no_grid = write_model_card(_run_args(tmp_path), {}, {}, None).read_text()
    assert "grid" not in no_grid and "```bash" in no_grid


def test_command_line_quotes_the_recorded_or_the_process_arguments(monkeypatch):
    assert command_line(SimpleNamespace(command=["train", "--prompt", "a b"])) == "train --prompt 'a b'"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/bayeslayers-dreambooth", "--seed", "1 2"])
    assert command_line(SimpleNamespace()) == "bayeslayers-dreambooth --seed '1 2'"
    assert command_line(SimpleNamespace(command=None)) == "bayeslayers-dreambooth --seed '1 2'"


def test_training_curves_plot_the_logged_series(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    savefig = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k)))
    history = {
        "step": [1, 2, 3],
        "loss": [3.0, 2.0, 1.0],
        "kl": [5.0, 4.0, 3.0],
        "kl_unet": [4.0, 3.0, 2.0],
        "mean_sigma": [0.01, 0.02, 0.03],
        "kl_text_encoder": [],
        "validation_step": [2],
    }
    plot_history(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (figure,) = figures
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["loss", "KL", "mean sigma"]
    assert [[line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] for ax in axes] == [
        ["loss", "validation"],
        ["kl", "kl_unet", "validation"],
        ["mean_sigma", "validation"],
    ]
    assert list(axes[1].get_lines()[0].get_ydata()) == [5.0, 4.0, 3.0]
    assert list(axes[0].get_lines()[0].get_xdata()) == [1, 2, 3]
    assert axes[1].get_yscale() == "symlog" and axes[0].get_yscale() == "linear"
    assert axes[0].get_xlabel() == "step" and axes[1].get_legend() is not None and axes[0].get_legend() is not None
    assert axes[1].yaxis.get_transform().linthresh == 1e-3  # KL values far below 1 stay apart
    (marker,) = [line for line in axes[0].get_lines() if line.get_label() == "validation"]
    assert list(marker.get_xdata()) == [2, 2] and marker.get_linestyle() == ":"  # dotted, at the validation step
    assert not plt.fignum_exists(figure.number)  # closed: runs that plot often keep no figures alive
    figures.clear()
    plot_history({"step": [1, 2], "loss": [1.0, 0.5]}, tmp_path / "loss.png")
    assert len(figures[0].axes) == 1 and figures[0].axes[0].get_legend() is None


def test_training_curves_of_a_bayesian_text_encoder_run(tmp_path, monkeypatch):
    import matplotlib
    from PIL import Image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    savefig = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k)))
    history = {
        "step": [1, 2, 3],
        "loss": [3.0, 2.0, 1.0],
        "kl_unet": [4.0, 3.0, 2.0],
        "kl_text_encoder": [1.0, 0.5, 0.25],
        "mean_sigma": [0.01, 0.02, 0.03],
        "mean_sigma_text_encoder": [0.02, 0.03, 0.04],
        "validation_step": [1, 3],
    }
    plot_history(history, tmp_path / "curves.png")
    labels = [
        [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] for ax in figures[0].axes
    ]
    assert labels == [
        ["loss", "validation"],
        ["kl_unet", "kl_text_encoder", "validation"],  # one legend entry for all validation lines
        ["mean_sigma", "mean_sigma_text_encoder", "validation"],
    ]
    assert Image.open(tmp_path / "curves.png").size == (1350, 320)  # 450 x 320 px per panel
    figures.clear()
    del history["validation_step"]
    plot_history({**history, "loss": []}, tmp_path / "two.png")  # a legend exactly where a panel has two series
    assert [ax.get_legend() is not None for ax in figures[0].axes] == [True, True]


def test_non_tensor_optimizer_state_and_checkpoints_without_manifest_or_per_process_rng(tmp_path):
    from safetensors.torch import load_file, save_file

    model, named, optimizer, scheduler = _training()
    _step(model, optimizer, scheduler)
    first = next(iter(named.values()))
    optimizer.state[first]["count"] = 3  # e.g. 8-bit optimizers keep plain numbers in their state
    optimizer.state[first]["loss.scale"] = 0.5  # names with a dot
    torch.manual_seed(8)
    path = save_checkpoint(tmp_path, 1, named, optimizer, scheduler, {}, None)
    draw = torch.rand(2)
    optimizer.state[first].update({"count": 0, "loss.scale": 1.0})
    load_checkpoint(path, named, optimizer, scheduler)
    assert (optimizer.state[first]["count"], optimizer.state[first]["loss.scale"]) == (3, 0.5)
    torch.testing.assert_close(torch.rand(2), draw, rtol=0, atol=0)
    load_checkpoint(path, named, optimizer, scheduler, process_index=3)  # more processes now: process 0's state
    torch.testing.assert_close(torch.rand(2), draw, rtol=0, atol=0)

    # a checkpoint from before manifests and per-process RNG states: one "torch" state, no file sizes
    state = json.loads((path / STATE_FILE).read_text())
    del state["files"]
    (path / STATE_FILE).write_text(json.dumps(state))
    rng = load_file(str(path / "rng.safetensors"))
    save_file({"torch": rng["torch.0"]}, str(path / "rng.safetensors"))
    load_checkpoint(path, named, optimizer, scheduler, process_index=1)
    torch.testing.assert_close(torch.rand(2), draw, rtol=0, atol=0)


def test_saving_creates_the_output_folder_and_clears_what_an_interrupted_save_left(tmp_path):
    """A crash can leave .tmp-checkpoint-N (mid-write) or .old-checkpoint-N (mid-swap); saving N again works."""
    _, named, optimizer, scheduler = _training()
    root = tmp_path / "new" / "run"
    save_checkpoint(root, 5, named, optimizer, scheduler, {"step": [5]}, None)
    for leftover in (".tmp-checkpoint-5", ".old-checkpoint-5"):
        (root / leftover).mkdir()
        (root / leftover / "params.safetensors").write_bytes(b"partial")
    path = save_checkpoint(root, 5, named, optimizer, scheduler, {"step": [5, 5]}, None)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-5"]
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.safetensors",
        "params.safetensors",
        "rng.safetensors",
        STATE_FILE,
    ]
    assert load_checkpoint(path, named, optimizer, scheduler) == (5, {"step": [5, 5]})


def test_manifest_holds_each_files_standard_crc32_whatever_the_read_chunk(tmp_path, monkeypatch):
    import zlib

    import bayeslayers.integrations.dreambooth.checkpoints as checkpoints

    _, named, optimizer, scheduler = _training()
    monkeypatch.setattr(checkpoints, "_CHUNK", 7)  # many chunks per file
    path = save_checkpoint(tmp_path, 1, named, optimizer, scheduler, {}, None)
    manifest = json.loads((path / STATE_FILE).read_text())["files"]
    for name, entry in manifest.items():
        assert entry["crc32"] == zlib.crc32((path / name).read_bytes()), name


def test_a_failed_write_of_the_state_file_names_it_and_leaves_the_earlier_checkpoints(tmp_path, monkeypatch):
    import builtins

    import bayeslayers.integrations.dreambooth.checkpoints as checkpoints

    _, named, optimizer, scheduler = _training()
    save_checkpoint(tmp_path, 1, named, optimizer, scheduler, {}, None)

    def failing_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(STATE_FILE) and "w" in mode:
            raise OSError(28, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", failing_open, raising=False)
    with pytest.raises(
        OSError,
        match=rf"^could not write checkpoint file {tmp_path}/\.tmp-checkpoint-2/{STATE_FILE} \(.*No space left on "
        rf"device\); checkpoint-2 was not written and the previous checkpoint {tmp_path}/checkpoint-1 is intact$",
    ):
        save_checkpoint(tmp_path, 2, named, optimizer, scheduler, {}, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_a_checkpoint_of_a_model_with_more_or_fewer_parameters_is_refused(tmp_path):
    model, named, optimizer, scheduler = _training()
    path = save_checkpoint(tmp_path, 1, named, optimizer, scheduler, {}, None)
    extra = {**named, **{f"extra{i}": nn.Parameter(torch.zeros(2)) for i in range(5)}}
    with pytest.raises(
        ValueError,
        match=r"is not from this model: it lacks trainable parameters \['extra0', 'extra1', 'extra2'\] "
        r"and holds others \[\] \(of 5 missing, 0 extra\)$",
    ):
        load_checkpoint(path, extra, optimizer, scheduler)
    fewer = dict(list(named.items())[1:])
    with pytest.raises(
        ValueError, match=r"lacks trainable parameters \[\] and holds others \['0\.weight_mu'\] \(of 0 missing, 1"
    ):
        load_checkpoint(path, fewer, optimizer, scheduler)
    many = {f"p{i}": nn.Parameter(torch.zeros(1)) for i in range(5)}
    path = save_checkpoint(tmp_path, 2, many, torch.optim.SGD(many.values(), lr=0.1), scheduler, {}, None)
    renamed = {f"q{i}": p for i, p in enumerate(many.values())}
    with pytest.raises(ValueError, match=r"holds others \['p0', 'p1', 'p2'\] \(of 5 missing, 5 extra\)"):
        load_checkpoint(path, renamed, optimizer, scheduler)
