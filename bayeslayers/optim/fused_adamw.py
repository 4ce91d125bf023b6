"""FusedBayesAdamW: AdamW with the update of the Bayesian layers' mu and rho applied in their gradient pass.

A training loop keeps its shape (``loss.backward(); opt.step(); opt.zero_grad()``, LR schedulers, param groups,
``state_dict``): the object *is* a ``torch.optim.AdamW`` (same arguments, groups and per-parameter state, so its
state_dict loads into a plain AdamW and back). The difference is when the posterior parameters move: each
Bayesian layer's backward forms d_mu and d_rho from dW and hands them straight to :meth:`step_in_backward`,
which updates mu, rho and their moments in place and drops the gradients. No weight-sized gradient of a
Bayesian layer outlives its layer's backward; every other parameter (biases, plain weights) gets its gradient in
``.grad`` as usual and is updated by AdamW in :meth:`step`.

What needs every gradient before any update cannot be combined with it, and says so (``docs/optim.md``):
gradient accumulation and a layer used twice per step (a second gradient before ``step()``), GradScaler
(fp16 mixed precision), torch.compile. Global-norm clipping does not see these gradients: clip only the other
parameters knowingly, or use a stock optimizer.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from bayeslayers.kernels.reparameterized import STEP_IN_BACKWARD

from ..convert import posterior_layers

UNSUPPORTED_OPTIONS = {
    "amsgrad": False,
    "maximize": False,
    "capturable": False,
    "differentiable": False,
    "sigma_space": False,
}


def adamw_state(state: dict, param: torch.Tensor) -> dict:
    """``state`` (one parameter's optimizer state) filled as torch.optim.AdamW initialises it, when empty."""
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch's single-tensor AdamW step on ``param`` with ``grad``, ``state`` and ``group``'s options."""
    beta1, beta2 = group["betas"]
    adamw(
        [param],
        [grad],
        [state["exp_avg"]],
        [state["exp_avg_sq"]],
        [],
        [state["step"]],
        foreach=False,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


class FusedBayesAdamW(torch.optim.AdamW):
    """AdamW (torch's update, bit for bit) whose update of every Bayesian layer's ``weight_mu`` / ``weight_rho``
    runs in backward as soon as the layer's gradient pass has formed them.

    params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (param groups with their own ``lr``, e.g. a
    separate rho learning rate, work as there). ``all_reduce``: average each in-backward gradient over the
    default process group first (``None``: when ``torch.distributed`` is initialised with more than one process);
    wrap the model with DDP after :func:`exclude_from_ddp`. Parameters that reach ``.grad`` (non-Bayesian ones,
    or Bayesian ones on the ``reference`` backend) are updated in :meth:`step`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, all_reduce=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        if all_reduce is None:
            all_reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.all_reduce = bool(all_reduce)
        # a group of its own: its reductions never interleave with DDP's bucket reductions on the default group
        self._process_group = dist.new_group() if self.all_reduce else None
        self._step_supports_amp_scaling = True  # GradScaler hands step() its scale: refused there, clearly
        self._stepped_in_backward: set[int] = set()
        self._groups_by_param: dict[int, dict] = {}
        self._index_groups()
        self._attach(self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_groups_by_param"):  # after __init__
            self._index_groups()
            self._attach(self.param_groups[-1:])

    def _attach(self, groups) -> None:
        """Points the parameters of ``groups`` at :meth:`step_in_backward` (weakly: they must not keep the
        optimizer alive)."""
        step = weakref.WeakMethod(self.step_in_backward)
        for group in groups:
            for param in group["params"]:
                setattr(param, STEP_IN_BACKWARD, step)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts: index them again
        self._index_groups()

    def _index_groups(self) -> None:
        self._groups_by_param = {}
        for group in self.param_groups:
            for option, supported in UNSUPPORTED_OPTIONS.items():
                if group.get(option, supported) != supported:
                    raise ValueError(
                        f"FusedBayesAdamW does not support {option}={group[option]!r}; use a stock optimizer "
                        f"(torch.optim.AdamW{', or the sigma-space AdamW' if option == 'sigma_space' else ''}) "
                        "for it"
                    )
            for param in group["params"]:
                self._groups_by_param[id(param)] = group

    def _check_first_gradient(self, param: torch.Tensor) -> dict:
        """The group of ``param``, after checking that it takes its first gradient of this step."""
        if id(param) in self._stepped_in_backward:
            raise RuntimeError(
                "FusedBayesAdamW: a Bayesian parameter received a second gradient before step() (gradient "
                "accumulation, or a layer used twice in one step); it updates in backward, so each parameter "
                "takes one gradient per step: use torch.optim.AdamW (the recipes: --no-fused_optimizer)"
            )
        if param.grad is not None:
            raise RuntimeError(
                "FusedBayesAdamW: a Bayesian parameter holds a .grad as well as its in-backward gradient (e.g. a "
                "KL computed apart from the sampling forward, or a gradient not cleared by zero_grad): use "
                "torch.optim.AdamW for such a loss"
            )
        group = self._groups_by_param.get(id(param))
        if group is None:
            raise RuntimeError("FusedBayesAdamW: a gradient pass handed it a parameter that is in none of its groups")
        return group

    def _state(self, param: torch.Tensor) -> dict:
        return adamw_state(self.state[param], param)

    @torch.no_grad()
    def fused_adamw_arguments(self, mu: torch.Tensor, rho: torch.Tensor):
        """What a gradient pass needs to run this step's AdamW on ``mu`` and ``rho`` itself (``AdamWArguments``:
        moments and scalars), counting the step as taken; None when it cannot (gradients to all-reduce first,
        moments not contiguous float32)."""
        from bayeslayers.kernels.kernel_ops import AdamWArguments

        if self.all_reduce:
            return None
        groups = [self._check_first_gradient(p) for p in (mu, rho)]
        states = [self._state(p) for p in (mu, rho)]
        tensors = [t for state in states for t in (state["exp_avg"], state["exp_avg_sq"])]
        if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device == mu.device for t in tensors):
            return None
        scalars = []
        for group, state in zip(groups, states):
            state["step"] += 1
            step = float(state["step"])
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            step_size = lr / (1 - beta1**step)
            scalars.append((1 - lr * decay, 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps, -step_size))
        self._stepped_in_backward.update((id(mu), id(rho)))
        return AdamWArguments(tuple(tensors), *scalars)

    @torch.no_grad()
    def step_in_backward(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW on ``param`` with ``grad`` (consumed), called by a Bayesian layer's gradient pass."""
        group = self._check_first_gradient(param)
        if self.all_reduce:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=self._process_group)
            grad.div_(dist.get_world_size(self._process_group))
        adamw_update(param, grad, self._state(param), group)
        self._stepped_in_backward.add(id(param))

    def step(self, closure=None):
        """AdamW on every parameter holding a ``.grad`` (those not updated in backward); ends the step."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            self.grad_scale = self.found_inf = None
            raise RuntimeError(
                "FusedBayesAdamW cannot run under GradScaler (fp16 mixed precision): the Bayesian layers were "
                "updated in backward, before the scaler's inf check of every gradient; use bf16 mixed precision "
                "(no scaler) or torch.optim.AdamW"
            )
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) in self._stepped_in_backward and param.grad is not None:
                    raise RuntimeError(
                        "FusedBayesAdamW: a Bayesian parameter updated in backward also holds a .grad (e.g. a KL "
                        "computed apart from the sampling forward): use torch.optim.AdamW for such a loss"
                    )
        loss = super().step(closure)
        self._stepped_in_backward.clear()
        return loss


def exclude_from_ddp(model: torch.nn.Module) -> list[str]:
    """Tells ``DistributedDataParallel`` (call before wrapping ``model``) to leave the Bayesian layers' mu and rho
    alone: :class:`FusedBayesAdamW` all-reduces their gradients itself, in backward. Returns the names."""
    from torch.nn.parallel import DistributedDataParallel

    names = [f"{name}.{p}".lstrip(".") for name, _ in posterior_layers(model) for p in ("weight_mu", "weight_rho")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names
