"""Timing and memory of one provider's step: forward, backward, full (forward + backward, KL included)."""

from __future__ import annotations

import statistics

import torch

from bayeslayers.diagnostics import saved_tensor_bytes

MODES = ("forward", "backward", "full")
KL_WEIGHT = 1e-6


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for non-fp32 runs (fp32 parameters, ``dtype`` compute), as diffusion training does."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def loss_of(out: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
    return out.float().mean() if kl is None else out.float().mean() + KL_WEIGHT * kl


def step_function(module, x: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32):
    """A zero-argument callable running ``mode`` of one training step; gradients are set to None first."""
    grads = [p for p in module.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])

    def clear():
        for tensor in grads:
            tensor.grad = None

    def forward():
        with autocast(x.device, dtype):
            return module(x)

    def full():
        clear()
        with autocast(x.device, dtype):
            loss = loss_of(*module(x))
        loss.backward()

    if mode == "forward":
        return forward
    if mode == "full":
        return full
    if mode != "backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with autocast(x.device, dtype):
        graph = loss_of(*module(x))

    def backward():
        clear()
        graph.backward(retain_graph=True)

    return backward


def sample_times(fn, device: torch.device, budget_s: float) -> list[float]:
    """Per-call times in ms over about ``budget_s`` seconds, after warm-up (which is not recorded).

    CUDA: ``triton.testing.do_bench`` (L2 flushed between calls). CPU: ``torch.utils.benchmark`` blocks.
    """
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=25, rep=max(100, int(budget_s * 1e3)), return_mode="all"))
    import torch.utils.benchmark as benchmark

    fn()
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=budget_s)
    return [t * 1e3 for t in measurement.times]


def summarize(times: list[float]) -> tuple[float, float, float]:
    """(median, 20 % quantile, 80 % quantile)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def saved_bytes(module, x, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of non-parameter, non-buffer tensors autograd saves for backward in one forward of ``module(x)``
    under autocast to ``dtype`` (``bayeslayers.diagnostics.saved_tensor_bytes``)."""
    with autocast(x.device, dtype):
        return saved_tensor_bytes(module, x)


def state_bytes(module) -> int:
    """Bytes of the module's parameters and buffers (persistent memory, gradients excluded)."""
    tensors = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in list(module.parameters()) + list(module.buffers())
    }
    return sum(tensors.values())


def peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during one call above what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the allocation and free events torch's profiler records
    (``profile_memory=True``) for every tensor allocation of the call, summed in time order. The profiler does
    not see the frees of blocks allocated before it started (a training step frees the last step's gradients),
    so ``fn`` runs once under a first profile and the second call is measured.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak
