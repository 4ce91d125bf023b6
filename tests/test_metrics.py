"""Metrics (bayeslayers.integrations.metrics) on tiny random CLIP / ViT models saved to and loaded from a folder,
each against an independent computation: the transformers image processor for the pixels, the models' own forward
for the embeddings, explicit loops for the averages; the judge against tiny_sd.fidelity."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayeslayers.integrations import metrics

PROMPTS = ["a red star", "a red star", "a large blue circle on a white background", "a blue circle"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import save_tiny_clip, save_tiny_vit

    root = tmp_path_factory.mktemp("metric_models")
    return save_tiny_clip(root / "clip"), save_tiny_vit(root / "vit")


def _uint8(n, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _tensor(pixels):
    from bayeslayers.integrations.tiny_sd.world import to_tensor

    return to_tensor(pixels)


def _processor(path):
    import transformers

    return transformers.AutoImageProcessor.from_pretrained(path)


def _hf_pixels(path, pixels):
    return _processor(path)(images=list(pixels), return_tensors="pt")["pixel_values"]


def _hf_clip(path):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _hf_image_features(model, pixel_values):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def _hf_text_features(model, tokenizer, prompts):
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (50, 30)])
@pytest.mark.parametrize("which", ["clip", "vit"])
def test_preprocessing_matches_the_image_processor(models, which, size):
    path = models[0] if which == "clip" else models[1]
    pixels = _uint8(3, *size)
    ours = metrics.Preprocessing.from_processor(_processor(path))(_tensor(pixels))
    reference = _hf_pixels(path, pixels)
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    if size == (32, 32) and which == "clip":  # no resampling: exact
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    else:  # PIL resamples uint8 images and rounds: same bicubic kernel, within a few grey levels
        difference = (ours - reference).abs() * 0.27 * 255  # back to grey levels
        assert difference.mean() < 1 and difference.max() < 20  # uniform noise: the worst case


def test_clip_t_matches_the_clip_model_forward(models):
    clip_path = models[0]
    model, tokenizer = _hf_clip(clip_path)
    pixels = _uint8(4, 32, 32, seed=1)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=_hf_pixels(clip_path, pixels)
        ).logits_per_image
    expected = logits.diagonal() / model.logit_scale.exp()
    got = metrics.clip_t(_tensor(pixels), PROMPTS, model=clip_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert got.shape == (4,) and got.abs().max() <= 1


def test_clip_t_on_resized_images_is_close_to_the_processor_path(models):
    clip_path = models[0]
    model, tokenizer = _hf_clip(clip_path)
    pixels = _uint8(4, 40, 56, seed=2)
    expected = (
        _hf_image_features(model, _hf_pixels(clip_path, pixels)) * _hf_text_features(model, tokenizer, PROMPTS)
    ).sum(-1)
    got = metrics.clip_t(_tensor(pixels), PROMPTS, model=clip_path)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


def test_clip_i_is_the_mean_cosine_to_the_references(models):
    clip_path = models[0]
    model, _ = _hf_clip(clip_path)
    generated, references = _uint8(4, 32, 32, seed=3), _uint8(3, 32, 32, seed=4)
    a = _hf_image_features(model, _hf_pixels(clip_path, generated))
    b = _hf_image_features(model, _hf_pixels(clip_path, references))
    expected = torch.tensor([np.mean([float(a[i] @ b[j]) for j in range(3)]) for i in range(4)], dtype=torch.float32)
    got = metrics.clip_i(_tensor(generated), _tensor(references), model=clip_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_clip_iqa_is_the_antonym_softmax(models):
    clip_path = models[0]
    model, tokenizer = _hf_clip(clip_path)
    pixels = _uint8(4, 32, 32, seed=5)
    image = _hf_image_features(model, _hf_pixels(clip_path, pixels))
    good, bad = _hf_text_features(model, tokenizer, ["Good photo.", "Bad photo."])
    expected = torch.tensor([1 / (1 + math.exp(100 * float(x @ bad - x @ good))) for x in image])
    got = metrics.clip_iqa(_tensor(pixels), model=clip_path)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    assert ((got >= 0) & (got <= 1)).all()


def _hf_cls(vit_path, pixels):
    from transformers import ViTModel

    model = ViTModel.from_pretrained(vit_path, add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(pixel_values=_hf_pixels(vit_path, pixels)).last_hidden_state
    return F.normalize(hidden[:, 0], dim=-1)


def test_dino_is_the_mean_cls_cosine_to_the_references(models):
    vit_path = models[1]
    generated, references = _uint8(4, 36, 36, seed=6), _uint8(2, 36, 36, seed=7)  # resize is the identity
    a, b = _hf_cls(vit_path, generated), _hf_cls(vit_path, references)
    expected = torch.tensor([np.mean([float(a[i] @ b[j]) for j in range(2)]) for i in range(4)], dtype=torch.float32)
    got = metrics.dino(_tensor(generated), _tensor(references), model=vit_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metrics.dino_features(_tensor(generated), vit_path), a, atol=1e-5, rtol=1e-4)


def test_diversity_is_the_mean_pairwise_distance_within_each_prompt(models):
    vit_path = models[1]
    pixels = _uint8(4, 36, 36, seed=8)
    prompts = ["a", "a", "b", "a"]
    features = _hf_cls(vit_path, pixels)
    got = metrics.dino_diversity(_tensor(pixels), prompts, model=vit_path)
    for i in range(4):
        others = [j for j in range(4) if j != i and prompts[j] == prompts[i]]
        if others:
            assert float(got[i]) == pytest.approx(
                np.mean([1 - float(features[i] @ features[j]) for j in others]), abs=1e-5
            )
        else:
            assert math.isnan(float(got[i]))
    # the mean over one prompt's images is its mean pairwise distance
    pairs = [(0, 1), (0, 3), (1, 3)]
    mean_pair = np.mean([1 - float(features[i] @ features[j]) for i, j in pairs])
    assert float(got[[0, 1, 3]].mean()) == pytest.approx(mean_pair, abs=1e-5)


def test_evaluate_runs_every_metric_and_summarizes(models):
    clip_path, vit_path = models
    images, references = _tensor(_uint8(4, 40, 40, seed=9)), _tensor(_uint8(3, 32, 32, seed=10))
    values = metrics.evaluate(
        images,
        PROMPTS,
        references,
        metrics="clip_t,clip_i,dino,diversity,clip_iqa,judge",
        clip_model=clip_path,
        dino_model=vit_path,
    )
    assert {"clip_t", "clip_i", "dino", "diversity", "clip_iqa", "judge_subject_similarity"} <= set(values)
    assert all(v.shape == (4,) for v in values.values())
    torch.testing.assert_close(values["clip_t"], metrics.clip_t(images, PROMPTS, model=clip_path))
    summary = metrics.summarize(values)
    assert summary["clip_t"]["count"] == 4
    assert summary["clip_t"]["mean"] == pytest.approx(float(values["clip_t"].mean()))
    assert summary["diversity"]["count"] == 2  # the two lone prompts have no pair
    assert summary["judge_size_accuracy"]["count"] == 1  # one prompt names a size


def test_prompt_attributes_reads_the_world_vocabulary():
    assert metrics.prompt_attributes("a large red circle on a black background") == {
        "colour": "red",
        "shape": "circle",
        "size": "large",
        "background": "black",
    }
    assert metrics.prompt_attributes("a sks star on a white background") == {"shape": "star", "background": "white"}
    assert metrics.prompt_attributes("a red and yellow star") == {"shape": "star"}  # two colours: none named
    assert metrics.prompt_attributes("a photo of a dog") == {}


def test_judge_metrics_match_tiny_sd_fidelity():
    from bayeslayers.integrations.tiny_sd import fidelity
    from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor

    reference_pixels, reference_scenes = make_dataset(24, seed=5)
    subject = to_tensor(reference_pixels[[i for i, s in enumerate(reference_scenes) if s.shape == "star"]])
    pixels, scenes = make_dataset(12, seed=3)
    images = to_tensor(pixels)
    prompts = [s.caption for s in scenes]
    values = metrics.judge_metrics(images, prompts, subject)
    expected = fidelity.subject_metrics(images, subject, shape="star")
    assert float(values["judge_subject_similarity"].mean()) == pytest.approx(expected["subject_similarity"], abs=1e-5)
    assert float(values["judge_corruption"].mean()) == pytest.approx(expected["corruption_score"], rel=1e-5)
    # clean renders of the world: the judge reads what the caption says
    for attribute in ("colour", "shape", "size", "background"):
        assert float(values[f"judge_{attribute}_accuracy"].mean()) >= 0.9
    # a 96 px version (no judge of its size) is resized to the 32 px judge's, and gives nearly the same reading
    big = F.interpolate(images, scale_factor=3, mode="nearest")
    assert metrics.judge_resolution(big) == 32
    assert float(metrics.judge_metrics(big, prompts)["judge_prompt_accuracy"].mean()) >= 0.9
    noisy = (images + 0.5 * torch.randn_like(images)).clamp(-1, 1)
    assert metrics.judge_metrics(noisy, prompts)["judge_corruption"].mean() > 3 * values["judge_corruption"].mean()


def test_judge_diversity_is_zero_for_identical_images():
    from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor

    pixels, scenes = make_dataset(2, seed=4)
    images = to_tensor(pixels)[[0, 0, 1, 1]]
    values = metrics.evaluate(images, ["x", "x", "y", "z"], metrics=["judge"])
    assert values["judge_diversity"][:2].abs().max() < 1e-5
    assert math.isnan(float(values["judge_diversity"][2]))
    assert "judge_subject_similarity" not in values  # no references given


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "images must be a float tensor"),
        (torch.rand(2, 3, 8, 8) * 255, r"images must lie in \[-1, 1\].*uint8"),
        (torch.rand(2, 8, 8, 3), r"images must have shape \(N, 3, H, W\)"),
        (torch.rand(3, 8, 8), r"images must have shape \(N, 3, H, W\)"),
        (torch.full((1, 3, 8, 8), float("nan")), "images holds NaN"),
        (np.zeros((2, 8, 8, 3), np.uint8), "images must be a float tensor"),
    ],
)
def test_bad_images_are_errors_naming_the_argument(images, message):
    with pytest.raises((TypeError, ValueError), match=message):
        metrics.evaluate(images, ["a"] * 2, metrics=["judge"])


def test_bad_references_prompts_metrics_and_models_are_clear_errors(models, tmp_path):
    clip_path, _ = models
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"references must lie in \[-1, 1\]"):
        metrics.clip_i(images, torch.ones(1, 3, 32, 32) * 2, model=clip_path)
    with pytest.raises(ValueError, match="prompts must be 2 strings"):
        metrics.clip_t(images, ["one"], model=clip_path)
    with pytest.raises(ValueError, match="metric 'clip_i' needs references"):
        metrics.evaluate(images, ["a", "b"], metrics=["clip_i"], clip_model=clip_path)
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        metrics.evaluate(images, ["a", "b"], metrics=["lpips"])
    with pytest.raises(ValueError, match="metrics: unknown or no metric 'nope'"):
        metrics.evaluate(images, ["a", "b"], metrics="judge,nope")
    with pytest.raises(OSError, match="--clip_model"):
        metrics.clip_t(images, ["a", "b"], model=str(tmp_path / "missing"))
    with pytest.raises(OSError, match="--dino_model"):
        metrics.dino(images, images, model=str(tmp_path / "missing"))


def _save_folder(folder, pixels):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"img{i}.png")
    return folder


def test_eval_cli_writes_per_image_csv_summary_and_table(models, tmp_path, capsys):
    import csv
    import json

    from bayeslayers.integrations.metrics import cli

    clip_path, vit_path = models
    generated = _uint8(4, 32, 32, seed=11)
    images = _save_folder(tmp_path / "generated", generated)
    references = _save_folder(tmp_path / "reference", _uint8(2, 40, 40, seed=12))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["--images", str(images), "--prompts", str(tmp_path / "prompts.txt"), "--reference", str(references)]
    argv += ["--clip_model", clip_path, "--dino_model", vit_path, "--output_dir", str(tmp_path / "out")]
    cli.cli(argv)
    printed = capsys.readouterr().out
    for name in ("clip_t", "clip_i", "dino", "diversity", "clip_iqa"):  # the paper's metrics by default
        assert name in printed
    with open(tmp_path / "out" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [f"img{i}.png" for i in range(4)]
    assert [r["prompt"] for r in rows] == PROMPTS
    expected = metrics.clip_t(_tensor(generated), PROMPTS, model=clip_path)
    assert [float(r["clip_t"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert rows[2]["diversity"] == ""  # alone with its prompt: undefined
    summary = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert summary["num_images"] == 4 and summary["num_references"] == 2
    assert summary["summary"]["clip_t"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert summary["per_prompt"]["a red star"]["clip_t"] == pytest.approx(float(expected[:2].mean()), abs=1e-5)


def test_eval_cli_from_run_uses_the_runs_eval_set_and_judge(tmp_path, capsys):
    import json

    from bayeslayers.integrations.metrics import cli, files
    from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor

    pixels, scenes = make_dataset(6, seed=6)
    run = tmp_path / "run"
    files.save_eval_set(to_tensor(pixels[:3]), [s.caption for s in scenes[:3]], run / "eval" / "step-000010")
    prompts = [scenes[3].caption] * 3
    files.save_eval_set(to_tensor(pixels[3:]), prompts, run / "eval" / "step-000020")
    reference = _save_folder(tmp_path / "reference", pixels[:2])
    (run / "eval" / "config.json").write_text(json.dumps({"metrics": "judge", "reference": str(reference)}))
    cli.cli(["--from-run", str(run)])
    printed = capsys.readouterr().out
    assert "step-000020" in printed and "judge_subject_similarity" in printed and "clip_t" not in printed
    summary = json.loads((run / "eval" / "step-000020" / "metrics_summary.json").read_text())
    values = metrics.judge_metrics(to_tensor(pixels[3:]), prompts, to_tensor(pixels[:2]))
    for column, value in values.items():
        assert summary["summary"][column]["mean"] == pytest.approx(float(value.nanmean()), abs=1e-5), column
    cli.cli(["--from-run", str(run), "--step", "10", "--metrics", "judge"])
    assert "step-000010" in capsys.readouterr().out


def test_eval_cli_errors_name_the_flag(tmp_path, capsys):
    from bayeslayers.integrations.metrics import cli

    with pytest.raises(SystemExit):
        cli.cli(["--images", str(tmp_path), "--metrics", "clip_t,lpips"])
    assert "--metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.cli([])  # neither --images nor --from-run
    with pytest.raises(SystemExit, match="--images: no images"):
        cli.cli(["--images", str(tmp_path), "--metrics", "judge"])
    with pytest.raises(SystemExit, match="--from-run: .* has no eval/ folder"):
        cli.cli(["--from-run", str(tmp_path)])
    folder = _save_folder(tmp_path / "few", _uint8(3, 32, 32))
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(SystemExit, match="--prompts: .* other than the 3 images"):
        cli.cli(["--images", str(folder), "--prompts", str(tmp_path / "two.txt"), "--metrics", "judge"])
    (folder / "prompts.json").write_text('{"img0.png": "a", "img1.png": "a", "img2.png": "b"}')
    with pytest.raises(SystemExit, match=r"--reference \(the subject's images\) is required by clip_i, dino"):
        cli.cli(["--images", str(folder)])
    (folder / "prompts.json").unlink()
    with pytest.raises(SystemExit, match="--prompts: .*prompts.json is not a file"):
        cli.cli(["--images", str(folder), "--metrics", "judge"])


def test_evaluate_computes_each_models_image_features_once(models, monkeypatch):
    import importlib

    clip = importlib.import_module("bayeslayers.integrations.metrics.clip")
    dino = importlib.import_module("bayeslayers.integrations.metrics.dino")  # the package's `dino` is the metric
    clip_path, vit_path = models
    calls = []
    for module, name in ((clip, "_image_features"), (dino, "_features")):
        original = getattr(module, name)

        def counted(images, *rest, _original=original, _name=name):
            calls.append((_name, len(images)))
            return _original(images, *rest)

        monkeypatch.setattr(module, name, counted)
    images, references = _tensor(_uint8(4, 32, 32, seed=13)), _tensor(_uint8(2, 32, 32, seed=14))
    values = metrics.evaluate(
        images, PROMPTS, references, metrics=metrics.PAPER_METRICS, clip_model=clip_path, dino_model=vit_path
    )
    # images and references once per model, although clip_t/clip_i/clip_iqa and dino/diversity each need them
    assert sorted(calls) == [("_features", 2), ("_features", 4), ("_image_features", 2), ("_image_features", 4)]
    torch.testing.assert_close(values["clip_i"], metrics.clip_i(images, references, model=clip_path))
    assert len(calls) == 6  # outside evaluate() nothing is cached


def test_load_images_reads_a_folder_a_file_or_a_list(tmp_path):
    from PIL import Image

    from bayeslayers.integrations.metrics import image_files, load_images

    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    listed = load_images(image_files(tmp_path))
    assert listed.shape == (2, 3, 8, 8) and listed.min() >= -1 and listed.max() <= 1
    assert torch.equal(load_images(tmp_path), listed) and torch.equal(load_images(str(tmp_path)), listed)
    assert torch.equal(load_images(tmp_path / "1.png"), listed[1:])


def test_64px_images_are_scored_by_the_64px_models_judge_at_full_resolution():
    """The 64 px model's images keep their 2-pixel textures: its own judge reads them at 64 px, and the
    corruption score is their Laplacian energy at 64 px (resized to 32 px, the texture is averaged away)."""
    from bayeslayers.integrations import tiny_sd
    from bayeslayers.integrations.tiny_sd.judge import corruption_score
    from bayeslayers.integrations.tiny_sd.subject import TEXTURE_SUBJECTS
    from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor

    pixels, scenes = make_dataset(16, seed=11, resolution=64)
    images = to_tensor(pixels)
    prompts = [s.caption for s in scenes]
    assert metrics.judge_resolution(images) == 64
    assert metrics.judge_resolution(images[..., :32]) == 32  # not square: the 32 px judge
    values = metrics.judge_metrics(images, prompts)
    judge, clean = tiny_sd.load_judge(64)
    assert values["judge_corruption"].tolist() == pytest.approx(corruption_score(images, clean).tolist(), rel=1e-6)
    held_out = tiny_sd.judge_config(64)["held_out_accuracy"]
    for attribute in ("colour", "shape", "background"):
        assert float(values[f"judge_{attribute}_accuracy"].mean()) >= held_out[attribute] - 0.15
    texture = to_tensor(np.stack([np.asarray(im) for im in TEXTURE_SUBJECTS["fine_checker_star"].render()]))
    at_64 = metrics.judge_metrics(texture, ["a sks star"] * len(texture))["judge_corruption"]
    at_32 = corruption_score(metrics.judge_input(texture, 32), tiny_sd.load_judge(32)[1])
    assert float(at_64.mean()) > 2 * float(values["judge_corruption"].mean())  # the texture is high frequency
    assert float(at_64.mean()) > 2 * float(at_32.mean())
