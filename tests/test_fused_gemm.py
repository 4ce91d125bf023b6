"""The fused GEMM kernels (sample-in-GEMM, dW epilogue, LoRA in the base GEMM) against float64 references that
use the same eps, and the layers on the fused paths against the sample-then-GEMM path.

On CPU they run under TRITON_INTERPRET=1 with 32-wide blocks: the odd shapes below span several blocks in
every dimension, none a multiple of the block.
"""

import contextlib

import pytest
import reference
import torch
import torch.nn as nn
from reference import TOLERANCE, kl_and_grads64, kl_reference, relative_error, sampled_weight

import bayeslayers
from bayeslayers import BayesLinear, BayesLoRALinear
from bayeslayers.kernels import FusionPolicy, fusion, fusion_policy, philox_normal, sample_weight_and_kl, seed_tensor
from bayeslayers.kernels.triton.gemm_tiles import tile_layout
from bayeslayers.kernels.triton.lora_matmul import lora_matmul
from bayeslayers.kernels.triton.sampled_matmul import sampled_matmul
from bayeslayers.kernels.triton.weight_grad_gemm import reparameterized_weight_grad

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows M, outputs N, inputs K); K = 36: weight rows start at multiples of 4, so tiles draw 4 elements per
# Philox counter (forward and transposed reads); K = 67 and 5: one counter per element.
GEMM_SHAPES = [(37, 45, 67), (70, 33, 5), (29, 44, 36)]
SEED = 0xC0FFEE


def posterior(n_out, n_in, prior_dtype=torch.float32, generator_seed=0):
    return reference.posterior((n_out, n_in), prior_dtype, generator_seed, DEVICE)


def randn(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def eps_of(shape):
    return philox_normal(SEED, shape, DEVICE).cpu().double()


# -------------------------------------------------------------------------------------- weight tiles in a GEMM
def test_tile_layouts():
    assert tile_layout(68, 1) == 1 and tile_layout(1, 68) == 2  # rows along K / along N, 4 per counter
    assert tile_layout(67, 1) == 0 and tile_layout(1, 67) == 0 and tile_layout(3, 5) == 0


@pytest.mark.parametrize("n_out,n_in", [(45, 67), (45, 68), (44, 36)])
def test_weight_tiles_in_the_gemm_follow_the_rng_contract_bit_for_bit(n_out, n_in):
    """a = I makes the product the weight itself: every element equals the sample+KL kernel's, forward
    (w^T) and transposed (w) reads alike, in every tile layout."""
    mu, rho, prior = posterior(n_out, n_in)
    seed = seed_tensor(SEED, DEVICE)
    w, _ = sample_weight_and_kl(mu, rho, prior, seed, 0.1, "qp", torch.float32)
    w_t, _ = sampled_matmul(torch.eye(n_in, device=DEVICE), mu, rho, seed)
    assert torch.equal(w_t, w.t())
    w_again, _ = sampled_matmul(torch.eye(n_out, device=DEVICE), mu, rho, seed, transpose_weight=False)
    assert torch.equal(w_again, w)


# ------------------------------------------------------------------------------------------ sample-in-GEMM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize(
    "prior_dtype,direction,with_bias", [(torch.float32, "qp", True), (None, "pq", False), (torch.bfloat16, "qp", False)]
)
def test_sampled_matmul_forward_and_kl(poisoned, dtype, shape, prior_dtype, direction, with_bias):
    rows, n_out, n_in = shape
    mu, rho, prior = posterior(n_out, n_in, prior_dtype)
    x = randn(rows, n_in, dtype=dtype)
    bias = randn(n_out, dtype=dtype, seed=2) if with_bias else None
    y, kl = sampled_matmul(
        x,
        mu,
        rho,
        seed_tensor(SEED, DEVICE),
        bias=bias,
        prior_mu=prior,
        prior_sigma=0.07,
        kl_direction=direction,
        with_kl=True,
    )
    w = sampled_weight(mu.cpu(), rho.cpu(), eps_of((n_out, n_in)))
    expected = x.cpu().double() @ w.t() + (0 if bias is None else bias.cpu().double())
    assert y.dtype == dtype and y.shape == (rows, n_out)
    assert relative_error(y.cpu(), expected) < TOLERANCE[dtype]
    prior64 = None if prior is None else prior.cpu()
    assert relative_error(kl.cpu(), kl_reference(mu.cpu(), rho.cpu(), prior64, 0.07, direction)) < 2e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_matmul_input_gradient_reads_the_weight_transposed(poisoned, dtype):
    rows, n_out, n_in = GEMM_SHAPES[0]
    mu, rho, _ = posterior(n_out, n_in)
    dy = randn(rows, n_out, dtype=dtype)
    dx, kl = sampled_matmul(dy, mu, rho, seed_tensor(SEED, DEVICE), transpose_weight=False)
    w = sampled_weight(mu.cpu(), rho.cpu(), eps_of((n_out, n_in)))
    assert dx.shape == (rows, n_in) and kl.numel() == 0
    assert relative_error(dx.cpu(), dy.cpu().double() @ w) < TOLERANCE[dtype]


