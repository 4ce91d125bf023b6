"""peft LoRA adapters made Bayesian in place (``convert(model, mode="peft")``).

A targeted peft ``LoraLayer`` (``lora.Linear`` / ``lora.Conv2d``) keeps its module tree: the chosen factors of one
adapter, ``lora_A[adapter]`` (rank, in) and / or ``lora_B[adapter]`` (out, rank), become Bayesian layers, and the
layer becomes a subclass of its peft class (as ``torch.nn.utils.parametrize`` does) that only adds the fused
kernel path. So peft's forward, ``disable_adapter()``, ``set_adapter``, merging (posterior mean) and unloading keep
working.

State dicts: a Bayesian factor shows peft's keys only: its posterior mean as ``weight`` (and ``bias``), so
``get_peft_model_state_dict``, ``save_pretrained`` and diffusers' ``save_lora_weights`` write a stock LoRA file of
the mean, and stock LoRA files load into it. The posterior (rho, the prior mean) goes through
:func:`bayeslayers.save` / :func:`bayeslayers.load`, which hold both factors of the adapter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.lora import layer as peft_lora

from .config import DEFAULTS, FACTOR_PRIORS, PEFT_FIELDS, POSTERIOR_FIELDS, check_choice
from .layers import BayesConv2d, BayesianLayer, BayesLinear
from .layers.lora import fused_lora_linear
from .registry import register_layer_type


class _PeftFactor:
    """A Bayesian factor's state-dict face: ``weight`` (the posterior mean) and ``bias``, as a peft factor has."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in (("weight", self.weight_mu), ("bias", self.bias)):
            if tensor is not None:
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name, target in (("weight", self.weight_mu), ("bias", self.bias)):
            if target is None:
                continue
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(target.shape)}."
                )
                continue
            with torch.no_grad():
                target.copy_(value)
        if strict:
            known = {prefix + "weight", prefix + "bias"}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)


class PeftBayesLinear(_PeftFactor, BayesLinear):
    """A Bayesian peft LoRA factor of a Linear layer (state dict: ``weight`` = posterior mean)."""


class PeftBayesConv2d(_PeftFactor, BayesConv2d):
    """A Bayesian peft LoRA factor of a Conv2d layer (state dict: ``weight`` = posterior mean)."""


def _bayesian_factor(plain: nn.Module, factor_prior: str, **posterior) -> BayesianLayer:
    """The Bayesian twin of a plain factor: mean = its weight; prior mean = a copy of it ('current') or zero."""
    weight = plain.weight.detach()
    prior_mean = weight if factor_prior == "current" else None
    common = dict(bias=plain.bias is not None, device=weight.device, prior_mean=prior_mean, **posterior)
    if isinstance(plain, nn.Conv2d):
        factor = PeftBayesConv2d(
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size,
            plain.stride,
            plain.padding,
            plain.dilation,
            plain.groups,
            padding_mode=plain.padding_mode,
            **common,
        )
    else:
        factor = PeftBayesLinear(plain.in_features, plain.out_features, **common)
    factor._copy_from(plain)
    factor.weight_mu.requires_grad_(plain.weight.requires_grad)
    factor.weight_rho.requires_grad_(plain.weight.requires_grad)
    return factor.train(plain.training)


def _is_identity(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Identity) or not dropout.training or getattr(dropout, "p", 1.0) == 0.0


def active_adapter(module: nn.Module, adapter_name: str | None) -> str:
    """The adapter ``convert`` makes Bayesian in ``module``: ``adapter_name``, else the single active one."""
    if adapter_name is not None:
        return adapter_name
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(f"adapter_name is needed: the peft layer has {len(active)} active adapters {active}")
    return active[0]


