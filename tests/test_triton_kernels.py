"""Triton kernels and the triton backend against float64 references that use the same eps.

On CPU they run under TRITON_INTERPRET=1 (conftest.py sets it before the kernels are imported): small, odd
shapes, one large-tile config. Tests marked ``gpu`` (real sizes, bf16, torch.compile of a converted UNet)
are skipped without CUDA.
"""

import math

import numpy as np
import pytest
import reference
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import (
    KL_WEIGHT,
    TOLERANCE,
    kl_and_grads64,
    kl_reference,
    philox4x32_10,
    randomize_layer,
    reference_normals,
    relative_error,
    sampled_weight,
)

import bayeslayers
from bayeslayers.backends import BACKENDS
from bayeslayers.kernels import (
    Posterior,
    SampleThenMap,
    mix_seed_tensor,
    philox_normal,
    reparameterization_grad,
    reparameterize,
    sample_weight_and_kl,
    seed_tensor,
)
from bayeslayers.kernels.triton.config import EXACT
from bayeslayers.kernels.triton.philox import _philox_normal_kernel
from bayeslayers.kernels.triton.sample_kl import _sample_weight_kl_kernel
from bayeslayers.kernels.triton.triton_ops import TRITON_KERNELS
from bayeslayers.layer_maps import Conv2dMap, LinearMap
from bayeslayers.rng import mix_seed

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ODD_SHAPES = [(37, 29), (67, 131), (5, 3, 3, 3)]  # 1073, 8777 (several 4096-element programs), 135 elements
SEEDS = [0, 1, 0xDEADBEEF, (1 << 40) + 12345, (1 << 64) - 3]  # the last one is negative as an int64


def posterior(shape, prior_dtype=torch.float32, generator_seed=0):
    return reference.posterior(shape, prior_dtype, generator_seed, DEVICE)


# ---------------------------------------------------------------------------------------------- the stream
def test_reference_philox_matches_random123_known_answers():
    counters = np.array(
        [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]], dtype=np.uint64
    )
    expected = [
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ]
    keys = [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0xA4093822, 0x299F31D0)]
    for row, key, want in zip(counters, keys, expected):
        assert philox4x32_10(row[None], key)[0].tolist() == want


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_normal_matches_independent_philox(seed):
    eps = philox_normal(seed, (37, 29), DEVICE)
    assert eps.dtype == torch.float32 and eps.shape == (37, 29)
    torch.testing.assert_close(
        eps.cpu().double().reshape(-1), reference_normals(seed, eps.numel()), rtol=2e-6, atol=2e-6
    )


def test_eps_is_a_function_of_seed_and_flat_index_only():
    long = philox_normal(77, (4099,), DEVICE)
    assert torch.equal(philox_normal(77, (17, 241), DEVICE).reshape(-1), long[: 17 * 241])
    assert torch.equal(philox_normal(77, (3,), DEVICE), long[:3])
    assert torch.equal(philox_normal(torch.tensor([77]), (4099,), DEVICE), long)  # tensor and int seeds agree
    assert not torch.equal(philox_normal(78, (4099,), DEVICE), long)


@pytest.mark.parametrize("block_groups", [pytest.param(4, marks=pytest.mark.slow), 32, 256, 2048])
def test_eps_and_weight_bit_identical_across_block_sizes(block_groups):
    numel, seed = 3001, seed_tensor(12345, DEVICE)
    tuned = philox_normal(12345, (numel,), DEVICE)
    eps = torch.full((numel,), float("nan"), device=DEVICE)
    grid = (math.ceil(numel / (4 * block_groups)),)
    _philox_normal_kernel.fn[grid](seed, eps, numel, BLOCK_GROUPS=block_groups, **EXACT)
    assert torch.equal(eps, tuned)

    mu, rho, prior = posterior((numel,))
    w_tuned, kl_tuned = sample_weight_and_kl(mu, rho, prior, seed, 0.03, "qp", torch.float32)
    w = torch.full((numel,), float("nan"), device=DEVICE)
    partials = torch.full(grid, float("nan"), device=DEVICE)
    _sample_weight_kl_kernel.fn[grid](
        mu,
        rho,
        prior,
        seed,
        w,
        partials,
        numel,
        0.03,
        HAS_PRIOR=True,
        KL_DIRECTION=0,
        WITH_KL=True,
        BLOCK_GROUPS=block_groups,
        **EXACT,
    )
    assert torch.equal(w, w_tuned)
    assert relative_error(partials.sum(), kl_tuned) < 1e-6


