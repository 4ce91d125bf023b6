"""Bytes saved for backward (activations only: parameters and buffers excluded)."""

import torch
import torch.nn as nn

import bayeslayers
from benchmarks.measure import saved_bytes


def _compare(plain, shape_in):
    x = torch.randn(*shape_in, requires_grad=True)
    weight_bytes = plain.weight.numel() * 4
    baseline = saved_bytes(plain, x)
    results = {}
    for backend in ("reference", "torch", "cpp"):
        bayeslayers.set_backend(backend)
        layer = type_for(plain).from_module(plain)
        results[backend] = saved_bytes(layer, x)
    return baseline, results, weight_bytes


def type_for(plain):
    return bayeslayers.BayesLinear if isinstance(plain, nn.Linear) else bayeslayers.BayesConv2d


def test_torch_backend_saves_at_most_one_weight_and_cpp_only_a_seed_beyond_a_plain_layer():
    for plain, shape in ((nn.Linear(320, 320), (64, 320)), (nn.Conv2d(32, 64, 3, padding=1), (2, 32, 16, 16))):
        baseline, results, weight_bytes = _compare(plain, shape)
        assert results["torch"] - baseline <= weight_bytes, (plain, baseline, results)
        assert results["reference"] >= results["torch"] + 2 * weight_bytes, (plain, baseline, results)
        assert results["cpp"] - baseline <= 8, (plain, baseline, results)  # one int64 seed
