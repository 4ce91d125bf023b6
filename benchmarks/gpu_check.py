"""The whole GPU verification in one command, bounded in wall time (``make gpu-check PY=python3``).

    python -m benchmarks.gpu_check [--out DIR] [--budget-seconds 450] [--wheels .whl] [--dry-run]

Runs with the interpreter that starts it (a GPU image's ``python3`` and its CUDA torch): no virtual environment,
no install, no network; bayeslayers comes from this tree. Pure-Python packages the image may lack (diffusers,
bayesian-torch) are installed from the wheels in ``--wheels`` (``tools/fetch_wheels.sh`` fills it) into a scratch
folder; what is still missing is named, and the phases that need it are skipped.

Phases, in order of value; one starts only when its estimated time fits in what is left of the budget, its steps
stop at its deadline (the budget less the estimates of the phases after it), and what did not run is listed as
skipped:

1. correctness: the ``gpu``-marked tests; every backend path of linear / conv2d / LoRA against float64 on the
   device (bf16, fp16, fp32; ``gpu_correctness.py``); Triton's Philox stream against the C++ twin, bit for bit
2. micro: linear / conv2d / LoRA at the SD1.5 shapes of batch 1, every provider (deterministic, bayesian-torch if
   present, each bayeslayers backend and fused path)
3. unet: the SD1.5-architecture UNet training step (random weights, 512 px, batch 1, bf16 autocast) per provider,
   and the fusion choices measured on the way (``fusion_choices.json``)
4. roofline: each measured ratio to the deterministic layer next to the roofline's prediction (``roofline.py``)

Files in ``--out`` (six, each well under 16 MiB): ``GPU_CHECK.md`` (device, driver, versions, pass/fail, phases,
measured and roofline ratios), ``correctness.csv``, ``results.csv``, ``roofline.csv``, ``fusion_choices.json``,
``gpu_tests.log``. Exit status: 0 when everything that ran passed, 1 on a failed check, 2 without CUDA.

``--dry-run`` runs the same flow on CPU: tiny shapes, the Triton kernels under TRITON_INTERPRET=1, wall-clock
fusion choices, the gpu tests of one module (skipped there); it checks the script, not speeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 450.0  # with the interpreter's start: inside 8 minutes on one H100 / H200, JIT compiles included
GPU_TESTS = ["tests/"]
DRY_RUN_TESTS = ["tests/test_fused_gemm.py"]
MICRO_OPS = ("linear", "conv2d", "lora")
# Dry run: one Triton program per kernel (the interpreter's cost is per program); the UNet with the baselines and
# the C++ backend (an interpreted Triton UNet step takes seconds; the measured policy is exercised by the micro
# phase's triton provider).
DRY_RUN_SHAPES = {"linear": [(16, 16, 16)], "conv2d": [(1, 4, 4)], "lora": [(16, 16, 16, 2)], "unet": [(1, 4, "nano")]}
DRY_RUN_UNET_PROVIDERS = ("deterministic", "bayesian-torch", "cpp")
# UNet providers in order of value: the floor, the measured policy, the baselines, each forced path, compiled.
UNET_ORDER = (
    "deterministic",
    "triton",
    "bayesian-torch",
    "reference",
    "torch",
    "triton:sample_then_map",
    "triton:sample_in_gemm",
    "triton:weight_grad_epilogue",
    "deterministic:compiled",
    "auto:compiled",
)
COMPILED_STEP_S = 60  # an Inductor compile of the SD1.5 UNet step: started only with this much of the phase left
FILES = ("GPU_CHECK.md", "correctness.csv", "results.csv", "roofline.csv", "fusion_choices.json", "gpu_tests.log")
LOG_TAIL_BYTES = 256 * 1024


@dataclass
class Phase:
    name: str
    title: str
    estimate_s: float  # expected wall time on one H100 / H200, JIT compiles included
    dry_run_estimate_s: float
    needs: tuple[str, ...] = ()  # optional modules (benchmarks/wheels.py)
    status: str = "not started"
    seconds: float = 0.0
    skipped_steps: list[str] = field(default_factory=list)


def phases() -> list[Phase]:
    return [
        Phase("correctness", "gpu tests; every backend path vs float64; Philox vs the C++ twin", 210, 40),
        Phase("micro", "linear / conv2d / LoRA at SD1.5 shapes, every provider", 100, 40),
        Phase("unet", "SD1.5 UNet training step per provider; measured fusion choice", 110, 40, ("diffusers",)),
        Phase("roofline", "measured / deterministic next to the roofline's prediction", 2, 1),
    ]


class Budget:
    """Wall-clock budget of the whole run, counted from its creation."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def gpu_shapes() -> dict:
    """Batch-1 SD1.5 shapes (benchmarks/shapes.py) and the 512 px UNet."""
    from .shapes import GPU

    return {
        "linear": [s for s in GPU["linear"] if s[0] in (4096, 1024, 256, 77)],
        "conv2d": [s for s in GPU["conv2d"] if s[0] == 1],
        "lora": [s for s in GPU["lora"] if s[0] in (4096, 1024, 256) and s[3] == 4],
        "unet": [(1, 64, "sd15")],
    }


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def run_gpu_tests(dry_run: bool, timeout_s: float, log: Path) -> tuple[str, str]:
    """``pytest -m gpu`` in a subprocess, stopped after ``timeout_s``; returns (result, last summary line)."""
    files = DRY_RUN_TESTS if dry_run else GPU_TESTS
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=max(timeout_s, 1))
        output, code = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as stopped:
        output = (
            (stopped.stdout or b"").decode(errors="replace")
            if isinstance(stopped.stdout, bytes)
            else (stopped.stdout or "")
        )
        output += f"\nstopped after {timeout_s:.0f} s (budget)\n"
        code = None
    log.write_text(output[-LOG_TAIL_BYTES:])
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if code is None:
        return "stopped (budget)", last
    return ("pass" if code in (0, 5) else "FAIL"), last  # 5: nothing collected