def test_eps_statistics():
    n = 1 << 18
    eps = torch.cat([philox_normal(seed, (n,), DEVICE) for seed in (3, 4)]).double().cpu()
    a, b = eps[:n], eps[n:]
    bound = 5 / math.sqrt(n)
    assert abs(a.mean()) < bound and abs(a.std() - 1) < 2 * bound
    assert abs((a.abs() > 1.959964).double().mean() - 0.05) < 0.003
    assert abs((a**4).mean() - 3) < 0.05  # Gaussian kurtosis
    for lag in (1, 2, 3, 4, 5, 8):  # within a Box-Muller pair, across pairs, across Philox counters
        assert abs(torch.corrcoef(torch.stack([a[:-lag], a[lag:]]))[0, 1]) < bound, lag
    # the radius is shared inside a pair: squares must still be uncorrelated, as for independent normals
    pairs = a.reshape(-1, 2)
    assert abs(torch.corrcoef(pairs.square().T)[0, 1]) < 2 * bound * math.sqrt(2)
    words = a.reshape(-1, 4)
    assert torch.corrcoef(words.T).sub(torch.eye(4, dtype=torch.float64)).abs().max() < 2 * bound
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < bound  # neighbouring seeds


# ---------------------------------------------------------------------------------------------- seeds
def test_device_seed_mix_equals_python_mix_and_layer_seed_follows_the_generator():
    draws = [0, 1, 123456789012345, (1 << 62) - 1]
    mixed = mix_seed_tensor(torch.tensor(draws, dtype=torch.int64, device=DEVICE), 0xDEADBEEF)
    assert mixed.tolist() == [mix_seed(d, 0xDEADBEEF) for d in draws]
    backend = BACKENDS["triton"]
    torch.manual_seed(5)
    first = backend.layer_seed(42, DEVICE)
    torch.manual_seed(5)
    assert first.dtype == torch.int64 and torch.equal(backend.layer_seed(42, DEVICE), first)
    assert not torch.equal(backend.layer_seed(42, DEVICE), first) and not torch.equal(
        backend.layer_seed(43, DEVICE), first
    )
    assert seed_tensor((1 << 64) - 1, DEVICE).item() == -1
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_tensor(1.5, DEVICE)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("direction", ["qp", "pq"])
@pytest.mark.parametrize("prior_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_sample_and_grad_kernels_match_float64(poisoned, shape, direction, prior_dtype, out_dtype):
    mu, rho, prior = posterior(shape, prior_dtype)
    seed = 2024 + len(shape)
    eps = philox_normal(seed, shape, DEVICE).cpu()
    d_w = torch.randn(shape).to(out_dtype)
    w64, kl64, d_mu64, d_rho64 = kl_and_grads64(mu.cpu(), rho.cpu(), prior, 0.03, direction, d_w, KL_WEIGHT, eps)

    seed = seed_tensor(seed, DEVICE)
    w, kl = sample_weight_and_kl(mu, rho, prior, seed, 0.03, direction, out_dtype)
    assert w.dtype == out_dtype and kl.shape == () and kl.dtype == torch.float32
    assert relative_error(w.cpu(), w64) < TOLERANCE[out_dtype] / 4
    assert relative_error(kl.cpu(), kl64) < 1e-5
    g_kl = torch.tensor(KL_WEIGHT, device=DEVICE)
    d_mu, d_rho, w_again = reparameterization_grad(
        d_w.to(DEVICE), mu, rho, prior, seed, g_kl, 0.03, direction, out_dtype
    )
    assert torch.equal(w_again, w)  # the gradient pass regenerates the forward's eps bit for bit
    assert relative_error(d_mu.cpu(), d_mu64) < 1e-5
    assert relative_error(d_rho.cpu(), d_rho64) < 1e-5


@pytest.mark.parametrize("direction", ["qp", "pq"])
def test_grad_kernel_with_only_one_upstream_gradient(poisoned, direction):
    shape = (19, 23)
    mu, rho, prior = posterior(shape)
    seed, eps = seed_tensor(99, DEVICE), philox_normal(99, shape, DEVICE).cpu()
    d_w = torch.randn(shape)
    _, _, d_mu64, d_rho64 = kl_and_grads64(mu.cpu(), rho.cpu(), prior, 0.02, direction, d_w, 0.0, eps)
    d_mu, d_rho, w = reparameterization_grad(d_w.to(DEVICE), mu, rho, prior, seed, None, 0.02, direction)
    assert w is None
    assert relative_error(d_mu.cpu(), d_mu64) < 1e-6 and relative_error(d_rho.cpu(), d_rho64) < 1e-6
    _, _, d_mu64, d_rho64 = kl_and_grads64(mu.cpu(), rho.cpu(), prior, 0.02, direction, 0 * d_w, 1.5, eps)
    d_mu, d_rho, _ = reparameterization_grad(
        None, mu, rho, prior, seed, torch.tensor([1.5], device=DEVICE), 0.02, direction
    )
    assert relative_error(d_mu.cpu(), d_mu64) < 1e-5 and relative_error(d_rho.cpu(), d_rho64) < 1e-5


def test_softplus_is_accurate_for_very_negative_and_large_rho():
    rho = torch.tensor([-30.0, -17.0, -9.0, -4.6, 0.0, 3.0, 19.9, 20.1, 40.0], device=DEVICE)
    mu = torch.zeros_like(rho)
    w, _ = sample_weight_and_kl(mu, rho, None, seed_tensor(1, DEVICE), 1.0, "qp", torch.float32)
    sigma64 = F.softplus(rho.double().cpu())
    eps = philox_normal(1, rho.shape, DEVICE).double().cpu()
    assert relative_error(w.cpu() / eps, sigma64) < 1e-6
    assert ((w.cpu().double() / eps / sigma64) - 1).abs().max() < 1e-5  # elementwise, also the tiny sigmas


# ---------------------------------------------------------------------------------------------- layers
def test_training_forward_uses_the_layer_seed_stream_and_frozen_posterior_still_gives_dx():
    bayeslayers.set_backend("triton")
    layer = bayeslayers.BayesLinear(11, 7, init_sigma=0.1)
    x = torch.randn(5, 11)
    torch.manual_seed(31)
    y = layer(x)
    torch.manual_seed(31)
    seed = BACKENDS["triton"].layer_seed(layer.layer_id, torch.device("cpu"))
    w = sampled_weight(layer.weight_mu, layer.weight_rho, philox_normal(seed, (7, 11)))
    assert relative_error(y, F.linear(x.double(), w, layer.bias.double())) < 1e-5
    assert not torch.equal(layer(x), y)  # a fresh sample per training forward

    layer.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).sum().backward()  # dx only: the backward rebuilds w with the sampling kernel
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_auto_never_picks_triton_on_cpu_but_explicit_triton_runs_interpreted():
    from bayeslayers.backends import resolve_backend

    bayeslayers.set_backend("auto")
    assert resolve_backend(torch.device("cpu")).name == "cpp"
    bayeslayers.set_backend("triton")
    assert resolve_backend(torch.device("cpu")).name == "triton"