class _BayesPeftLayer:
    """What the swapped peft layer adds: options, the Bayesian state, export, and the fused forward."""

    PEFT_CLASS: type

    @classmethod
    def accepts(cls, module: nn.Module, adapter_name: str | None = None, **_) -> bool:
        """True when ``module`` holds the adapter (a model's adapter need not cover every layer)."""
        return active_adapter(module, adapter_name) in module.lora_A

    @classmethod
    def from_module(
        cls,
        module,
        *,
        adapter_name=DEFAULTS.adapter_name,
        bayesian_factors=DEFAULTS.bayesian_factors,
        factor_prior=DEFAULTS.factor_prior,
        **posterior,
    ):
        if type(module) is not cls.PEFT_CLASS:
            raise TypeError(f"{cls.__name__} converts a peft {cls.PEFT_CLASS.__name__}, got {type(module).__name__}")
        check_choice(factor_prior, FACTOR_PRIORS, "factor_prior")
        adapter = active_adapter(module, adapter_name)
        if adapter not in module.lora_A:
            raise ValueError(f"adapter_name {adapter!r} is not an adapter of this layer; it has {list(module.lora_A)}")
        if adapter in module.lora_variant:
            raise ValueError(
                f"adapter {adapter!r} is a LoRA variant ({type(module.lora_variant[adapter]).__name__}); only plain "
                "LoRA adapters can become Bayesian"
            )
        if module.merged:
            raise ValueError("the peft layer has merged adapters; call unmerge_adapter() before converting")
        if not bayesian_factors:
            raise ValueError("bayesian_factors must name at least one factor ('AB', 'A' or 'B') in mode 'peft'")
        for name in bayesian_factors:
            factors = module.lora_A if name == "A" else module.lora_B
            factors[adapter] = _bayesian_factor(factors[adapter], factor_prior, **posterior)
        module.__class__ = cls
        module.bayes_adapter, module.bayes_factors, module.factor_prior = adapter, bayesian_factors, factor_prior
        return module

    def _factors(self):
        """(path, module) of the adapter's two factors."""
        return [(f"lora_{n}.{self.bayes_adapter}", getattr(self, f"lora_{n}")[self.bayes_adapter]) for n in "AB"]

    def _posteriors(self):
        return [f for _, f in self._factors() if isinstance(f, BayesianLayer)]

    def bayes_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors that :func:`bayeslayers.save` writes: each factor's mean, rho, prior mean and bias
        (a plain factor's weight and bias); views sharing storage."""
        state = {}
        for path, factor in self._factors():
            tensors = list(factor.named_parameters(recurse=False))
            buffers = factor.named_buffers(recurse=False)
            tensors += [(n, b) for n, b in buffers if n not in factor._non_persistent_buffers_set]
            state.update({f"{path}.{name}": tensor.detach() for name, tensor in tensors if tensor is not None})
        return state

    def options(self) -> dict:
        options = {"adapter_name": self.bayes_adapter, "bayesian_factors": self.bayes_factors}
        options["factor_prior"] = self.factor_prior
        options.update(self._posteriors()[0].options())
        return options

    def apply_options(self, options: dict) -> None:
        """Sets the factors' prior and KL options; the structure (adapter, factors, prior kind) must match."""
        for name, have in (
            ("adapter_name", self.bayes_adapter),
            ("bayesian_factors", self.bayes_factors),
            ("factor_prior", self.factor_prior),
        ):
            if options[name] != have:
                raise ValueError(f"{name} is {have!r} in this layer but {options[name]!r} in the options")
        for factor in self._posteriors():
            factor.apply_options({**options, "prior_dtype": options.get("prior_dtype") or "float32"})

    def to_deterministic(self) -> nn.Module:
        """This layer as a stock peft layer again, its factors plain modules holding the posterior means."""
        for path, factor in self._factors():
            if isinstance(factor, BayesianLayer):
                plain = factor.to_deterministic()
                plain.weight.requires_grad_(factor.weight_mu.requires_grad)
                getattr(self, path.split(".")[0])[self.bayes_adapter] = plain.train(factor.training)
        self.__class__ = self.PEFT_CLASS
        del self.bayes_adapter, self.bayes_factors, self.factor_prior
        return self

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's, after turning this layer back into a stock one when the Bayesian adapter goes."""
        peft_class = self.PEFT_CLASS
        if adapter_name == self.bayes_adapter:
            self.to_deterministic()
        peft_class.delete_adapter(self, adapter_name)


class BayesPeftLinear(_BayesPeftLayer, peft_lora.Linear):
    """A peft ``lora.Linear`` whose adapter is Bayesian; the base GEMM and the adapter run as one kernel where the
    backend fuses LoRA (one active adapter, not merged, no dropout in training, no LoRA bias, no extra arguments)."""

    PEFT_CLASS = peft_lora.Linear

    def _fusable(self) -> bool:
        adapter = self.bayes_adapter
        return (
            not self.disable_adapters
            and not self.merged
            and list(self.active_adapters) == [adapter]
            and adapter not in self.lora_variant
            and not self.lora_bias[adapter]
            and not self.fan_in_fan_out
            and _is_identity(self.lora_dropout[adapter])
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and self._fusable():
            adapter = self.bayes_adapter
            y = fused_lora_linear(x, self.base_layer, self.lora_A[adapter], self.lora_B[adapter], self.scaling[adapter])
            if y is not None:
                return y
        return super().forward(x, *args, **kwargs)


class BayesPeftConv2d(_BayesPeftLayer, peft_lora.Conv2d):
    """A peft ``lora.Conv2d`` whose adapter is Bayesian (peft's forward; A is a conv like the base, B is 1x1)."""

    PEFT_CLASS = peft_lora.Conv2d


_OPTIONS = POSTERIOR_FIELDS + PEFT_FIELDS
register_layer_type("peft_lora_linear", "peft", peft_lora.Linear, BayesPeftLinear, _OPTIONS)
register_layer_type("peft_lora_conv2d", "peft", peft_lora.Conv2d, BayesPeftConv2d, _OPTIONS)
