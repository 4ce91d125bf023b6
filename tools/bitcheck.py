"""Hashes of everything a CPU backend path computes, to show a refactor changed no bit.

For each backend path available on CPU (reference, torch, cpp, and Triton under TRITON_INTERPRET=1 on its four
fused paths), a few layer types, shapes and compute dtypes, it records SHA-256 digests of the eps stream, the
weight sample, the KL, the output and the gradients of x, mu, rho and the bias (one training forward under
``torch.manual_seed`` and one under ``bayeslayers.sampling``). Run it on two commits and diff the outputs:

    TORCH_EXTENSIONS_DIR=$PWD/build/torch_extensions .venv/bin/python tools/bitcheck.py > before.txt
    # ... check out the other commit ...
    TORCH_EXTENSIONS_DIR=$PWD/build/torch_extensions .venv/bin/python tools/bitcheck.py > after.txt
    diff before.txt after.txt   # empty: bit-identical

It uses only the public API, so it runs unchanged on both sides of a layout change. About a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are decorated: before any import

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import bayeslayers  # noqa: E402

# (backend, fusion policy or None): every way a CPU call can go.
PATHS = [
    ("reference", None),
    ("torch", None),
    ("cpp", None),
    ("triton", dict()),  # sample-then-GEMM
    ("triton", dict(weight_grad_epilogue=True)),  # dW epilogue
    ("triton", dict(sample_in_gemm_max_rows=2**31 - 1)),  # sample-in-GEMM
    ("triton", dict(fused_lora=True)),  # LoRA in the base GEMM
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def digest(tensor) -> str:
    if tensor is None:
        return "none"
    t = tensor.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16] + f":{t.dtype}:{tuple(t.shape)}".replace(" ", "")


def make_layers(dtype):
    """Fresh layers with fixed parameters (created under one torch seed); LoRA's frozen base in ``dtype``."""
    torch.manual_seed(0)
    linear = nn.Linear(13, 7)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    lora_base = nn.Linear(11, 6).to(dtype)
    layers = {
        "linear": bayeslayers.BayesLinear.from_module(linear, init_sigma=0.05),
        "linear_pq_bf16prior": bayeslayers.BayesLinear.from_module(
            linear, init_sigma=0.02, kl_direction="pq", prior_dtype=torch.bfloat16, prior_sigma=0.3
        ),
        "conv": bayeslayers.BayesConv2d.from_module(conv, init_sigma=0.05),
        "lora": bayeslayers.BayesLoRALinear(lora_base, rank=4, bayesian_factors="AB", init_sigma=0.05),
    }
    with torch.no_grad():  # move the means off their initial values so every term is nonzero
        for layer in layers.values():
            for name, p in layer.named_parameters():
                if name.endswith("weight_mu") or name.endswith("weight_rho"):
                    p.add_(0.01 * torch.randn_like(p))
            if isinstance(layer, bayeslayers.BayesLoRALinear):
                layer.base_layer.requires_grad_(False)
    return layers


def inputs(kind: str, dtype):
    g = torch.Generator().manual_seed(7)
    shape = {"conv": (2, 3, 6, 5), "lora": (3, 5, 11)}.get(kind, (2, 9, 13))
    return torch.randn(shape, generator=g).to(dtype)


def run_case(kind: str, layer: nn.Module, dtype) -> list[str]:
    out = []
    x = inputs(kind, dtype).requires_grad_(True)
    layer.train()
    for mode in ("train", "sampling"):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1234)
        if mode == "train":
            y = layer(x)
        else:
            with bayeslayers.sampling(layer, 99):
                y = layer(x)
        kl = bayeslayers.kl_loss(layer)
        (y.float().square().mean() + 1e-3 * kl).backward()
        out.append(f"  {mode} y={digest(y)} kl={digest(kl)} dx={digest(x.grad)}")
        for name, p in sorted(layer.named_parameters()):
            if p.requires_grad:
                out.append(f"  {mode} d[{name}]={digest(p.grad)}")
    bayesian = [m for m in layer.modules() if isinstance(m, bayeslayers.BayesianLayer)]
    for i, m in enumerate(bayesian):
        torch.manual_seed(4321)
        w = m.draw_weight(dtype)
        out.append(f"  draw_weight[{i}]={digest(w)} kl={digest(m.kl())}")
    return out


def main() -> None:
    torch.set_num_threads(1)
    for backend, policy in PATHS:
        bayeslayers.set_backend(backend)
        bayeslayers.set_fusion_policy(None if policy is None else bayeslayers.FusionPolicy(**policy))
        label = backend if policy is None else f"{backend}{policy}"
        for shape in ((7, 13), (1, 1), (33, 65)):
            print(f"{label} eps{shape}={digest(bayeslayers.materialize_eps(5, shape))}")
        for dtype in DTYPES:
            for kind, layer in make_layers(dtype).items():
                print(f"{label} {kind} {dtype}")
                try:
                    lines = run_case(kind, layer, dtype)
                except (RuntimeError, NotImplementedError) as error:  # an unsupported combination: record it
                    lines = [f"  error {type(error).__name__}: {str(error).splitlines()[0][:100]}"]
                print("\n".join(lines), flush=True)
    bayeslayers.set_backend(None)
    bayeslayers.set_fusion_policy(None)


if __name__ == "__main__":
    main()
