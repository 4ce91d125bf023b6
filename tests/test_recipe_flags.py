"""bayeslayers-dreambooth speaks diffusers: every flag of diffusers' train_dreambooth.py and train_dreambooth_lora.py
parses with the same type, and each does what it does there (units of the recipe, one mocked-Hub recipe run)."""

import math
import sys
import types

import numpy as np
import pytest
import torch
from tiny_models import recipe_argv

from bayeslayers.integrations.dreambooth import args as recipe_args
from bayeslayers.integrations.dreambooth import main, parse_args, recipe

# diffusers examples/dreambooth/train_dreambooth.py, parse_args, in order: (flag, kind). kind: "flag" (store_true),
# a type, ("choice", values) or "list" (nargs="+").
DREAMBOOTH_FLAGS = [
    ("pretrained_model_name_or_path", str),
    ("revision", str),
    ("variant", str),
    ("tokenizer_name", str),
    ("instance_data_dir", str),
    ("class_data_dir", str),
    ("instance_prompt", str),
    ("class_prompt", str),
    ("with_prior_preservation", "flag"),
    ("prior_loss_weight", float),
    ("num_class_images", int),
    ("output_dir", str),
    ("seed", int),
    ("resolution", int),
    ("center_crop", "flag"),
    ("train_text_encoder", "flag"),
    ("train_batch_size", int),
    ("sample_batch_size", int),
    ("num_train_epochs", int),
    ("max_train_steps", int),
    ("checkpointing_steps", int),
    ("checkpoints_total_limit", int),
    ("resume_from_checkpoint", str),
    ("gradient_accumulation_steps", int),
    ("gradient_checkpointing", "flag"),
    ("learning_rate", float),
    ("scale_lr", "flag"),
    ("lr_scheduler", str),
    ("lr_warmup_steps", int),
    ("lr_num_cycles", int),
    ("lr_power", float),
    ("use_8bit_adam", "flag"),
    ("dataloader_num_workers", int),
    ("adam_beta1", float),
    ("adam_beta2", float),
    ("adam_weight_decay", float),
    ("adam_epsilon", float),
    ("max_grad_norm", float),
    ("push_to_hub", "flag"),
    ("hub_token", str),
    ("hub_model_id", str),
    ("logging_dir", str),
    ("allow_tf32", "flag"),
    ("report_to", str),
    ("validation_prompt", str),
    ("num_validation_images", int),
    ("validation_steps", int),
    ("mixed_precision", ("choice", ["no", "fp16", "bf16"])),
    ("prior_generation_precision", ("choice", ["no", "fp32", "fp16", "bf16"])),
    ("local_rank", int),
    ("enable_xformers_memory_efficient_attention", "flag"),
    ("set_grads_to_none", "flag"),
    ("offset_noise", "flag"),
    ("snr_gamma", float),
    ("pre_compute_text_embeddings", "flag"),
    ("tokenizer_max_length", int),
    ("text_encoder_use_attention_mask", "flag"),
    ("skip_save_text_encoder", "flag"),
    ("validation_images", "list"),
    ("class_labels_conditioning", str),
    ("validation_scheduler", ("choice", ["DPMSolverMultistepScheduler", "DDPMScheduler"])),
]

