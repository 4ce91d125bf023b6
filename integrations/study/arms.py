"""The study's arms and settings: seven fine-tuning methods, each a set of recipe flags, and the sizes of the full
and quick studies."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arm:
    name: str
    flags: tuple[str, ...]  # bayeslayers-dreambooth flags that make this arm
    bayesian: bool
    train_mode: str
    kl_weight: float | None = None  # None: the study's KL weight for the arm's train mode


_FULL_BNN = ("--train_mode", "full", "--bayesian", "--bayes_preset", "dreambooth-bnn")
_LORA_BNN = ("--train_mode", "lora", "--bayesian", "--bayes_preset", "dreambooth-bnn-lora")
ARMS = {
    a.name: a
    for a in (
        Arm("dreambooth", ("--train_mode", "full", "--no-bayesian"), False, "full"),
        Arm("dreambooth-bnn", (*_FULL_BNN, "--no-sigma_space"), True, "full"),
        Arm("lora", ("--train_mode", "lora", "--no-bayesian"), False, "lora"),
        Arm("lora-bnn", (*_LORA_BNN, "--no-sigma_space"), True, "lora"),
        # sigma stepped in sigma space (SigmaAdamW), as the seed paper's code: the posterior moves ~100x more
        Arm("dreambooth-bnn-sigma", (*_FULL_BNN, "--sigma_space"), True, "full"),
        Arm("lora-bnn-sigma", (*_LORA_BNN, "--sigma_space"), True, "lora"),
        # IVON (natural-gradient VI): sigma is its Hessian estimate; its prior is the weight decay, so KL weight 0
        Arm("dreambooth-bnn-ivon", (*_FULL_BNN, "--optimizer", "ivon"), True, "full", kl_weight=0.0),
    )
}


@dataclass(frozen=True)
class StudySettings:
    """Everything that sizes a study; arms differ only by their flags and learning rate."""

    subjects: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    max_train_steps: int
    evaluations: int  # evaluation points after step 0, evenly spaced (15 = every 6.7 % of training)
    images_per_prompt: int  # per evaluation prompt, fixed initial-noise seeds
    learning_rate: dict = field(default_factory=lambda: {"full": 2e-4, "lora": 1e-3})
    # full: the prior is centred on the pretrained weights; LoRA: 0 as in the paper's scripts (the zero-mean prior
    # of the up matrix would act as a weight decay of strength kl_weight / prior_sigma^2 = 1 at 1e-4)
    kl_weight: dict = field(default_factory=lambda: {"full": 1e-4, "lora": 0.0})
    train_batch_size: int = 4
    with_prior_preservation: bool = True
    num_class_images: int = 32
    num_inference_steps: int = 20  # class images and the uncertainty analysis
    eval_inference_steps: int = 10  # evaluation images during training (their cost: see the recipe's README)
    guidance_scale: float = 3.0
    uncertainty_samples: int = 6  # posterior samples per image for the uncertainty analysis (0: skip it)
    uncertainty_images_per_prompt: int = 8
    model: str = "tiny-sd-32"  # the bundled model (tiny_sd.models.CONFIGS) whose subjects and judge are used

    @property
    def resolution(self) -> int:
        from bayeslayers.integrations.tiny_sd.models import CONFIGS

        return next(c.resolution for c in CONFIGS.values() if c.name == self.model)

    @property
    def eval_steps(self) -> int:
        return max(1, self.max_train_steps // self.evaluations)

    def replace(self, **changes) -> StudySettings:
        from dataclasses import replace

        return replace(self, **changes)


FULL = StudySettings(
    subjects=("checker_star", "split_circle", "striped_square", "ring_circle"),
    # the sigma-space arms equalled the rho-space ones on every metric at 3 seeds (docs/study.md): not in the
    # default run (about 73 min without them), still available with --arms
    arms=tuple(a for a in ARMS if not a.endswith("-sigma")),
    seeds=(0, 1, 2),
    max_train_steps=300,
    evaluations=15,
    images_per_prompt=4,
)
SMOKE = dict(  # the sizes of a smoke run (--quick)
    seeds=(0,),
    max_train_steps=8,
    evaluations=2,
    images_per_prompt=2,
    num_class_images=8,
    num_inference_steps=4,
    eval_inference_steps=4,
    uncertainty_samples=2,
    uncertainty_images_per_prompt=2,
)
QUICK = FULL.replace(subjects=("checker_star",), **SMOKE)
# The corruption stage on the 64 px model (its 16x16x4 latent holds 2-pixel textures): plain vs Bayesian full
# fine-tuning at a learning rate and length where plain fine-tuning overfits, evaluated every 5 % of training
CORRUPTION = FULL.replace(
    model="tiny-sd-64",
    subjects=("fine_checker_star", "pinstripe_square"),
    arms=("dreambooth", "dreambooth-bnn"),
    max_train_steps=1000,
    evaluations=20,
    images_per_prompt=2,
    learning_rate={"full": 5e-4, "lora": 1e-3},
    train_batch_size=1,
    uncertainty_samples=0,
)
