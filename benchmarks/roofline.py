"""Roofline model of a training step: bytes, FLOPs and lower-bound time of every kernel of every path.

    python -m benchmarks.roofline --model sd15 --preset dreambooth-bnn --resolution 512 --batch 1 --gpu h100

The SD1.5 UNet is built on the meta device (``configs/sd15/unet.json``), converted with the preset, and run
once on meta tensors with hooks recording the input rows of every Linear / Conv2d and the token counts of
every attention. For each converted layer and each path, every kernel of the forward, the backward and the
optimizer step (AdamW on mu and rho) is listed with the tensors it reads and writes (the sizes the kernels'
arguments have: ``tests/test_roofline.py`` checks them against the Triton launches), its tensor-core FLOPs
and its CUDA-core operations (Philox + Box-Muller, softplus, KL: counted from ``kernels/``' source). Its time
is at least max(bytes / bandwidth, FLOPs / tensor-core peak, operations / CUDA-core issue rate) on the
spec sheet; the layer's time is the sum over its kernels (no overlap between kernels, no launch cost).

The deterministic layer is the same op with a plain weight under bf16 autocast (cast, GEMMs, AdamW on the
weight). Summed over the step, the converted layers' predicted time is shown next to the deterministic UNet's
own GEMM / convolution / attention floor (norms and elementwise ops excluded from both).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

CONFIG_DIRS = [Path(__file__).resolve().parents[2] / "shared" / "configs" / "sd15", Path(__file__).parent]


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes / s (HBM / GDDR)
    tensor_flops: float  # dense bf16 tensor-core FLOP/s with fp32 accumulation
    alu_ops: float  # fp32 / int32 lane operations per second (SMs x lanes x boost clock)


GPUS = {  # spec sheets
    "h100": GPU("H100 SXM5 80GB", 3.35e12, 989e12, 132 * 128 * 1.98e9),
    "h200": GPU("H200 SXM 141GB", 4.8e12, 989e12, 132 * 128 * 1.98e9),  # H100's chip, HBM3e
    "a100": GPU("A100 SXM4 80GB", 2.039e12, 312e12, 108 * 64 * 1.41e9),
    "4090": GPU("RTX 4090", 1.008e12, 165e12, 128 * 128 * 2.52e9),
}

# CUDA-core operations per weight element, counted from kernels/ (philox.py, posterior_math.py): Philox4x32-10
# ~25 per element (10 rounds of 2 mul-hi, 2 mul-lo, 4 xor, 2 key adds per 4 words), Box-Muller ~45 (log
# series with a correctly rounded division, sqrt, sin/cos series, selects), softplus ~20, KL ~45, its
# gradient ~35, sigmoid ~14.
OPS_EPS = 70
OPS_SAMPLE = OPS_EPS + 20 + 3  # eps, softplus, w = mu + sigma * eps
OPS_SAMPLE_KL = OPS_SAMPLE + 45
OPS_GRAD = OPS_EPS + 20 + 14 + 35 + 6
ADAM_BYTES = 28  # AdamW per fp32 parameter: read p, grad, m, v; write p, m, v
ADAM_OPS = 12
SAMPLE_IN_GEMM_BLOCK_M = 128  # largest BLOCK_M of triton/config.SAMPLED_GEMM_SHAPES: fewest weight regenerations
COMPUTE = 2  # bf16 autocast


@dataclasses.dataclass
class Kernel:
    """One kernel launch: bytes read / written per tensor (named as the Triton kernels' arguments where one
    exists), tensor-core FLOPs and CUDA-core operations."""

    name: str
    phase: str  # forward | backward | optimizer
    reads: dict
    writes: dict
    flops: float = 0.0
    ops: float = 0.0

    @property
    def bytes(self) -> float:
        return sum(self.reads.values()) + sum(self.writes.values())

    def time(self, gpu: GPU) -> float:
        return max(self.bytes / gpu.bandwidth, self.flops / gpu.tensor_flops, self.ops / gpu.alu_ops)

    def bound(self, gpu: GPU) -> str:
        times = {
            "memory": self.bytes / gpu.bandwidth,
            "tensor": self.flops / gpu.tensor_flops,
            "alu": self.ops / gpu.alu_ops,
        }
        return max(times, key=times.get)


def _gemm(name, phase, m, n, k, a, b, out, c=COMPUTE):
    """out[m, n] = a[m, k] @ b[k, n] in the compute dtype."""
    return Kernel(name, phase, {a: c * m * k, b: c * k * n}, {out: c * m * n}, 2.0 * m * n * k)


def deterministic_linear(m, n, k, trained=True, bias=True) -> list[Kernel]:
    """nn.Linear under bf16 autocast: fp32 weight cast, forward GEMM, dx and dW GEMMs, dW cast, AdamW."""
    nk, c = n * k, COMPUTE
    kernels = [
        Kernel("cast w", "forward", {"weight": 4 * nk}, {"w": c * nk}, ops=nk),
        _gemm("y = x w^T", "forward", m, n, k, "x", "w", "y"),
        _gemm("dx = dy w", "backward", m, k, n, "dy", "w", "dx"),
    ]
    if trained:
        kernels += [
            _gemm("dW = dy^T x", "backward", n, k, m, "dy", "x", "dW"),
            Kernel("cast dW", "backward", {"dW": c * nk}, {"weight.grad": 4 * nk}, ops=nk),
            Kernel("AdamW weight", "optimizer", {"weight": ADAM_BYTES * nk}, {}, ops=ADAM_OPS * nk),
        ]
    return kernels


def sample_kl(nk, prior_bytes, with_kl=True, phase="forward") -> Kernel:
    reads = {"mu_ptr": 4 * nk, "rho_ptr": 4 * nk}
    if with_kl and prior_bytes:
        reads["prior_ptr"] = prior_bytes * nk
    return Kernel(
        "sample_weight_kl" if with_kl else "sample_weight",
        phase,
        reads,
        {"w_ptr": COMPUTE * nk},
        ops=(OPS_SAMPLE_KL if with_kl else OPS_SAMPLE) * nk,
    )


def reparam_grad(nk, prior_bytes, write_w=True) -> Kernel:
    reads = {"dw_ptr": COMPUTE * nk, "mu_ptr": 4 * nk, "rho_ptr": 4 * nk}
    if prior_bytes:
        reads["prior_ptr"] = prior_bytes * nk
    writes = {"d_mu_ptr": 4 * nk, "d_rho_ptr": 4 * nk}
    if write_w:
        writes["w_ptr"] = COMPUTE * nk
    return Kernel("reparameterization_grad", "backward", reads, writes, ops=(OPS_GRAD + 3 * write_w) * nk)


def weight_grad_epilogue(m, n, k, prior_bytes) -> Kernel:
    nk = n * k
    reads = {"dy_ptr": COMPUTE * m * n, "x_ptr": COMPUTE * m * k, "mu_ptr": 4 * nk, "rho_ptr": 4 * nk}
    if prior_bytes:
        reads["prior_ptr"] = prior_bytes * nk
    return Kernel(
        "weight_grad (dW epilogue)",
        "backward",
        reads,
        {"d_mu_ptr": 4 * nk, "d_rho_ptr": 4 * nk},
        2.0 * m * n * k,
        OPS_GRAD * nk,
    )


def sampled_matmul(m, n, k, prior_bytes, transposed=False) -> Kernel:
    """Sample-in-GEMM: the weight tiles (mu, rho) are read and regenerated once per BLOCK_M rows."""
    nk, regenerations = n * k, max(1, math.ceil(m / SAMPLE_IN_GEMM_BLOCK_M))
    if transposed:  # dx[m, k] = dy[m, n] @ w[n, k]
        reads = {"a_ptr": COMPUTE * m * n, "mu_ptr": 4 * nk * regenerations, "rho_ptr": 4 * nk * regenerations}
        return Kernel(
            "sampled_matmul (dx)",
            "backward",
            reads,
            {"out_ptr": COMPUTE * m * k},
            2.0 * m * n * k,
            OPS_SAMPLE * nk * regenerations,
        )
    reads = {"a_ptr": COMPUTE * m * k, "mu_ptr": 4 * nk * regenerations, "rho_ptr": 4 * nk * regenerations}
    if prior_bytes:
        reads["prior_ptr"] = prior_bytes * nk  # KL summed by the first row block only
    return Kernel(
        "sampled_matmul (y, KL)",
        "forward",
        reads,
        {"out_ptr": COMPUTE * m * n},
        2.0 * m * n * k,
        OPS_SAMPLE * nk * regenerations + (OPS_SAMPLE_KL - OPS_SAMPLE) * nk,
    )


def adam_posterior(nk) -> Kernel:
    return Kernel("AdamW mu, rho", "optimizer", {"mu, rho": 2 * ADAM_BYTES * nk}, {}, ops=2 * ADAM_OPS * nk)


def ivon_posterior(nk, prior_bytes) -> Kernel:
    """IVON's step on a Bayesian weight as one pass (bayeslayers.optim.IVON runs it as torch elementwise ops):
    reads mu, rho, their gradients, the moment and the prior mean; writes mu, rho and the moment."""
    return Kernel(
        "IVON mu, rho",
        "optimizer",
        {"mu, rho, d_mu, d_rho, moment": 20 * nk, "prior": prior_bytes * nk},
        {"mu, rho, moment": 12 * nk},
        ops=2 * ADAM_OPS * nk,
    )


def ivon_optimizer(kernels: list[Kernel], prior_bytes) -> list[Kernel]:
    """The kernels of a Bayesian layer's step with IVON's pass in place of AdamW's on mu and rho."""
    return [
        ivon_posterior(k.reads["mu, rho"] // (2 * ADAM_BYTES), prior_bytes) if k.name == "AdamW mu, rho" else k
        for k in kernels
    ]


def step_in_gradient_pass(kernel: Kernel) -> Kernel:
    """``kernel`` (a gradient pass writing d_mu, d_rho) with AdamW fused in: it reads the four moments and writes
    mu, rho and the moments instead of d_mu and d_rho (FusedBayesAdamW's update inside the gradient pass)."""
    nk = kernel.writes["d_mu_ptr"] // 4
    writes = {k: v for k, v in kernel.writes.items() if k not in ("d_mu_ptr", "d_rho_ptr")}
    writes.update({"mu_ptr": 4 * nk, "rho_ptr": 4 * nk, "moments": 16 * nk})
    return dataclasses.replace(
        kernel,
        name=kernel.name + " + AdamW",
        reads={**kernel.reads, "moments": 16 * nk},
        writes=writes,
        ops=kernel.ops + 2 * ADAM_OPS * nk,
    )


def fuse_optimizer(kernels: list[Kernel]) -> list[Kernel]:
    """The kernels of a Bayesian layer's step with its AdamW pass folded into the pass that forms d_mu, d_rho."""
    fused = [step_in_gradient_pass(k) if "d_mu_ptr" in k.writes else k for k in kernels]
    return [k for k in fused if k.name != "AdamW mu, rho"]


def bayesian_linear(m, n, k, path, prior_bytes) -> list[Kernel]:
    """Kernels of a Bayesian Linear's training step on ``path`` (kernels/paths/fusion.py's names)."""
    nk = n * k
    forward_gemm = _gemm("y = x w^T", "forward", m, n, k, "x", "w", "y")
    dx_gemm = _gemm("dx = dy w", "backward", m, k, n, "dy", "w", "dx")
    if path == "sample_then_map":
        return [
            sample_kl(nk, prior_bytes),
            forward_gemm,
            _gemm("dW = dy^T x", "backward", n, k, m, "dy", "x", "dW"),
            reparam_grad(nk, prior_bytes),
            dx_gemm,
            adam_posterior(nk),
        ]
    if path == "weight_grad_epilogue":
        return [
            sample_kl(nk, prior_bytes),
            forward_gemm,
            weight_grad_epilogue(m, n, k, prior_bytes),
            sample_kl(nk, 0, with_kl=False, phase="backward"),
            dx_gemm,
            adam_posterior(nk),
        ]
    if path == "sample_in_gemm":
        return [
            sampled_matmul(m, n, k, prior_bytes),
            weight_grad_epilogue(m, n, k, prior_bytes),
            sampled_matmul(m, n, k, 0, transposed=True),
            adam_posterior(nk),
        ]
    raise ValueError(f"unknown path {path!r}")


def lora_linear(m, n, k, rank, path, bayesian_b=True, prior_bytes=0) -> list[Kernel]:
    """LoRA on a frozen Linear (bf16 autocast): A [rank, K] trained, B [N, rank] Bayesian (or plain)."""
    nk, c = n * k, COMPUTE
    kernels = [Kernel("cast w0", "forward", {"weight": 4 * nk}, {"w": c * nk}, ops=nk)]
    if bayesian_b:
        kernels += [sample_kl(n * rank, prior_bytes)]
    if path == "fused_lora":
        kernels += [
            Kernel(
                "lora_matmul (y)",
                "forward",
                {"x_ptr": c * m * k, "w_ptr": c * nk, "a_ptr": c * rank * k, "b_ptr": c * n * rank},
                {"out_ptr": c * m * n},
                2.0 * m * n * k + 2.0 * m * rank * (k + n),
            ),
            Kernel(
                "lora_matmul (dx)",
                "backward",
                {"x_ptr": c * m * n, "w_ptr": c * nk, "a_ptr": c * rank * n, "b_ptr": c * k * rank},
                {"out_ptr": c * m * k},
                2.0 * m * n * k + 2.0 * m * rank * (k + n),
            ),
        ]
    else:
        kernels += [
            _gemm("y0 = x w^T", "forward", m, n, k, "x", "w", "y0"),
            _gemm("h = x a^T", "forward", m, rank, k, "x", "a", "h"),
            _gemm("y = y0 + s h b^T", "forward", m, n, rank, "h", "b", "y"),
            Kernel("add", "forward", {"y0": c * m * n, "y": c * m * n}, {"y": c * m * n}, ops=m * n),
            _gemm("dx = dy w", "backward", m, k, n, "dy", "w", "dx0"),
            _gemm("dh = dy b", "backward", m, rank, n, "dy", "b", "dh"),
            _gemm("dx += dh a", "backward", m, k, rank, "dh", "a", "dx"),
            Kernel("add dx", "backward", {"dx0": c * m * k, "dx": c * m * k}, {"dx": c * m * k}, ops=m * k),
        ]
    kernels += [
        _gemm("dA = dh^T x", "backward", rank, k, m, "dh", "x", "dA"),
        _gemm("dB = dy^T h", "backward", n, rank, m, "dy", "h", "dB"),
    ]
    if bayesian_b:
        kernels += [reparam_grad(n * rank, prior_bytes, write_w=False), adam_posterior(n * rank)]
    else:
        kernels += [Kernel("AdamW B", "optimizer", {"B": ADAM_BYTES * n * rank}, {}, ops=ADAM_OPS * n * rank)]
    kernels += [Kernel("AdamW A", "optimizer", {"A": ADAM_BYTES * rank * k}, {}, ops=ADAM_OPS * rank * k)]
    return kernels


def deterministic_conv(m, n, k, trained=True) -> list[Kernel]:
    """Conv2d as an implicit GEMM: m = batch x output pixels, n = out channels, k = in channels x kernel area."""
    return deterministic_linear(m, n, k, trained)


def attention(batch, heads, q_tokens, kv_tokens, channels) -> list[Kernel]:
    """Flash attention (fwd: QK^T and PV; bwd: twice the forward FLOPs)."""
    c = COMPUTE
    flops = 4.0 * batch * q_tokens * kv_tokens * channels
    q, kv = c * batch * q_tokens * channels, c * batch * kv_tokens * channels
    return [
        Kernel("attention", "forward", {"q": q, "k": kv, "v": kv}, {"o": q}, flops),
        Kernel(
            "attention backward",
            "backward",
            {"q": q, "k": kv, "v": kv, "o": q, "do": q},
            {"dq": q, "dk": kv, "dv": kv},
            2 * flops,
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# The SD1.5 UNet's layers


@dataclasses.dataclass
class Layer:
    name: str
    kind: str  # linear | conv2d | attention
    m: int = 0
    n: int = 0
    k: int = 0
    heads: int = 0
    kv_tokens: int = 0
    converted: bool = False
    prior_bytes: int = 0
    rank: int = 0


def _unet_config(model: str) -> dict:
    if model != "sd15":
        raise ValueError(f"--model must be 'sd15', got {model!r}")
    for directory in CONFIG_DIRS:
        for name in ("unet.json", "sd15_unet.json"):
            if (directory / name).exists():
                config = json.loads((directory / name).read_text())
                return {k: v for k, v in config.items() if not k.startswith("_")}
    raise FileNotFoundError(f"no SD1.5 UNet config in {CONFIG_DIRS}")


@functools.lru_cache(maxsize=8)
def unet_layers(model: str, preset: str, resolution: int, batch: int) -> tuple[Layer, ...]:
    """Every Linear, Conv2d and attention of the UNet with its shapes; the preset's layers marked converted."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    import bayeslayers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config(model))
    converted = copy.deepcopy(unet)
    bayeslayers.convert(converted, preset=preset)
    bayes = dict(converted.named_modules())
    layers: list[Layer] = []

    def hook(name):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(module, Attention):
                context = kwargs.get("encoder_hidden_states")
                tokens = x.shape[-2] if x.dim() == 3 else x.shape[-1] * x.shape[-2]
                kv = tokens if context is None else context.shape[1]
                layers.append(Layer(name, "attention", x.shape[0], tokens, module.inner_dim, module.heads, kv))
            elif isinstance(module, torch.nn.Linear):
                layers.append(Layer(name, "linear", x.numel() // x.shape[-1], module.out_features, module.in_features))
            else:
                rows = out.shape[0] * out.shape[2] * out.shape[3]
                area = module.kernel_size[0] * module.kernel_size[1]
                layers.append(Layer(name, "conv2d", rows, module.out_channels, module.in_channels * area))

        return record

    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, Attention)):
            module.register_forward_hook(hook(name), with_kwargs=True)
    latent = resolution // 8
    with torch.device("meta"), torch.no_grad():
        unet(
            torch.empty(batch, unet.config.in_channels, latent, latent),
            torch.zeros(batch, dtype=torch.long),
            encoder_hidden_states=torch.empty(batch, 77, unet.config.cross_attention_dim),
        )
    for layer in layers:
        module = bayes.get(layer.name)
        kind = type(module).__name__
        if kind == "BayesLinear":
            layer.converted = True
            layer.prior_bytes = 0 if module.prior_mu is None else module.prior_mu.element_size()
        elif kind == "BayesLoRALinear":
            layer.converted, layer.rank = True, module.rank
            prior = getattr(module.lora_B, "prior_mu", None)
            layer.prior_bytes = 0 if prior is None else prior.element_size()
    return tuple(layers)


# ---------------------------------------------------------------------------------------------------------------
# The table


LINEAR_PATHS = ("sample_then_map", "weight_grad_epilogue", "sample_in_gemm")
LORA_PATHS = ("unfused_lora", "fused_lora")


def layer_kernels(layer: Layer, path: str | None, lora: bool, fused_optimizer: bool | str = False) -> list[Kernel]:
    """Kernels of one layer: ``path`` None for the deterministic layer (LoRA preset: plain LoRA);
    ``fused_optimizer``: True, a Bayesian Linear's AdamW runs inside its gradient pass; "ivon", IVON's one pass
    replaces its AdamW."""
    if layer.kind == "attention":
        return attention(layer.m, layer.heads, layer.n, layer.kv_tokens, layer.k)
    if layer.kind == "conv2d":
        return deterministic_conv(layer.m, layer.n, layer.k, trained=not lora)
    if lora and layer.converted:
        return lora_linear(
            layer.m,
            layer.n,
            layer.k,
            layer.rank,
            path or "unfused_lora",
            bayesian_b=path is not None,
            prior_bytes=layer.prior_bytes,
        )
    if path is None or not layer.converted:
        return deterministic_linear(layer.m, layer.n, layer.k, trained=not lora)
    kernels = bayesian_linear(layer.m, layer.n, layer.k, path, layer.prior_bytes)
    if fused_optimizer == "ivon":
        return ivon_optimizer(kernels, layer.prior_bytes)
    return fuse_optimizer(kernels) if fused_optimizer else kernels


def roofline(layers: list[Layer], gpu: GPU, lora: bool, fused_optimizer: bool | str = False) -> dict:
    """Per converted layer and path: time (s) and ratio to the deterministic layer; step totals."""
    paths = LORA_PATHS if lora else LINEAR_PATHS
    rows, kernel_rows = [], []
    floor = sum(sum(k.time(gpu) for k in layer_kernels(layer, None, lora)) for layer in layers)
    extra = {p: 0.0 for p in paths}
    best_extra = 0.0
    for layer in layers:
        if not layer.converted:
            continue
        det = sum(k.time(gpu) for k in layer_kernels(layer, None, lora))
        times = {}
        for path in paths:
            kernels = layer_kernels(layer, path, lora, fused_optimizer)
            times[path] = sum(k.time(gpu) for k in kernels)
            for kern in kernels:
                kernel_rows.append(
                    {
                        "layer": layer.name,
                        "path": path,
                        "kernel": kern.name,
                        "phase": kern.phase,
                        "bytes_read": int(sum(kern.reads.values())),
                        "bytes_written": int(sum(kern.writes.values())),
                        "flops": int(kern.flops),
                        "alu_ops": int(kern.ops),
                        "time_us": kern.time(gpu) * 1e6,
                        "bound": kern.bound(gpu),
                    }
                )
        best = min(paths, key=times.get)
        for path in paths:
            extra[path] += times[path] - det
        best_extra += times[best] - det
        rows.append(
            {
                "layer": layer.name,
                "m": layer.m,
                "n": layer.n,
                "k": layer.k,
                "deterministic_us": det * 1e6,
                **{f"{p}_us": times[p] * 1e6 for p in paths},
                **{f"{p}_ratio": times[p] / det for p in paths},
                "best": best,
                "best_ratio": times[best] / det,
                "extra_us": (times[best] - det) * 1e6,
            }
        )
    totals = {
        "floor_ms": floor * 1e3,
        **{f"{p}_ms": (floor + extra[p]) * 1e3 for p in paths},
        "best_ms": (floor + best_extra) * 1e3,
        "best_ratio": (floor + best_extra) / floor,
        **{f"{p}_ratio": (floor + extra[p]) / floor for p in paths},
    }
    return {"rows": rows, "kernels": kernel_rows, "totals": totals, "paths": paths}


def markdown(result: dict, args, gpu: GPU, layers: list[Layer]) -> str:
    paths, totals = result["paths"], result["totals"]
    rows = sorted(result["rows"], key=lambda r: -r["extra_us"])
    n_conv = sum(layer.converted for layer in layers)
    out = [
        f"# Roofline: {args.model} {args.preset}, {args.resolution} px, batch {args.batch}, {gpu.name}"
        + (", AdamW fused into the gradient pass" if args.fused_optimizer else "")
        + (", IVON on the Bayesian layers" if args.ivon else ""),
        "",
        f"Spec sheet: {gpu.bandwidth / 1e12:.2f} TB/s, {gpu.tensor_flops / 1e12:.0f} TFLOP/s bf16 tensor, "
        f"{gpu.alu_ops / 1e12:.1f} T lane-ops/s. Lower bounds (`benchmarks/roofline.py`): each kernel takes "
        "max(bytes / bandwidth, FLOPs / tensor peak, ALU ops / issue rate); no overlap, no launch cost. "
        "Deterministic floor: every Linear, Conv2d and attention of the UNet, fwd + bwd"
        + (" + AdamW on every weight" if "lora" not in args.preset else " (frozen; plain rank-r LoRA trained)")
        + ", norms and elementwise ops excluded."
        + (
            " Bayesian layers: AdamW on mu and rho fused into the pass that forms d_mu and d_rho (it reads the "
            "moments and writes mu, rho and the moments; no d_mu, d_rho written, no separate optimizer pass)."
            if args.fused_optimizer
            else " Bayesian layers: IVON in one pass (reads mu, rho, d_mu, d_rho, its moment and the prior; writes mu, "
            "rho and the moment) in place of AdamW on mu and rho; bayeslayers.optim.IVON runs it as torch elementwise "
            "ops today, so this is the bound a one-pass kernel would reach."
            if args.ivon
            else ""
        ),
        "",
        "| step | time (ms) | ratio to deterministic |",
        "|---|---:|---:|",
        f"| deterministic UNet (GEMM/conv/attention floor) | {totals['floor_ms']:.2f} | 1.000 |",
    ]
    for p in paths:
        out.append(f"| Bayesian, {p} everywhere | {totals[f'{p}_ms']:.2f} | {totals[f'{p}_ratio']:.3f} |")
    out.append(f"| Bayesian, fastest path per layer | {totals['best_ms']:.2f} | {totals['best_ratio']:.3f} |")
    out += [
        "",
        f"{n_conv} converted layers, sorted by the time they add on their fastest path (µs):",
        "",
        "| layer | M | N | K | deterministic | " + " | ".join(paths) + " | fastest | ratio | added |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(paths) + "---|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['layer']} | {r['m']} | {r['n']} | {r['k']} | {r['deterministic_us']:.1f} | "
            + " | ".join(f"{r[f'{p}_us']:.1f}" for p in paths)
            + f" | {r['best']} | {r['best_ratio']:.2f} | {r['extra_us']:.1f} |"
        )
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, paths = result["rows"], result["paths"]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.12), 4.5))
    for p in paths:
        ax.plot(range(len(rows)), [r[f"{p}_ratio"] for r in rows], marker=".", linestyle="none", label=p)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("converted layer (UNet order)")
    ax.set_ylabel("predicted time / deterministic layer")
    ratio = result["totals"]["best_ratio"]
    ax.set_title(f"predicted (roofline lower bounds, not measured): {title}, step ratio {ratio:.3f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--preset", default="dreambooth-bnn", choices=("dreambooth-bnn", "dreambooth-bnn-lora"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--fused_optimizer", action="store_true", help="model AdamW on mu, rho inside the gradient pass"
    )
    parser.add_argument("--ivon", action="store_true", help="model IVON's one pass in place of AdamW on mu, rho")
    args = parser.parse_args(argv)
    if (args.fused_optimizer or args.ivon) and "lora" in args.preset:
        parser.error("--fused_optimizer and --ivon are modelled for the full preset (dreambooth-bnn) only")
    if args.fused_optimizer and args.ivon:
        parser.error("--fused_optimizer and --ivon model two different optimizers: pass one")
    if args.resolution % 64 or args.resolution <= 0 or args.batch <= 0:
        parser.error("--resolution must be a positive multiple of 64 and --batch positive")
    gpu = GPUS[args.gpu]
    layers = unet_layers(args.model, args.preset, args.resolution, args.batch)
    optimizer = "ivon" if args.ivon else args.fused_optimizer
    result = roofline(layers, gpu, lora="lora" in args.preset, fused_optimizer=optimizer)
    stem = f"roofline_{args.model}_{args.preset}_{args.resolution}px_b{args.batch}_{args.gpu}"
    stem += "_fused_optimizer" if args.fused_optimizer else "_ivon" if args.ivon else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(markdown(result, args, gpu, layers))
    with open(args.out / f"{stem}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(result["kernels"][0]))
        writer.writeheader()
        writer.writerows(result["kernels"])
    plot(result, args.out / f"{stem}.png", f"{args.preset} {args.resolution}px b{args.batch} {gpu.name}")
    totals = result["totals"]
    worst = sorted(result["rows"], key=lambda r: -r[f"{r['best']}_us"])[:3]
    print(
        f"{stem}: deterministic floor {totals['floor_ms']:.2f} ms, Bayesian (fastest path per layer) "
        f"{totals['best_ms']:.2f} ms, ratio {totals['best_ratio']:.3f}"
    )
    for p in result["paths"]:
        print(f"  {p} everywhere: {totals[f'{p}_ms']:.2f} ms (ratio {totals[f'{p}_ratio']:.3f})")
    print(
        "  costliest layers: "
        + "; ".join(
            f"{r['layer']} {r[r['best'] + '_us']:.1f} us on {r['best']} "
            f"({r['best_ratio']:.2f}x its deterministic layer)"
            for r in worst
        )
    )
    print(f"wrote {args.out / stem}.md/.csv/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
