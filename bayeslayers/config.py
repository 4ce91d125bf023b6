"""BayesConfig: every option of a conversion in one place, with its default and help text.

``convert``, the presets, checkpoints and the recipes' command lines all read this dataclass, so each default
is written once (here)::

    config = BayesConfig(target_modules=["to_q", "to_v"], mode="lora", rank=8, prior_dtype=torch.bfloat16)
    bayeslayers.convert(unet, config=config)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from .kl import KL_DIRECTIONS
from .targets import check_targets

MODES = ("full", "lora", "peft")
FACTOR_CHOICES = ("AB", "A", "B", "")  # "": a plain (deterministic) LoRA, for baselines
PRIOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# every Bayesian layer's options
POSTERIOR_FIELDS = ("init_sigma", "prior_sigma", "kl_direction", "prior_dtype", "store_prior")
LORA_FIELDS = ("rank", "lora_alpha", "bayesian_factors")  # the LoRA layers' options on top
PEFT_FIELDS = ("adapter_name", "bayesian_factors", "factor_prior")  # a peft adapter's options on top
FACTOR_PRIORS = ("current", "zero")
OPTIMIZER_FIELDS = ("rho_learning_rate", "sigma_space")  # how training steps the posterior (bayeslayers.optim)


def _option(default, help_text: str, **metadata):
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass(frozen=True)
class BayesConfig:
    """Which modules become Bayesian, and how (peft's ``LoraConfig`` pattern: one dataclass, every option)."""

    target_modules: str | tuple[str, ...] | None = _option(
        None, "module names (exact, or a '.name' suffix) or one full-match regex"
    )
    exclude_modules: str | tuple[str, ...] | None = _option(None, "same forms; checked before target_modules")
    mode: str = _option(
        "full",
        "'full': the weight becomes Bayesian; 'lora': a Bayesian LoRA adapter is added; "
        "'peft': the model's peft LoRA adapter becomes Bayesian in place",
        choices=MODES,
    )
    init_sigma: float = _option(0.01, "initial posterior std of every Bayesian weight (> 0)")
    prior_sigma: float = _option(0.01, "prior std (> 0); the prior mean is the pretrained weight")
    kl_direction: str = _option(
        "qp", "'qp': KL(q||p), the variational term; 'pq': KL(p||q), the seed paper's code", choices=KL_DIRECTIONS
    )
    prior_dtype: torch.dtype | None = _option(
        None, "dtype of the stored prior mean (bfloat16 halves its memory); None: float32"
    )
    store_prior: bool = _option(
        True,
        "False: store no prior (one weight's worth of memory less per Bayesian weight); only for training "
        "without the KL term (KL weight 0): kl_loss then raises",
    )
    rank: int = _option(4, "LoRA rank (mode 'lora')")
    lora_alpha: float | None = _option(None, "LoRA alpha (mode 'lora'); None: = rank (scaling 1)")
    bayesian_factors: str = _option(
        "AB", "LoRA factors that are Bayesian: 'AB', 'A', 'B' or '' (plain LoRA)", choices=FACTOR_CHOICES
    )
    adapter_name: str | None = _option(None, "peft adapter made Bayesian (mode 'peft'); None: the active one")
    factor_prior: str = _option(
        "current",
        "prior mean of a peft factor (mode 'peft'): 'current' (its value at convert) or 'zero'",
        choices=FACTOR_PRIORS,
    )
    rho_learning_rate: float | None = _option(
        None, "learning rate of every posterior's rho (sigma with sigma_space); None: the model's learning rate"
    )
    sigma_space: bool = _option(
        False,
        "step sigma itself, as the seed paper's code (SigmaAdamW): AdamW then moves sigma by ~lr per step instead "
        "of ~sigmoid(rho)*lr (~0.01*lr at sigma 0.01)",
    )

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules"):
            value = check_targets(getattr(self, name), name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)
        if isinstance(self.prior_dtype, str):
            object.__setattr__(self, "prior_dtype", dtype_from_name(self.prior_dtype, "prior_dtype"))
        self.validate()

    def validate(self) -> None:
        """Raises a ValueError naming the first option that is out of range."""
        check_choice(self.mode, MODES, "mode")
        check_positive(self.init_sigma, "init_sigma")
        check_positive(self.prior_sigma, "prior_sigma")
        check_choice(self.kl_direction, KL_DIRECTIONS, "kl_direction")
        if self.prior_dtype is not None and self.prior_dtype not in PRIOR_DTYPES:
            raise ValueError(f"prior_dtype must be one of {PRIOR_DTYPES} or None, got {self.prior_dtype!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.lora_alpha is not None and (
            isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0
        ):
            raise ValueError(f"lora_alpha must be a positive number or None, got {self.lora_alpha!r}")
        check_choice(self.bayesian_factors, FACTOR_CHOICES, "bayesian_factors")
        if self.adapter_name is not None and (not isinstance(self.adapter_name, str) or not self.adapter_name):
            raise ValueError(f"adapter_name must be a non-empty string or None, got {self.adapter_name!r}")
        check_choice(self.factor_prior, FACTOR_PRIORS, "factor_prior")
        if self.mode == "peft" and not self.bayesian_factors:
            raise ValueError("bayesian_factors must name at least one factor ('AB', 'A' or 'B') in mode 'peft'")
        check_bool(self.store_prior, "store_prior")
        if self.rho_learning_rate is not None:
            check_positive(self.rho_learning_rate, "rho_learning_rate")
        if not isinstance(self.sigma_space, bool):
            raise ValueError(f"sigma_space must be True or False, got {self.sigma_space!r}")

    def replace(self, **changes) -> BayesConfig:
        """A copy with ``changes``; unknown names raise a TypeError listing the options."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown BayesConfig option(s) {unknown}; options: {option_names()}")
        return dataclasses.replace(self, **changes)

    def layer_options(self, names) -> dict:
        """The options ``names`` as keyword arguments of a layer type's ``from_module``."""
        return {name: getattr(self, name) for name in names}

    @classmethod
    def add_arguments(cls, parser, names=POSTERIOR_FIELDS, defaults: dict | None = None):
        """Adds ``--<name>`` flags for the options ``names`` (help text, type and choices from the fields) to an
        ``argparse`` parser (or argument group, or its ``add_argument`` function); returns ``parser``."""
        add = getattr(parser, "add_argument", parser)
        defaults = defaults or {}
        by_name = {f.name: f for f in fields(cls)}
        for name in names:
            option = by_name[name]
            kwargs = {"default": defaults.get(name, option.default), "help": option.metadata["help"]}
            if "choices" in option.metadata:
                kwargs["choices"] = option.metadata["choices"]
            if option.type in (bool, "bool"):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _ARGUMENT_TYPES.get(name, str)
            add(f"--{name}", **kwargs)
        return parser

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, names=POSTERIOR_FIELDS, **extra) -> BayesConfig:
        """A config from the flags :meth:`add_arguments` added (plus ``extra`` options)."""
        return cls(**{name: getattr(args, name) for name in names}, **extra)


def option_names() -> list[str]:
    return [f.name for f in fields(BayesConfig)]


def check_positive(value, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{argument} must be a positive finite number, got {value!r}")
    return float(value)


def check_bool(value, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{argument} must be True or False, got {value!r}")
    return value


def check_choice(value, choices, argument: str):
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


def dtype_from_name(name: str, argument: str) -> torch.dtype:
    """torch.bfloat16 from 'bfloat16' (or 'torch.bfloat16'); a ValueError naming ``argument`` otherwise."""
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{argument} must name a torch dtype such as 'bfloat16', got {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """'bfloat16' for torch.bfloat16 (JSON-friendly), None for None."""
    return None if dtype is None else str(dtype).replace("torch.", "")


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def _optional_dtype(text: str):
    """A dtype name (JSON-friendly in saved arguments), checked; None for 'none' / 'float32'."""
    return None if text.lower() in ("none", "float32") else dtype_name(dtype_from_name(text, "--prior_dtype"))


_ARGUMENT_TYPES = {
    "init_sigma": float,
    "prior_sigma": float,
    "rank": int,
    "lora_alpha": _optional_float,
    "rho_learning_rate": _optional_float,
    "prior_dtype": _optional_dtype,
}

DEFAULTS = BayesConfig()  # the one place every default is read from