def roofline_gpu(device_name: str) -> str:
    name = device_name.lower()
    return next((key for key in ("a100", "4090", "h200") if key in name), "h100")


FORWARD_BACKWARD = ("forward", "backward")


def predicted_ratio(op: str, shape: tuple, provider: str, gpu) -> float | None:
    """Roofline ratio (forward + backward) of ``provider`` to the deterministic layer at a benchmark shape."""
    from . import roofline
    from .providers import FUSED_PROVIDERS

    path = {"triton": "fastest", **{p: p.split(":")[1] for p in FUSED_PROVIDERS}}.get(provider)
    if path is None:
        return None

    def seconds(kernels):
        return sum(k.time(gpu) for k in kernels if k.phase in FORWARD_BACKWARD)

    if op == "linear" and path in (*roofline.LINEAR_PATHS, "fastest"):
        m, k, n = shape
        paths = roofline.LINEAR_PATHS if path == "fastest" else [path]
        bayes = min(seconds(roofline.bayesian_linear(m, n, k, p, 4)) for p in paths)
        return bayes / seconds(roofline.deterministic_linear(m, n, k))
    if op == "lora" and path == "fastest":
        m, k, n, rank = shape
        bayes = min(seconds(roofline.lora_linear(m, n, k, rank, p, prior_bytes=4)) for p in roofline.LORA_PATHS)
        return bayes / seconds(roofline.lora_linear(m, n, k, rank, "unfused_lora", bayesian_b=False))
    if op == "lora" and path == "fused_lora":
        m, k, n, rank = shape
        return seconds(roofline.lora_linear(m, n, k, rank, "fused_lora", prior_bytes=4)) / seconds(
            roofline.lora_linear(m, n, k, rank, "unfused_lora", bayesian_b=False)
        )
    return None


def unet_predicted_ratio(provider: str, gpu, shape: tuple) -> float | None:
    from . import roofline
    from .providers import FUSED_PROVIDERS

    path = {"triton": None, **{p: p.split(":")[1] for p in FUSED_PROVIDERS}}.get(provider, "missing")
    if path == "missing" or shape[2] != "sd15":
        return None
    layers = roofline.unet_layers("sd15", "dreambooth-bnn", shape[1] * 8, shape[0])

    def seconds(layer, p):
        return sum(k.time(gpu) for k in roofline.layer_kernels(layer, p, False) if k.phase in FORWARD_BACKWARD)

    floor = sum(seconds(layer, None) for layer in layers)
    paths = [path] if path else list(roofline.LINEAR_PATHS)
    bayes = sum(min(seconds(layer, p) for p in paths) if layer.converted else seconds(layer, None) for layer in layers)
    return bayes / floor