def test_sampled_matmul_sums_the_kl_even_without_rows():
    mu, rho, prior = posterior(45, 67)
    y, kl = sampled_matmul(
        randn(0, 67), mu, rho, seed_tensor(SEED, DEVICE), prior_mu=prior, prior_sigma=0.1, with_kl=True
    )
    assert y.shape == (0, 45)
    assert relative_error(kl.cpu(), kl_reference(mu.cpu(), rho.cpu(), prior.cpu(), 0.1, "qp")) < 2e-5


def test_sampled_matmul_rejects_mismatched_shapes():
    mu, rho, _ = posterior(45, 67)
    with pytest.raises(ValueError, match="a has 66 columns"):
        sampled_matmul(randn(3, 66), mu, rho, seed_tensor(SEED, DEVICE))
    with pytest.raises(ValueError, match="bias"):
        sampled_matmul(randn(3, 45), mu, rho, seed_tensor(SEED, DEVICE), transpose_weight=False, bias=randn(67))


# ------------------------------------------------------------------------------------------- dW epilogue
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize(
    "prior_dtype,direction,g_kl", [(torch.float32, "qp", 0.37), (None, "pq", 1.3), (torch.bfloat16, "qp", None)]
)
def test_weight_grad_epilogue_matches_float64_autograd(poisoned, dtype, shape, prior_dtype, direction, g_kl):
    rows, n_out, n_in = shape
    mu, rho, prior = posterior(n_out, n_in, prior_dtype)
    dy, x = randn(rows, n_out, dtype=dtype), randn(rows, n_in, dtype=dtype, seed=3)
    g = None if g_kl is None else torch.tensor([g_kl], device=DEVICE)
    d_mu, d_rho = reparameterized_weight_grad(dy, x, mu, rho, prior, seed_tensor(SEED, DEVICE), g, 0.07, direction)
    d_w = dy.cpu().double().t() @ x.cpu().double()
    prior64 = None if prior is None else prior.cpu()
    _, _, d_mu64, d_rho64 = kl_and_grads64(
        mu.cpu(), rho.cpu(), prior64, 0.07, direction, d_w, g_kl or 0.0, eps_of((n_out, n_in))
    )
    assert d_mu.dtype == d_rho.dtype == torch.float32
    assert relative_error(d_mu.cpu(), d_mu64) < 2e-5
    assert relative_error(d_rho.cpu(), d_rho64) < 2e-5


