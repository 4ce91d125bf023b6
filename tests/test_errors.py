"""Bad input gets an error naming the argument and what was expected."""

import pytest
import torch

import bayeslayers


def test_wrong_input_shape_and_dtype():
    linear = bayeslayers.BayesLinear(8, 4)
    with pytest.raises(ValueError, match=r"last dimension in_features=8, got shape \(2, 7\)"):
        linear(torch.randn(2, 7))
    with pytest.raises(TypeError, match="^BayesLinear: input x must be a floating-point tensor, got torch.int64"):
        linear(torch.ones(2, 8, dtype=torch.long))
    conv = bayeslayers.BayesConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"C=in_channels=3, got shape \(1, 2, 8, 8\)"):
        conv(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"got shape \(8, 8\)"):
        conv(torch.randn(8, 8))


def test_unknown_backend_and_unavailable_triton(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        bayeslayers.set_backend("cuda-magic")
    monkeypatch.setenv("BAYESLAYERS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"\$BAYESLAYERS_BACKEND must be one of"):
        bayeslayers.BayesLinear(4, 4)(torch.randn(1, 4))
    monkeypatch.setenv("BAYESLAYERS_BACKEND", "torch")
    assert bayeslayers.get_backend() == "torch"


def test_auto_backend_picks_cpp_on_cpu_and_falls_back_to_torch_with_one_warning(monkeypatch):
    import warnings

    import bayeslayers.backends as backends
    from bayeslayers.kernels import cpu

    bayeslayers.set_backend("auto")
    assert backends.resolve_backend(torch.device("cpu")).name == "cpp"
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "no C++ compiler")
    monkeypatch.setattr(backends, "_warned", set())
    assert backends.resolve_backend(torch.device("cpu")).name == "cpp"  # resolved once, then cached
    bayeslayers.set_backend("auto")  # a new selection resolves again
    with pytest.warns(UserWarning, match="using the 'torch' backend on cpu: no C\\+\\+ compiler"):
        assert backends.resolve_backend(torch.device("cpu")).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bayeslayers.set_backend("auto")
        assert backends.resolve_backend(torch.device("cpu")).name == "torch"  # warned once
    bayeslayers.set_backend("cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run on device cpu: no C\\+\\+ compiler"):
        backends.resolve_backend(torch.device("cpu"))


def test_non_finite_rho_is_reported_by_kl_loss_with_the_layer_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    bayeslayers.convert(model, target_modules=["0", "1"])
    with torch.no_grad():
        model[1].weight_rho[0, 1] = float("inf")
    with pytest.raises(ValueError, match="weight_rho of layer '1' holds NaN or Inf"):
        bayeslayers.kl_loss(model)


def test_bad_reduction_and_models_without_bayesian_layers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="^kl_loss: the model has no Bayesian layers; call bayeslayers.convert first$"):
        bayeslayers.kl_loss(model)
    bayeslayers.convert(model, target_modules=["0"])
    with pytest.raises(ValueError, match="reduction must be one of"):
        bayeslayers.kl_loss(model, reduction="max")
    with pytest.raises(TypeError, match="seed must be an int"):
        with bayeslayers.sampling(model, seed="1"):
            pass


def test_prior_options_are_checked():
    with pytest.raises(ValueError, match=r"prior_mean must have the weight's shape \(4, 8\)"):
        bayeslayers.BayesLinear(8, 4, prior_mean=torch.zeros(8, 4))
    with pytest.raises(ValueError, match="prior_dtype must be one of"):
        bayeslayers.BayesLinear(8, 4, prior_mean=torch.zeros(4, 8), prior_dtype=torch.int8)


def test_summary_reports_each_layer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Conv2d(2, 2, 3))
    bayeslayers.convert(model, target_modules=["0", "1"], init_sigma=0.02, prior_sigma=0.01)
    rows = bayeslayers.summary(model)
    assert [r.name for r in rows] == ["0", "1"]
    assert rows[0].shape == (5, 3) and rows[0].numel == 15
    assert abs(rows[0].mean_sigma - 0.02) < 1e-6 and rows[0].kl > 0
    assert "Bayesian layers" in str(rows)


def test_layers_name_the_option_at_fault():
    """Built directly, updated by apply_options or wrapped in LoRA: each bad option is named in the error."""
    positive = "must be a positive finite number"
    for kind in (lambda **o: bayeslayers.BayesLinear(4, 3, **o), lambda **o: bayeslayers.BayesConv2d(2, 3, 3, **o)):
        with pytest.raises(ValueError, match=f"^init_sigma {positive}, got 0"):
            kind(init_sigma=0)
        with pytest.raises(ValueError, match=f"^prior_sigma {positive}, got -1"):
            kind(prior_sigma=-1)
        with pytest.raises(ValueError, match=r"^kl_direction must be one of \('qp', 'pq'\), got 'kl'"):
            kind(kl_direction="kl")
    layer = bayeslayers.BayesLinear.from_module(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=f"^prior_sigma {positive}, got 0"):
        layer.apply_options({"prior_sigma": 0, "kl_direction": "qp"})
    with pytest.raises(ValueError, match="^kl_direction must be one of"):
        layer.apply_options({"prior_sigma": 0.1, "kl_direction": "both"})
    with pytest.raises(ValueError, match="^prior_dtype must name a torch dtype such as 'bfloat16', got 'half8'"):
        layer.apply_options({"prior_sigma": 0.1, "kl_direction": "qp", "prior_dtype": "half8"})
    # a plain LoRA (no Bayesian factor to check them) still checks every posterior option
    base = torch.nn.Linear(4, 3)
    bad = {
        "rank": (0, "^rank must be a positive integer, got 0"),
        "lora_alpha": (-1, "^lora_alpha must be a positive number or None, got -1"),
        "bayesian_factors": ("C", "^bayesian_factors must be one of"),
        "init_sigma": (0, f"^init_sigma {positive}"),
        "prior_sigma": (0, f"^prior_sigma {positive}"),
        "kl_direction": ("kl", "^kl_direction must be one of"),
        "prior_dtype": (torch.int8, "^prior_dtype must be one of"),
    }
    for name, (value, message) in bad.items():
        options = {"bayesian_factors": ""} if name != "bayesian_factors" else {}
        with pytest.raises(ValueError, match=message):
            bayeslayers.BayesLoRALinear(base, **options, **{name: value})


def test_non_finite_values_of_an_unnamed_layer():
    layer = bayeslayers.BayesLinear(4, 3)
    with torch.no_grad():
        layer.weight_mu[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^weight_mu holds NaN or Inf values; expected finite numbers$"):
        layer.check_finite()
