"""torch.compile of converted models: one graph, no recompiles, and the same samples as eager.

Graph breaks and recompiles are read with the ``aot_eager`` backend (dynamo + AOT autograd, no code
generation: fast); the eager-vs-compiled sample test runs Inductor. The triton backend runs interpreted here.
"""

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from reference import BACKENDS, KL_WEIGHT
from tiny_models import tiny_unet, unet_inputs

import bayeslayers

PRESETS = ["dreambooth-bnn", "dreambooth-bnn-lora"]


def _converted_unet(preset):
    unet = tiny_unet()
    bayeslayers.convert(unet, preset=preset, init_sigma=0.05)
    return unet.train()


def _loss(unet, inputs):
    sample, timesteps, text = inputs
    out = unet(sample, timesteps, encoder_hidden_states=text).sample
    return out.square().mean() + KL_WEIGHT * 1e-3 * bayeslayers.kl_loss(unet)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    "backend", [b if b in ("reference", "torch") else pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS]
)
def test_converted_unet_traces_as_one_graph_on_every_backend(backend, preset):
    pytest.importorskip("diffusers")
    bayeslayers.set_backend(backend)
    unet = _converted_unet(preset)
    sample, timesteps, text = unet_inputs()
    explanation = torch._dynamo.explain(unet)(sample, timesteps, encoder_hidden_states=text)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["linear", "conv2d", "lora_linear", "lora_conv2d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layer_type_compiles_with_fullgraph(backend, kind):
    bayeslayers.set_backend(backend)
    linear = kind.endswith("linear")
    plain = nn.Linear(12, 10) if linear else nn.Conv2d(3, 5, 3, padding=1)
    layer = (
        bayeslayers.BayesLinear.from_module(plain)
        if kind == "linear"
        else bayeslayers.BayesConv2d.from_module(plain)
        if kind == "conv2d"
        else bayeslayers.BayesLoRALinear(plain, rank=2)
        if linear
        else bayeslayers.BayesLoRAConv2d(plain, rank=2)
    )
    x = torch.randn(4, 12) if linear else torch.randn(2, 3, 6, 6)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    eager = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(x), eager)


def test_layers_of_one_shape_and_new_steps_do_not_recompile():
    torch._dynamo.reset()
    bayeslayers.set_backend("cpp")
    layers = [bayeslayers.BayesLinear(16, 16) for _ in range(6)]
    x = torch.randn(3, 16)
    compiled = [torch.compile(layer, backend="aot_eager", fullgraph=True) for layer in layers]
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):  # steps
        for layer in compiled:  # several layers of one shape, each its own id
            layer(x).sum().backward()
        with bayeslayers.sampling(nn.ModuleList(layers), seed=_ + 10):  # new fixed seeds
            for layer in compiled:
                layer(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs <= 2, graphs  # the training forward and the fixed-seed forward, shared by all six layers


def _step(model, module, loss_fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2024)  # the one documented way: the default generator decides every layer's seed
    loss = loss_fn(module)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(got, want):
    (loss, grads), (eager_loss, eager_grads) = got, want
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        error = float((grad - eager_grads[name]).norm() / eager_grads[name].norm().clamp_min(1e-30))
        assert error < 1e-4, (name, error)


def test_compiled_unet_draws_the_same_samples_and_gradients_as_eager():
    pytest.importorskip("diffusers")
    bayeslayers.set_backend("cpp")
    unet = _converted_unet("dreambooth-bnn")
    inputs = unet_inputs()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    eager = _step(unet, unet, lambda m: _loss(m, inputs))
    _assert_same_step(_step(unet, compiled, lambda m: _loss(m, inputs)), eager)
    assert not torch.allclose(_loss(compiled, inputs), eager[0])  # the next draw: another sample


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_inductor_keeps_the_eager_draw_order(backend):
    """Inductor may reorder independent operators: the ordered seed draw keeps each layer's sample."""
    bayeslayers.set_backend(backend)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(6)], nn.Linear(16, 4))
    bayeslayers.convert(model, target_modules=r".*\d\.0|6", init_sigma=0.2)
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True)

    def loss_fn(module):
        return module(x).square().sum() + KL_WEIGHT * bayeslayers.kl_loss(model)

    _assert_same_step(_step(model, compiled, loss_fn), _step(model, model, loss_fn))


def test_set_backend_retraces_a_compiled_layer():
    layer = bayeslayers.BayesLinear(12, 10, init_sigma=0.2)
    x = torch.randn(4, 12)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outputs = {}
    for backend in ("torch", "cpp"):  # two noise streams: the outputs tell which backend ran
        bayeslayers.set_backend(backend)
        torch.manual_seed(5)
        eager = layer(x)
        torch.manual_seed(5)
        outputs[backend] = compiled(x)
        torch.testing.assert_close(outputs[backend], eager)
    assert not torch.allclose(outputs["torch"], outputs["cpp"])
