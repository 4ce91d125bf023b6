"""The roofline model (benchmarks/roofline.py): the SD1.5 layers it walks, and its byte counts against the
arguments the Triton kernels are actually launched with (captured on meta tensors, as tools/aot.py does)."""

import pytest
import torch

from benchmarks import roofline
from tools import aot

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def layers():
    return roofline.unet_layers("sd15", "dreambooth-bnn", 512, 1)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _launch_bytes(call):
    """{kernel argument name: bytes} of the tensors the single Triton launch made by ``call()`` receives."""
    launches = []
    with aot.captured_launches(launches, "roofline"):
        call()
    (launch,) = launches
    names = launch.autotuner.fn.arg_names
    return {
        name: arg.numel() * arg.element_size() for name, arg in zip(names, launch.args) if isinstance(arg, torch.Tensor)
    }


def _assert_covers(kernel, actual, unread=()):
    """Every tensor the launch receives is in the model, except a few bytes (seed, KL upstream gradient, the
    per-program KL partial sums) and the ``unread`` arguments its specialization never loads: a dropped tensor
    term fails here, whatever the model's own keys are."""
    modelled = {**kernel.reads, **kernel.writes}
    left_out = {name: nbytes for name, nbytes in actual.items() if name not in modelled and name not in unread}
    assert sum(left_out.values()) <= 1e-3 * kernel.bytes, (kernel.name, left_out)


def _assert_model_matches(kernel, actual, unread=()):
    for name, nbytes in {**kernel.reads, **kernel.writes}.items():
        assert actual[name] == nbytes, (kernel.name, name, actual[name], nbytes)
    _assert_covers(kernel, actual, unread)