# diffusers examples/dreambooth/train_dreambooth_lora.py, parse_args, in order.
DREAMBOOTH_LORA_FLAGS = [
    ("pretrained_model_name_or_path", str),
    ("revision", str),
    ("variant", str),
    ("tokenizer_name", str),
    ("instance_data_dir", str),
    ("class_data_dir", str),
    ("instance_prompt", str),
    ("class_prompt", str),
    ("validation_prompt", str),
    ("num_validation_images", int),
    ("validation_epochs", int),
    ("with_prior_preservation", "flag"),
    ("prior_loss_weight", float),
    ("num_class_images", int),
    ("output_dir", str),
    ("seed", int),
    ("resolution", int),
    ("center_crop", "flag"),
    ("train_text_encoder", "flag"),
    ("train_batch_size", int),
    ("sample_batch_size", int),
    ("num_train_epochs", int),
    ("max_train_steps", int),
    ("checkpointing_steps", int),
    ("checkpoints_total_limit", int),
    ("resume_from_checkpoint", str),
    ("gradient_accumulation_steps", int),
    ("gradient_checkpointing", "flag"),
    ("learning_rate", float),
    ("scale_lr", "flag"),
    ("lr_scheduler", str),
    ("lr_warmup_steps", int),
    ("lr_num_cycles", int),
    ("lr_power", float),
    ("dataloader_num_workers", int),
    ("use_8bit_adam", "flag"),
    ("adam_beta1", float),
    ("adam_beta2", float),
    ("adam_weight_decay", float),
    ("adam_epsilon", float),
    ("max_grad_norm", float),
    ("push_to_hub", "flag"),
    ("hub_token", str),
    ("hub_model_id", str),
    ("logging_dir", str),
    ("allow_tf32", "flag"),
    ("report_to", str),
    ("mixed_precision", ("choice", ["no", "fp16", "bf16"])),
    ("prior_generation_precision", ("choice", ["no", "fp32", "fp16", "bf16"])),
    ("local_rank", int),
    ("enable_xformers_memory_efficient_attention", "flag"),
    ("pre_compute_text_embeddings", "flag"),
    ("tokenizer_max_length", int),
    ("text_encoder_use_attention_mask", "flag"),
    ("validation_images", "list"),
    ("class_labels_conditioning", str),
    ("rank", int),
]

SAMPLE_VALUE = {str: "some-value", int: "3", float: "0.25"}


def _flag_cases():
    seen = {}
    for name, kind in DREAMBOOTH_FLAGS + DREAMBOOTH_LORA_FLAGS:
        seen.setdefault(name, kind)
    return sorted(seen.items(), key=lambda item: item[0])


def test_flag_lists_are_the_two_scripts():
    assert len(DREAMBOOTH_FLAGS) == len({n for n, _ in DREAMBOOTH_FLAGS}) == 61
    assert len(DREAMBOOTH_LORA_FLAGS) == len({n for n, _ in DREAMBOOTH_LORA_FLAGS}) == 57
    union = {n for n, _ in DREAMBOOTH_FLAGS} | {n for n, _ in DREAMBOOTH_LORA_FLAGS}
    assert len(union) == 63
    accepted = {a.dest for a in recipe_args.build_parser()._actions}
    assert union <= accepted, sorted(union - accepted)


@pytest.mark.parametrize("name,kind", _flag_cases(), ids=[n for n, _ in _flag_cases()])
def test_every_diffusers_flag_parses_with_its_type(name, kind):
    parser = recipe_args.build_parser()
    if kind == "flag":
        assert getattr(parser.parse_args([]), name) is False
        assert getattr(parser.parse_args([f"--{name}"]), name) is True
        return
    if kind == "list":
        assert getattr(parser.parse_args([f"--{name}", "a.png", "b.png"]), name) == ["a.png", "b.png"]
        return
    if isinstance(kind, tuple):
        for value in kind[1]:  # every diffusers choice is accepted (ours may add more)
            assert getattr(parser.parse_args([f"--{name}", value]), name) == value
        return
    value = getattr(parser.parse_args([f"--{name}={SAMPLE_VALUE[kind]}"]), name)  # the `--flag=value` form too
    assert type(value) is kind and value == kind(SAMPLE_VALUE[kind])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny_models import recipe_workspace

    return recipe_workspace(tmp_path_factory.mktemp("flags"))