ROOFLINE_FIELDS = ["op", "shape", "provider", "median_ms", "measured_ratio", "roofline_ratio", "measured_over_roofline"]


def roofline_rows(rows: list[dict], device_name: str) -> list[dict]:
    """Per full-step row: measured time ratio to the deterministic provider, the roofline's, and their quotient."""
    from . import roofline

    gpu = roofline.GPUS[roofline_gpu(device_name)]
    out = []
    for row in rows:
        if row["mode"] != "full":
            continue
        shape = tuple(int(v) if v.isdigit() else v for v in row["shape"].split("x"))
        if row["op"] == "unet":
            predicted = unet_predicted_ratio(row["provider"], gpu, shape)
        else:
            predicted = predicted_ratio(row["op"], shape, row["provider"], gpu)
        measured = row.get("ratio_to_deterministic", "")
        measured = float(measured) if measured != "" else None
        out.append(
            {
                "op": row["op"],
                "shape": row["shape"],
                "provider": row["provider"],
                "median_ms": f"{float(row['median_ms']):.4f}",
                "measured_ratio": "" if measured is None else f"{measured:.3f}",
                "roofline_ratio": "" if predicted is None else f"{predicted:.3f}",
                "measured_over_roofline": f"{measured / predicted:.2f}" if measured and predicted else "",
            }
        )
    return out


def markdown_table(rows: list[dict], fields: list[str]) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(row.get(f, "")) or "–" for f in fields) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default: build/gpu-check, or a scratch one)")
    p.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_S, help="wall-time bound of the whole run")
    p.add_argument("--timing-seconds", type=float, default=None, help="seconds of timing per provider, mode and shape")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of wheels (tools/fetch_wheels.sh)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_seconds)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before bayeslayers loads them
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it needs one (make gpu-check DRY_RUN=1 checks the script on CPU)")
        return 2
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.dry_run and "bayeslayers.kernels.triton.philox" in sys.modules and not interpreted:
        print("gpu-check --dry-run: the kernels were imported without TRITON_INTERPRET=1")
        return 2

    from .wheels import install_missing

    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    packages = install_missing(args.wheels, scratch / "site")
    for line in packages.lines():
        print(f"gpu-check: {line}")

    from bayeslayers.kernels import cpu

    from .environment import environment

    device = torch.device("cpu" if args.dry_run else "cuda")
    out = args.out or (scratch / "out" if args.dry_run else ROOT / "build" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, f"gpu-check{' dry run' if args.dry_run else ''}; driver {driver_version() or '?'}")
    print(f"gpu-check on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['notes']})")
    print(f"gpu-check: budget {args.budget_seconds:.0f} s; phases in order of value; results in {out}")

    # The C++ twin builds in the background (minutes on few cores) while the first checks run on the device.
    cpp_build = threading.Thread(target=cpu.unavailable_reason, daemon=True)
    cpp_build.start()

    state = {"correctness": [], "tests": ("not run", ""), "results": [], "roofline": [], "cpp_build": cpp_build}
    state["selector"] = path_selector(args, scratch)
    runners = {"correctness": _correctness, "micro": _micro, "unet": _unet, "roofline": _roofline}
    plan = phases()
    estimates = [p.dry_run_estimate_s if args.dry_run else p.estimate_s for p in plan]
    for index, phase in enumerate(plan):
        estimate, later = estimates[index], sum(estimates[index + 1 :])
        missing = [m for m in phase.needs if m in packages.missing]
        if missing:
            phase.status = f"skipped: {', '.join(missing)} missing ({packages.missing[missing[0]]})"
        elif budget.left() < estimate:
            phase.status = f"skipped: needs ~{estimate:.0f} s, {max(budget.left(), 0):.0f} s of the budget left"
        else:
            begin = time.perf_counter()
            deadline = begin + max(budget.left() - later, estimate)  # the later phases' estimates stay free
            print(f"== phase {phase.name}: {phase.title} (~{estimate:.0f} s)", flush=True)
            try:
                runners[phase.name](phase, state, args, device, deadline, out)
                phase.status = "ran" if not phase.skipped_steps else f"ran; {len(phase.skipped_steps)} steps skipped"
            except Exception as error:  # a crashed phase is reported; the later phases still get their chance
                phase.status = f"FAILED: {type(error).__name__}: {str(error).strip()[:300]}"
            phase.seconds = time.perf_counter() - begin
        print(f"   {phase.name}: {phase.status}", flush=True)

    status = _write(
        out,
        state,
        plan,
        packages,
        env,
        args,
        budget,
        cpu.unavailable_reason() if not cpp_build.is_alive() else "still building",
    )
    print(f"gpu-check {'dry run ' if args.dry_run else ''}finished in {budget.elapsed():.0f} s; results in {out}")
    return status


