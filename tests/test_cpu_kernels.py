"""The C++ CPU kernels (cpp backend): the Triton eps stream bit for bit, float64 references, build cache."""

import os
import subprocess
import sys

import pytest
import torch
from reference import TOLERANCE, kl_and_grads64, posterior, reference_normals, relative_error

from bayeslayers.kernels import cpu

KL_WEIGHT = 0.37
ODD_SHAPES = [(37, 29), (67, 131), (5, 3, 3, 3), (4099,)]  # 1073, 8777 (three 4096-element chunks), 135, 4099
SEEDS = [0, 1, 0xDEADBEEF, (1 << 40) + 12345, (1 << 64) - 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_eps_is_the_triton_stream_bit_for_bit(seed):
    from bayeslayers.kernels import philox_normal  # the Triton kernel, interpreted on CPU

    for shape in ODD_SHAPES:
        assert torch.equal(cpu.philox_normal(seed, shape), philox_normal(seed, shape))
    torch.testing.assert_close(
        cpu.philox_normal(seed, (9001,)).double(), reference_normals(seed, 9001), rtol=2e-6, atol=2e-6
    )


def test_weight_sample_and_gradient_match_the_triton_kernels():
    from bayeslayers.kernels import reparameterization_grad, sample_weight_and_kl, seed_tensor

    mu, rho, prior = posterior((67, 131), torch.bfloat16)
    seed = seed_tensor(77, torch.device("cpu"))
    w_cpu, kl_cpu = cpu.sample_weight_and_kl(mu, rho, prior, seed, 0.03, "qp", torch.float32)
    w_triton, kl_triton = sample_weight_and_kl(mu, rho, prior, seed, 0.03, "qp", torch.float32)
    # Same eps; softplus and log come from different libm implementations: a few ulp apart at most.
    assert relative_error(w_cpu, w_triton) < 1e-6 and relative_error(kl_cpu, kl_triton) < 1e-6
    d_w, g_kl = torch.randn(67, 131), torch.tensor(KL_WEIGHT)
    for a, b in zip(
        cpu.reparameterization_grad(d_w, mu, rho, prior, seed, g_kl, 0.03, "qp", torch.float32),
        reparameterization_grad(d_w, mu, rho, prior, seed, g_kl, 0.03, "qp", torch.float32),
    ):
        assert relative_error(a, b) < 1e-6


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("direction", ["qp", "pq"])
@pytest.mark.parametrize("prior_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sample_and_grad_kernels_match_float64(poisoned, shape, direction, prior_dtype, out_dtype):
    mu, rho, prior = posterior(shape, prior_dtype, generator_seed=len(shape))
    seed = 2024 + len(shape)
    eps = cpu.philox_normal(seed, shape)
    d_w = torch.randn(shape).to(out_dtype)
    w64, kl64, d_mu64, d_rho64 = kl_and_grads64(mu, rho, prior, 0.03, direction, d_w, KL_WEIGHT, eps)

    w, kl = cpu.sample_weight_and_kl(mu, rho, prior, seed, 0.03, direction, out_dtype)
    assert w.dtype == out_dtype and kl.shape == () and kl.dtype == torch.float32
    assert relative_error(w, w64) < TOLERANCE.get(out_dtype, 2e-5) / 4 + 2e-7
    assert relative_error(kl, kl64) < 1e-5
    d_mu, d_rho, w_again = cpu.reparameterization_grad(
        d_w, mu, rho, prior, seed, torch.tensor(KL_WEIGHT), 0.03, direction, out_dtype
    )
    assert torch.equal(w_again, w)  # the gradient pass regenerates the forward's eps bit for bit
    assert relative_error(d_mu, d_mu64) < 1e-5 and relative_error(d_rho, d_rho64) < 1e-5

    _, _, d_mu64, d_rho64 = kl_and_grads64(mu, rho, prior, 0.03, direction, d_w, 0.0, eps)
    d_mu, d_rho, none = cpu.reparameterization_grad(d_w, mu, rho, prior, seed, None, 0.03, direction)
    assert none is None
    assert relative_error(d_mu, d_mu64) < 1e-6 and relative_error(d_rho, d_rho64) < 1e-6


def test_every_instruction_set_gives_the_same_bits():
    """The builds of the kernels this CPU runs: eps is the Triton stream bit for bit on each; AVX-512 and AVX2
    (fused multiply-adds) agree bit for bit, baseline x86-64 (no FMA) within a few ulp."""
    from bayeslayers.kernels import philox_normal  # the Triton kernel, interpreted on CPU

    sets = cpu.instruction_sets()
    assert sets[-1] == "baseline" and cpu.instruction_set() == sets[0]
    shape, seed = (67, 131), (1 << 40) + 12345
    mu, rho, prior = posterior(shape)
    rho[0, :7] = torch.tensor([-25.0, -20.0, -1e-3, 0.0, 1e-3, 19.0, 30.0])  # softplus' branches
    d_w, g_kl = torch.randn(shape), torch.tensor(KL_WEIGHT)
    triton_eps = philox_normal(seed, shape)
    runs = {}
    try:
        for name in sets:
            cpu.set_instruction_set(name)
            assert cpu.instruction_set() == name
            assert torch.equal(cpu.philox_normal(seed, shape), triton_eps), name
            runs[name] = [
                *cpu.sample_weight_and_kl(mu, rho, prior, seed, 0.03, "pq", torch.bfloat16),
                *cpu.sample_weight_and_kl(mu, rho, None, seed, 0.03, "qp", torch.float32),
                *cpu.reparameterization_grad(d_w, mu, rho, prior, seed, g_kl, 0.03, "qp", torch.float32),
                *cpu.reparameterization_grad(None, mu, rho, None, seed, g_kl, 0.03, "pq")[:2],
            ]
    finally:
        cpu.set_instruction_set(None)
    assert cpu.instruction_set() == sets[0]
    for name in sets[1:]:
        for a, b in zip(runs[sets[0]], runs[name]):
            if name == "baseline" and sets[0] != "baseline":
                assert relative_error(a, b) < 4e-7, name
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_d_mu_written_over_d_w_gives_the_same_bits(shape):
    """The in-place gradient pass (d_mu over the temporary dW) equals the pass with a fresh d_mu, bit for bit,
    and the kernels' front end uses it for a float32 temporary only."""
    from bayeslayers.kernels import seed_tensor
    from bayeslayers.kernels.posterior import Posterior

    mu, rho, prior = posterior(shape, generator_seed=3)
    d_w, g_kl, seed = torch.randn(shape), torch.tensor(KL_WEIGHT), seed_tensor(7, torch.device("cpu"))
    expected = cpu.reparameterization_grad(d_w, mu, rho, prior, seed, g_kl, 0.03, "pq", torch.bfloat16)
    buffer = d_w.clone()
    d_rho, w = torch.ops.bayeslayers.cpu_reparameterization_grad_into_d_w(
        buffer, mu, rho, prior, seed, g_kl, 0.03, "pq", torch.bfloat16
    )
    assert not torch.equal(buffer, d_w)  # overwritten ...
    assert torch.equal(buffer, expected[0]) and torch.equal(d_rho, expected[1]) and torch.equal(w, expected[2])

    kernels, post = cpu.CPU_KERNELS, Posterior(mu, rho, prior, 0.03, "pq")
    temporary = d_w.clone()
    d_mu, d_rho, none = kernels.reparameterization_grad(post, seed, temporary, g_kl, d_w_is_temporary=True)
    assert d_mu.data_ptr() == temporary.data_ptr() and none is None
    assert torch.equal(d_mu, expected[0]) and torch.equal(d_rho, expected[1])
    kept = d_w.clone()
    d_mu, _, _ = kernels.reparameterization_grad(post, seed, kept, g_kl)  # not a temporary: left as it was
    assert torch.equal(kept, d_w) and torch.equal(d_mu, expected[0])
    half = d_w.to(torch.bfloat16)
    d_mu, _, _ = kernels.reparameterization_grad(post, seed, half, g_kl, d_w_is_temporary=True)
    assert d_mu.dtype == torch.float32 and d_mu.data_ptr() != half.data_ptr()


def test_outputs_that_partly_overlap_inputs_are_refused():
    mu, rho, prior = posterior((5, 7))
    storage = torch.randn(36)
    d_w, shifted = storage[:35], storage[1:]
    with pytest.raises(RuntimeError, match="d_mu must be d_w itself or not overlap it"):
        cpu.reparameterization_grad(d_w, mu, rho, prior, 1, None, 0.03, "qp", d_mu=shifted)
    with pytest.raises(RuntimeError, match="must not overlap mu, rho"):
        cpu.reparameterization_grad(d_w, mu, rho, prior, 1, None, 0.03, "qp", d_mu=rho.view(-1))


def test_results_do_not_depend_on_the_thread_count():
    mu, rho, prior = posterior((300, 301))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(
                (
                    *cpu.sample_weight_and_kl(mu, rho, prior, 5, 0.1, "qp", torch.float32),
                    *cpu.reparameterization_grad(mu, mu, rho, prior, 5, torch.tensor(2.0), 0.1, "pq")[:2],
                )
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_the_build_is_cached_and_a_new_process_compiles_nothing():
    library = cpu.extension().__file__
    before = os.stat(library).st_mtime_ns
    code = (
        "import time; from bayeslayers.kernels import cpu; t = time.perf_counter(); cpu.extension(); "
        "print(time.perf_counter() - t)"
    )
    seconds = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert os.stat(library).st_mtime_ns == before
    assert seconds < 10, seconds  # loading, not compiling (a build takes about a minute)


def test_bad_arguments_name_the_tensor():
    ext = cpu.extension()
    mu = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="rho must be a contiguous float32 CPU tensor of 12 elements"):
        ext.sample_weight_kl(mu, torch.zeros(3, 5), None, 1, 0.1, 0, torch.empty(3, 4), torch.empty(()))
    with pytest.raises(RuntimeError, match="kl must be a float32 CPU tensor of one element"):
        ext.sample_weight_kl(mu, mu, None, 1, 0.1, 0, torch.empty(3, 4), torch.empty(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="instruction set 'avx1024' is not supported"):
        cpu.set_instruction_set("avx1024")
    with pytest.raises(ValueError, match="got one on meta"):
        cpu.sample_weight_and_kl(mu.to("meta"), mu, None, 1, 0.1, "qp", torch.float32)
