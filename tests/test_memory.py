"""Bytes saved for backward (activations only: parameters and buffers excluded)."""

import torch
import torch.nn as nn

import bayeslayers


def saved_activation_bytes(module: nn.Module, *inputs) -> int:
    model_storage = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in model_storage and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs)
        if isinstance(module, bayeslayers.BayesianLayer):
            out = out.sum() + module.kl()
    return total


def _compare(plain, shape_in):
    x = torch.randn(*shape_in, requires_grad=True)
    weight_bytes = plain.weight.numel() * 4
    baseline = saved_activation_bytes(plain, x)
    results = {}
    for backend in ("reference", "torch"):
        bayeslayers.set_backend(backend)
        layer = type_for(plain).from_module(plain)
        results[backend] = saved_activation_bytes(layer, x)
    return baseline, results, weight_bytes


def type_for(plain):
    return bayeslayers.BayesLinear if isinstance(plain, nn.Linear) else bayeslayers.BayesConv2d


def test_torch_backend_saves_at_most_one_weight_beyond_a_plain_layer():
    for plain, shape in ((nn.Linear(320, 320), (64, 320)), (nn.Conv2d(32, 64, 3, padding=1), (2, 32, 16, 16))):
        baseline, results, weight_bytes = _compare(plain, shape)
        assert results["torch"] - baseline <= weight_bytes, (plain, baseline, results)
        assert results["reference"] >= results["torch"] + 2 * weight_bytes, (plain, baseline, results)
