"""Timing and memory of one provider step: forward, backward, full (forward + backward, KL included)."""

from __future__ import annotations

import statistics

import torch


def _loss(out, kl):
    return out.float().mean() + (0 if kl is None else 1e-6 * kl)


def time_call(fn, device: torch.device, min_run_time: float) -> tuple[float, float, float]:
    """(median, 20 %, 80 % quantile) in milliseconds; warm-up excluded."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    import torch.utils.benchmark as benchmark

    fn()
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(t * 1e3 for t in measurement.times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def mode_function(module, x, mode: str):
    """A zero-argument callable running ``mode`` of the module's training step."""
    params = [p for p in module.parameters() if p.requires_grad] + [x]

    def forward():
        with torch.no_grad() if mode == "inference" else torch.enable_grad():
            return module(x)

    def full():
        for p in params:
            p.grad = None
        _loss(*module(x)).backward()

    if mode == "forward":
        return forward
    if mode == "full":
        return full
    loss = _loss(*module(x))

    def backward():
        for p in params:
            p.grad = None
        loss.backward(retain_graph=True)

    return backward


def saved_bytes(module, x) -> int:
    """Bytes of non-parameter, non-buffer tensors autograd saves for backward in one forward."""
    model = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in model and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak allocated bytes of one call on CUDA; None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
