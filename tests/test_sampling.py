"""sampling(model, seed): per-layer noise, stability across models converted alike, the seeds it restores, and
backward after the block."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mixed_model import (
    SPECS,
    Mixed,
    convert_spec,
    mixed_inputs,
    mixed_outputs,
)
from reference import (
    randomize_bayesian_state,
    relative_error,
    sample_weight,
)

import bayeslayers


# sampling(seed)
def _sample_of(layer, seed):
    return sample_weight(layer.weight_mu, layer.weight_rho, bayeslayers.materialize_eps(seed, layer.weight_mu.shape))


def test_sampling_gives_layers_of_one_shape_different_noise_and_each_the_same_across_calls():
    model = bayeslayers.convert(Mixed(), target_modules=["a", "b", "conv1", "conv2"], init_sigma=0.3)
    with torch.no_grad():  # identical posteriors: any difference comes from the noise
        model.b.weight_mu.copy_(model.a.weight_mu), model.conv2.weight_mu.copy_(model.conv1.weight_mu)
    x, image = mixed_inputs()
    for train in (False, True):
        model.train(train)
        with bayeslayers.sampling(model, seed=11):
            seeds = {name: layer.fixed_seed for name, layer in bayeslayers.posterior_layers(model)}
            first = model.a(x), model.b(x), model.conv1(image), model.conv2(image)
            torch.manual_seed(99)  # the sample does not follow the global generator
            second = model.a(x), model.b(x), model.conv1(image), model.conv2(image)
        for y1, y2 in zip(first, second):
            torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        assert not torch.allclose(first[0], first[1], atol=1e-3) and not torch.allclose(first[2], first[3], atol=1e-3)
        assert len(set(seeds.values())) == 4
        for name, out in zip(["a", "b"], first[:2]):
            layer = model.get_submodule(name)
            expected = F.linear(x.double(), _sample_of(layer, seeds[name]), layer.bias.double())
            assert relative_error(out, expected) < 1e-5
        with bayeslayers.sampling(model, seed=12):
            assert not torch.allclose(model.a(x), first[0], atol=1e-3)


def test_sampling_reaches_lora_factors_and_is_stable_across_models_converted_alike():
    spec = SPECS["lora"]
    one = randomize_bayesian_state(convert_spec(Mixed(), spec), seed=5).eval()
    two = randomize_bayesian_state(convert_spec(Mixed(), spec), seed=5).eval()
    inputs = mixed_inputs()
    mean = mixed_outputs(one, inputs)
    with bayeslayers.sampling(one, seed=21):
        factors = [layer.fixed_seed for _, layer in bayeslayers.posterior_layers(one)]
        sample = mixed_outputs(one, inputs)
    assert None not in factors and len(set(factors)) == len(factors)
    assert not torch.allclose(sample, mean, atol=1e-4)
    with bayeslayers.sampling(two, seed=21):
        torch.testing.assert_close(mixed_outputs(two, inputs), sample, rtol=0, atol=0)


def test_sampling_restores_the_previous_seeds_also_after_an_exception():
    model = bayeslayers.convert(Mixed(), target_modules=["a", "b"], init_sigma=0.3)
    model.b.fixed_seed = 1234  # a seed set by hand before the block
    x = torch.randn(3, 6)
    model.eval()
    mean_a, fixed_b = model.a(x), model.b(x)
    with bayeslayers.sampling(model, seed=1):
        outer_a, outer_b = model.a(x), model.b(x)
        with bayeslayers.sampling(model, seed=2):
            assert not torch.allclose(model.a(x), outer_a)
        torch.testing.assert_close(model.a(x), outer_a, rtol=0, atol=0)
        torch.testing.assert_close(model.b(x), outer_b, rtol=0, atol=0)
    assert model.a.fixed_seed is None and model.b.fixed_seed == 1234
    torch.testing.assert_close(model.a(x), mean_a, rtol=0, atol=0)
    torch.testing.assert_close(model.b(x), fixed_b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inside the block"):
        with bayeslayers.sampling(model, seed=3):
            raise RuntimeError("inside the block")
    assert model.a.fixed_seed is None and model.b.fixed_seed == 1234
    model.train()
    assert not torch.allclose(model.a(x), model.a(x))  # fresh draws again
    with pytest.raises(ValueError, match="sampling: the model has no Bayesian layers"):
        with bayeslayers.sampling(nn.Linear(2, 2), seed=0):
            pass
    with pytest.raises(TypeError, match="seed must be an int, got bool"):
        with bayeslayers.sampling(model, seed=True):
            pass


def test_backward_after_the_sampling_block_uses_the_forward_sample():
    """The seed saved for backward is a copy: leaving (or nesting) sampling() before backward changes nothing."""
    bayeslayers.set_backend("torch")

    def grads(leave_before_backward):
        torch.manual_seed(0)
        model = bayeslayers.convert(Mixed(), target_modules=["a"], init_sigma=0.2)
        with bayeslayers.sampling(model, seed=1):
            with bayeslayers.sampling(model, seed=2):
                y = model.a(torch.randn(3, 6))
                if not leave_before_backward:
                    y.square().sum().backward()
            if leave_before_backward:  # the outer seed is back in the buffer now
                y.square().sum().backward()
        return model.a.weight_mu.grad, model.a.weight_rho.grad

    for inside, outside in zip(grads(False), grads(True)):
        torch.testing.assert_close(outside, inside, rtol=0, atol=0)
