"""Attaching a :class:`PowerSteering` network to a frozen ``UNet2DConditionModel`` with hooks.

A forward pre-hook on the UNet computes the residuals from the current condition and the UNet's own timestep
embedding, passes the down and mid residuals as ControlNet-style residuals (added to any the caller passes),
and forward hooks on the up blocks' layers add the up residuals. The UNet's code and weights are untouched:
``detach()`` removes the hooks and the UNet computes exactly what it did before.
"""

from __future__ import annotations

import contextlib

import torch


def _unet_inputs(args, kwargs):
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return sample, timestep


def _expand_batch(condition: torch.Tensor, batch: int) -> torch.Tensor:
    """The condition for a UNet batch of ``batch`` (repeated for classifier-free guidance's stacked batches)."""
    if condition.shape[0] == batch:
        return condition
    if batch % condition.shape[0]:
        raise ValueError(f"condition batch {condition.shape[0]} does not divide the UNet batch {batch}")
    return condition.repeat(batch // condition.shape[0], 1, 1, 1)


def _up_layers(unet) -> list[torch.nn.Module]:
    """The module after which each up-block layer's output is complete (its attention, else its resnet)."""
    layers = []
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            layers.append(attentions[j] if attentions is not None and len(attentions) > j else resnet)
    return layers


def _add_to_output(output, residual):
    if isinstance(output, torch.Tensor):
        return output + residual
    if isinstance(output, tuple):
        return (output[0] + residual, *output[1:])
    output.sample = output.sample + residual  # a BaseOutput (return_dict=True)
    return output


class Steerer:
    """The hooks of one attached steering network; see :meth:`PowerSteering.attach`."""

    def __init__(self, steering, unet):
        self.steering, self.unet = steering, unet
        self.condition: torch.Tensor | None = None
        self.strength = 1.0
        self._pending_up: list[torch.Tensor] = []
        layers = _up_layers(unet)
        if len(layers) != len(steering.up_scales):
            raise ValueError(
                f"unet has {len(layers)} up-block layers, the steering network was built for "
                f"{len(steering.up_scales)}: build it with PowerSteering.from_unet(unet)"
            )
        self._handles = [unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)]
        self._handles += [layer.register_forward_hook(self._after_up_layer) for layer in layers]

    def _before_unet(self, unet, args, kwargs):
        if self.condition is None or self.strength == 0:
            self._pending_up = []
            return None
        sample, timestep = _unet_inputs(args, kwargs)
        self.steering.check_condition(self.condition, tuple(sample.shape[-2:]))
        timestep_cond = kwargs.get("timestep_cond")
        temb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        down, mid, up = self.steering(_expand_batch(self.condition, sample.shape[0]).to(sample.device), temb)
        if self.strength != 1.0:
            down, mid, up = [r * self.strength for r in down], mid * self.strength, [r * self.strength for r in up]
        given_down = kwargs.get("down_block_additional_residuals")
        given_mid = kwargs.get("mid_block_additional_residual")
        if given_down is not None:
            down = [a + b for a, b in zip(given_down, down)]
        if given_mid is not None:
            mid = given_mid + mid
        kwargs = {
            **kwargs,
            "down_block_additional_residuals": tuple(r.to(sample.dtype) for r in down),
            "mid_block_additional_residual": mid.to(sample.dtype),
        }
        self._pending_up = list(up)
        return args, kwargs

    def _after_up_layer(self, module, inputs, output):
        if not self._pending_up:
            return None
        residual = self._pending_up.pop(0)
        return _add_to_output(output, residual.to(output[0].dtype if isinstance(output, tuple) else residual.dtype))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending_up = []

    @contextlib.contextmanager
    def conditioned(self, condition: torch.Tensor | None, strength: float = 1.0):
        """Within the block, UNet calls are steered by ``condition`` (None: not steered) at ``strength``."""
        previous = self.condition, self.strength
        self.condition, self.strength = condition, strength
        try:
            yield self
        finally:
            self.condition, self.strength = previous
