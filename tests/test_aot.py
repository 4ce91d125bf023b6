"""Ahead-of-time compilation of the Triton kernels for real GPU targets (no GPU needed).

``bayeslayers.kernels.aot`` runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process,
and the interpreter replaces ``@triton.jit``). The default run compiles one launch per kernel with every
autotune config for sm_80 and sm_90; ``-m aot_full`` compiles the whole matrix for the four targets.
"""

import os
import subprocess
import sys

import pytest
import torch

from tools import aot

KERNELS = {
    "philox_normal_kernel",
    "sample_weight_kl_kernel",
    "reparameterization_grad_kernel",
    "sampled_matmul_kernel",
    "weight_grad_kernel",
    "lora_matmul_kernel",
}


def _compile(tmp_path, subset, targets):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "aot.csv"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.aot",
            "--subset",
            subset,
            "--targets",
            targets,
            "--csv",
            str(path),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert path.exists(), run.stdout + run.stderr
    return aot.read_csv(path), run


def _check(results, targets):
    assert {r.kernel for r in results} == KERNELS
    assert {r.target for r in results} == set(targets)
    failed = [r for r in results if r.error]
    assert not failed, failed[:5]
    assert all(r.registers > 0 for r in results)
    spilled = [(r.kernel, r.config, r.specialization, r.target, r.spill_bytes) for r in results if r.spill_bytes]
    assert not spilled, spilled[:5]
    over = [
        (r.kernel, r.config, r.target, r.shared_memory)
        for r in results
        if r.shared_memory > aot.SHARED_MEMORY_LIMIT[int(r.target[3:])]
    ]
    assert not over, over[:5]
    # every kernel compiled with its autotune configs (at least 4 each: the elementwise kernels have 4, the
    # GEMMs 5-7 for bf16 operands) for every target
    for kernel in KERNELS:
        for target in targets:
            assert len({r.config for r in results if r.kernel == kernel and r.target == target}) >= 4, (kernel, target)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    results, run = _compile(tmp_path, "default", "sm_80,sm_90")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _check(results, ["sm_80", "sm_90"])
    assert "compiles, 0 failed" in run.stdout


@pytest.mark.aot_full
def test_full_matrix_compiles_for_every_target(tmp_path, request):
    if "aot_full" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full compile matrix (about 30 min on 2 cores) runs with -m aot_full")
    results, run = _compile(tmp_path, "full", ",".join(aot.TARGETS))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _check(results, list(aot.TARGETS))
    specializations = {r.specialization for r in results}
    assert any("fp16" in s for s in specializations) and any("tf32" in s for s in specializations)
    assert any("odd" in s for s in specializations) and any("kl=pq" in s for s in specializations)


def test_resource_usage_reads_cuobjdump_output(monkeypatch):
    class Done:
        stdout = "Resource usage:\n Function k:\n  REG:162 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:400 TEXTURE:0\n"

    monkeypatch.setattr(aot.subprocess, "run", lambda *a, **k: Done())
    assert aot.resource_usage(b"") == (162, 24)


def test_compile_refuses_to_run_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(SystemExit):
        aot.main(["--subset", "default"])


def test_launches_cover_the_library_options():
    full = aot.library_launches("full")
    default = aot.library_launches("default")
    assert {launch.kernel for launch in default} == KERNELS == {launch.kernel for launch in full}
    labels = [launch.specialization for launch in full]
    assert len(labels) == len(set(zip(labels, [launch.kernel for launch in full])))  # no duplicate launch
    for option in (
        "prior=none",
        "prior=fp32",
        "prior=bf16",
        "kl=pq",
        "bias=False",
        "with_kl=False",
        "tokens",
        "input_grad",
        "lora_input_grad",
        "write_w=False",
        "kl_grad=False",
        "fp16",
        "bf16",
        "fp32-tf32",
    ):
        assert any(option in label for label in labels), option


def test_gemm_configs_are_chosen_per_operand_dtype_and_alignment():
    import triton

    from bayeslayers.kernels.triton import config

    def configs(shapes):
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes
        ]

    every = configs(config._union(config.WEIGHT_GRAD_GEMM_SHAPES, config.FP32_WEIGHT_GRAD_GEMM_SHAPES))
    prune = config.PRUNE_WEIGHT_GRAD_GEMM
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    shapes = [config.config_shape(c) for c in prune(every, {"x_ptr": bf16, "N": 320, "K": 640})]
    assert shapes == config.WEIGHT_GRAD_GEMM_SHAPES
    shapes = [config.config_shape(c) for c in prune(every, {"x_ptr": fp32, "N": 320, "K": 640})]
    assert shapes == config.FP32_WEIGHT_GRAD_GEMM_SHAPES
    shapes = [config.config_shape(c) for c in prune(every, {"x_ptr": bf16, "N": 37, "K": 640})]
    assert (128, 128, 32, 8, 3) not in shapes and len(shapes) == len(config.WEIGHT_GRAD_GEMM_SHAPES) - 1
    interpreter = configs([(32, 32, 32, 4, 3)])
    assert config.PRUNE_SAMPLED_GEMM(interpreter, {"a_ptr": fp32, "N": 8, "K": 8}) == interpreter
