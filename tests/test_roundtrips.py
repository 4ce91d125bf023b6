"""Model-level round trips a user relies on: save/load into models whose weights, priors and options differ from
the saved ones, to_deterministic against the Bayesian layer's eval output, sampling(seed) noise per layer and
the state it restores, the KL reductions and cache, and summary values."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import (
    assert_same_tensors,
    bayesian_state,
    kl_reference,
    randomize_bayesian_state,
    randomize_layer,
    relative_error,
    sampled_weight,
)

import bayeslayers

BF16, FP16 = torch.bfloat16, torch.float16


class Mixed(nn.Module):
    """Two Linear and two Conv2d layers of one shape each, a Linear without bias and a layer never converted."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.keep = nn.Linear(3, 3)

    def forward(self, x, image):
        h = self.head(F.gelu(self.b(F.gelu(self.a(x)))))
        return self.keep(h), self.conv2(torch.tanh(self.conv1(image)))


# (targets, options) per convert call; every option away from its default somewhere, alpha != rank.
SPECS = {
    "full": [
        (["a"], dict(prior_dtype=BF16, kl_direction="pq", prior_sigma=0.03)),
        (["b", "head", "conv1"], dict(prior_sigma=0.05)),
        (["conv2"], dict(prior_dtype=FP16, kl_direction="pq", prior_sigma=0.2)),
    ],
    "lora": [
        (["a"], dict(mode="lora", rank=2, lora_alpha=5, bayesian_factors="A", prior_dtype=BF16, kl_direction="pq")),
        (["b"], dict(mode="lora", rank=3, lora_alpha=1.5, bayesian_factors="B", prior_sigma=0.2)),
        (["conv1", "conv2"], dict(mode="lora", rank=2, lora_alpha=3, bayesian_factors="AB", prior_dtype=FP16)),
        (["head"], dict(mode="lora", rank=4, bayesian_factors="")),
    ],
    "mixed": [
        (["a", "conv1"], dict(prior_dtype=BF16, kl_direction="pq")),
        (["b"], dict(mode="lora", rank=2, lora_alpha=7, bayesian_factors="A", prior_sigma=0.3)),
        (["conv2"], dict(mode="lora", rank=3, lora_alpha=2, bayesian_factors="AB", kl_direction="pq")),
    ],
}
OTHER_DTYPE = {
    None: None,
    BF16: None,
    FP16: None,
}  # other stores: test_load_restores_the_saved_prior_whatever_dtype_the_model_stores_it_in


def _other_options(options):
    """Same structure (mode, rank, factors), every other option different."""
    other = dict(
        options,
        prior_sigma=options.get("prior_sigma", 0.01) * 3 + 0.01,
        init_sigma=0.1,
        kl_direction="qp" if options.get("kl_direction") == "pq" else "pq",
        prior_dtype=OTHER_DTYPE[options.get("prior_dtype")],
    )
    if other.get("mode") == "lora":
        other["lora_alpha"] = options.get("lora_alpha", options["rank"]) + 1.25
    return other


def _convert(model, spec, other=False):
    for targets, options in spec:
        bayeslayers.convert(model, target_modules=targets, **(_other_options(options) if other else options))
    return model


def _inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, generator=g), torch.randn(2, 3, 5, 5, generator=g)


def _outputs(model, inputs):
    with torch.no_grad():
        return torch.cat([y.flatten() for y in model(*inputs)])


def _saved_model(spec, tmp_path, seed=1):
    model = randomize_bayesian_state(_convert(Mixed(), spec), seed)
    path = tmp_path / "posterior.safetensors"
    bayeslayers.save(model, path, metadata={"note": "round trip"})
    return model, path


