"""The bundled tiny Stable Diffusion: offline pipeline, tokenizer, deterministic world, judge, subject."""

import numpy as np
import pytest
import torch

from bayeslayers.integrations import tiny_sd
from bayeslayers.integrations.tiny_sd.world import make_dataset, to_tensor


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.pipeline_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_loads_offline_and_generates_images(pipe):
    images = pipe(
        ["a large red circle on a black background"] * 2,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    names = [n for n, _ in pipe.unet.named_modules()]
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("ff.net.2") for n in names)


def test_tokenizer_round_trips_the_world_captions(pipe):
    _, scenes = make_dataset(50, seed=3)
    for caption in {s.caption for s in scenes} | {"a sks star", "an unseen zebra"}:
        ids = pipe.tokenizer(caption).input_ids
        assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert len(pipe.tokenizer("a small red circle on a black background").input_ids) == 10  # one token per word


def test_shipped_vocab_and_merges_rebuild_the_pipeline_tokenizer(pipe, tmp_path):
    import shutil

    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_sd.pipeline_path() / "tokenizer" / name, tmp_path / name)
    rebuilt = CLIPTokenizer.from_pretrained(str(tmp_path))
    _, scenes = make_dataset(20, seed=4)
    for caption in [s.caption for s in scenes] + ["a sks star", "a star"]:
        assert rebuilt(caption).input_ids == pipe.tokenizer(caption).input_ids


def test_world_is_deterministic_for_a_seed():
    a, scenes_a = make_dataset(20, seed=7)
    b, scenes_b = make_dataset(20, seed=7)
    c, _ = make_dataset(20, seed=8)
    assert np.array_equal(a, b) and scenes_a == scenes_b and not np.array_equal(a, c)


def test_judge_reads_fresh_clean_renders():
    from bayeslayers.integrations.tiny_sd.train_judge import accuracy, world_sample

    judge, clean_energy = tiny_sd.load_judge()
    images, scenes = world_sample(240, seed=12345)
    result = accuracy(judge, images, scenes)
    assert result["colour"] >= 0.95 and result["shape"] >= 0.95, result
    from bayeslayers.integrations.tiny_sd.judge import corruption_score

    clean = corruption_score(images, clean_energy).mean()
    noisy = corruption_score((images + 0.3 * torch.randn_like(images)).clamp(-1, 1), clean_energy).mean()
    assert 0.7 < clean < 1.3 and noisy > 3 * clean


def test_judge_config_describes_the_shipped_judge():
    from bayeslayers.integrations.tiny_sd.judge import ATTRIBUTES

    config = tiny_sd.judge_config()
    assert config["attributes"] == {name: list(values) for name, values in ATTRIBUTES.items()}
    assert min(config["held_out_accuracy"].values()) >= 0.95


def test_subject_assets_load():
    prompts = tiny_sd.subject_prompts()
    assert "sks" in prompts["instance_prompt"] and prompts["class_prompt"]
    from PIL import Image

    images = sorted(tiny_sd.subject_path().glob("*.png"))
    assert 4 <= len(images) <= 6
    assert all(Image.open(p).size == (32, 32) for p in images)


def test_bundled_subjects_are_their_renders_and_unlike_their_plain_class(tmp_path):
    """Each shipped subject folder is what subject.py renders, its prompts name its class, and the judge tells
    the subject from the plain class object drawn in the same scenes (what the base model makes of the word)."""
    import json

    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from bayeslayers.integrations.dreambooth.data import load_image
    from bayeslayers.integrations.tiny_sd.subject import SUBJECTS, get_subject, save_subjects
    from bayeslayers.integrations.tiny_sd.world import render

    save_subjects(tmp_path)
    judge, _ = tiny_sd.load_judge()
    assert len(SUBJECTS) >= 4
    for name, subject in SUBJECTS.items():
        shipped = sorted(tiny_sd.subject_path(name).glob("*.png"))
        assert [p.name for p in shipped] == sorted(p.name for p in (tmp_path / name).glob("*.png"))
        for path in shipped:
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / name / path.name)))
        prompts = tiny_sd.subject_prompts(name)
        assert prompts == json.loads((tmp_path / name / "prompts.json").read_text())
        assert prompts["class_prompt"] == f"a {subject.shape}" and "sks" in prompts["instance_prompt"]
        assert all(subject.shape in p and "sks" in p for p in prompts["eval_prompts"])
        pixels = torch.stack([load_image(p, 32, True) for p in shipped])
        plain = to_tensor(np.stack([np.asarray(render(scene)) for scene in subject.scenes]))
        with torch.no_grad():
            own = F.normalize(judge.embedding(pixels), dim=1)
            reference = F.normalize(own.mean(0), dim=0)
            assert (
                float((own @ reference).mean())
                > float((F.normalize(judge.embedding(plain), dim=1) @ reference).mean()) + 0.02
            )
            assert np.mean([s == subject.shape for s in judge.predict(pixels)["shape"]]) >= 0.75
    with pytest.raises(ValueError, match="subject must be one of"):
        get_subject("dog")


def test_two_line_bayesian_training_loop_on_the_bundled_model():
    """The README's promise: an existing diffusers loop goes Bayesian with convert + kl_loss."""
    import sys

    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    import bayeslayers

    path = tiny_sd.pipeline_path()
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    from bayeslayers.integrations.dreambooth.data import load_image

    pixels = torch.stack([load_image(p, 32, True) for p in sorted(tiny_sd.subject_path().glob("*.png"))])
    ids = tokenizer(
        [tiny_sd.subject_prompts()["instance_prompt"]] * len(pixels),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids

    bayeslayers.convert(unet, preset="dreambooth-bnn")  # line 1
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if "weight_rho" in n}
    for _ in range(3):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            text = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, noise) + 1e-4 * bayeslayers.kl_loss(unet)  # line 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in unet.named_parameters() if n in before)
    assert "torchvision" not in sys.modules


def test_subject_metrics_separate_the_subject_from_other_shapes():
    from bayeslayers.integrations.dreambooth.data import load_image
    from bayeslayers.integrations.tiny_sd.fidelity import subject_metrics

    subject = torch.stack([load_image(p, 32, True) for p in sorted(tiny_sd.subject_path().glob("*.png"))])
    images, _ = make_dataset(16, seed=5)
    itself = subject_metrics(subject, subject)
    others = subject_metrics(to_tensor(images), subject)
    assert itself["shape_accuracy"] >= 0.8  # the patterned subject is outside the judge's training world
    assert itself["subject_similarity"] > others["subject_similarity"] + 0.1
