"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on any machine (no GPU needed).

    python -m bayeslayers.kernels.aot [--subset default|full] [--targets sm_80,sm_90] [--csv PATH]

The launches come from the library itself: each kernel wrapper (``sample_weight_and_kl``, ``sampled_matmul``,
...) is called on meta tensors with the options the layers pass, and the kernel launch it makes is captured
instead of run. Each captured launch is bound exactly as Triton's JIT binds it on a GPU (argument types,
16-byte alignment and divisibility hints, constexprs), then compiled with ``triton.compile`` for every autotune
config of the kernel and every target. Registers and local memory (spills) are read from the cubin with the
``cuobjdump`` shipped in the Triton wheel; shared memory from the compiled kernel's metadata.

Subsets: ``default`` is one bf16 launch per kernel (the layers' forward and weight-gradient launches) at
SD-like aligned sizes, with every config, for the given targets;
``full`` varies, per kernel, every dtype (fp32 with IEEE and TF32 dots, bf16, fp16 inputs) at the layers'
default options and, at bf16, every other value of every option the library launches (prior none/bf16/fp32,
both KL directions, with and without KL, bias, transposed weight reads, unaligned sizes and their scattered
RNG layout, 77 text tokens). The elementwise kernels take the full product of their options at aligned sizes
instead, and each dtype at unaligned sizes. Options a kernel does not read (prior and KL direction without KL)
are normalised by the wrappers, so one launch covers them.

Needs a real ``@triton.jit`` (``TRITON_INTERPRET`` unset): the tests run this module in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_REGISTERS = 255
CSV_FIELDS = [
    "kernel",
    "config",
    "specialization",
    "target",
    "registers",
    "spill_bytes",
    "shared_memory",
    "shared_memory_limit",
    "compile_seconds",
    "error",
]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass
class Launch:
    """One kernel launch as the library makes it: the autotuned kernel and its arguments."""

    kernel: str
    specialization: str
    autotuner: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Result:
    kernel: str
    config: str
    specialization: str
    target: str
    registers: int = -1
    spill_bytes: int = -1
    shared_memory: int = -1
    shared_memory_limit: int = -1
    compile_seconds: float = 0.0
    error: str = ""

    @property
    def fits(self) -> bool:
        """Compiled, no local memory, shared memory within the target's limit."""
        return not self.error and self.spill_bytes == 0 and self.shared_memory <= self.shared_memory_limit


# ---------------------------------------------------------------------------------------------------------------
# Capturing the library's launches


@contextlib.contextmanager
def captured_launches(into: list, label: str):
    """Within the block, every autotuned kernel launch is appended to ``into`` as a :class:`Launch` instead of
    running."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def record(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        into.append(Launch(self.fn.__name__.lstrip("_"), label, self, args, kwargs))

    Autotuner.run = record
    try:
        yield
    finally:
        Autotuner.run = original


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# Shape classes (rows M, outputs N, inputs K): what decides Triton's specialization is divisibility by 16 and
# whether weight rows start at multiples of 4 (the GEMMs' RNG layout).
ALIGNED = (256, 320, 640)
TOKENS = (77, 320, 768)  # cross-attention K/V on the text encoder's 77 tokens
ODD = (33, 37, 41)  # nothing divisible: scattered RNG layout, masked edges
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PRIORS = (None, torch.bfloat16, torch.float32)


def _prior_name(prior) -> str:
    return "none" if prior is None else DTYPE_NAMES[prior]


def _options_label(dtype, tf32=False, **options) -> str:
    parts = [DTYPE_NAMES[dtype] + ("-tf32" if tf32 else "")]
    parts += [f"{k}={_prior_name(v) if k == 'prior' else v}" for k, v in options.items()]
    return " ".join(parts)


@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _elementwise_calls(full: bool) -> Iterator[tuple[str, Callable]]:
    from bayeslayers.kernels.triton.philox import philox_normal_into
    from bayeslayers.kernels.triton.reparam_grad import reparameterization_grad
    from bayeslayers.kernels.triton.sample_kl import sample_weight_and_kl

    seed = _meta(1, dtype=torch.int64)
    sizes = {"aligned": ALIGNED[1] * ALIGNED[2]}
    if full:
        sizes["odd"] = ODD[1] * ODD[2]
    for size_name, numel in sizes.items():
        mu = _meta(numel)
        yield f"fp32 {size_name}", lambda mu=mu: philox_normal_into(seed, _meta(mu.numel()))
        # The full product of options at aligned sizes; unaligned sizes (no divisibility hints) at the defaults.
        product = full and size_name == "aligned"
        dtypes = DTYPES if full else (torch.bfloat16,)
        priors = PRIORS if product else (torch.bfloat16,)
        directions = ("qp", "pq") if product else ("qp",)
        for dtype, prior, direction in itertools.product(dtypes, priors, directions):
            p = None if prior is None else _meta(numel, dtype=prior)
            yield (
                _options_label(dtype, prior=prior, kl=direction) + f" {size_name}",
                lambda mu=mu, p=p, dtype=dtype, direction=direction: sample_weight_and_kl(
                    mu, mu, p, seed, 0.01, direction, dtype, True
                ),
            )
            # Backward: dW in the compute dtype, with / without the KL's gradient, with / without writing w.
            for kl_grad, write_w in itertools.product((True, False), (True, False)) if product else [(True, True)]:
                if not kl_grad and (prior is not None or direction != "qp"):
                    continue  # prior and direction are not read without the KL gradient: one launch covers them
                g_kl = _meta(1) if kl_grad else None
                yield (
                    _options_label(dtype, prior=prior, kl=direction, dw=True, kl_grad=kl_grad, write_w=write_w)
                    + f" {size_name}",
                    lambda mu=mu, p=p, dtype=dtype, direction=direction, g_kl=g_kl, write_w=write_w: (
                        reparameterization_grad(
                            _meta(mu.numel(), dtype=dtype),
                            mu,
                            mu,
                            p,
                            seed,
                            g_kl,
                            0.01,
                            direction,
                            dtype if write_w else None,
                        )
                    ),
                )
        if product:
            for dtype in DTYPES:  # weight resampled for dx without KL (dW epilogue path, frozen-weight layers)
                yield (
                    _options_label(dtype, with_kl=False) + f" {size_name}",
                    lambda mu=mu, dtype=dtype: sample_weight_and_kl(mu, mu, None, seed, 0.01, "qp", dtype, False),
                )
            for prior, direction in itertools.product(PRIORS, ("qp", "pq")):  # KL-only backward (no dW)
                p = None if prior is None else _meta(numel, dtype=prior)
                yield (
                    f"fp32 prior={_prior_name(prior)} kl={direction} dw=False kl_grad=True {size_name}",
                    lambda mu=mu, p=p, direction=direction: reparameterization_grad(
                        None, mu, mu, p, seed, _meta(1), 0.01, direction, None
                    ),
                )


def _gemm_variants(full: bool) -> list[dict]:
    """Options of the GEMM launches: each dtype at the defaults, then each other option value at bf16."""
    base = {
        "dtype": torch.bfloat16,
        "tf32": False,
        "prior": torch.bfloat16,
        "kl": "qp",
        "bias": True,
        "shape": "aligned",
    }
    if not full:
        return [base]
    variants = [dict(base, dtype=d) for d in DTYPES] + [dict(base, dtype=torch.float32, tf32=True)]
    variants += [dict(base, prior=p) for p in (None, torch.float32)]
    variants += [dict(base, kl="pq"), dict(base, bias=False), dict(base, shape="tokens"), dict(base, shape="odd")]
    return variants


@dataclasses.dataclass
class _GemmCase:
    """Meta tensors of one GEMM variant and the wrapper calls the layers make with them."""

    m: int
    n: int
    k: int
    dtype: torch.dtype
    tf32: bool
    prior: torch.dtype | None
    direction: str
    bias: bool
    rank: int = 4

    def _t(self, *shape):
        return _meta(*shape, dtype=self.dtype)

    def _weights(self):
        mu = _meta(self.n, self.k)
        prior = None if self.prior is None else _meta(self.n, self.k, dtype=self.prior)
        return mu, prior, _meta(1, dtype=torch.int64)

    def forward(self):
        from bayeslayers.kernels.triton.sampled_matmul import sampled_matmul

        mu, prior, seed = self._weights()
        bias = self._t(self.n) if self.bias else None
        with _tf32(self.tf32):
            sampled_matmul(
                self._t(self.m, self.k),
                mu,
                mu,
                seed,
                transpose_weight=True,
                bias=bias,
                prior_mu=prior,
                prior_sigma=0.01,
                kl_direction=self.direction,
                with_kl=True,
            )

    def input_grad(self):
        from bayeslayers.kernels.triton.sampled_matmul import sampled_matmul

        mu, _, seed = self._weights()
        with _tf32(self.tf32):
            sampled_matmul(self._t(self.m, self.n), mu, mu, seed, transpose_weight=False)

    def weight_grad(self):
        from bayeslayers.kernels.triton.weight_grad_gemm import reparameterized_weight_grad

        mu, prior, seed = self._weights()
        with _tf32(self.tf32):
            reparameterized_weight_grad(
                self._t(self.m, self.n), self._t(self.m, self.k), mu, mu, prior, seed, _meta(1), 0.01, self.direction
            )

    def _lora_factors(self):
        return self._t(self.n, self.k), self._t(self.rank, self.k), self._t(self.n, self.rank)

    def lora_forward(self):
        from bayeslayers.kernels.triton.lora_matmul import lora_matmul

        w, a, b = self._lora_factors()
        with _tf32(self.tf32):
            lora_matmul(self._t(self.m, self.k), w, a, b, 1.0, self._t(self.n) if self.bias else None)

    def lora_input_grad(self):
        from bayeslayers.kernels.triton.lora_matmul import lora_matmul

        w, a, b = self._lora_factors()
        with _tf32(self.tf32):
            lora_matmul(self._t(self.m, self.n), w.t(), b.t(), a.t(), 1.0, None)


def _gemm_calls(full: bool) -> Iterator[tuple[str, Callable]]:
    shapes = {"aligned": ALIGNED, "tokens": TOKENS, "odd": ODD}
    for v in _gemm_variants(full):
        case = _GemmCase(*shapes[v["shape"]], v["dtype"], v["tf32"], v["prior"], v["kl"], v["bias"])
        label = _options_label(case.dtype, case.tf32, prior=case.prior, kl=case.direction, bias=case.bias)
        shape = v["shape"]
        yield f"{label} {shape} forward", case.forward
        if case.bias:  # the dW GEMM reads no bias: one launch covers both
            no_bias = _options_label(case.dtype, case.tf32, prior=case.prior, kl=case.direction)
            yield f"{no_bias} {shape} weight_grad", case.weight_grad
        defaults = case.prior is torch.bfloat16 and case.direction == "qp"
        if full and case.bias and defaults:  # the input gradients read no prior, KL or bias
            yield _options_label(case.dtype, case.tf32) + f" {shape} input_grad", case.input_grad
            yield _options_label(case.dtype, case.tf32) + f" {shape} lora_input_grad", case.lora_input_grad
        if defaults:  # LoRA reads no prior
            yield _options_label(case.dtype, case.tf32, bias=case.bias) + f" {shape} lora_forward", case.lora_forward


def library_launches(subset: str = "default") -> list[Launch]:
    """Every distinct kernel launch of ``subset`` (see the module docstring), captured from the wrappers."""
    if subset not in ("default", "full"):
        raise ValueError(f"subset must be 'default' or 'full', got {subset!r}")
    full = subset == "full"
    launches: list[Launch] = []
    for label, call in itertools.chain(_elementwise_calls(full), _gemm_calls(full)):
        with captured_launches(launches, label):
            call()
    return launches


# ---------------------------------------------------------------------------------------------------------------
# Compiling


def config_label(config) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread: stack frame + local) of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", file.name], check=True, capture_output=True, text=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text!r}")
    return int(fields["REG"]), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def compile_launch(launch: Launch, config, capability: int) -> Result:
    """Compiles ``launch`` with one autotune ``config`` for ``sm_<capability>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.autotuner.fn
    result = Result(
        launch.kernel,
        config_label(config),
        launch.specialization,
        f"sm_{capability}",
        shared_memory_limit=SHARED_MEMORY_LIMIT[capability],
    )
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
    options = {k: v for k, v in options.items() if v is not None}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
        result.registers, result.spill_bytes = resource_usage(compiled.asm["cubin"])
        result.shared_memory = int(compiled.metadata.shared)
    except Exception as error:  # a compile failure is a result: it is reported, not raised
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
    result.compile_seconds = round(time.perf_counter() - start, 3)
    return result


def candidate_configs(launch: Launch) -> list:
    """The configs the autotuner may pick for this launch (after its ``early_config_prune``, if any)."""
    autotuner = launch.autotuner
    if not getattr(autotuner, "early_config_prune", None):
        return list(autotuner.configs)
    named = dict(zip(autotuner.fn.arg_names, launch.args))
    return list(autotuner.early_config_prune(autotuner.configs, named, **launch.kwargs))


def compile_all(launches: list[Launch], targets: list[str], progress: Callable[[Result], None] | None = None):
    results = []
    for launch in launches:
        for config in candidate_configs(launch):
            for name in targets:
                result = compile_launch(launch, config, TARGETS[name])
                results.append(result)
                if progress:
                    progress(result)
    return results


def write_csv(results: list[Result], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(dataclasses.asdict(r))


def read_csv(path: Path) -> list[Result]:
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    ints = ("registers", "spill_bytes", "shared_memory", "shared_memory_limit")
    return [
        Result(**{**row, **{k: int(row[k]) for k in ints}, "compile_seconds": float(row["compile_seconds"])})
        for row in rows
    ]


def summary(results: list[Result]) -> str:
    """Per kernel: launches x configs x targets compiled, failures, worst registers, spills, shared memory."""
    lines = [
        f"{'kernel':26} {'compiles':>8} {'failed':>6} {'spill':>5} {'over smem':>9} {'max regs':>8} "
        f"{'max smem KiB':>12} {'seconds':>8}"
    ]
    for kernel in sorted({r.kernel for r in results}):
        rs = [r for r in results if r.kernel == kernel]
        ok = [r for r in rs if not r.error]
        lines.append(
            f"{kernel:26} {len(rs):8d} {len(rs) - len(ok):6d} {sum(r.spill_bytes > 0 for r in ok):5d} "
            f"{sum(r.shared_memory > r.shared_memory_limit for r in ok):9d} "
            f"{max((r.registers for r in ok), default=0):8d} "
            f"{max((r.shared_memory for r in ok), default=0) / 1024:12.1f} "
            f"{sum(r.compile_seconds for r in rs):8.1f}"
        )
    bad = [r for r in results if not r.fits]
    lines.append(f"{len(results)} compiles, {len(bad)} failed, spilled or over the shared-memory limit")
    for r in bad[:20]:
        lines.append(
            f"  {r.kernel} [{r.config}] {r.specialization} {r.target}: "
            f"{r.error or f'spill {r.spill_bytes} B, shared {r.shared_memory} B'}"
        )
    return "\n".join(lines)


def summary_markdown(results: list[Result]) -> str:
    """Per kernel: launches, configs, compiles, failures, spills, worst registers and shared memory per target."""
    targets = sorted({r.target for r in results}, key=lambda t: int(t[3:]))
    lines = [
        "| kernel | launches | configs | compiles | failed | spilled | over smem | max registers ("
        + " / ".join(targets)
        + ") | max shared KiB ("
        + " / ".join(targets)
        + ") | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for kernel in sorted({r.kernel for r in results}):
        rs = [r for r in results if r.kernel == kernel]
        ok = [r for r in rs if not r.error]
        regs = " / ".join(str(max((r.registers for r in ok if r.target == t), default=0)) for t in targets)
        smem = " / ".join(
            f"{max((r.shared_memory for r in ok if r.target == t), default=0) / 1024:.0f}" for t in targets
        )
        lines.append(
            f"| `{kernel}` | {len({r.specialization for r in rs})} | {len({r.config for r in rs})} | "
            f"{len(rs)} | {len(rs) - len(ok)} | {sum(r.spill_bytes > 0 for r in ok)} | "
            f"{sum(r.shared_memory > r.shared_memory_limit for r in ok)} | {regs} | {smem} | "
            f"{sum(r.compile_seconds for r in rs):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", default="full", choices=("default", "full"))
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ",".join(TARGETS))
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/aot_compile.csv"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=None,
        help="combine these CSVs into --csv and print the summary (no compiling)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 replaces @triton.jit by the interpreter: unset it to compile")
    if args.merge is not None:
        results = [r for path in args.merge for r in read_csv(path)]
        # Configs a launch's autotuner can no longer pick (pruned since those CSVs were written) are dropped.
        candidates = {
            (launch.kernel, launch.specialization): {config_label(c) for c in candidate_configs(launch)}
            for launch in library_launches("full")
        }
        kept = [r for r in results if r.config in candidates.get((r.kernel, r.specialization), {r.config})]
        print(f"merged {len(results)} rows; dropped {len(results) - len(kept)} of configs no longer candidates")
        results = kept
        write_csv(results, args.csv)
        print(summary(results))
        print(summary_markdown(results))
        return 0 if all(r.fits for r in results) else 1
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"--targets: unknown {unknown}; expected some of {list(TARGETS)}")
    launches = library_launches(args.subset)
    if args.kernels:
        names = set(args.kernels.split(","))
        launches = [launch for launch in launches if launch.kernel in names]
    total = sum(len(candidate_configs(launch)) for launch in launches) * len(targets)
    done = []

    def progress(result: Result):
        done.append(result)
        if not args.quiet:
            status = "ok" if result.fits else "FAIL"
            print(
                f"[{len(done)}/{total}] {status} {result.kernel} [{result.config}] {result.specialization} "
                f"{result.target}: regs {result.registers} spill {result.spill_bytes} smem {result.shared_memory} "
                f"{result.compile_seconds:.1f}s {result.error}",
                flush=True,
            )

    results = compile_all(launches, targets, progress)
    write_csv(results, args.csv)
    print(summary(results))
    print(f"wrote {args.csv}")
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