def _assert_same_model(restored, saved):
    """Bayesian tensors, options, eval output, a fixed-seed sample and the KL all equal, bit for bit."""
    (tensors, options), (expected_tensors, expected_options) = bayesian_state(restored), bayesian_state(saved)
    assert_same_tensors(tensors, expected_tensors)
    assert options == expected_options
    for (name, layer), (_, expected) in zip(
        bayeslayers.posterior_layers(restored), bayeslayers.posterior_layers(saved)
    ):
        assert (layer.prior_sigma, layer.kl_direction, layer.layer_id) == (
            expected.prior_sigma,
            expected.kl_direction,
            expected.layer_id,
        ), name
    for (name, module), (_, expected) in zip(
        bayeslayers.bayesian_modules(restored), bayeslayers.bayesian_modules(saved)
    ):
        assert type(module) is type(expected), name
        assert getattr(module, "scaling", None) == getattr(expected, "scaling", None), name
    restored.eval(), saved.eval()
    inputs = _inputs()
    torch.testing.assert_close(_outputs(restored, inputs), _outputs(saved, inputs), rtol=0, atol=0)
    with bayeslayers.sampling(restored, seed=5), bayeslayers.sampling(saved, seed=5):
        torch.testing.assert_close(_outputs(restored, inputs), _outputs(saved, inputs), rtol=0, atol=0)
    torch.testing.assert_close(bayeslayers.kl_loss(restored), bayeslayers.kl_loss(saved), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_load_converts_an_unconverted_model_like_the_saved_one(kind, tmp_path):
    saved, path = _saved_model(SPECS[kind], tmp_path)
    target = Mixed()  # the pretrained model: same base weights, the trained posterior nowhere
    assert bayeslayers.load(target, path) is target
    assert [n for n, _ in bayeslayers.bayesian_modules(target)] == [n for n, _ in bayeslayers.bayesian_modules(saved)]
    _assert_same_model(target, saved)
    assert bayeslayers.read_metadata(path)["note"] == "round trip"
    if kind == "full":  # (each convert call in mode lora freezes the whole model, earlier adapters included)
        grads = {n: p.requires_grad for n, p in target.named_parameters()}
        assert grads == {n: p.requires_grad for n, p in saved.named_parameters()}
        assert grads["keep.weight"] and grads["a.weight_rho"]


def test_load_of_a_lora_checkpoint_into_an_unconverted_model_leaves_every_adapter_trainable(tmp_path):
    saved, path = _saved_model([(["a", "b", "conv1"], dict(mode="lora", rank=2, bayesian_factors="A"))], tmp_path)
    trainable = sorted(n for n, p in saved.named_parameters() if p.requires_grad)
    assert trainable == [
        "a.lora_A.weight_mu",
        "a.lora_A.weight_rho",
        "a.lora_B.weight",
        "b.lora_A.weight_mu",
        "b.lora_A.weight_rho",
        "b.lora_B.weight",
        "conv1.lora_A.weight_mu",
        "conv1.lora_A.weight_rho",
        "conv1.lora_B.weight",
    ]
    target = bayeslayers.load(Mixed(), path)
    assert sorted(n for n, p in target.named_parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_load_into_a_converted_model_replaces_its_weights_priors_and_options(kind, tmp_path):
    saved, path = _saved_model(SPECS[kind], tmp_path)
    target = randomize_bayesian_state(_convert(Mixed(), SPECS[kind], other=True), seed=3)
    target(*_inputs())  # a training forward: the KL of the other weights is cached
    before, _ = bayesian_state(target)
    differing = [k for k, t in bayesian_state(saved)[0].items() if not torch.equal(t.float(), before[k].float())]
    assert len(differing) == len(before)  # every tensor starts from other values
    bayeslayers.load(target, path)
    _assert_same_model(target, saved)


@pytest.mark.parametrize(
    ("mode", "saved_dtype", "model_dtype"),
    [
        ("full", None, BF16),
        ("full", FP16, BF16),
        ("lora", None, BF16),
        ("lora", None, torch.float64),
        ("lora", FP16, BF16),
    ],
)
def test_load_restores_the_saved_prior_whatever_dtype_the_model_stores_it_in(tmp_path, mode, saved_dtype, model_dtype):
    structure = dict(mode="lora", rank=2, bayesian_factors="A") if mode == "lora" else {}
    saved, path = _saved_model([(["a", "conv1"], dict(structure, prior_dtype=saved_dtype))], tmp_path)
    target = _convert(Mixed(), [(["a", "conv1"], dict(structure, prior_dtype=model_dtype))])
    bayeslayers.load(target, path)
    _assert_same_model(target, saved)


def test_load_rejects_a_model_with_other_structure(tmp_path):
    saved, path = _saved_model(SPECS["lora"], tmp_path)
    other_rank = _convert(Mixed(), [(t, dict(o, rank=o["rank"] + 1)) for t, o in SPECS["lora"]])
    with pytest.raises(ValueError, match=r"a\.lora_A\.weight_mu has shape \(3, 6\) in the model but \(2, 6\)"):
        bayeslayers.load(other_rank, path)
    other_factors = _convert(Mixed(), [(t, dict(o, bayesian_factors="AB")) for t, o in SPECS["lora"]])
    with pytest.raises(ValueError, match="load: layer 'a' holds tensors"):
        bayeslayers.load(other_factors, path)
    extra = _convert(Mixed(), SPECS["lora"] + [(["keep"], {})])
    with pytest.raises(ValueError, match="model layer 'keep' is Bayesian but the checkpoint has no such layer"):
        bayeslayers.load(extra, path)
    layer = _convert(Mixed(), SPECS["lora"]).a
    options = dict(layer.options(), rank=5)
    with pytest.raises(ValueError, match="rank is 2 in this layer but 5 in the options"):
        layer.apply_options(options)
    with pytest.raises(ValueError, match="bayesian_factors is 'A' in this layer but 'B'"):
        layer.apply_options(dict(layer.options(), bayesian_factors="B"))


def test_options_record_every_convert_option():
    model = _convert(Mixed(), SPECS["mixed"])
    assert model.a.options() == {
        "prior_sigma": 0.01,
        "kl_direction": "pq",
        "prior_dtype": "bfloat16",
        "store_prior": True,
    }
    assert model.b.options() == {
        "rank": 2,
        "lora_alpha": 7.0,
        "bayesian_factors": "A",
        "prior_sigma": 0.3,
        "kl_direction": "qp",
        "prior_dtype": None,
        "store_prior": True,
    }
    assert model.conv2.options()["lora_alpha"] == 2.0 and model.conv2.scaling == pytest.approx(2 / 3)
    plain = bayeslayers.convert(
        Mixed(), target_modules=["a"], mode="lora", bayesian_factors="", prior_sigma=0.4, kl_direction="pq"
    )
    assert plain.a.options() == {
        "rank": 4,
        "lora_alpha": 4.0,
        "bayesian_factors": "",
        "prior_sigma": 0.01,
        "kl_direction": "qp",
        "prior_dtype": None,
        "store_prior": True,
    }
    assert bayeslayers.convert(Mixed(), target_modules=["a"], prior_dtype=FP16).a.options()["prior_dtype"] == "float16"


def test_convert_gives_every_layer_type_each_posterior_option():
    options = dict(init_sigma=0.07, prior_sigma=0.3, kl_direction="pq", prior_dtype=BF16)
    full = bayeslayers.convert(Mixed(), target_modules=["a", "conv1"], **options)
    lora = bayeslayers.convert(Mixed(), target_modules=["b", "conv2"], mode="lora", rank=2, **options)
    factors = [lora.b.lora_A, lora.b.lora_B, lora.conv2.lora_A, lora.conv2.lora_B]
    for layer in [full.a, full.conv1, *factors]:
        torch.testing.assert_close(layer.weight_sigma, torch.full_like(layer.weight_sigma, 0.07))
        assert (layer.prior_sigma, layer.kl_direction) == (0.3, "pq")
    pretrained = Mixed()
    for layer, weight in ((full.a, pretrained.a.weight), (full.conv1, pretrained.conv1.weight)):
        assert layer.prior_mu.dtype == BF16
        torch.testing.assert_close(layer.prior_mu, weight.detach().to(BF16), rtol=0, atol=0)
    assert lora.b.lora_A.prior_mu.dtype == lora.conv2.lora_A.prior_mu.dtype == BF16
    assert lora.b.lora_B.prior_mu is None and lora.conv2.lora_B.prior_mu is None


# to_deterministic: every layer type, non-default options, against the Bayesian layer in eval mode.
def _deterministic_cases():
    linear64 = nn.Linear(7, 5).double()
    return {
        "linear-no-bias-bf16-prior": (
            lambda: bayeslayers.BayesLinear.from_module(
                nn.Linear(7, 5, bias=False), prior_dtype=BF16, kl_direction="pq"
            ),
            (3, 7),
        ),
        "linear-float64": (lambda: bayeslayers.BayesLinear.from_module(linear64, prior_sigma=0.2), (3, 7)),
        "conv-strided-dilated-grouped-reflect": (
            lambda: bayeslayers.BayesConv2d.from_module(
                nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"), prior_dtype=FP16
            ),
            (2, 4, 9, 8),
        ),
        "conv-same-circular": (
            lambda: bayeslayers.BayesConv2d.from_module(
                nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="circular", bias=False)
            ),
            (2, 3, 6, 7),
        ),
        "lora-linear-A": (
            lambda: bayeslayers.BayesLoRALinear(
                nn.Linear(7, 5), rank=3, lora_alpha=7, bayesian_factors="A", prior_dtype=BF16
            ),
            (3, 7),
        ),
        "lora-linear-B": (
            lambda: bayeslayers.BayesLoRALinear(
                nn.Linear(7, 5, bias=False), rank=2, lora_alpha=0.5, bayesian_factors="B"
            ),
            (3, 7),
        ),
        "lora-linear-plain": (
            lambda: bayeslayers.BayesLoRALinear(nn.Linear(7, 5), rank=4, lora_alpha=2, bayesian_factors=""),
            (2, 3, 7),
        ),
        "lora-conv-AB": (
            lambda: bayeslayers.BayesLoRAConv2d(
                nn.Conv2d(4, 6, 3, stride=2, padding=1), rank=2, lora_alpha=5, kl_direction="pq"
            ),
            (2, 4, 7, 6),
        ),
        "conv-same-even-kernel": (
            lambda: bayeslayers.BayesConv2d.from_module(nn.Conv2d(3, 4, (3, 4), padding="same")),
            (2, 3, 6, 7),
        ),
        "lora-conv-dilated-positional": (
            lambda: bayeslayers.BayesLoRAConv2d(nn.Conv2d(3, 4, 3, padding=2, dilation=2), 2, 3, "A"),
            (1, 3, 7, 6),
        ),
        "lora-conv-B": (
            lambda: bayeslayers.BayesLoRAConv2d(nn.Conv2d(3, 5, 3, padding=1), rank=2, bayesian_factors="B"),
            (1, 3, 6, 6),
        ),
        "lora-conv-A-reflect": (
            lambda: bayeslayers.BayesLoRAConv2d(
                nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), rank=3, lora_alpha=1, bayesian_factors="A"
            ),
            (1, 3, 6, 6),
        ),
    }


