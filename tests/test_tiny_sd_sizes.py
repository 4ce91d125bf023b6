"""The tiny Stable Diffusion's two model sizes (32 px, bundled; 64 px, 16x16x4 latents): configs, textured world
and subjects, training that resumes bit-identically, and asset building from a (tiny) run."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bayeslayers.integrations import tiny_sd
from bayeslayers.integrations.tiny_sd import models, train
from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor

TINY = ["--num_images", "16", "--batch_size", "4", "--vae_steps", "4", "--unet_steps", "4", "--checkpoint_every", "2"]


def _run(output_dir, resolution, *extra):
    return train.main(
        train.parse_args(["--output_dir", str(output_dir), "--resolution", str(resolution), *TINY, *extra])
    )


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{key}": value
        for part in ("vae", "unet", "text_encoder")
        for path in sorted((run_dir / "pipeline" / part).glob("*.safetensors"))
        for key, value in load_file(str(path)).items()
    }


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """{resolution: folder of an uninterrupted tiny training run}."""
    runs = {}
    for resolution in models.RESOLUTIONS:
        runs[resolution] = tmp_path_factory.mktemp(f"run{resolution}")
        _run(runs[resolution], resolution)
    return runs


@pytest.mark.parametrize("resolution", models.RESOLUTIONS)
def test_each_size_is_bundled_with_its_config(resolution):
    """Both pipelines were trained with their CONFIGS entry (every config key matches the shipped config.json),
    fit the 25 MB budget, and are known to the recipe as bundled models (judge metrics by default)."""
    from bayeslayers.integrations.dreambooth.evaluation import is_bundled_model

    config = models.CONFIGS[resolution]
    for part, expected in (("vae", config.vae), ("unet", config.unet)):
        shipped = json.loads((tiny_sd.pipeline_path(resolution) / part / "config.json").read_text())
        assert {k: shipped[k] for k in expected} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()
        }
    assert is_bundled_model(tiny_sd.pipeline_path(resolution))
    assert not is_bundled_model(tiny_sd.assets_dir(resolution)) and not is_bundled_model("no/such/model")
    folder = tiny_sd.assets_dir(resolution)
    other = {c.name for c in models.CONFIGS.values()}  # the 64 px folder sits inside the 32 px one
    files = [p for p in folder.rglob("*") if p.is_file() and not other & set(p.relative_to(folder).parts)]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"{config.unet_steps} steps" in card and "Judge" in card and "Prompt accuracy" in card


def test_config_sizes():
    assert models.CONFIGS[32].latent_side == 8 and models.CONFIGS[64].latent_side == 16
    with pytest.raises(ValueError, match="resolution must be one of"):
        models.get_config(48)


@pytest.mark.parametrize("resolution", models.RESOLUTIONS)
def test_latents_and_predictions_have_the_model_sizes_shapes(resolution):
    torch.manual_seed(0)
    side = models.get_config(resolution).latent_side
    vae, unet = models.build_vae(resolution), models.build_unet(resolution)
    with torch.no_grad():
        latents = vae.encode(torch.rand(2, 3, resolution, resolution) * 2 - 1).latent_dist.mean
        assert latents.shape == (2, 4, side, side)
        assert vae.decode(latents).sample.shape == (2, 3, resolution, resolution)
        pred = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 16, 64)).sample
    assert pred.shape == (2, 4, side, side)


def test_size_defaults_and_bad_counts():
    args = train.parse_args(["--output_dir", "x", "--resolution", "64"])
    config = models.CONFIGS[64]
    assert (args.vae_steps, args.unet_steps, args.batch_size) == (config.vae_steps, config.unet_steps, 64)
    assert train.parse_args(["--output_dir", "x"]).unet_steps == 4000  # the 32 px model's recorded run
    assert train.parse_args(["--output_dir", "x", "--resolution", "64", "--unet_steps", "7"]).unet_steps == 7
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--unet_steps", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--output_dir", "x", "--resolution", "48"])


def test_textured_world_keeps_the_scenes_and_adds_high_frequencies():
    from bayeslayers.integrations.tiny_sd.judge import high_frequency_energy

    plain, scenes = make_dataset(60, seed=3, resolution=64)
    assert plain.shape == (60, 64, 64, 3)
    assert np.array_equal(plain, make_dataset(60, seed=3, resolution=64, textured=0.0)[0])
    textured, textured_scenes = make_dataset(60, seed=3, resolution=64, textured=0.5)
    assert textured_scenes == scenes and np.array_equal(textured, make_dataset(60, 3, resolution=64, textured=0.5)[0])
    changed = [not np.array_equal(a, b) for a, b in zip(plain, textured)]
    assert 15 <= sum(changed) <= 45
    energy = high_frequency_energy(to_tensor(textured[changed])) / high_frequency_energy(to_tensor(plain[changed]))
    assert float(energy.min()) > 1.0 and float(energy.median()) > 2.0  # coarse textures on small shapes add less


def test_texture_subjects_carry_high_frequencies_the_corruption_score_measures():
    from bayeslayers.integrations.tiny_sd.judge import corruption_score, high_frequency_energy
    from bayeslayers.integrations.tiny_sd.subject import SUBJECTS, TEXTURE_SUBJECTS, get_subject, subjects
    from bayeslayers.integrations.tiny_sd.world import pattern, render

    assert subjects(32) is SUBJECTS and subjects(64) is TEXTURE_SUBJECTS and len(TEXTURE_SUBJECTS) >= 4
    for subject in TEXTURE_SUBJECTS.values():
        renders = subject.render()
        assert all(image.size == (64, 64) for image in renders)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(renders, subject.render()))
        pixels = to_tensor(np.stack([np.asarray(image) for image in renders]))
        plain = to_tensor(np.stack([np.asarray(render(scene, 64)) for scene in subject.scenes]))
        own = float(high_frequency_energy(pixels).mean())
        assert own > 3 * float(high_frequency_energy(plain).mean()), subject.name
        # against the subject's own renders, clean images score 1 on average and fine noise raises every image's
        # score (by less than against the plain world's reference: the texture already holds high frequencies)
        torch.manual_seed(0)
        noisy = (pixels + 0.15 * torch.randn_like(pixels)).clamp(-1, 1)
        clean_score = corruption_score(pixels, own)
        assert abs(float(clean_score.mean()) - 1) < 1e-5
        assert float((corruption_score(noisy, own) - clean_score).min()) > 0.15, subject.name
    with pytest.raises(ValueError, match="at 64 px"):
        get_subject("checker_star", 64)
    with pytest.raises(ValueError, match="resolution must be one of"):
        subjects(128)
    with pytest.raises(ValueError, match="kind must be one of"):
        pattern("zigzag", ((0, 0, 0), (255, 255, 255)), 2, 64)


@pytest.mark.slow
@pytest.mark.parametrize("resolution", models.RESOLUTIONS)
def test_training_resumes_bit_identically_after_interruptions(tiny_runs, tmp_path, monkeypatch, resolution):
    """Killed after the VAE's step-2 checkpoint, then after the UNet's: rerunning the command twice gives the
    uninterrupted run's weights exactly."""
    report = json.loads((tiny_runs[resolution] / "training_report.json").read_text())
    side = models.get_config(resolution).latent_side
    assert report["resolution"] == resolution and report["latent_shape"] == [4, side, side]
    assert report["vae_steps"] == report["unet_steps"] == 4

    save = train._save_stage

    class Killed(Exception):
        pass

    stop_at = {"name": None}

    def save_then_die(path, modules, optimizer, step, *rest):
        save(path, modules, optimizer, step, *rest)
        if step == 2 and path.name == stop_at["name"]:
            raise Killed

    monkeypatch.setattr(train, "_save_stage", save_then_die)
    for name in ("vae_stage.safetensors", "unet_stage.safetensors"):
        stop_at["name"] = name
        with pytest.raises(Killed):
            _run(tmp_path, resolution)
    assert not (tmp_path / "pipeline").exists()
    stop_at["name"] = None
    _run(tmp_path, resolution)
    resumed, uninterrupted = _weights(tmp_path), _weights(tiny_runs[resolution])
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 100
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_size_is_refused(tiny_runs, tmp_path):
    import shutil

    shutil.copy(tiny_runs[32] / "vae_stage.safetensors", tmp_path / "vae_stage.safetensors")
    with pytest.raises(ValueError, match="different run"):
        _run(tmp_path, 64)


