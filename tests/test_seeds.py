"""Per-layer seeds: under one global seed, layers of one shape draw different noise, and one (seed, layer id)
always draws the same noise, on every backend (the layer id is mixed into every seed)."""

import pytest
import torch

import bayeslayers
from bayeslayers import BayesLinear
from bayeslayers.kernels import device_layer_seed, mix_seed_tensor
from bayeslayers.rng import mix_seed

BACKENDS = ["reference", "torch", "cpp", "triton"]


def _twins(count):
    """``count`` layers of one shape with identical posteriors (a weight sample differs only by its eps)."""
    layers = [BayesLinear(6, 5, init_sigma=0.5) for _ in range(count)]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    return layers


def _training_sample(layer, global_seed):
    layer.train()
    torch.manual_seed(global_seed)
    return layer.draw_weight(torch.float32).detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_of_one_shape_draw_different_eps_under_one_global_seed(backend):
    bayeslayers.set_backend(backend)
    a, b, same_id_as_a = _twins(3)
    assert a.layer_id != b.layer_id
    same_id_as_a.layer_id = a.layer_id
    w_a, w_b = _training_sample(a, 7), _training_sample(b, 7)
    assert (w_a - w_b).abs().min() > 0, "two layers drew the same noise from one global seed"
    torch.testing.assert_close(_training_sample(same_id_as_a, 7), w_a, rtol=0, atol=0)
    torch.testing.assert_close(_training_sample(a, 7), w_a, rtol=0, atol=0)
    assert not torch.equal(_training_sample(a, 8), w_a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_seeds_depend_on_the_seed_and_the_layer_id(backend):
    bayeslayers.set_backend(backend)
    a, b, same_id_as_a = _twins(3)
    same_id_as_a.layer_id = a.layer_id
    model = torch.nn.ModuleList([a, b, same_id_as_a])
    with bayeslayers.sampling(model, seed=3):
        w = [layer.draw_weight(torch.float32).detach() for layer in (a, b, same_id_as_a)]
        assert a.fixed_seed == mix_seed(3, a.layer_id) != b.fixed_seed == mix_seed(3, b.layer_id)
    assert (w[0] - w[1]).abs().min() > 0
    torch.testing.assert_close(w[2], w[0], rtol=0, atol=0)


def test_the_device_mix_takes_the_layer_id():
    draws = torch.tensor([0, 1, 123456789012345, (1 << 62) - 1], dtype=torch.int64)
    for layer_id in (0, 1, 0xDEADBEEF, torch.tensor([5])):
        want = [mix_seed(int(d), int(layer_id)) for d in draws]
        assert mix_seed_tensor(draws, layer_id).tolist() == want
    assert len({tuple(mix_seed_tensor(draws, layer_id).tolist()) for layer_id in range(8)}) == 8
    seeds = []
    for layer_id in (41, 42, 42):
        torch.manual_seed(5)
        seeds.append(int(device_layer_seed(layer_id, torch.device("cpu"))))
    assert seeds[0] != seeds[1] == seeds[2]