@pytest.mark.parametrize("case", sorted(_deterministic_cases()))
def test_to_deterministic_matches_the_eval_output_of_every_layer_type(case):
    make, shape = _deterministic_cases()[case]
    layer = randomize_bayesian_state(make(), seed=4)
    base = getattr(layer, "base_layer", None)
    dtype = torch.float64 if case == "linear-float64" else torch.float32
    x = torch.randn(shape, dtype=dtype)
    before = None if base is None else base(x).detach()
    layer.eval()
    expected = layer(x).detach()
    if hasattr(layer, "bias") and layer.bias is not None:
        layer.bias.requires_grad_(False)
    plain = bayeslayers.to_deterministic(nn.Sequential(layer))[0]
    assert type(plain) in (nn.Linear, nn.Conv2d)
    assert plain.weight.dtype == dtype
    if isinstance(plain, nn.Conv2d):
        source = base if base is not None else layer
        assert (plain.stride, plain.padding, plain.dilation, plain.groups, plain.padding_mode) == (
            source.stride,
            source.padding,
            source.dilation,
            source.groups,
            source.padding_mode,
        )
    if base is None:
        assert (plain.bias is None) == (layer.bias is None)
        if plain.bias is not None:
            assert not plain.bias.requires_grad
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
        assert relative_error(expected, before) > 1e-3  # the adapter changed the output: it was merged