@pytest.mark.slow
def test_build_assets_of_a_tiny_64px_run_gives_a_loadable_64px_pipeline(tiny_runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from bayeslayers.integrations.tiny_sd import build_assets
    from bayeslayers.integrations.tiny_sd.judge import Judge
    from bayeslayers.integrations.tiny_sd.subject import TEXTURE_SUBJECTS

    out = tmp_path / "assets64"
    shipped = {p: p.read_bytes() for p in tiny_sd.assets_dir(64).rglob("*") if p.is_file()}
    build_assets.main(
        ["--run_dir", str(tiny_runs[64]), "--output_dir", str(out), "--judge_steps", "2", "--judge_images", "24"]
        + ["--eval_images", "4", "--inference_steps", "2", "--guidance_sweep", ""]
    )
    assert shipped == {p: p.read_bytes() for p in tiny_sd.assets_dir(64).rglob("*") if p.is_file()}  # untouched
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a large red circle on a black background"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images
    assert images[0].size == (64, 64)
    judge = Judge(64)
    judge.load_state_dict(load_file(str(out / "judge.safetensors")))
    assert judge(torch.zeros(1, 3, 64, 64))["shape"].shape == (1, 4)
    assert json.loads((out / "judge_config.json").read_text())["input_shape"] == [3, 64, 64]
    assert sorted(p.name for p in (out / "subjects").iterdir()) == sorted(TEXTURE_SUBJECTS)
    card = (out / "MODEL_CARD.md").read_text()
    assert "64x64x3 -> 16x16x4 latents" in card and "--resolution 64" in card
    evaluation = json.loads((tiny_runs[64] / "evaluation.json").read_text())
    assert evaluation["parameters"]["unet"] > 1e6 and evaluation["inference_steps"] == 2
