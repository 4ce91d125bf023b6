"""FusedBayesAdamW against torch.optim.AdamW on the same weight samples: the same training, state and resume."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import randomize_bayesian_state

import bayeslayers
from bayeslayers.optim import FusedBayesAdamW

BACKENDS = ["reference", "torch", "cpp", "triton"]  # triton under TRITON_INTERPRET=1 on CPU
KL_WEIGHT = 1e-3


class Net(nn.Module):
    """A Bayesian Conv2d and Linear (full) and a Bayesian LoRA head, each with a plain bias or base."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4 * 5 * 5, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = F.silu(self.conv(x)).flatten(1)
        return self.head(F.silu(self.proj(h)))


@pytest.fixture(autouse=True)
def _backend_reset():
    yield
    bayeslayers.set_backend(None)


def convert_net(net):
    torch.manual_seed(0)
    net = Net()
    bayeslayers.convert(net, target_modules=["conv", "proj"], init_sigma=0.05)
    bayeslayers.convert(net, target_modules=["head"], mode="lora", rank=2, init_sigma=0.05)
    for module in (net.conv, net.proj):  # LoRA mode froze the rest: train these in full
        module.requires_grad_(True)
    return randomize_bayesian_state(net, seed=3)


@pytest.fixture(scope="module")
def converted():
    return convert_net(Net())


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _groups(model, rho_lr=2e-2):
    """Two groups: rho at its own learning rate, everything else at the default."""
    rho = [p for n, p in _trainable(model) if n.endswith("weight_rho")]
    rest = [p for n, p in _trainable(model) if not n.endswith("weight_rho")]
    return [{"params": rest}, {"params": rho, "lr": rho_lr, "weight_decay": 0.0}]


def _train(model, optimizer, scheduler, steps, first_step=0, kl_weight=KL_WEIGHT, checkpoint=False):
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, 5, 5, generator=generator), torch.randn(4, 3, generator=generator)
    for step in range(first_step, first_step + steps):
        torch.manual_seed(100 + step)  # the same layer seeds (weight samples) in both runs
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if checkpoint else model(x)
        loss = F.mse_loss(out, y)
        if kl_weight:
            loss = loss + kl_weight * bayeslayers.kl_loss(model)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.3 * step))


def _max_relative_difference(a, b):
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        scale = q.detach().abs().max().clamp_min(1e-30)
        worst = max(worst, float((p.detach() - q.detach()).abs().max() / scale))
    return worst


# reference: no gradient pass, so AdamW in step(); cpp: AdamW inside the C++ gradient pass; torch, triton: torch's
# AdamW on the layer's tensors right after the gradient pass
@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_steps_equal_adamw_with_groups_and_a_scheduler(converted, backend):
    bayeslayers.set_backend(backend)
    fused_model, plain_model = copy.deepcopy(converted), copy.deepcopy(converted)
    fused = FusedBayesAdamW(_groups(fused_model), lr=1e-3, weight_decay=1e-2)
    plain = torch.optim.AdamW(_groups(plain_model), lr=1e-3, weight_decay=1e-2, foreach=False)
    _train(fused_model, fused, _scheduler(fused), 10)
    _train(plain_model, plain, _scheduler(plain), 10)
    assert _max_relative_difference(fused_model, converted) > 1e-3  # it trained
    assert _max_relative_difference(fused_model, plain_model) <= 1e-6
    for (_, p), (_, q) in zip(_trainable(fused_model), _trainable(plain_model)):
        for key in ("exp_avg", "exp_avg_sq", "step"):  # 1e-6 of the tensor's largest value (C++: other roundings)
            expected = plain.state[q][key]
            scale = float(expected.abs().max())
            torch.testing.assert_close(fused.state[p][key], expected, rtol=0, atol=1e-6 * scale)
    assert fused.param_groups[1]["lr"] == plain.param_groups[1]["lr"] < 2e-2  # the schedule reached rho's group


