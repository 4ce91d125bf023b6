"""Property-based tests (hypothesis): every layer type on every backend against the float64 reference of
``reference.py`` (``check_layer``) on random configurations: shapes with 1-sized and odd dims, non-contiguous and
channels_last inputs, every Conv2d option (stride, int/pair/'same'/'valid' padding, all padding modes,
dilation, groups), bias on/off, fp32/bf16/fp16 inputs and bf16/fp16 autocast, 1-D to 4-D inputs for Linear,
both KL directions, zero-mean and bf16 priors. Outputs, KL and the gradients of the input and every trainable
parameter are checked.

The example budget is fixed and derandomized (``FUZZ_EXAMPLES`` per test, same examples every run), so the
file's run time is stable; raise ``BAYESLAYERS_FUZZ_EXAMPLES`` locally to search longer.
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import TOLERANCE, check_layer, relative_error

import bayeslayers

FUZZ_EXAMPLES = int(os.environ.get("BAYESLAYERS_FUZZ_EXAMPLES", "120"))
BACKENDS = ["reference", "torch", "cpp", "triton"]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]

fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# (input dtype, autocast dtype or None): the compute dtype is the autocast one when set
PRECISIONS = [
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]


def _posterior_options(draw):
    return dict(
        kl_direction=draw(st.sampled_from(["qp", "pq"])),
        prior_sigma=draw(st.sampled_from([0.003, 0.01, 0.2])),
        init_sigma=draw(st.sampled_from([1e-4, 0.01, 0.3])),
    )


def _randomize(module, seed):
    """Fresh, non-trivial posterior, prior and plain weights (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [m for m in module.modules() if isinstance(m, bayeslayers.BayesianLayer)]:
            layer.weight_mu.copy_(0.3 * torch.randn(layer.weight_mu.shape, generator=g))
            layer.weight_rho.copy_(torch.empty(layer.weight_rho.shape).uniform_(-7, 0, generator=g))
            if layer.prior_mu is not None:
                prior = layer.weight_mu + 0.05 * torch.randn(layer.weight_mu.shape, generator=g)
                layer.prior_mu.copy_(prior.to(layer.prior_mu.dtype))
        for m in module.modules():
            for name in ("weight", "bias"):
                tensor = m._parameters.get(name) if isinstance(m, (nn.Linear, nn.Conv2d)) else None
                if tensor is not None:
                    tensor.copy_(0.3 * torch.randn(tensor.shape, generator=g))
            if isinstance(m, bayeslayers.BayesianLayer) and m.bias is not None:
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return module


def _layout(x, draw, image):
    """The input as drawn: contiguous, non-contiguous (a strided slice) or channels_last (4-D images)."""
    layouts = ["contiguous", "strided"] + (["channels_last"] if image and x.dim() == 4 else [])
    layout = draw(st.sampled_from(layouts))
    if layout == "strided":
        wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        x = wide[..., ::2]
        assert not x.is_contiguous() or x.shape[-1] == 1 or x.numel() <= 1
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@st.composite
def linear_cases(draw, lora=False):
    in_features, out_features = draw(st.integers(1, 23)), draw(st.integers(1, 19))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))  # 1-D to 4-D inputs
    bias = draw(st.booleans())
    options = _posterior_options(draw)
    if lora:
        base = nn.Linear(in_features, out_features, bias=bias)
        module = bayeslayers.BayesLoRALinear(
            base,
            rank=draw(st.integers(1, 4)),
            lora_alpha=draw(st.sampled_from([None, 1.0, 7.0])),
            bayesian_factors=draw(st.sampled_from(["AB", "A", "B"])),
            **options,
        )
    else:
        prior_dtype = draw(st.sampled_from([None, torch.bfloat16]))
        module = bayeslayers.BayesLinear.from_module(
            nn.Linear(in_features, out_features, bias=bias), prior_dtype=prior_dtype, **options
        )
        if draw(st.booleans()):  # zero-mean prior
            module.prior_mu = None
    x = torch.randn(*lead, in_features)
    return module, x