def test_a_diffusers_readme_command_line_is_accepted(workspace):
    # The diffusers DreamBooth README's commands, `=` syntax and all.
    args = parse_args(
        recipe_argv(workspace, "out")
        + [
            "--resolution=16",
            "--train_batch_size=1",
            "--gradient_accumulation_steps=1",
            "--learning_rate=5e-6",
            "--lr_scheduler=constant",
            "--lr_warmup_steps=0",
            "--max_train_steps=400",
            "--use_8bit_adam",
            "--gradient_checkpointing",
            "--set_grads_to_none",
            "--mixed_precision=fp16",
            "--snr_gamma=5.0",
            "--validation_prompt=a sks star",
            "--validation_steps=100",
            "--num_class_images=200",
            "--rank=8",
            "--checkpointing_steps=500",
            "--train_text_encoder",
            "--seed=0",
        ]
    )
    assert (args.max_train_steps, args.rank, args.snr_gamma, args.mixed_precision) == (400, 8, 5.0, "fp16")
    assert args.command[0] == "bayeslayers-dreambooth" and "--use_8bit_adam" in args.command


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--train_text_encoder", "--pre_compute_text_embeddings"],
            "cannot be used with --pre_compute_text_embeddings",
        ),
        (["--bayes_text_encoder"], "--bayes_text_encoder needs --train_text_encoder"),
        (["--validation_images", "a.png"], "--validation_images is for image-conditioned pipelines"),
        (["--class_labels_conditioning", "labels"], "--class_labels_conditioning must be 'timesteps'"),
        (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
        (["--lr_num_cycles", "0"], "--lr_num_cycles must be a positive integer"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be a positive integer"),
        (["--hub_token", "t", "--report_to", "wandb"], "--hub_token together with --report_to=wandb"),
    ],
)
def test_bad_flag_combinations_fail_before_training(workspace, extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args(recipe_argv(workspace, "out") + extra)


def test_training_length_from_epochs_and_validation_epochs(workspace):
    args = parse_args(recipe_argv(workspace, "out") + ["--num_train_epochs", "3", "--validation_epochs", "2"])
    recipe.resolve_training_length(args, steps_per_epoch=5)
    assert (args.max_train_steps, args.num_train_epochs, args.validation_steps) == (15, 3, 10)
    args = parse_args(recipe_argv(workspace, "out") + ["--num_train_epochs", "3", "--max_train_steps", "7"])
    recipe.resolve_training_length(args, steps_per_epoch=5)
    assert (args.max_train_steps, args.num_train_epochs) == (7, 2)  # max_train_steps overrides epochs
    args = parse_args(recipe_argv(workspace, "out"))
    recipe.resolve_training_length(args, steps_per_epoch=5)
    assert args.max_train_steps == recipe_args.DEFAULT_MAX_TRAIN_STEPS


def test_scale_lr_multiplies_by_accumulation_batch_and_processes(workspace):
    args = parse_args(
        recipe_argv(workspace, "out")
        + ["--learning_rate", "1e-4", "--gradient_accumulation_steps", "3", "--train_batch_size", "2"]
    )
    assert recipe.scaled_learning_rate(args, num_processes=4) == 1e-4
    args.scale_lr = True
    assert recipe.scaled_learning_rate(args, num_processes=4) == pytest.approx(1e-4 * 3 * 2 * 4)


def test_lr_num_cycles_and_lr_power_reach_the_diffusers_schedulers(workspace):
    def lrs(*extra):
        args = parse_args(recipe_argv(workspace, "out") + ["--learning_rate", "1.0", "--max_train_steps", "8", *extra])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = recipe.build_lr_scheduler(args, optimizer, num_processes=1)
        values = []
        for _ in range(8):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return np.array(values)

    steps = np.arange(8) / 8
    restarts = lrs("--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2")
    np.testing.assert_allclose(restarts, 0.5 * (1 + np.cos(np.pi * ((2 * steps) % 1.0))), atol=1e-6)
    poly = lrs("--lr_scheduler", "polynomial", "--lr_power", "2.0")
    np.testing.assert_allclose(poly, (1.0 - 1e-7) * (1 - steps) ** 2 + 1e-7, atol=1e-6)


def test_8bit_adam_is_bitsandbytes_adamw8bit(workspace, monkeypatch):
    args = parse_args(recipe_argv(workspace, "out") + ["--use_8bit_adam"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match="--use_8bit_adam needs the bitsandbytes package"):
        recipe.build_optimizer([torch.nn.Parameter(torch.zeros(2))], args, 1)

    class AdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    optimizer = recipe.build_optimizer([torch.nn.Parameter(torch.zeros(2))], args, 1)
    assert type(optimizer) is AdamW8bit
    assert optimizer.defaults["betas"] == (args.adam_beta1, args.adam_beta2)
    assert optimizer.defaults["weight_decay"] == args.adam_weight_decay


def test_xformers_missing_is_a_clear_error(monkeypatch):
    import diffusers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_xformers_available", lambda: False)
    with pytest.raises(ValueError, match="needs the xformers package"):
        recipe.enable_xformers(torch.nn.Linear(2, 2))
    calls = []
    unet = types.SimpleNamespace(enable_xformers_memory_efficient_attention=lambda: calls.append("on"))
    monkeypatch.setattr(import_utils, "is_xformers_available", lambda: True)
    recipe.enable_xformers(unet)
    assert calls == ["on"]


def test_min_snr_loss_matches_a_float64_reference():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 5, 5, generator=generator), torch.randn(6, 4, 5, 5, generator=generator)
    timesteps = torch.tensor([0, 10, 200, 500, 900, 999])
    args = types.SimpleNamespace(with_prior_preservation=True, prior_loss_weight=0.5, snr_gamma=5.0)
    loss = recipe.diffusion_loss(pred, target, timesteps, scheduler, args)

    alphas = scheduler.alphas_cumprod.double()[timesteps[:3]]
    snr = alphas / (1 - alphas)
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    per_sample = ((pred[:3].double() - target[:3].double()) ** 2).mean(dim=(1, 2, 3))
    prior = ((pred[3:].double() - target[3:].double()) ** 2).mean()
    assert weights.min() < 0.999  # the clipping is active for the small timesteps
    torch.testing.assert_close(loss.double(), (per_sample * weights).mean() + 0.5 * prior, rtol=1e-5, atol=0)
    args.snr_gamma = None
    plain = recipe.diffusion_loss(pred, target, timesteps, scheduler, args)
    torch.testing.assert_close(plain.double(), per_sample.mean() + 0.5 * prior, rtol=1e-5, atol=0)


def test_offset_noise_adds_a_per_channel_offset():
    torch.manual_seed(0)
    latents = torch.empty(64, 4, 32, 32)
    plain = recipe.sample_noise(latents, offset_noise=False).mean(dim=(2, 3))
    offset = recipe.sample_noise(latents, offset_noise=True).mean(dim=(2, 3))
    # per-(sample, channel) mean: std 1/32 without; sqrt(0.1^2 + 1/32^2) = 0.105 with
    assert plain.std() < 0.04 and 0.09 < offset.std() < 0.12


def test_prior_generation_precision_and_tf32():
    assert recipe.prior_generation_dtype(None, "cpu") is torch.float32
    assert recipe.prior_generation_dtype(None, "cuda") is torch.float16
    assert recipe.prior_generation_dtype("bf16", "cpu") is torch.bfloat16
    assert recipe.prior_generation_dtype("fp32", "cuda") is torch.float32
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        recipe.allow_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_one_run_with_diffusers_flags_and_a_mocked_hub_upload(workspace, monkeypatch):
    """Epochs, LR scaling, cosine restarts, min-SNR, offset noise, grads to None, a loader subprocess, prompts
    pre-computed with a named tokenizer, max length and attention mask, DDPM validation every epoch, class
    images in fp32 and the upload that --push_to_hub would send."""
    import huggingface_hub

    root, pipe, _ = workspace
    sent = {}

    def create_repo(repo_id, exist_ok, token):
        sent["create_repo"] = dict(repo_id=repo_id, exist_ok=exist_ok, token=token)
        return types.SimpleNamespace(repo_id=f"someone/{repo_id.split('/')[-1]}")

    def upload_folder(**kwargs):
        from pathlib import Path

        sent["upload_folder"] = kwargs
        sent["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = root / "many-flags"
    result = main(
        parse_args(
            recipe_argv(workspace, "many-flags")
            + [
                "--num_train_epochs",
                "2",
                "--train_batch_size",
                "2",
                "--learning_rate",
                "1e-4",
                "--scale_lr",
                "--lr_scheduler",
                "cosine_with_restarts",
                "--lr_num_cycles",
                "2",
                "--snr_gamma",
                "5",
                "--offset_noise",
                "--set_grads_to_none",
                "--dataloader_num_workers",
                "1",
                "--pre_compute_text_embeddings",
                "--tokenizer_name",
                f"{pipe}/tokenizer",
                "--tokenizer_max_length",
                "12",
                "--text_encoder_use_attention_mask",
                "--validation_prompt",
                "a sks star",
                "--validation_epochs",
                "1",
                "--num_validation_images",
                "2",
                "--validation_scheduler",
                "DDPMScheduler",
                "--num_inference_steps",
                "2",
                "--with_prior_preservation",
                "--class_data_dir",
                str(root / "class"),
                "--class_prompt",
                "a star",
                "--num_class_images",
                "2",
                "--prior_generation_precision",
                "fp32",
                "--allow_tf32",
                "--seed",
                "0",
                "--checkpointing_steps",
                "100",
                "--push_to_hub",
                "--hub_model_id",
                "bnn-star",
                "--hub_token",
                "secret",
            ]
        )
    )
    # 3 instance images (> 2 class images), batch 2: 2 steps per epoch, 2 epochs
    assert result["steps"] == 4 and result["epochs"] == 2
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert len(list((root / "class").glob("*.png"))) == 2
    assert sent["create_repo"] == {"repo_id": "bnn-star", "exist_ok": True, "token": "secret"}
    upload = sent["upload_folder"]
    assert upload["repo_id"] == "someone/bnn-star" and upload["folder_path"] == str(out)
    assert upload["token"] == "secret" and upload["commit_message"] == "End of training"
    assert "checkpoint-*" in upload["ignore_patterns"]
    assert {"README.md", "unet", "bayesian_state.safetensors", "training_curves.png", "validation"} <= set(
        sent["files"]
    )
    assert result["hub_repo"] == "someone/bnn-star"
    assert math.isfinite(result["final_loss"])


def test_grids_upscale_small_images_with_nearest_and_a_caption_row():
    from bayeslayers.integrations.dreambooth.images import MIN_CELL, captioned_grid

    rng = np.random.default_rng(0)
    small = [rng.random((16, 16, 3)) for _ in range(3)]
    grid = np.asarray(captioned_grid(small, "a sks star on a black background", columns=2))
    header = grid.shape[0] - 2 * MIN_CELL
    assert grid.shape[1] == 2 * MIN_CELL and header > 0
    caption = grid[:header]
    assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on white
    cell = grid[header : header + MIN_CELL, :MIN_CELL].astype(int)
    blocks = cell.reshape(16, 16, 16, 16, 3)  # 16x16 source pixels, each a 16x16 block
    assert (blocks == blocks[:, :1, :, :1]).all()  # nearest: every block is one colour
    expected = (np.clip(small[0], 0, 1) * 255).round().astype(int)
    np.testing.assert_array_equal(blocks[:, 0, :, 0], expected)


def test_training_curves_mark_validation_steps(tmp_path, monkeypatch):
    import matplotlib.axes

    from bayeslayers.integrations.dreambooth.export import plot_history

    marked = []
    real = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axvline", lambda self, x, *a, **k: marked.append(x) or real(self, x, *a, **k)
    )
    history = {
        "step": [1, 2, 3, 4],
        "loss": [0.4, 0.3, 0.3, 0.2],
        "kl": [1.0, 2.0, 3.0, 4.0],
        "mean_sigma": [0.01] * 4,
        "validation_step": [2, 4],
    }
    plot_history(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert sorted(set(marked)) == [2, 4] and len(marked) == 2 * 3  # on each of the three panels


def test_model_card_embeds_the_final_grid_and_the_exact_command(workspace, tmp_path):
    from bayeslayers.integrations.dreambooth.export import write_model_card

    args = parse_args(
        recipe_argv(workspace, "out")
        + [
            "--output_dir",
            str(tmp_path),
            "--instance_prompt",
            "a photo of sks dog",
            "--validation_prompt",
            "sks dog in a bucket",
        ]
    )
    grid = tmp_path / "validation" / "step-000010.png"
    card = write_model_card(args, {"steps": 10}, {"unet": str(tmp_path / "unet")}, grid).read_text()
    assert "![final validation grid](validation/step-000010.png)" in card
    assert "bayeslayers-dreambooth --pretrained_model_name_or_path" in card
    assert "--instance_prompt 'a photo of sks dog'" in card  # shell-quoted, copy-pasteable