def test_to_deterministic_of_a_model_leaves_only_stock_modules():
    model = randomize_bayesian_state(_convert(Mixed(), SPECS["mixed"]), seed=2).eval()
    inputs = _inputs()
    expected = _outputs(model, inputs)
    assert bayeslayers.to_deterministic(model) is model
    assert not bayeslayers.bayesian_modules(model)
    assert all(type(m).__module__.startswith("torch") for m in model.modules() if m is not model)
    torch.testing.assert_close(_outputs(model, inputs), expected, rtol=1e-5, atol=1e-6)


# sampling(seed)
def _sample_of(layer, seed):
    return sampled_weight(layer.weight_mu, layer.weight_rho, bayeslayers.materialize_eps(seed, layer.weight_mu.shape))


def test_sampling_gives_layers_of_one_shape_different_noise_and_each_the_same_across_calls():
    model = bayeslayers.convert(Mixed(), target_modules=["a", "b", "conv1", "conv2"], init_sigma=0.3)
    with torch.no_grad():  # identical posteriors: any difference comes from the noise
        model.b.weight_mu.copy_(model.a.weight_mu), model.conv2.weight_mu.copy_(model.conv1.weight_mu)
    x, image = _inputs()
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
    one = randomize_bayesian_state(_convert(Mixed(), spec), seed=5).eval()
    two = randomize_bayesian_state(_convert(Mixed(), spec), seed=5).eval()
    inputs = _inputs()
    mean = _outputs(one, inputs)
    with bayeslayers.sampling(one, seed=21):
        factors = [layer.fixed_seed for _, layer in bayeslayers.posterior_layers(one)]
        sample = _outputs(one, inputs)
    assert None not in factors and len(set(factors)) == len(factors)
    assert not torch.allclose(sample, mean, atol=1e-4)
    with bayeslayers.sampling(two, seed=21):
        torch.testing.assert_close(_outputs(two, inputs), sample, rtol=0, atol=0)


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