def test_weight_grad_epilogue_reads_strided_inputs():
    rows, n_out, n_in = GEMM_SHAPES[0]
    mu, rho, prior = posterior(n_out, n_in)
    dy, x = randn(n_out, rows).t(), randn(n_in, rows, seed=3).t()  # column-major views
    got = reparameterized_weight_grad(dy, x, mu, rho, prior, seed_tensor(SEED, DEVICE), None, 0.07, "qp")
    want = reparameterized_weight_grad(
        dy.contiguous(), x.contiguous(), mu, rho, prior, seed_tensor(SEED, DEVICE), None, 0.07, "qp"
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -------------------------------------------------------------------------------------------- LoRA GEMM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 5, 17])
def test_lora_matmul_forward_and_input_gradient(poisoned, dtype, rank):
    rows, n_out, n_in = GEMM_SHAPES[0]
    x, w = randn(rows, n_in, dtype=dtype), randn(n_out, n_in, dtype=dtype, seed=2)
    a, b = randn(rank, n_in, dtype=dtype, seed=3), randn(n_out, rank, dtype=dtype, seed=4)
    bias, dy = randn(n_out, dtype=dtype, seed=5), randn(rows, n_out, dtype=dtype, seed=6)
    x64, w64, a64, b64 = (t.cpu().double() for t in (x, w, a, b))
    y = lora_matmul(x, w, a, b, 0.75, bias)
    expected = x64 @ w64.t() + 0.75 * (x64 @ a64.t()) @ b64.t() + bias.cpu().double()
    assert y.dtype == dtype and relative_error(y.cpu(), expected) < TOLERANCE[dtype]
    dx = lora_matmul(dy, w.t(), b.t(), a.t(), 0.75)  # dx = dy @ w + s (dy @ b) @ a
    dy64 = dy.cpu().double()
    assert relative_error(dx.cpu(), dy64 @ w64 + 0.75 * (dy64 @ b64) @ a64) < TOLERANCE[dtype]