def test_bayesian_gradients_never_reach_grad(converted):
    model = copy.deepcopy(converted)
    optimizer = FusedBayesAdamW([p for _, p in _trainable(model)], lr=1e-3)
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    for name, p in _trainable(model):
        bayesian = name.endswith(("weight_mu", "weight_rho"))
        assert (p.grad is None) == bayesian, name
    assert len(optimizer.state) == 2 * len(bayeslayers.posterior_layers(model))  # updated already
    optimizer.step()
    assert len(optimizer.state) == len(_trainable(model))


def test_resume_from_a_state_dict_is_exact(converted, tmp_path):
    bayeslayers.set_backend("cpp")
    reference_model = copy.deepcopy(converted)
    reference = FusedBayesAdamW(_groups(reference_model), lr=1e-3)
    ref_scheduler = _scheduler(reference)
    _train(reference_model, reference, ref_scheduler, 6)

    first_model = copy.deepcopy(converted)
    first = FusedBayesAdamW(_groups(first_model), lr=1e-3)
    scheduler = _scheduler(first)
    _train(first_model, first, scheduler, 3)
    torch.save(
        {"model": first_model.state_dict(), "opt": first.state_dict(), "sched": scheduler.state_dict()},
        tmp_path / "ckpt.pt",
    )

    resumed_model = randomize_bayesian_state(copy.deepcopy(converted), seed=11)  # differs from the saved state
    resumed = FusedBayesAdamW(_groups(resumed_model, rho_lr=0.5), lr=7e-2, betas=(0.5, 0.9))
    resumed_scheduler = _scheduler(resumed)
    _train(resumed_model, resumed, resumed_scheduler, 1)  # state of its own, overwritten by the load
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    resumed_scheduler.load_state_dict(saved["sched"])
    _train(resumed_model, resumed, resumed_scheduler, 3, first_step=3)
    assert _max_relative_difference(resumed_model, reference_model) == 0.0
    for (_, p), (_, q) in zip(_trainable(resumed_model), _trainable(reference_model)):
        torch.testing.assert_close(resumed.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"], rtol=0, atol=0)


def test_the_state_dict_is_adamw_s(converted):
    model = copy.deepcopy(converted)
    fused = FusedBayesAdamW(model.parameters(), lr=1e-3)
    _train(model, fused, _scheduler(fused), 2)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain.load_state_dict(fused.state_dict())  # interchangeable: switch optimizers mid-run
    assert plain.state_dict()["state"].keys() == fused.state_dict()["state"].keys()


def test_gradient_checkpointing_gives_the_same_training(converted):
    bayeslayers.set_backend("cpp")
    fused_model, plain_model = copy.deepcopy(converted), copy.deepcopy(converted)
    fused = FusedBayesAdamW(fused_model.parameters(), lr=1e-3)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, foreach=False)
    _train(fused_model, fused, _scheduler(fused), 3, checkpoint=True)
    _train(plain_model, plain, _scheduler(plain), 3)
    assert _max_relative_difference(fused_model, plain_model) <= 1e-6


def test_gradient_accumulation_is_refused_naming_the_alternative(converted):
    model = copy.deepcopy(converted)
    optimizer = FusedBayesAdamW(model.parameters(), lr=1e-3)  # noqa: F841 (kept alive: it updates in backward)
    x = torch.randn(2, 3, 5, 5)
    model(x).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"second gradient before step\(\).*torch.optim.AdamW"):
        model(x).square().mean().backward()


def test_grad_scaler_is_refused_naming_bf16():
    model = bayeslayers.convert(torch.nn.Sequential(torch.nn.Linear(6, 4)), "0")
    optimizer = FusedBayesAdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 6)).square().sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler.*bf16 mixed precision"):
        scaler.step(optimizer)


def test_unsupported_options_are_refused():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        FusedBayesAdamW([{"params": params, "amsgrad": True}])
    with pytest.raises(ValueError, match="does not support sigma_space=True.*sigma-space AdamW"):
        FusedBayesAdamW([{"params": params, "sigma_space": True}])