def _correctness(phase, state, args, device, deadline, out):
    import torch

    from .gpu_correctness import run_layer_checks, run_philox_check

    if args.skip_tests:
        phase.skipped_steps.append("gpu tests (--skip-tests)")
    else:
        # a share of the phase for the tests; the float64 checks and Philox need the rest
        tests_deadline = time.perf_counter() + 0.55 * (deadline - time.perf_counter())
        state["tests"] = run_gpu_tests(args.dry_run, tests_deadline - time.perf_counter(), out / "gpu_tests.log")
        print(f"   gpu tests: {state['tests'][0]}: {state['tests'][1]}")
    dtypes = [torch.float32] if args.dry_run else [torch.bfloat16, torch.float16, torch.float32]
    rows = run_layer_checks(device, dtypes, args.dry_run, deadline)
    phase.skipped_steps += [
        f"layer {r['op']} {r['shape']} {r['backend']} {r['path']} {r['dtype']}" for r in rows if r["note"] == "budget"
    ]
    cpp_build = state["cpp_build"]
    cpp_build.join(timeout=max(deadline - time.perf_counter(), 0))
    if cpp_build.is_alive():
        phase.skipped_steps.append("philox vs the C++ twin (the C++ build did not finish in time)")
    else:
        rows += run_philox_check(device, args.dry_run)
    state["correctness"] = rows
    failed = [r for r in rows if r["result"] == "FAIL"]
    print(f"   float64 / philox checks: {len(rows) - len(failed)} of {len(rows)} pass or skipped; {len(failed)} failed")


def _measure(op, shape, device, args, only):
    import torch

    from .run import measure_shape

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    timing = args.timing_seconds or (0.01 if args.dry_run else 0.25)
    return measure_shape(op, shape, device, dtype, timing, 1, only)


def _interpreted(args):
    from . import providers

    providers.INTERPRETED_TRITON = args.dry_run


def _micro(phase, state, args, device, deadline, out):
    from bayeslayers.kernels.paths import timing as path_timing

    from .providers import COMPILED_PROVIDERS, providers

    _interpreted(args)
    shapes = DRY_RUN_SHAPES if args.dry_run else gpu_shapes()
    only = [p for p in providers() if p not in COMPILED_PROVIDERS]
    for op in MICRO_OPS:
        for shape in shapes[op]:
            label = f"{op} {'x'.join(map(str, shape))}"
            if time.perf_counter() > deadline:
                phase.skipped_steps.append(label)
                continue
            with path_timing.using_path_selector(state["selector"]):
                rows = _measure(op, shape, device, args, only)
            state["results"] += rows
            print(
                f"   {label}: "
                + ", ".join(f"{r['provider']} {r['median_ms']:.3f} ms" for r in rows if r["mode"] == "full"),
                flush=True,
            )


def path_selector(args, cache: Path):
    """The measured fusion policy's selector: CUDA events on the GPU, the wall clock in a dry run."""
    import torch

    from bayeslayers.kernels.paths import timing as path_timing

    if not args.dry_run:
        return path_timing.path_selector()

    def wall_clock(path, step):
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin

    return path_timing.PathSelector(
        timer=wall_clock,
        cache_dir=cache,
        may_time=lambda d, grad: grad and torch.is_grad_enabled() and not torch.compiler.is_compiling(),
    )