def test_lora_matmul_rejects_mismatched_factors():
    x, w = randn(4, 20), randn(30, 20)
    with pytest.raises(ValueError, match="LoRA shapes do not match"):
        lora_matmul(x, w, randn(3, 19), randn(30, 3), 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        lora_matmul(x, w, randn(3, 20, dtype=torch.float16), randn(30, 3), 1.0)


# ------------------------------------------------------------------------------- layers on the fused paths
@pytest.fixture
def fused_calls(monkeypatch):
    """Names of the fused GEMM kernels launched during the test, in order."""
    import bayeslayers.kernels.triton.triton_ops as triton_ops

    calls = []
    for name in ("sampled_matmul", "reparameterized_weight_grad", "lora_matmul"):
        launch = getattr(triton_ops, name)
        monkeypatch.setattr(
            triton_ops, name, lambda *a, _launch=launch, _name=name, **k: calls.append(_name) or _launch(*a, **k)
        )
    return calls


def _step(layer, x, policy):
    """(y, kl, dx, parameter grads) of one sampling forward/backward with a fixed seed under ``policy``."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    bayesian = any(isinstance(m, BayesLinear) for m in layer.modules())
    with fusion(**policy), bayeslayers.sampling(layer, seed=11) if bayesian else contextlib.nullcontext():
        y = layer(x)
        kl = bayeslayers.kl_loss(layer) if bayesian else torch.zeros((), device=DEVICE)
    (y.float().square().sum() + 0.3 * kl).backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), kl.detach(), x.grad, grads


def _assert_same_step(got, want, dtype):
    assert relative_error(got[0], want[0]) < TOLERANCE[dtype]
    assert relative_error(got[1], want[1]) < 2e-5
    assert relative_error(got[2], want[2]) < TOLERANCE[dtype]
    assert got[3].keys() == want[3].keys() and want[3]
    for name in want[3]:
        assert relative_error(got[3][name], want[3][name]) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "policy,kernels",
    [
        ({"sample_in_gemm_max_rows": 10**9}, ["sampled_matmul", "sampled_matmul", "reparameterized_weight_grad"]),
        ({"weight_grad_epilogue": True}, ["reparameterized_weight_grad"]),
    ],
)
def test_bayes_linear_fused_paths_agree_with_sample_then_gemm(fused_calls, dtype, policy, kernels):
    bayeslayers.set_backend("triton")
    layer = BayesLinear(67, 45, init_sigma=0.05, prior_sigma=0.1).to(DEVICE)
    x = randn(3, 13, 67, dtype=dtype)
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        want = _step(layer, x, {})
        assert fused_calls == []
        got = _step(layer, x, policy)
    assert fused_calls == kernels
    _assert_same_step(got, want, dtype)


def test_heuristic_takes_sample_in_gemm_only_up_to_the_row_limit():
    from bayeslayers.kernels import SampleInGemm, SampleThenMap
    from bayeslayers.kernels.paths.fusion import SAMPLE_IN_GEMM, SAMPLE_THEN_GEMM, choose_linear_path, weight_path
    from bayeslayers.layer_maps import Conv2dMap, LinearMap

    layer = BayesLinear(8, 8).to(DEVICE)
    posterior, seed = layer.posterior(), 1
    with fusion(sample_in_gemm_max_rows=77):
        assert choose_linear_path(LinearMap(), randn(2, 77, 8)[:1], posterior, None, seed, True) == SAMPLE_IN_GEMM
        assert choose_linear_path(LinearMap(), randn(2, 78, 8)[:1], posterior, None, seed, True) == SAMPLE_THEN_GEMM
        assert choose_linear_path(Conv2dMap(), randn(1, 8, 2, 2), posterior, None, seed, False) == SAMPLE_THEN_GEMM
    assert isinstance(weight_path(SAMPLE_IN_GEMM), SampleInGemm)
    assert isinstance(weight_path(SAMPLE_THEN_GEMM), SampleThenMap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factors", ["AB", "B", ""])
def test_bayes_lora_fused_matches_unfused(fused_calls, dtype, factors):
    bayeslayers.set_backend("triton")
    layer = BayesLoRALinear(nn.Linear(67, 45), rank=5, lora_alpha=8, bayesian_factors=factors, init_sigma=0.05).to(
        DEVICE
    )
    with torch.no_grad():  # a trained-looking B, so every gradient is non-zero
        (layer.lora_B.weight_mu if "B" in factors else layer.lora_B.weight).normal_()
    x = randn(2, 19, 67, dtype=dtype)
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        want = _step(layer, x, {})
        got = _step(layer, x, {"fused_lora": True})
    assert fused_calls == ["lora_matmul", "lora_matmul"]  # forward, input gradient
    _assert_same_step(got, want, dtype)


def test_fused_lora_in_eval_uses_the_posterior_means():
    bayeslayers.set_backend("triton")
    layer = BayesLoRALinear(nn.Linear(20, 30), rank=3).to(DEVICE).eval()
    with torch.no_grad():
        layer.lora_B.weight_mu.normal_()
    x = randn(5, 20)
    with fusion(fused_lora=True):
        fused = layer(x)
    torch.testing.assert_close(fused, layer(x), rtol=1e-5, atol=1e-5)


class _DoubledLinear(nn.Linear):
    """A Linear subclass with its own forward (as quantized or wrapped layers have): the fused GEMM must not
    replace it."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_fused_lora_takes_bias_free_bases_and_leaves_subclassed_ones_to_their_forward(fused_calls):
    bayeslayers.set_backend("triton")
    for base, kernels in (
        (nn.Linear(20, 30, bias=False), ["lora_matmul", "lora_matmul"]),
        (_DoubledLinear(20, 30), []),
    ):
        layer = BayesLoRALinear(base, rank=3, lora_alpha=6, init_sigma=0.05).to(DEVICE)
        with torch.no_grad():
            layer.lora_B.weight_mu.normal_()
        x = randn(5, 20)
        want = _step(layer, x, {})
        fused_calls.clear()
        got = _step(layer, x, {"fused_lora": True})
        assert fused_calls == kernels
        _assert_same_step(got, want, torch.float32)


def test_fused_lora_under_autocast_takes_float32_inputs_and_records_the_kl(fused_calls):
    """fp32 activations and base under bf16 autocast go in cast, in a training step and in eval (mean factors);
    a sampling forward leaves its fused KL for kl_loss."""
    bayeslayers.set_backend("triton")
    layer = BayesLoRALinear(nn.Linear(20, 30), rank=3, lora_alpha=6, init_sigma=0.05).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.weight_mu.normal_()
    x = randn(5, 20)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        want = _step(layer, x, {})
        fused_calls.clear()
        got = _step(layer, x, {"fused_lora": True})
        assert fused_calls == ["lora_matmul", "lora_matmul"] and got[0].dtype == torch.bfloat16
        _assert_same_step(got, want, torch.bfloat16)
        layer.eval()
        with torch.no_grad():
            want = layer(x)
            fused_calls.clear()
            with fusion(fused_lora=True):
                got = layer(x)
    assert fused_calls == ["lora_matmul"] and got.dtype == torch.bfloat16
    assert relative_error(got, want) < TOLERANCE[torch.bfloat16]
    with fusion(fused_lora=True), bayeslayers.sampling(layer, seed=3):
        layer(x)
    for factor in (layer.lora_A, layer.lora_B):
        assert factor.kl() is factor._kl_cache[0]


def test_sample_in_gemm_saves_only_the_input_and_a_seed():
    bayeslayers.set_backend("triton")
    layer = BayesLinear(67, 45).to(DEVICE)
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    x = randn(7, 67).requires_grad_(True)
    with fusion(sample_in_gemm_max_rows=64), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert sum(saved) == x.numel() * 4 + 8


def test_fusion_policy_validates_and_restores():
    before = fusion_policy()
    with pytest.raises(ValueError, match="sample_in_gemm_max_rows must be a non-negative int"):
        FusionPolicy(sample_in_gemm_max_rows=-1)
    with pytest.raises(ValueError, match="fused_lora must be a bool"):
        FusionPolicy(fused_lora="yes")
    with fusion(fused_lora=True) as inside:
        assert inside.fused_lora and fusion_policy() is inside
    assert fusion_policy() == before


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_draw_weight_is_the_weight_a_sampling_forward_uses(backend):
    bayeslayers.set_backend(backend)
    layer = BayesLinear(20, 30, init_sigma=0.1).to(DEVICE)
    x = randn(4, 20)
    with bayeslayers.sampling(layer, seed=5):
        y = layer(x)
        kl_forward = layer.kl()
        w = layer.draw_weight(torch.float32)
        assert layer.kl() is not kl_forward  # the draw recorded its own KL
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.equal(w, layer.weight_mu)
    torch.testing.assert_close(layer.kl(), kl_forward)
    layer.eval()
    assert torch.equal(layer.draw_weight(torch.float16), layer.weight_mu.half())


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_linear_gradients_of_every_input(dtype):
    from bayeslayers.kernels import Posterior, sampled_linear

    rows, n_out, n_in = GEMM_SHAPES[2]
    mu, rho, prior = posterior(n_out, n_in)
    mu.requires_grad_(True)
    rho.requires_grad_(True)
    x = randn(2, rows, n_in, dtype=dtype).requires_grad_(True)
    bias = randn(n_out, dtype=dtype, seed=2).requires_grad_(True)
    upstream = randn(2, rows, n_out, dtype=torch.float64, seed=3)
    y, kl = sampled_linear(x, Posterior(mu, rho, prior, 0.07, "qp"), bias, SEED)
    ((y.double() * upstream).sum() + 0.37 * kl).backward()
    leaves64 = [t.detach().cpu().double().requires_grad_(True) for t in (x, mu, rho, bias)]
    x64, mu64, rho64, bias64 = leaves64
    y64 = x64 @ sampled_weight(mu64, rho64, eps_of((n_out, n_in))).t() + bias64
    kl64 = kl_reference(mu64, rho64, prior.cpu(), 0.07, "qp")
    ((y64 * upstream.cpu()).sum() + 0.37 * kl64).backward()
    for name, got, want in zip(("x", "mu", "rho", "bias"), (x, mu, rho, bias), leaves64):
        assert relative_error(got.grad.cpu(), want.grad) < 2 * TOLERANCE[dtype], name
    mu.grad = rho.grad = None
    _, kl = sampled_linear(x, Posterior(mu, rho, prior, 0.07, "qp"), bias, SEED)
    kl.backward()  # only the KL reaches the parameters
    mu64.grad = rho64.grad = None
    kl_reference(mu64, rho64, prior.cpu(), 0.07, "qp").backward()
    assert relative_error(mu.grad.cpu(), mu64.grad) < 2e-5 and relative_error(rho.grad.cpu(), rho64.grad) < 2e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_gradients_of_every_input(dtype):
    from bayeslayers.kernels import lora_linear

    rows, n_out, n_in = GEMM_SHAPES[0]
    tensors = [
        randn(2, rows, n_in, dtype=dtype),
        randn(n_out, n_in, dtype=dtype, seed=2),
        randn(n_out, dtype=dtype, seed=3),
        randn(5, n_in, dtype=dtype, seed=4),
        randn(n_out, 5, dtype=dtype, seed=5),
    ]
    x, w, bias, a, b = (t.requires_grad_(True) for t in tensors)
    upstream = randn(2, rows, n_out, dtype=torch.float64, seed=6)
    (lora_linear(x, w, bias, a, b, 0.75).double() * upstream).sum().backward()
    leaves64 = [t.detach().cpu().double().requires_grad_(True) for t in tensors]
    x64, w64, bias64, a64, b64 = leaves64
    y64 = x64 @ w64.t() + 0.75 * (x64 @ a64.t()) @ b64.t() + bias64
    (y64 * upstream.cpu()).sum().backward()
    for name, got, want in zip(("x", "w", "bias", "a", "b"), tensors, leaves64):
        assert relative_error(got.grad.cpu(), want.grad) < 2 * TOLERANCE[dtype], name


def test_fused_paths_trace_without_graph_breaks(fused_calls):
    import torch._dynamo

    bayeslayers.set_backend("triton")
    model = nn.Sequential(BayesLinear(16, 24), nn.GELU(), BayesLoRALinear(nn.Linear(24, 8), rank=2)).to(DEVICE)
    with fusion(sample_in_gemm_max_rows=4, fused_lora=True):
        explanation = torch._dynamo.explain(model)(randn(4, 16))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert "sampled_matmul" in fused_calls and "lora_matmul" in fused_calls


# ---------------------------------------------------------------------------------------------- GPU only
GPU_SHAPES = [(77, 768, 320), (154, 768, 1280), (256, 1280, 1280), (1024, 640, 640)]  # (rows, in, out)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n_in,n_out", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", [{"sample_in_gemm_max_rows": 10**9}, {"weight_grad_epilogue": True}])
def test_gpu_fused_linear_paths_at_sd_shapes(rows, n_in, n_out, dtype, policy):
    """bf16 operands go to the tensor cores directly here (the interpreter needs them as fp32)."""
    bayeslayers.set_backend("triton")
    layer = BayesLinear(n_in, n_out, init_sigma=0.02, prior_sigma=0.05).to(DEVICE)
    x = randn(rows, n_in, dtype=dtype)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want, got = _step(layer, x, {}), _step(layer, x, policy)
    _assert_same_step(got, want, dtype if dtype != torch.float32 else torch.float16)  # fp32 GEMMs may use TF32


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,rank", [(4096, 320, 4), (1024, 640, 16), (256, 1280, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_fused_lora_at_sd_shapes(rows, width, rank, dtype):
    bayeslayers.set_backend("triton")
    layer = BayesLoRALinear(nn.Linear(width, width), rank=rank).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.weight_mu.normal_(std=0.02)
    x = randn(rows, width, dtype=dtype)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want, got = _step(layer, x, {}), _step(layer, x, {"fused_lora": True})
    _assert_same_step(got, want, dtype if dtype != torch.float32 else torch.float16)