# kl_loss
def _kl64(model):
    return sum(
        kl_reference(layer.weight_mu, layer.weight_rho, layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        for _, layer in bayeslayers.posterior_layers(model)
    )


def test_kl_loss_sums_and_averages_over_every_posterior_with_its_own_options():
    model = randomize_bayesian_state(_convert(Mixed(), SPECS["mixed"]), seed=6, rho_range=(-5.0, -3.0))
    total = bayeslayers.kl_loss(model)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert relative_error(total, _kl64(model)) < 1e-5
    numel = sum(layer.weight_mu.numel() for _, layer in bayeslayers.posterior_layers(model))
    assert numel == 36 + 2 * 6 + 81 + 3 * 27 + 3 * 3  # a, b.lora_A, conv1, conv2.lora_A, conv2.lora_B
    mean = bayeslayers.kl_loss(model, reduction="mean")
    assert relative_error(mean, _kl64(model) / numel) < 1e-5
    for name, layer in bayeslayers.posterior_layers(model):
        assert (
            relative_error(
                layer.kl(),
                kl_reference(layer.weight_mu, layer.weight_rho, layer.prior_mu, layer.prior_sigma, layer.kl_direction),
            )
            < 1e-5
        ), name


def test_kl_loss_reuses_the_fused_value_only_while_it_is_valid():
    model = randomize_bayesian_state(_convert(Mixed(), SPECS["mixed"]), seed=8, rho_range=(-5.0, -3.0))
    model.requires_grad_(True)
    layers = [layer for _, layer in bayeslayers.posterior_layers(model)]
    with torch.no_grad():
        model(*_inputs())  # train mode, no grad: a cached KL without a graph
    kl = bayeslayers.kl_loss(model)
    assert kl.requires_grad  # recomputed: the cached value cannot carry gradients
    kl.backward()
    grads = [(layer.weight_mu.grad.clone(), layer.weight_rho.grad.clone()) for layer in layers]
    mu64 = [layer.weight_mu.detach().double().requires_grad_(True) for layer in layers]
    rho64 = [layer.weight_rho.detach().double().requires_grad_(True) for layer in layers]
    sum(
        kl_reference(m, r, layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        for m, r, layer in zip(mu64, rho64, layers)
    ).backward()
    for (g_mu, g_rho), m, r in zip(grads, mu64, rho64):
        assert relative_error(g_mu, m.grad) < 1e-5 and relative_error(g_rho, r.grad) < 1e-5
    model.zero_grad()

    model(*_inputs())  # with grad: the fused KL is reused, gradients included
    fused = bayeslayers.kl_loss(model)
    assert all(layer._kl_cache is not None for layer in layers)
    assert relative_error(fused, _kl64(model)) < 1e-5
    with torch.no_grad():
        assert not bayeslayers.kl_loss(model).requires_grad
    fused.backward()
    for (g_mu, g_rho), layer in zip(grads, layers):
        assert relative_error(layer.weight_mu.grad, g_mu) < 1e-4 and relative_error(layer.weight_rho.grad, g_rho) < 1e-4

    for change in ("weight_mu", "weight_rho", "prior_mu"):  # any in-place change makes the cached value stale
        model(*_inputs())
        with torch.no_grad():
            getattr(model.a, change).add_(0.5)
        assert relative_error(bayeslayers.kl_loss(model), _kl64(model)) < 1e-5, change
    model(*_inputs())
    model.a.apply_options({"prior_sigma": 0.5, "kl_direction": "qp", "prior_dtype": "bfloat16"})
    assert model.a.prior_sigma == 0.5 and model.a.kl_direction == "qp"
    assert relative_error(bayeslayers.kl_loss(model), _kl64(model)) < 1e-5

    # while valid, the fused pass's value itself comes back (no second pass over the weights), with or without
    # grad, and also when only sigma is trained
    model(*_inputs())
    assert all(layer.kl() is layer._kl_cache[0] for layer in layers)
    with torch.no_grad():
        model(*_inputs())
        assert all(layer.kl() is layer._kl_cache[0] for layer in layers)
    model.a.weight_mu.requires_grad_(False)
    model(*_inputs())
    assert model.a.kl() is model.a._kl_cache[0] and model.a.kl().requires_grad


def test_kl_loss_check_finite_can_be_turned_off():
    model = bayeslayers.convert(Mixed(), target_modules=["a"])
    with torch.no_grad():
        model.a.weight_mu[0, 0] = float("nan")
    assert torch.isnan(bayeslayers.kl_loss(model, check_finite=False))
    with pytest.raises(ValueError, match="weight_mu of layer 'a' holds NaN"):
        bayeslayers.kl_loss(model)
    model = bayeslayers.convert(Mixed(), target_modules=["a"])
    model.a.prior_sigma = 1e-300  # finite posterior, KL overflows
    with pytest.raises(
        ValueError, match="^kl_loss is not finite although every posterior is: check prior_sigma and prior_mu$"
    ):
        bayeslayers.kl_loss(model)


# diagnostics.summary
def test_summary_values_per_posterior_including_lora_factors():
    model = randomize_bayesian_state(_convert(Mixed(), SPECS["mixed"]), seed=9)
    rows = bayeslayers.summary(model)
    layers = bayeslayers.posterior_layers(model)
    assert (
        [r.name for r in rows] == [n for n, _ in layers] == ["a", "b.lora_A", "conv1", "conv2.lora_A", "conv2.lora_B"]
    )
    for row, (_, layer) in zip(rows, layers):
        mu, sigma = layer.weight_mu.detach().double(), F.softplus(layer.weight_rho.detach().double())
        assert row.shape == tuple(mu.shape) and row.numel == mu.numel()
        assert row.mean_sigma == pytest.approx(float(sigma.mean()), rel=1e-5)
        kl = kl_reference(mu, layer.weight_rho.detach(), layer.prior_mu, layer.prior_sigma, layer.kl_direction)
        assert row.kl == pytest.approx(float(kl), rel=1e-5)
        assert row.snr == pytest.approx(float((mu.abs() / sigma).mean()), rel=1e-5)
    assert not any(layer.weight_mu.grad is not None for _, layer in layers)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        bayeslayers.summary(model)
    assert packed == []  # statistics only: no autograd graph is built
    assert rows.as_dicts()[2] == {
        "name": "conv1",
        "shape": (3, 3, 3, 3),
        "numel": 81,
        "mean_sigma": rows[2].mean_sigma,
        "kl": rows[2].kl,
        "snr": rows[2].snr,
    }
    text = str(rows).splitlines()
    assert text[0].split() == ["layer", "shape", "params", "mean", "sigma", "KL", "|mu|/sigma"]
    assert len(text) == 2 + len(rows) + 1 and set(text[1]) == {"-"}
    assert len({len(line) for line in text[:-1]}) == 1  # header, rule and rows: one column layout
    assert " (3, 3, 3, 3) " in text[4] and " (6, 6) " in text[2]
    assert text[2].split()[0] == "a" and text[2].split()[-4] == "36"
    assert f"{rows[0].mean_sigma:.3e}" in text[2] and f"{rows[0].kl:.4e}" in text[2] and f"{rows[0].snr:.3f}" in text[2]
    total_kl = sum(r.kl for r in rows)
    assert text[-1] == f"5 Bayesian layers, {sum(r.numel for r in rows)} Bayesian weights, total KL {total_kl:.4e}"


class _Square(nn.Module):
    def forward(self, x):
        return x * x  # autograd saves x twice: one storage


def test_saved_tensor_bytes_counts_each_storage_once_and_nothing_else():
    x = torch.randn(5, 4, requires_grad=True)
    assert bayeslayers.saved_tensor_bytes(_Square(), x) == 5 * 4 * 4
    assert bayeslayers.saved_tensor_bytes(nn.Linear(4, 3), x) == 5 * 4 * 4  # x; the weight is the module's own
    assert bayeslayers.saved_tensor_bytes(nn.Linear(4, 3).requires_grad_(False), x.detach()) == 0


def test_layers_built_directly_validate_and_keep_their_options():
    layer = bayeslayers.BayesLinear(
        4, 3, init_sigma=0.2, prior_sigma=0.4, kl_direction="pq", prior_mean=torch.ones(3, 4), prior_dtype=FP16
    )
    torch.testing.assert_close(layer.weight_sigma, torch.full((3, 4), 0.2))
    assert layer.weight is layer.weight_mu  # code reading .weight sees the posterior mean
    assert layer.prior_mu.dtype == FP16 and bool((layer.prior_mu == 1).all())
    assert layer.options() == {"prior_sigma": 0.4, "kl_direction": "pq", "prior_dtype": "float16", "store_prior": True}
    assert "prior_mean=pretrained, prior_sigma=0.4, kl_direction='pq'" in repr(layer)
    assert "prior_mean=zero" in repr(bayeslayers.BayesConv2d(2, 2, 1))
    with pytest.raises(ValueError, match="in_channels=3 and out_channels=4 must be divisible by groups=2"):
        bayeslayers.BayesConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be"):
        bayeslayers.BayesConv2d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        bayeslayers.BayesConv2d(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        bayeslayers.BayesConv2d(2, 2, 3, padding="full")
    with pytest.raises(ValueError, match="BayesLoRAConv2d needs a base conv with groups=1"):
        bayeslayers.BayesLoRAConv2d(nn.Conv2d(2, 2, 3, groups=2))
    positional = bayeslayers.BayesLoRAConv2d(nn.Conv2d(2, 2, 3), 2, 3, "A", 0.2, 0.4, "pq", BF16)
    assert positional.options() == {
        "rank": 2,
        "lora_alpha": 3.0,
        "bayesian_factors": "A",
        "prior_sigma": 0.4,
        "kl_direction": "pq",
        "prior_dtype": "bfloat16",
        "store_prior": True,
    }
    torch.testing.assert_close(positional.lora_A.weight_sigma, torch.full_like(positional.lora_A.weight_sigma, 0.2))
    assert not any(name.endswith("bias") for name, _ in positional.named_parameters() if "lora" in name)
    for plain_lora in (  # plain factors are bias-free too: the adapter trains exactly A and B
        bayeslayers.BayesLoRAConv2d(nn.Conv2d(2, 3, 3), bayesian_factors=""),
        bayeslayers.BayesLoRALinear(nn.Linear(2, 3), bayesian_factors=""),
    ):
        trainable = sorted(name for name, p in plain_lora.named_parameters() if p.requires_grad)
        assert trainable == ["lora_A.weight", "lora_B.weight"]
    with pytest.raises(TypeError, match="fixed_seed must be an int or None, got float"):
        layer.fixed_seed = 1.5
    layer.fixed_seed = (1 << 64) - 3  # seeds are 64-bit: stored wrapped, read back unsigned
    assert layer.fixed_seed == (1 << 64) - 3
    with pytest.raises(ValueError, match="weight_rho of layer 'x' holds NaN or Inf"):
        with torch.no_grad():
            layer.weight_rho[0, 0] = float("inf")
        layer.check_finite("x")
    randomize_layer(layer)
    layer.check_finite()


# export (integrations/dreambooth/export.py) -> stock diffusers -> the Bayesian model's mean outputs
@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("export") / "pipe")


def _pipeline(path, **components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, **components)


def _unet_and_text_outputs(unet, text_encoder):
    from tiny_models import unet_inputs

    sample, timesteps, text = unet_inputs()
    ids = torch.tensor([[49, 3, 7, 11, 50, 50], [49, 20, 2, 50, 50, 50]])
    with torch.no_grad():
        return unet(sample, timesteps, encoder_hidden_states=text).sample, text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_loads_in_stock_diffusers_with_the_mean_outputs(tiny_pipeline, tmp_path, mode):
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from bayeslayers.integrations.dreambooth.export import BAYESIAN_STATE, TEXT_ENCODER_BAYESIAN_STATE, export_model

    pipe = _pipeline(tiny_pipeline)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    if mode == "full":
        bayeslayers.convert(unet, preset="dreambooth-bnn", prior_dtype=BF16)
        bayeslayers.convert(text_encoder, preset="clip-text-bnn", kl_direction="pq")
        with torch.no_grad():  # a trained non-Bayesian layer goes along in the exported UNet
            unet.conv_in.bias.add_(0.3)
    else:  # alpha != rank: the exported B carries the scaling
        bayeslayers.convert(unet, preset="dreambooth-bnn-lora", rank=2, lora_alpha=5, bayesian_factors="AB")
        bayeslayers.convert(
            text_encoder,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            mode="lora",
            rank=3,
            lora_alpha=1.5,
            bayesian_factors="B",
        )
    for model in (unet, text_encoder):
        randomize_bayesian_state(model, seed=12, rho_range=(-6.0, -5.0)).eval()
    expected_unet, expected_text = _unet_and_text_outputs(unet, text_encoder)
    base_unet, base_text = _unet_and_text_outputs(*(lambda p: (p.unet, p.text_encoder))(_pipeline(tiny_pipeline)))
    assert relative_error(expected_unet, base_unet) > 1e-2 and relative_error(expected_text, base_text) > 1e-2

    args = SimpleNamespace(output_dir=str(tmp_path), bayesian=True, train_mode=mode, skip_save_text_encoder=False)
    written = export_model(unet, args, text_encoder)
    assert written["bayesian_state"] == str(tmp_path / BAYESIAN_STATE)
    assert written["text_encoder_bayesian_state"] == str(tmp_path / TEXT_ENCODER_BAYESIAN_STATE)
    for key in ("bayesian_state", "text_encoder_bayesian_state"):
        assert bayeslayers.read_metadata(written[key])["train_mode"] == mode
    if mode == "full":
        assert sorted(written) == ["bayesian_state", "text_encoder", "text_encoder_bayesian_state", "unet"]
        for folder in ("unet", "text_encoder"):  # checkpoints are safetensors
            assert [p.suffix for p in (tmp_path / folder).iterdir() if p.suffix != ".json"] == [".safetensors"]
        stock = _pipeline(
            tiny_pipeline,
            unet=UNet2DConditionModel.from_pretrained(written["unet"]),
            text_encoder=CLIPTextModel.from_pretrained(written["text_encoder"]),
        )
    else:
        assert sorted(written) == ["bayesian_state", "lora_weights", "text_encoder_bayesian_state"]
        assert written["lora_weights"] == str(tmp_path / "pytorch_lora_weights.safetensors")
        stock = _pipeline(tiny_pipeline)
        stock.load_lora_weights(str(tmp_path))
    assert not bayeslayers.posterior_layers(stock.unet) and not bayeslayers.posterior_layers(stock.text_encoder)
    stock_unet, stock_text = _unet_and_text_outputs(stock.unet, stock.text_encoder)
    torch.testing.assert_close(stock_unet, expected_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stock_text, expected_text, rtol=1e-4, atol=1e-5)

    # the posterior goes along: loaded into the pretrained model it gives the same mean model again
    again = _pipeline(tiny_pipeline)
    bayeslayers.load(again.unet, written["bayesian_state"])
    bayeslayers.load(again.text_encoder, written["text_encoder_bayesian_state"])
    if mode == "full":
        with torch.no_grad():
            again.unet.conv_in.bias.add_(0.3)
    again_unet, again_text = _unet_and_text_outputs(again.unet.eval(), again.text_encoder.eval())
    torch.testing.assert_close(again_unet, expected_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again_text, expected_text, rtol=1e-5, atol=1e-6)


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


def test_new_layers_start_like_the_plain_layers_they_replace():
    torch.manual_seed(0)
    for layer, fan_in in ((bayeslayers.BayesLinear(300, 200), 300), (bayeslayers.BayesConv2d(30, 200, 3), 270)):
        bound = 1 / fan_in**0.5  # nn.Linear / nn.Conv2d: kaiming_uniform(a=sqrt(5)) and the same bias bound
        for tensor in (layer.weight_mu, layer.bias):
            assert 0.98 * bound < float(tensor.detach().abs().max()) <= bound
    lora = bayeslayers.BayesLoRALinear(nn.Linear(300, 20), rank=64, bayesian_factors="AB", prior_sigma=0.2)
    assert 0.98 / 300**0.5 < float(lora.lora_A.weight_mu.detach().abs().max()) <= 1 / 300**0.5
    torch.testing.assert_close(lora.lora_A.prior_mu, lora.lora_A.weight_mu, rtol=0, atol=0)  # prior at A's start
    assert lora.lora_B.prior_mu is None and not bool(lora.lora_B.weight_mu.any())
    assert lora.lora_alpha == 64.0 and lora.scaling == 1.0
    assert not any(p.requires_grad for p in lora.base_layer.parameters())
    frozen_bias = nn.Linear(4, 3)
    frozen_bias.bias.requires_grad_(False)
    converted = bayeslayers.BayesLinear.from_module(frozen_bias)
    assert not converted.bias.requires_grad and converted.weight_mu.requires_grad
    assert not bayeslayers.BayesConv2d.from_module(nn.Conv2d(2, 2, 1, bias=False)).bias
    one_d = bayeslayers.BayesLinear(4, 3).eval()
    x = torch.randn(4)
    torch.testing.assert_close(one_d(x), F.linear(x, one_d.weight_mu, one_d.bias))
    conv = bayeslayers.BayesConv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2, bias=False)
    assert repr(conv).startswith(
        "BayesConv2d(2, 4, kernel_size=(3, 3), stride=(2, 2), padding=1, dilation=(2, 2), "
        "groups=2, padding_mode=zeros, bias=False, prior_mean=zero, prior_sigma=0.01"
    )
    assert "in_features=4, out_features=3, bias=True, prior_mean=zero" in repr(one_d)
    assert "rank=64, lora_alpha=64.0, bayesian_factors='AB'" in repr(lora)


def test_save_names_the_layer_at_fault_and_needs_a_bayesian_layer(tmp_path):
    with pytest.raises(ValueError, match="^save: the model has no Bayesian layers; call bayeslayers.convert first$"):
        bayeslayers.save(Mixed(), tmp_path / "x.safetensors")
    model = _convert(Mixed(), SPECS["lora"])
    with torch.no_grad():
        model.b.lora_B.weight_mu[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_mu of layer 'b.lora_B' holds NaN"):
        bayeslayers.save(model, tmp_path / "x.safetensors")
    with pytest.raises(OSError, match=r"save: could not write .*missing/x\.safetensors.*; nothing was written"):
        bayeslayers.save(_convert(Mixed(), SPECS["full"]), tmp_path / "missing" / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "a_folder").mkdir()  # written, then not renamed into place: the temporary file goes
    with pytest.raises(OSError, match=r"save: could not write .*a_folder.*; the existing file there is unchanged$"):
        bayeslayers.save(_convert(Mixed(), SPECS["full"]), tmp_path / "a_folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"] and not any((tmp_path / "a_folder").iterdir())


def test_read_metadata_refuses_other_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is not a bayeslayers checkpoint \(format 'pt', expected 'bayeslayers/1'\)"):
        bayeslayers.load(Mixed(), tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match=r"\(format None, expected"):
        bayeslayers.read_metadata(tmp_path / "bare.safetensors")
    _, path = _saved_model(SPECS["mixed"], tmp_path)
    header = bayeslayers.read_metadata(path)
    assert header["format"] == "bayeslayers/1" and list(header["layers"]) == ["a", "b", "conv1", "conv2"]
    assert header["layers"]["b"] == {"type": "lora_linear", "options": _convert(Mixed(), SPECS["mixed"]).b.options()}
    assert header["layers"]["conv1"]["type"] == "conv2d"


def test_convert_checks_its_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        bayeslayers.convert({"a": 1}, target_modules=["a"])
    with pytest.raises(ValueError, match="convert needs target_modules or a preset"):
        bayeslayers.convert(Mixed())
    with pytest.raises(TypeError, match="config must be a bayeslayers.BayesConfig, got dict"):
        bayeslayers.convert(Mixed(), config={"target_modules": ["a"]})
    many = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(ValueError, match=r"candidates include: '0', '1', '2', '3', '4', '5', '6', '7'$"):
        bayeslayers.convert(many, target_modules=["x"])
    with pytest.raises(ValueError, match=r"matched no convertible module \(Linear/Conv2d\) in mode 'full'"):
        bayeslayers.convert(many, target_modules=["x"])
    model = bayeslayers.convert(
        Mixed(),
        target_modules=["a"],
        exclude_modules=["b"],
        config=bayeslayers.BayesConfig(target_modules=["b"], prior_sigma=0.3),
    )
    assert [n for n, _ in bayeslayers.bayesian_modules(model)] == ["a"] and model.a.prior_sigma == 0.3
    layer = bayeslayers.BayesLinear.from_module(nn.Linear(3, 2))
    plain = bayeslayers.to_deterministic(layer)
    assert type(plain) is nn.Linear and torch.equal(plain.weight, layer.weight_mu)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_writes_what_the_run_trained(tiny_pipeline, tmp_path, mode):
    """A deterministic run exports no posterior; a plain text-encoder LoRA exports no text-encoder posterior."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from bayeslayers.integrations.dreambooth.export import export_model, lora_layers_state

    pipe = _pipeline(tiny_pipeline)
    if mode == "full":
        args = SimpleNamespace(output_dir=str(tmp_path), bayesian=False, train_mode="full", skip_save_text_encoder=True)
        assert sorted(export_model(pipe.unet, args, pipe.text_encoder)) == ["unet"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
        return
    bayeslayers.convert(pipe.unet, preset="dreambooth-bnn-lora", rank=2, lora_alpha=3)
    bayeslayers.convert(pipe.text_encoder, target_modules=["q_proj"], mode="lora", rank=2, bayesian_factors="")
    randomize_bayesian_state(pipe.unet, seed=1), randomize_bayesian_state(pipe.text_encoder, seed=2)
    args = SimpleNamespace(output_dir=str(tmp_path), bayesian=True, train_mode="lora", skip_save_text_encoder=False)
    assert sorted(export_model(pipe.unet, args, pipe.text_encoder)) == ["bayesian_state", "lora_weights"]
    weights = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    state = lora_layers_state(pipe.unet)
    name, module = bayeslayers.bayesian_modules(pipe.unet)[0]
    torch.testing.assert_close(state[f"{name}.lora_A.weight"], module.lora_A.weight)
    torch.testing.assert_close(state[f"{name}.lora_B.weight"], module.lora_B.weight_mu * 1.5)
    text_layers = len(bayeslayers.bayesian_modules(pipe.text_encoder))
    assert sum(k.startswith("text_encoder.") for k in weights) == 2 * text_layers
    assert len(weights) == len(state) + 2 * text_layers
    assert lora_layers_state(bayeslayers.convert(Mixed(), target_modules=["a"])) == {}  # no LoRA layers, no keys
    mixed = lora_layers_state(_convert(Mixed(), SPECS["mixed"]))  # a full layer first, then LoRA layers
    assert sorted(mixed) == ["b.lora_A.weight", "b.lora_B.weight", "conv2.lora_A.weight", "conv2.lora_B.weight"]
    unet_only = tmp_path / "unet-only"
    unet_only.mkdir()
    args = SimpleNamespace(output_dir=str(unet_only), bayesian=True, train_mode="lora", skip_save_text_encoder=False)
    assert sorted(export_model(pipe.unet, args)) == ["bayesian_state", "lora_weights"]
    unet_keys = load_file(str(unet_only / "pytorch_lora_weights.safetensors"))
    assert unet_keys and not any(k.startswith("text_encoder.") for k in unet_keys)