@st.composite
def conv_cases(draw, lora=False):
    groups = 1 if lora else draw(st.sampled_from([1, 1, 2, 3]))
    in_channels, out_channels = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    stride = (1, 1) if padding_kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding = {
        "int": draw(st.integers(0, 2)),
        "pair": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        "same": "same",
        "valid": "valid",
    }[padding_kind]
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    pads = {
        "int": (padding, padding) if isinstance(padding, int) else None,
        "pair": padding,
        "same": tuple(d * (k - 1) for d, k in zip(dilation, kernel)),
        "valid": (0, 0),
    }[padding_kind]
    # spatial sizes big enough for the kernel and (reflect) for the padding
    sizes = []
    for axis in range(2):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        smallest = max(
            1,
            span - 2 * pads[axis] if padding_kind in ("int", "pair") else span,
            pads[axis] + 1 if padding_mode in ("reflect", "circular") else 1,
        )
        sizes.append(draw(st.integers(smallest, smallest + 4)))
    bias = draw(st.booleans())
    options = _posterior_options(draw)
    base = nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    )
    if lora:
        module = bayeslayers.BayesLoRAConv2d(
            base, rank=draw(st.integers(1, 3)), bayesian_factors=draw(st.sampled_from(["AB", "A", "B"])), **options
        )
    else:
        module = bayeslayers.BayesConv2d.from_module(base, **options)
    batch = draw(st.integers(0, 3))  # 0: an unbatched (C, H, W) input
    x = torch.randn(*([batch] if batch else []), in_channels, *sizes)
    return module, x


def _check(case, seed, data):
    module, x = case
    draw = data.draw
    backend = draw(st.sampled_from(BACKENDS))
    dtype, autocast = draw(st.sampled_from(PRECISIONS))
    _randomize(module, seed)
    if autocast is None and hasattr(module, "base_layer"):
        # plain factors on a half-precision base fail (see test_lora_plain_factor_on_a_half_precision_base)
        assume(dtype == torch.float32 or module.bayesian_factors == "AB")
        module.base_layer.to(dtype)  # a half-precision base model with fp32 adapters, as LoRA fine-tuning runs
    x = _layout(x.to(dtype), draw, image=isinstance(module, (bayeslayers.BayesConv2d, bayeslayers.BayesLoRAConv2d)))
    check_layer(module, x, backend, compute_dtype=autocast or dtype, autocast=autocast)


@fuzz
@given(case=linear_cases(), seed=st.integers(0, 2**16), data=st.data())
def test_fuzz_bayes_linear(case, seed, data):
    _check(case, seed, data)


@fuzz
@given(case=conv_cases(), seed=st.integers(0, 2**16), data=st.data())
def test_fuzz_bayes_conv2d(case, seed, data):
    _check(case, seed, data)


@fuzz
@given(case=linear_cases(lora=True), seed=st.integers(0, 2**16), data=st.data())
def test_fuzz_bayes_lora_linear(case, seed, data):
    _check(case, seed, data)


@fuzz
@given(case=conv_cases(lora=True), seed=st.integers(0, 2**16), data=st.data())
def test_fuzz_bayes_lora_conv2d(case, seed, data):
    _check(case, seed, data)


@pytest.mark.parametrize("factors", ["A", "B", ""])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_lora_plain_factor_on_a_half_precision_base(kind, factors):
    """A LoRA adapter on a bf16 base layer (a bf16 UNet, no autocast) runs whichever factors are Bayesian, like
    the all-Bayesian one does, and matches the float64 reference."""
    if kind == "linear":
        module, x = bayeslayers.BayesLoRALinear(nn.Linear(6, 5), rank=2, bayesian_factors=factors), torch.randn(3, 6)
    else:
        module = bayeslayers.BayesLoRAConv2d(nn.Conv2d(3, 4, 3, padding=1), rank=2, bayesian_factors=factors)
        x = torch.randn(2, 3, 5, 5)
    _randomize(module, 0)
    module.base_layer.to(torch.bfloat16)
    module.train()
    if factors:
        check_layer(module, x.to(torch.bfloat16), "torch", compute_dtype=torch.bfloat16)
    else:  # a plain LoRA (no posterior) against the same module in float64
        y = module(x.to(torch.bfloat16))
        y64 = copy.deepcopy(module).double()(x.to(torch.bfloat16).double())
        assert y.dtype == torch.bfloat16 and relative_error(y, y64) < TOLERANCE[torch.bfloat16]


@pytest.fixture(autouse=True)
def _reset_backend():
    yield
    bayeslayers.set_backend(None)
