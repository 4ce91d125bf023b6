"""CPU posterior kernels against the machine's memory floor, measured in the same run.

    python -m benchmarks.kernel_throughput [--sizes 1638400,6553600] [--repeats 15] [--out benchmarks/results/]

A stream probe (torch copy of a 256 MiB float32 array: read + write) gives the bandwidth; each kernel of the
``cpp`` backend (``kernels/cpu/``) is timed on preallocated tensors and reported in ns per weight, next to the
floor its bytes set at that bandwidth (``floor_fraction`` = floor / time: 1.0 is memory-bound at the probe's
speed). Bytes per weight: sample + KL reads mu, rho, prior and writes w (16); the gradient pass reads d_w, mu,
rho, prior and writes d_mu, d_rho, w (28); eps alone writes 4. Medians of ``--repeats`` calls, probe and kernels
interleaved so background load hits both alike. Appends to ``<out>/kernel_throughput.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from .environment import environment

PROBE_ELEMENTS = 1 << 26  # 256 MiB of float32: far above the last-level cache of a small machine's share
SIZES = (1280 * 1280, 5120 * 1280)  # an SD1.5 attention projection and a feed-forward output
KERNEL_BYTES = {"eps": 4, "sample_kl": 16, "gradient": 28}
FIELDS = [
    "kernel",
    "weights",
    "median_ms",
    "ns_per_weight",
    "bytes_per_weight",
    "floor_ns_per_weight",
    "floor_fraction",
    "probe_gbps",
    "isa",
    "threads",
    "device",
    "torch",
    "bayeslayers",
    "commit",
    "date",
    "notes",
]


def instruction_set_name(backend: str = "cpp") -> str:
    """The instruction set the cpp kernels run with ('' for other backends or without the extension)."""
    if backend != "cpp":
        return ""
    from bayeslayers.kernels import cpu

    return "" if cpu.unavailable_reason() else cpu.instruction_set()


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (fixed decimals lose the small fractions of a loaded machine)."""
    return float(f"{value:.{digits}g}")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def stream_probe(repeats: int = 15, elements: int = PROBE_ELEMENTS) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second) with torch's threads."""
    src, dst = torch.ones(elements), torch.empty(elements)
    ms = _median_ms(lambda: dst.copy_(src), repeats)
    return 2 * 4 * elements / (ms * 1e6)


def kernel_calls(numel: int) -> dict:
    """Zero-argument calls of each kernel on preallocated float32 tensors of ``numel`` weights."""
    from bayeslayers.kernels import cpu

    ext = cpu.extension()
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(numel, generator=generator) * 0.02
    rho = torch.full((numel,), -4.6)
    prior = mu + 0.001 * torch.randn(numel, generator=generator)
    d_w = torch.randn(numel, generator=generator)
    w, d_mu, d_rho = torch.empty(numel), torch.empty(numel), torch.empty(numel)
    kl = torch.empty(())
    return {
        "eps": lambda: ext.philox_normal_into(12345, w),
        "sample_kl": lambda: ext.sample_weight_kl(mu, rho, prior, 12345, 0.01, 0, w, kl),
        "gradient": lambda: ext.reparameterization_grad(d_w, mu, rho, prior, 12345, 1e-6, 0.01, 0, d_mu, d_rho, w),
    }


def measure(sizes=SIZES, repeats: int = 15, notes: str = "", probe_elements: int = PROBE_ELEMENTS) -> list[dict]:

    env = environment(torch.device("cpu"), notes)
    isa = instruction_set_name()
    rows = []
    for numel in sizes:
        calls = kernel_calls(numel)
        for name, fn in calls.items():
            probes, times = [], []
            for _ in range(3):  # interleaved: probe, kernel, probe, kernel, ...
                probes.append(stream_probe(max(3, repeats // 3), probe_elements))
                times.append(_median_ms(fn, repeats))
            gbps, ms = statistics.median(probes), statistics.median(times)
            ns = ms * 1e6 / numel
            floor_ns = KERNEL_BYTES[name] / gbps
            rows.append(
                {
                    "kernel": name,
                    "weights": numel,
                    "median_ms": significant(ms),
                    "ns_per_weight": significant(ns),
                    "bytes_per_weight": KERNEL_BYTES[name],
                    "floor_ns_per_weight": significant(floor_ns),
                    "floor_fraction": significant(floor_ns / ns),
                    "probe_gbps": significant(gbps),
                    "isa": isa,
                    "threads": torch.get_num_threads(),
                    **{k: env[k] for k in ("device", "torch", "bayeslayers", "commit", "date", "notes")},
                }
            )
            print(
                f"{name:10s} {numel:>9d} weights {ms:8.3f} ms  {ns:6.3f} ns/weight  floor {floor_ns:6.3f} ns "
                f"({floor_ns / ns:.2f} of it) at {gbps:.1f} GB/s  [{isa}]"
            )
    return rows


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated weight counts")
    p.add_argument("--repeats", type=int, default=15, help="calls per timing (median)")
    p.add_argument("--out", default="benchmarks/results/")
    p.add_argument("--probe_mib", type=int, default=PROBE_ELEMENTS * 4 >> 20, help="stream probe array size")
    p.add_argument("--notes", default="")
    args = p.parse_args(input_args)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(args) -> Path:
    rows = measure(args.sizes, args.repeats, args.notes, args.probe_mib << 18)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernel_throughput.csv"
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


if __name__ == "__main__":
    print(main(parse_args()))
