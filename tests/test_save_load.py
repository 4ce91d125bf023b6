"""save / load / read_metadata: round trips into models whose weights, priors and options differ from the saved
ones, and the errors that name the file, layer or tensor at fault (other structure, non-finite values, failed
writes, foreign files)."""

import pytest
import torch
import torch.nn as nn
from mixed_model import (
    BF16,
    FP16,
    SPECS,
    Mixed,
    assert_same_model,
    convert_spec,
    mixed_inputs,
    saved_model,
)
from reference import (
    bayesian_state,
    randomize_bayesian_state,
)

import bayeslayers


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_load_converts_an_unconverted_model_like_the_saved_one(kind, tmp_path):
    saved, path = saved_model(SPECS[kind], tmp_path)
    target = Mixed()  # the pretrained model: same base weights, the trained posterior nowhere
    assert bayeslayers.load(target, path) is target
    assert [n for n, _ in bayeslayers.bayesian_modules(target)] == [n for n, _ in bayeslayers.bayesian_modules(saved)]
    assert_same_model(target, saved)
    assert bayeslayers.read_metadata(path)["note"] == "round trip"
    if kind == "full":  # (each convert call in mode lora freezes the whole model, earlier adapters included)
        grads = {n: p.requires_grad for n, p in target.named_parameters()}
        assert grads == {n: p.requires_grad for n, p in saved.named_parameters()}
        assert grads["keep.weight"] and grads["a.weight_rho"]


def test_load_of_a_lora_checkpoint_into_an_unconverted_model_leaves_every_adapter_trainable(tmp_path):
    saved, path = saved_model([(["a", "b", "conv1"], dict(mode="lora", rank=2, bayesian_factors="A"))], tmp_path)
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
    saved, path = saved_model(SPECS[kind], tmp_path)
    target = randomize_bayesian_state(convert_spec(Mixed(), SPECS[kind], other=True), seed=3)
    target(*mixed_inputs())  # a training forward: the KL of the other weights is cached
    before, _ = bayesian_state(target)
    differing = [k for k, t in bayesian_state(saved)[0].items() if not torch.equal(t.float(), before[k].float())]
    assert len(differing) == len(before)  # every tensor starts from other values
    bayeslayers.load(target, path)
    assert_same_model(target, saved)


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
    saved, path = saved_model([(["a", "conv1"], dict(structure, prior_dtype=saved_dtype))], tmp_path)
    target = convert_spec(Mixed(), [(["a", "conv1"], dict(structure, prior_dtype=model_dtype))])
    bayeslayers.load(target, path)
    assert_same_model(target, saved)


def test_load_rejects_a_model_with_other_structure(tmp_path):
    saved, path = saved_model(SPECS["lora"], tmp_path)
    other_rank = convert_spec(Mixed(), [(t, dict(o, rank=o["rank"] + 1)) for t, o in SPECS["lora"]])
    with pytest.raises(ValueError, match=r"a\.lora_A\.weight_mu has shape \(3, 6\) in the model but \(2, 6\)"):
        bayeslayers.load(other_rank, path)
    other_factors = convert_spec(Mixed(), [(t, dict(o, bayesian_factors="AB")) for t, o in SPECS["lora"]])
    with pytest.raises(ValueError, match="load: layer 'a' holds tensors"):
        bayeslayers.load(other_factors, path)
    extra = convert_spec(Mixed(), SPECS["lora"] + [(["keep"], {})])
    with pytest.raises(ValueError, match="model layer 'keep' is Bayesian but the checkpoint has no such layer"):
        bayeslayers.load(extra, path)
    layer = convert_spec(Mixed(), SPECS["lora"]).a
    options = dict(layer.options(), rank=5)
    with pytest.raises(ValueError, match="rank is 2 in this layer but 5 in the options"):
        layer.apply_options(options)
    with pytest.raises(ValueError, match="bayesian_factors is 'A' in this layer but 'B'"):
        layer.apply_options(dict(layer.options(), bayesian_factors="B"))


