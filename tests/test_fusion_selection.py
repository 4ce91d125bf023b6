"""The measured choice of fused path (kernels/fusion.py, kernels/path_timing.py), driven on CPU by an injected
timer: the fastest candidate wins, choices are cached in the process and on disk, bad cache files are ignored
with a warning, and nothing is timed without gradients or while torch.compile traces."""

import importlib
import json
import warnings

import pytest
import torch

import bayeslayers
from bayeslayers import BayesLinear
from bayeslayers.kernels.paths import timing as path_timing
from bayeslayers.kernels.paths.fusion import (
    DW_EPILOGUE,
    FUSED_LORA,
    SAMPLE_IN_GEMM,
    SAMPLE_THEN_GEMM,
    UNFUSED_LORA,
    fusion,
    fusion_mode,
)
from bayeslayers.kernels.paths.timing import PathSelector, shape_class, using_path_selector

fusion_module = importlib.import_module("bayeslayers.kernels.paths.fusion")  # the package exports a fusion()


class FakeTimer:
    """Runs each candidate step once (so a broken path fails the test) and reports the given times."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, path, step):
        step()
        self.calls.append(path)
        return self.times[path]


def _selector(times, tmp_path=None, allow=True):
    timer = FakeTimer(times)
    selector = PathSelector(
        timer=timer,
        may_time=lambda device, needs_grad: (
            allow and needs_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        ),
        cache_dir=tmp_path,
        device_name=lambda device: "Test GPU 80GB",
    )
    return selector, timer


@pytest.fixture
def auto(monkeypatch):
    """Triton backend, BAYESLAYERS_FUSION=auto, the taken path recorded (timing steps excluded)."""
    monkeypatch.setenv("BAYESLAYERS_FUSION", "auto")
    bayeslayers.set_backend("triton")
    taken = []
    choose = fusion_module.choose_linear_path

    def record(*args, **kwargs):
        path = choose(*args, **kwargs)
        taken.append(path)
        return path

    monkeypatch.setattr(fusion_module, "choose_linear_path", record)
    return taken


def _train_step(layer, rows, seed=3):
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).requires_grad_()
    layer.zero_grad()
    with bayeslayers.sampling(layer, seed=seed):
        y = layer(x)
        (y.square().sum() + layer.kl()).backward()
    return y.detach(), layer.weight_mu.grad.clone(), layer.weight_rho.grad.clone(), x.grad.clone()


def test_fastest_candidate_is_chosen_and_gives_the_same_step(auto):
    layer = BayesLinear(36, 40, init_sigma=0.05)
    selector, timer = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 1.0, SAMPLE_IN_GEMM: 2.0})
    rng_before = torch.random.get_rng_state()
    with using_path_selector(selector):
        got = _train_step(layer, 24)
    assert sorted(timer.calls) == sorted([SAMPLE_THEN_GEMM, DW_EPILOGUE, SAMPLE_IN_GEMM])
    assert auto == [DW_EPILOGUE]
    key = shape_class("linear", 24, 40, 36, torch.float32, "Test GPU 80GB")
    assert selector.choices == {key: DW_EPILOGUE}
    assert selector.timings[key][DW_EPILOGUE] == 1.0
    # timing drew nothing from the generators beyond what the plain step draws
    torch.random.set_rng_state(rng_before)
    with fusion():  # fixed sample-then-GEMM policy: nothing timed
        want = _train_step(layer, 24)
    assert auto[-1] == SAMPLE_THEN_GEMM and len(timer.calls) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_choice_is_cached_per_shape_class(auto):
    layer = BayesLinear(36, 40)
    selector, timer = _selector({SAMPLE_THEN_GEMM: 1.0, DW_EPILOGUE: 2.0, SAMPLE_IN_GEMM: 3.0})
    with using_path_selector(selector):
        _train_step(layer, 20)
        assert len(timer.calls) == 3
        _train_step(layer, 30)  # same bucket (32 rows): reused
        assert len(timer.calls) == 3
        _train_step(layer, 40)  # next bucket: timed again
        assert len(timer.calls) == 6
    assert auto == [SAMPLE_THEN_GEMM] * 3
    assert len(selector.choices) == 2


def test_sample_in_gemm_is_not_a_candidate_for_many_rows():
    assert SAMPLE_IN_GEMM in fusion_module.linear_candidates(1024, True)
    assert fusion_module.linear_candidates(1025, True) == [SAMPLE_THEN_GEMM, DW_EPILOGUE]
    assert fusion_module.linear_candidates(77, False) == [SAMPLE_THEN_GEMM, SAMPLE_IN_GEMM]


def test_disk_cache_is_written_and_reused(auto, tmp_path):
    layer = BayesLinear(36, 40)
    selector, _ = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 2.0, SAMPLE_IN_GEMM: 1.0}, tmp_path)
    with using_path_selector(selector):
        _train_step(layer, 8)
    (file,) = tmp_path.glob("fusion-paths-*.json")
    assert file.name == "fusion-paths-test-gpu-80gb.json"
    data = json.loads(file.read_text())
    assert data["device"] == "Test GPU 80GB" and data["triton"] == path_timing.versions()["triton"]
    assert list(data["choices"].values()) == [SAMPLE_IN_GEMM]

    def no_timing(path, step):
        raise AssertionError("a cached choice must not be timed again")

    fresh = PathSelector(
        timer=no_timing, may_time=lambda d, g: True, cache_dir=tmp_path, device_name=lambda d: "Test GPU 80GB"
    )
    with using_path_selector(fresh):
        _train_step(layer, 8)
    assert auto == [SAMPLE_IN_GEMM, SAMPLE_IN_GEMM]


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BAYESLAYERS_CACHE_DIR", str(tmp_path))
    assert PathSelector().cache_file("NVIDIA H100 80GB HBM3") == tmp_path / "fusion-paths-nvidia-h100-80gb-hbm3.json"
    monkeypatch.delenv("BAYESLAYERS_CACHE_DIR")
    assert PathSelector().cache_file("NVIDIA H100 80GB HBM3") is None


@pytest.mark.parametrize(
    "content", ["{not json", '{"format": 1}', "[1, 2]", "foreign-device", "old-triton", "bad-choices"]
)
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(auto, tmp_path, content):
    selector, timer = _selector({SAMPLE_THEN_GEMM: 1.0, DW_EPILOGUE: 2.0, SAMPLE_IN_GEMM: 3.0}, tmp_path)
    file = selector.cache_file("Test GPU 80GB")
    key = shape_class("linear", 8, 40, 36, torch.float32, "Test GPU 80GB")
    header = {"format": 1, "device": "Test GPU 80GB", **path_timing.versions()}
    if content == "foreign-device":
        content = json.dumps({**header, "device": "Other GPU", "choices": {key: DW_EPILOGUE}})
    elif content == "old-triton":
        content = json.dumps({**header, "triton": "2.0.0", "choices": {key: DW_EPILOGUE}})
    elif content == "bad-choices":
        content = json.dumps({**header, "choices": {key: 7}})
    file.write_text(content)
    with using_path_selector(selector), pytest.warns(UserWarning, match="ignoring the .*fusion path cache"):
        _train_step(BayesLinear(36, 40), 8)
    assert len(timer.calls) == 3 and auto == [SAMPLE_THEN_GEMM]
    assert json.loads(file.read_text())["choices"] == {key: SAMPLE_THEN_GEMM}  # replaced by a valid file


def test_nothing_is_timed_without_gradients(auto):
    layer = BayesLinear(36, 40)
    selector, timer = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 1.0, SAMPLE_IN_GEMM: 2.0})
    x = torch.randn(8, 36)
    with using_path_selector(selector), torch.no_grad(), bayeslayers.sampling(layer, seed=1):
        layer(x)
    layer.eval()
    with using_path_selector(selector):
        layer(x)
    assert timer.calls == [] and selector.choices == {}
    assert auto == [SAMPLE_THEN_GEMM]  # the no-grad sampling forward; eval uses the means (no Bayesian op)


def test_nothing_is_timed_while_torch_compile_traces(auto):
    layer = BayesLinear(36, 40)
    selector, timer = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 1.0, SAMPLE_IN_GEMM: 2.0})
    traced = []

    def step(x):
        traced.append(torch.compiler.is_compiling())
        return layer(x).sum()

    torch._dynamo.reset()
    x = torch.randn(8, 36, requires_grad=True)
    with using_path_selector(selector):
        torch.compile(step, backend="eager", fullgraph=True)(x).backward()
    torch._dynamo.reset()
    assert traced[0] is True  # the layer ran under dynamo's trace
    assert timer.calls == [] and selector.choices == {}


def test_default_may_time_needs_cuda_gradients_and_no_tracing(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert path_timing.may_time(cuda, True)
    assert not path_timing.may_time(cuda, False)
    assert not path_timing.may_time(torch.device("cpu"), True)
    with torch.no_grad():
        assert not path_timing.may_time(cuda, True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not path_timing.may_time(cuda, True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not path_timing.may_time(cuda, True)


def test_environment_overrides_measurement(auto, monkeypatch):
    layer = BayesLinear(36, 40)
    selector, timer = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 1.0, SAMPLE_IN_GEMM: 2.0})
    with using_path_selector(selector):
        monkeypatch.setenv("BAYESLAYERS_FUSION", "off")
        _train_step(layer, 8)
        monkeypatch.setenv("BAYESLAYERS_FUSION", "force:sample_in_gemm")
        _train_step(layer, 8)
        monkeypatch.setenv("BAYESLAYERS_FUSION", "auto")
        with fusion(weight_grad_epilogue=True):  # an explicit policy wins over auto
            assert fusion_mode() == "policy"
            _train_step(layer, 8)
    assert auto == [SAMPLE_THEN_GEMM, SAMPLE_IN_GEMM, DW_EPILOGUE]
    assert timer.calls == []
    monkeypatch.setenv("BAYESLAYERS_FUSION", "force:fastest")
    with pytest.raises(ValueError, match="BAYESLAYERS_FUSION must be 'auto', 'off' or 'force:<path>'"):
        fusion_mode()


def test_lora_path_is_measured_and_matches(monkeypatch):
    monkeypatch.setenv("BAYESLAYERS_FUSION", "auto")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 36, generator=g, requires_grad=True)
    w, bias = torch.randn(40, 36, generator=g), torch.randn(40, generator=g)
    a = torch.randn(4, 36, generator=g, requires_grad=True)
    b = torch.randn(40, 4, generator=g, requires_grad=True)
    selector, timer = _selector({FUSED_LORA: 1.0, UNFUSED_LORA: 2.0})
    with using_path_selector(selector):
        y = fusion_module.apply_lora(x, w, bias, a, b, 0.5)
        fusion_module.apply_lora(x, w, bias, a, b, 0.5)
    assert timer.calls == [FUSED_LORA, UNFUSED_LORA]
    assert list(selector.choices.values()) == [FUSED_LORA]
    assert a.grad is None and x.grad is None  # timing differentiated detached views
    torch.testing.assert_close(y, fusion_module.unfused_lora(x, w, bias, a, b, 0.5), rtol=1e-5, atol=1e-5)
    assert not fusion_module.fuses_lora(torch.device("cpu"))  # auto: measured only on CUDA
    assert fusion_module.fuses_lora(torch.device("cuda"))
    with fusion(fused_lora=False):
        assert not fusion_module.fuses_lora(torch.device("cuda"))


def test_timing_does_not_touch_parameter_gradients(auto):
    layer = BayesLinear(36, 40)
    selector, _ = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 1.0, SAMPLE_IN_GEMM: 2.0})
    x = torch.randn(8, 36)
    with using_path_selector(selector), bayeslayers.sampling(layer, seed=1), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # forward only: the timing ran fwd+bwd on detached views
    assert layer.weight_mu.grad is None and layer.weight_rho.grad is None
    assert len(selector.choices) == 1


def test_first_call_inside_activation_checkpointing_is_timed_and_correct(auto):
    layer = BayesLinear(36, 40, init_sigma=0.05)
    selector, timer = _selector({SAMPLE_THEN_GEMM: 3.0, DW_EPILOGUE: 2.0, SAMPLE_IN_GEMM: 1.0})
    x = torch.randn(8, 36, requires_grad=True)
    with using_path_selector(selector), bayeslayers.sampling(layer, seed=4):
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        y.square().sum().backward()
    assert len(timer.calls) == 3 and auto[0] == SAMPLE_IN_GEMM
    got = layer.weight_mu.grad.clone()
    layer.zero_grad()
    with fusion(sample_in_gemm_max_rows=8), bayeslayers.sampling(layer, seed=4):
        layer(x).square().sum().backward()
    torch.testing.assert_close(got, layer.weight_mu.grad, rtol=1e-5, atol=1e-5)