def test_sd15_layers_and_the_preset(layers):
    converted = [layer for layer in layers if layer.converted]
    assert len(converted) == 96
    assert sum(layer.n * layer.k for layer in converted) == pytest.approx(198.2e6, rel=1e-3)
    by_name = {layer.name: layer for layer in layers}
    q = by_name["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (q.m, q.n, q.k, q.converted) == (4096, 320, 320, True)
    assert by_name["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"].m == 64
    k = by_name["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert (k.m, k.k, k.converted) == (77, 768, False)
    attn2 = by_name["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert (attn2.kind, attn2.n, attn2.kv_tokens, attn2.heads) == ("attention", 4096, 77, 8)
    assert sum(layer.kind == "conv2d" for layer in layers) > 20


@pytest.mark.parametrize(
    "name",
    [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
    ],
)
def test_byte_model_matches_the_kernel_arguments(layers, name):
    from bayeslayers.kernels.triton.reparam_grad import reparameterization_grad
    from bayeslayers.kernels.triton.sample_kl import sample_weight_and_kl
    from bayeslayers.kernels.triton.sampled_matmul import sampled_matmul
    from bayeslayers.kernels.triton.weight_grad_gemm import weight_grad_gemm

    layer = next(layer for layer in layers if layer.name == name)
    m, n, k, prior_bytes = layer.m, layer.n, layer.k, layer.prior_bytes
    prior = {2: BF16, 4: torch.float32}.get(prior_bytes)
    mu, seed = _meta(n, k), _meta(1, dtype=torch.int64)
    p = None if prior is None else _meta(n, k, dtype=prior)
    kernels = {
        kern.name: kern
        for path in roofline.LINEAR_PATHS
        for kern in roofline.bayesian_linear(m, n, k, path, prior_bytes)
    }
    _assert_model_matches(
        kernels["sample_weight_kl"],
        _launch_bytes(lambda: sample_weight_and_kl(mu, mu, p, seed, 0.01, "qp", BF16, True)),
    )
    _assert_model_matches(  # without the KL the prior is passed but never loaded (WITH_KL is a constexpr)
        kernels["sample_weight"],
        _launch_bytes(lambda: sample_weight_and_kl(mu, mu, p, seed, 0.01, "qp", BF16, False)),
        unread={"prior_ptr"},
    )
    _assert_model_matches(
        kernels["reparameterization_grad"],
        _launch_bytes(
            lambda: reparameterization_grad(_meta(n, k, dtype=BF16), mu, mu, p, seed, _meta(1), 0.01, "qp", BF16)
        ),
    )
    _assert_model_matches(
        kernels["weight_grad (dW epilogue)"],
        _launch_bytes(
            lambda: weight_grad_gemm(
                _meta(m, n, dtype=BF16), _meta(m, k, dtype=BF16), mu, mu, p, seed, _meta(1), 0.01, "qp"
            )
        ),
    )
    # sample-in-GEMM reads the weight once per 128-row block: the model counts the re-reads
    regenerations = -(-m // roofline.SAMPLE_IN_GEMM_BLOCK_M)
    forward = kernels["sampled_matmul (y, KL)"]
    actual = _launch_bytes(
        lambda: sampled_matmul(_meta(m, k, dtype=BF16), mu, mu, seed, prior_mu=p, prior_sigma=0.01, with_kl=True)
    )
    _assert_covers(forward, actual, unread={"bias_ptr"})  # no bias: HAS_BIAS=False, a placeholder pointer
    assert forward.reads["mu_ptr"] == regenerations * actual["mu_ptr"]
    assert forward.reads["a_ptr"] == actual["a_ptr"] and forward.writes["out_ptr"] == actual["out_ptr"]
    dx = kernels["sampled_matmul (dx)"]
    actual = _launch_bytes(lambda: sampled_matmul(_meta(m, n, dtype=BF16), mu, mu, seed, transpose_weight=False))
    _assert_covers(dx, actual, unread={"bias_ptr", "prior_ptr"})  # no KL in dx: the prior is not loaded
    assert dx.reads["rho_ptr"] == regenerations * actual["rho_ptr"] and dx.writes["out_ptr"] == actual["out_ptr"]


def test_lora_byte_model_matches_the_fused_kernel():
    from bayeslayers.kernels.triton.lora_matmul import lora_matmul

    m, n, k, rank = 77, 320, 768, 4
    kernels = {kern.name: kern for kern in roofline.lora_linear(m, n, k, rank, "fused_lora")}
    w, a, b = _meta(n, k, dtype=BF16), _meta(rank, k, dtype=BF16), _meta(n, rank, dtype=BF16)
    _assert_model_matches(
        kernels["lora_matmul (y)"],
        _launch_bytes(lambda: lora_matmul(_meta(m, k, dtype=BF16), w, a, b, 1.0)),
        unread={"bias_ptr"},  # no bias: HAS_BIAS=False, a placeholder pointer
    )
    _assert_model_matches(
        kernels["lora_matmul (dx)"],
        _launch_bytes(lambda: lora_matmul(_meta(m, n, dtype=BF16), w.t(), b.t(), a.t(), 1.0)),
        unread={"bias_ptr"},
    )


def test_roofline_totals_and_outputs(layers, tmp_path):
    gpu = roofline.GPUS["h100"]
    result = roofline.roofline(list(layers), gpu, lora=False)
    totals = result["totals"]
    assert totals["best_ms"] > totals["floor_ms"] > 0
    assert totals["best_ms"] <= min(totals[f"{p}_ms"] for p in roofline.LINEAR_PATHS) + 1e-9
    rows = {r["layer"]: r for r in result["rows"]}
    big = rows["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]  # 4096 rows: regenerating loses
    assert big["sample_in_gemm_us"] > big["sample_then_map_us"] > big["deterministic_us"]
    # a deterministic layer is one memory-bound cast plus three GEMMs plus AdamW: check one by hand
    m, n, k = 4096, 320, 320
    by_hand = (4 * n * k + 2 * n * k) / gpu.bandwidth + 3 * max(
        2 * (m * k + n * k + m * n) / gpu.bandwidth, 2 * m * n * k / gpu.tensor_flops
    )
    by_hand += (2 * n * k + 4 * n * k) / gpu.bandwidth + 28 * n * k / gpu.bandwidth
    assert big["deterministic_us"] == pytest.approx(by_hand * 1e6, rel=1e-6)
    assert roofline.main(["--preset", "dreambooth-bnn", "--gpu", "a100", "--out", str(tmp_path)]) == 0
    stem = "roofline_sd15_dreambooth-bnn_512px_b1_a100"
    assert {p.suffix for p in tmp_path.glob(stem + ".*")} == {".md", ".csv", ".png"}
    assert "| deterministic UNet" in (tmp_path / f"{stem}.md").read_text()


@pytest.mark.parametrize("path", ["sample_then_map", "weight_grad_epilogue", "sample_in_gemm"])
def test_fused_optimizer_reads_the_moments_in_the_gradient_pass_and_drops_the_adamw_pass(path):
    m, n, k, prior_bytes = 256, 320, 640, 4
    unfused = roofline.bayesian_linear(m, n, k, path, prior_bytes)
    fused = roofline.fuse_optimizer(unfused)
    assert [kern.name for kern in unfused if kern.phase == "optimizer"] == ["AdamW mu, rho"]
    assert not [kern for kern in fused if kern.phase == "optimizer"]
    (step,) = [kern for kern in fused if kern.name.endswith(" + AdamW")]
    assert step.reads["moments"] == step.writes["moments"] == 16 * n * k and "d_mu_ptr" not in step.writes
    # d_mu, d_rho no longer written (8 B) nor read back with mu, rho by the AdamW pass (16 B)
    assert sum(kern.bytes for kern in unfused) - sum(kern.bytes for kern in fused) == 24 * n * k


def test_ivon_replaces_the_adamw_pass_on_mu_and_rho(tmp_path):
    m, n, k, prior_bytes = 256, 320, 640, 2
    adamw = roofline.bayesian_linear(m, n, k, "sample_then_map", prior_bytes)
    ivon = roofline.ivon_optimizer(adamw, prior_bytes)
    (step,) = [kern for kern in ivon if kern.phase == "optimizer"]
    assert step.name == "IVON mu, rho"
    # AdamW on the pair reads and writes 56 B per weight; IVON's pass 22 + 12 B (bf16 prior)
    assert sum(step.reads.values()) == 22 * n * k and sum(step.writes.values()) == 12 * n * k
    assert [kern.name for kern in ivon if kern.phase != "optimizer"] == [
        kern.name for kern in adamw if kern.phase != "optimizer"
    ]
    assert roofline.main(["--ivon", "--gpu", "h100", "--out", str(tmp_path)]) == 0
    assert "IVON" in (tmp_path / "roofline_sd15_dreambooth-bnn_512px_b1_h100_ivon.md").read_text()