def test_save_names_the_layer_at_fault_and_needs_a_bayesian_layer(tmp_path):
    with pytest.raises(ValueError, match="^save: the model has no Bayesian layers; call bayeslayers.convert first$"):
        bayeslayers.save(Mixed(), tmp_path / "x.safetensors")
    model = convert_spec(Mixed(), SPECS["lora"])
    with torch.no_grad():
        model.b.lora_B.weight_mu[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_mu of layer 'b.lora_B' holds NaN"):
        bayeslayers.save(model, tmp_path / "x.safetensors")
    with pytest.raises(OSError, match=r"save: could not write .*missing/x\.safetensors.*; nothing was written"):
        bayeslayers.save(convert_spec(Mixed(), SPECS["full"]), tmp_path / "missing" / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "a_folder").mkdir()  # written, then not renamed into place: the temporary file goes
    with pytest.raises(OSError, match=r"save: could not write .*a_folder.*; the existing file there is unchanged$"):
        bayeslayers.save(convert_spec(Mixed(), SPECS["full"]), tmp_path / "a_folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"] and not any((tmp_path / "a_folder").iterdir())


def test_read_metadata_refuses_other_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is not a bayeslayers checkpoint \(format 'pt', expected 'bayeslayers/1'\)"):
        bayeslayers.load(Mixed(), tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match=r"\(format None, expected"):
        bayeslayers.read_metadata(tmp_path / "bare.safetensors")
    _, path = saved_model(SPECS["mixed"], tmp_path)
    header = bayeslayers.read_metadata(path)
    assert header["format"] == "bayeslayers/1" and list(header["layers"]) == ["a", "b", "conv1", "conv2"]
    assert header["layers"]["b"] == {
        "type": "lora_linear",
        "options": convert_spec(Mixed(), SPECS["mixed"]).b.options(),
    }
    assert header["layers"]["conv1"]["type"] == "conv2d"


def test_load_into_mismatched_model_names_the_first_mismatch(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bayeslayers.convert(model, target_modules=["0", "2"])
    path = tmp_path / "m.safetensors"
    bayeslayers.save(model, path)

    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    bayeslayers.convert(other, target_modules=["0", "2"])
    with pytest.raises(ValueError, match=r"2\.weight_mu has shape \(3, 8\) in the model but \(2, 8\)"):
        bayeslayers.load(other, path)

    partial = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bayeslayers.convert(partial, target_modules=["0"])
    with pytest.raises(ValueError, match="checkpoint layer '2' is not a Bayesian layer"):
        bayeslayers.load(partial, path)

    lora = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bayeslayers.convert(lora, target_modules=["0", "2"], mode="lora")
    with pytest.raises(ValueError, match="'lora_linear' in the model but 'linear'"):
        bayeslayers.load(lora, path)

    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors' is not a readable safetensors file"):
        bayeslayers.load(model, tmp_path / "bad.safetensors")


def test_save_keeps_the_previous_checkpoint_when_it_fails(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8))
    bayeslayers.convert(model, target_modules=["0"])
    path = tmp_path / "m.safetensors"
    bayeslayers.save(model, path)
    before = path.read_bytes()
    with torch.no_grad():
        model[0].weight_rho[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_rho of layer '0' holds NaN"):
        bayeslayers.save(model, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def _raw_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("tensor", ["weight_rho", "weight_mu", "prior_mu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_load_refuses_non_finite_tensors_naming_the_file_and_tensor(tmp_path, tensor, bad):
    from safetensors.torch import load_file, save_file

    _, path = saved_model(SPECS["full"], tmp_path)
    tensors = load_file(str(path))
    tensors[f"conv1.{tensor}"][0, 0, 1, 1] = bad
    corrupt = tmp_path / "corrupt.safetensors"
    save_file(tensors, str(corrupt), metadata=_raw_metadata(path))
    model = convert_spec(Mixed(), SPECS["full"])
    with pytest.raises(
        ValueError, match=rf"load: '.*corrupt\.safetensors' holds non-finite values .* in conv1\.{tensor}"
    ):
        bayeslayers.load(model, corrupt)
    with pytest.raises(ValueError, match=rf"in conv1\.{tensor}"):
        bayeslayers.load(Mixed(), corrupt)  # converted like the saved one, then refused