def test_a_dropped_optimizer_leaves_plain_gradients():
    model = bayeslayers.convert(torch.nn.Sequential(torch.nn.Linear(6, 4)), "0")
    FusedBayesAdamW(model.parameters(), lr=1e-3)  # not kept
    model(torch.randn(3, 6)).square().sum().backward()
    assert model[0].weight_mu.grad is not None and model[0].weight_rho.grad is not None


def test_two_ddp_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """DDP leaves mu and rho to the optimizer (exclude_from_ddp), which averages their gradients in backward."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from multiprocess_fused_optim import batches, train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).parent / "multiprocess_fused_optim.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    out = tmp_path / "ddp.pt"
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", str(port), str(out)], env=env) for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    single = convert_net(Net())
    optimizer = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    train(single, optimizer, *batches())
    distributed = torch.load(out)
    moved = 0.0
    for name, p in single.named_parameters():
        torch.testing.assert_close(distributed[name], p.detach(), rtol=1e-5, atol=1e-7, msg=name)
        moved = max(moved, float((p.detach() - convert_net(Net()).get_parameter(name).detach()).abs().max()))
    assert moved > 1e-3  # it trained


def test_under_torch_compile_gradients_reach_step_and_training_equals_adamw(converted):
    """A compiled graph does not update in backward: the gradients are materialised and step() applies AdamW."""
    bayeslayers.set_backend("cpp")
    fused_model, plain_model = copy.deepcopy(converted), copy.deepcopy(converted)
    fused = FusedBayesAdamW([p for _, p in _trainable(fused_model)], lr=1e-3)
    plain = torch.optim.AdamW([p for _, p in _trainable(plain_model)], lr=1e-3, foreach=False)
    compiled = torch.compile(fused_model)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for step, (model, optimizer) in enumerate([(compiled, fused), (plain_model, plain)] * 2):
        torch.manual_seed(step // 2)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _max_relative_difference(fused_model, plain_model) <= 1e-5
    assert _max_relative_difference(fused_model, converted) > 1e-5


def test_cpp_layers_update_inside_the_gradient_pass(converted, monkeypatch):
    """On the cpp backend every Bayesian layer (Conv2d, Linear, the LoRA factors applied as Linears) runs AdamW
    inside the C++ gradient pass: none goes through step_in_backward, each took one step."""
    bayeslayers.set_backend("cpp")
    model = copy.deepcopy(converted)
    seen = []
    original = FusedBayesAdamW.step_in_backward
    monkeypatch.setattr(FusedBayesAdamW, "step_in_backward", lambda self, p, g: (seen.append(p), original(self, p, g)))
    optimizer = FusedBayesAdamW([p for _, p in _trainable(model)], lr=1e-3)
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    assert seen == []
    layers = bayeslayers.posterior_layers(model)
    assert len(layers) == 4
    for _, layer in layers:
        assert float(optimizer.state[layer.weight_mu]["step"]) == float(optimizer.state[layer.weight_rho]["step"]) == 1
        assert layer.weight_mu.grad is None and layer.weight_rho.grad is None
    bayeslayers.set_backend("torch")  # the torch kernels have no fused pass: the step runs after it
    optimizer.step()
    optimizer.zero_grad()
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    assert len(seen) == 8


def test_bf16_autocast_trains_as_adamw_on_cpp(converted):
    """bf16 autocast (no GradScaler): the fused C++ pass writes the bf16 weight sample for dx as the unfused one."""
    bayeslayers.set_backend("cpp")
    fused_model, plain_model = copy.deepcopy(converted), copy.deepcopy(converted)
    fused = FusedBayesAdamW([p for _, p in _trainable(fused_model)], lr=1e-3)
    plain = torch.optim.AdamW([p for _, p in _trainable(plain_model)], lr=1e-3, foreach=False)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    for model, optimizer in ((fused_model, fused), (plain_model, plain)):
        for step in range(3):
            torch.manual_seed(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert _max_relative_difference(fused_model, plain_model) <= 1e-6
    assert _max_relative_difference(fused_model, converted) > 1e-4