@pytest.mark.slow
def test_torch_compile_traces_a_converted_model_without_graph_breaks():
    import torch._dynamo

    bayeslayers.set_backend("triton")
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    bayeslayers.convert(model, target_modules=["0", "2"], init_sigma=0.05)
    x = torch.randn(4, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0

    def step(module, seed):
        for p in model.parameters():
            p.grad = None
        with bayeslayers.sampling(model, seed):
            loss = module(x).square().sum() + KL_WEIGHT * bayeslayers.kl_loss(model)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(model, fullgraph=True)
    for seed in (1, 2):
        (eager_loss, eager_grads), (loss, grads) = step(model, seed), step(compiled, seed)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(step(compiled, 1)[0], step(compiled, 2)[0])


def test_bad_arguments():
    mu = torch.zeros(3, 4)
    path = SampleThenMap(TRITON_KERNELS)
    with pytest.raises(ValueError, match="kl_direction"):
        reparameterize(LinearMap(), torch.randn(2, 4), Posterior(mu, mu, None, 0.1, "pp"), None, 1, path)
    with pytest.raises(TypeError, match="mu and rho must both be float32"):
        reparameterize(Conv2dMap(), torch.randn(1, 4, 3, 3), Posterior(mu.double(), mu, None, 0.1, "qp"), None, 1, path)


# ---------------------------------------------------------------------------------------------- GPU only
SD_SHAPES = [(4096, 320, 320), (256, 1280, 1280), (77, 768, 640), (1024, 640, 5120), (256, 5120, 1280)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", SD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_linear_at_sd_shapes_matches_float64(m, k, n, dtype):
    bayeslayers.set_backend("triton")
    layer = bayeslayers.BayesLinear.from_module(
        nn.Linear(k, n, device="cuda"), prior_dtype=torch.bfloat16, kl_direction="qp"
    ).cuda()
    randomize_layer(layer)
    layer.fixed_seed = 4242
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    upstream = torch.randn(y.shape, device="cuda", dtype=torch.float64)
    ((y.double() * upstream).sum() + KL_WEIGHT * layer.kl()).backward()
    eps = philox_normal(4242, (n, k), "cuda")
    assert (
        torch.testing.assert_close(eps.cpu().double().reshape(-1), reference_normals(4242, n * k), rtol=1e-5, atol=1e-5)
        is None
    )
    mu = layer.weight_mu.detach().double().requires_grad_(True)
    rho = layer.weight_rho.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y64 = F.linear(x64, sampled_weight(mu, rho, eps), layer.bias.detach().double())
    kl64 = kl_reference(mu, rho, layer.prior_mu, layer.prior_sigma, "qp")
    ((y64 * upstream).sum() + KL_WEIGHT * kl64).backward()
    tol = 4 * TOLERANCE[dtype] if dtype != torch.float32 else 1e-3  # TF32 may be on for fp32 GEMMs
    assert relative_error(y, y64) < tol and relative_error(x.grad, x64.grad) < tol
    assert relative_error(layer.weight_mu.grad, mu.grad) < tol
    assert relative_error(layer.weight_rho.grad, rho.grad) < tol
    assert relative_error(layer.kl(), kl64) < 1e-5


@pytest.mark.gpu
def test_gpu_eps_identical_across_configs_and_between_forward_and_backward():
    numel = 1280 * 1280 + 3
    seed = seed_tensor(7, "cuda")
    tuned = philox_normal(7, (numel,), "cuda")
    for block_groups in (64, 128, 512, 1024):
        eps = torch.full((numel,), float("nan"), device="cuda")
        _philox_normal_kernel.fn[(triton_cdiv(numel, 4 * block_groups),)](
            seed, eps, numel, BLOCK_GROUPS=block_groups, **EXACT
        )
        assert torch.equal(eps, tuned)
    mu, rho = torch.randn(numel, device="cuda") * 0.1, torch.full((numel,), -4.0, device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w, _ = sample_weight_and_kl(mu, rho, None, seed, 0.01, "qp", dtype)
        _, _, w_again = reparameterization_grad(torch.ones_like(mu), mu, rho, None, seed, None, 0.01, "qp", dtype)
        assert torch.equal(w, w_again)


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.gpu
def test_gpu_torch_compile_of_a_converted_tiny_unet():
    pytest.importorskip("diffusers")
    from tiny_models import tiny_unet, unet_inputs

    bayeslayers.set_backend("triton")
    unet = tiny_unet().cuda()
    bayeslayers.convert(unet, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj", "net.2", "conv1"])
    sample, timesteps, text = (t.cuda() for t in unet_inputs())
    with torch.autocast("cuda", dtype=torch.bfloat16), bayeslayers.sampling(unet, seed=3):
        eager = unet(sample, timesteps, text).sample
        compiled = torch.compile(unet)(sample, timesteps, text).sample
        loss = compiled.float().square().mean() + 1e-6 * bayeslayers.kl_loss(unet)
    loss.backward()
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=3e-2, atol=3e-2)
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)