def _unet(phase, state, args, device, deadline, out):
    from bayeslayers.kernels.paths import timing as path_timing

    from .run import add_ratios

    _interpreted(args)
    order = DRY_RUN_UNET_PROVIDERS if args.dry_run else UNET_ORDER
    shape = (DRY_RUN_SHAPES if args.dry_run else gpu_shapes())["unet"][0]
    rows = []
    with path_timing.using_path_selector(state["selector"]):
        for provider in order:
            cost = 0 if args.dry_run else COMPILED_STEP_S if provider.endswith(":compiled") else 0
            if time.perf_counter() + cost > deadline:
                phase.skipped_steps.append(f"unet {provider}")
                continue
            rows += _measure("unet", shape, device, args, [provider])
            step = [r for r in rows if r["mode"] == "full" and r["provider"] == provider]
            print(f"   unet {provider}: " + ", ".join(f"{r['median_ms']:.1f} ms" for r in step), flush=True)
    state["results"] += add_ratios(rows)  # ratios across providers measured one by one


def _roofline(phase, state, args, device, deadline, out):
    from .environment import device_name

    state["roofline"] = roofline_rows(state["results"], device_name(device))


def _write(out: Path, state, plan, packages, env, args, budget, cpp_reason) -> int:
    import torch

    from .run import FIELDS

    write_csv(
        out / "correctness.csv",
        state["correctness"],
        list(state["correctness"][0]) if state["correctness"] else ["check"],
    )
    write_csv(out / "results.csv", [{**row, **env} for row in state["results"]], FIELDS)
    write_csv(out / "roofline.csv", state["roofline"], ROOFLINE_FIELDS)
    selector = state["selector"]
    choices = {"device": env["device"], "choices": selector.choices, "timings": selector.timings}
    (out / "fusion_choices.json").write_text(json.dumps(choices, indent=1, sort_keys=True, default=str))
    if not (out / "gpu_tests.log").exists():
        (out / "gpu_tests.log").write_text(f"gpu tests: {state['tests'][0]}\n")
    failed = [r for r in state["correctness"] if r["result"] == "FAIL"]
    tests_failed = state["tests"][0] == "FAIL"
    crashed = [p for p in plan if p.status.startswith("FAILED")]
    ran = {r["result"] for r in state["correctness"]}
    verdict = "FAIL" if failed or tests_failed or crashed else ("pass" if "pass" in ran else "nothing checked")
    cuda = torch.version.cuda or "none"
    lines = [
        f"# gpu-check: {env['device']}{' (dry run)' if args.dry_run else ''}",
        "",
        f"**{verdict}** · {env['date']} · driver {driver_version() or '?'} · CUDA {cuda} · torch {env['torch']} · "
        f"triton {env['triton']} · Python {sys.version.split()[0]} · bayeslayers {env['bayeslayers']} "
        f"(commit {env['commit'] or '?'}) · {budget.elapsed():.0f} s of a {args.budget_seconds:.0f} s budget",
        "",
        "## Phases",
        "",
        markdown_table(
            [{"phase": p.name, "what": p.title, "status": p.status, "seconds": f"{p.seconds:.0f}"} for p in plan],
            ["phase", "what", "status", "seconds"],
        ),
    ]
    skipped = [f"{p.name}: {step}" for p in plan for step in p.skipped_steps]
    if skipped:
        lines += ["Skipped steps (budget): " + "; ".join(skipped[:40]) + (" …" if len(skipped) > 40 else ""), ""]
    lines += ["## Environment", ""]
    lines += [f"- {line}" for line in packages.lines()] or ["- every optional package present"]
    lines += [f"- C++ CPU kernels: {'built and loaded' if not cpp_reason else cpp_reason}", f"- {env['notes']}", ""]
    lines += ["## Correctness", "", f"gpu tests: {state['tests'][0]} ({state['tests'][1]})", ""]
    counts = {
        result: sum(r["result"] == result for r in state["correctness"]) for result in ("pass", "FAIL", "skipped")
    }
    lines += [
        f"float64 and Philox checks: {counts['pass']} pass, {counts['FAIL']} failed, {counts['skipped']} skipped",
        "",
    ]
    shown = failed + [r for r in state["correctness"] if r["check"] == "philox" or r["result"] == "skipped"]
    lines += [
        markdown_table(
            shown, ["check", "op", "shape", "backend", "path", "dtype", "max_error", "tolerance", "result", "note"]
        ),
        "",
    ]
    lines += ["## Measured / deterministic next to the roofline", ""]
    lines += [markdown_table(state["roofline"], ROOFLINE_FIELDS), ""]
    lines += [f"Measured fusion choices: {len(selector.choices)} shape classes (fusion_choices.json)."]
    (out / "GPU_CHECK.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
