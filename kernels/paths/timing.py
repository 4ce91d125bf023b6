"""Which fused path is fastest for a shape, measured on the device the first time the shape trains.

As ``torch.backends.cudnn.benchmark`` and Triton's autotuner do, the first training call of a *shape class*
(op, rows rounded up to a power of two, N, K, dtype, device name) runs every eligible path forward and
backward on the real tensors, timed by ``triton.testing.do_bench`` (a few ms each), and keeps the fastest.
Every path draws the same eps (the RNG contract of ``philox.py``), so the choice changes results by float
reassociation at most, and timing touches no generator and no parameter (it differentiates detached views).

Choices are cached in the process and, when ``$BAYESLAYERS_CACHE_DIR`` is set, in
``$BAYESLAYERS_CACHE_DIR/fusion-paths-<device>.json``, valid for one device name and one set of
bayeslayers / Triton / torch versions; a corrupt or foreign file is ignored with a warning and replaced.

Nothing is timed without gradients (eval), under torch.compile / jit tracing or CUDA-graph capture, or on
devices other than CUDA (tests inject a timer and a device predicate through :class:`PathSelector`); such
calls take a cached choice if there is one, else the sample-then-GEMM path.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CACHE_DIR_ENV = "BAYESLAYERS_CACHE_DIR"
CACHE_FORMAT = 1
# do_bench budget per candidate (ms): a few ms each, once per shape class.
WARMUP_MS, REPEAT_MS = 5, 20

Timer = Callable[[str, Callable[[], None]], float]  # (path name, one fwd+bwd step) -> seconds or ms


def do_bench_timer(path: str, step: Callable[[], None]) -> float:
    """Median ms of ``step`` on the current CUDA stream (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=WARMUP_MS, rep=REPEAT_MS))


def rows_bucket(rows: int) -> int:
    """The power of two at or above ``rows`` (1 for 0 or 1): rows of one bucket share a choice."""
    return 1 if rows <= 1 else 1 << math.ceil(math.log2(rows))


def shape_class(op: str, rows: int, n: int, k: int, dtype: torch.dtype, device_name: str) -> str:
    """Cache key of a shape class, e.g. ``linear|m4096|n320|k320|bfloat16|NVIDIA H100 80GB HBM3``."""
    return f"{op}|m{rows_bucket(rows)}|n{n}|k{k}|{str(dtype).removeprefix('torch.')}|{device_name}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict:
    """Library versions a cached choice is valid for."""
    return {"bayeslayers": _version("bayeslayers"), "triton": _version("triton"), "torch": torch.__version__}


def may_time(device: torch.device, needs_grad: bool) -> bool:
    """True when a call may run timing: a training call on CUDA, not traced, compiled or graph-captured."""
    if device.type != "cuda" or not needs_grad or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return not torch.cuda.is_current_stream_capturing()


class PathSelector:
    """Chooses a path per shape class by timing the candidates once, then remembers the choice.

    ``timer(path, step)`` times one forward+backward ``step`` (default: ``do_bench_timer``);
    ``may_time(device, needs_grad)`` says whether a call may be timed (default: :func:`may_time`);
    ``cache_dir``: where the JSON cache lives (default: ``$BAYESLAYERS_CACHE_DIR``; None: in-process only).
    """

    def __init__(
        self,
        timer: Timer | None = None,
        may_time: Callable[[torch.device, bool], bool] | None = None,
        cache_dir: str | os.PathLike | None = None,
        device_name: Callable[[torch.device], str] = device_name,
    ):
        self.timer = timer or do_bench_timer
        self.may_time = may_time or globals()["may_time"]
        self._cache_dir = None if cache_dir is None else Path(cache_dir)
        self.device_name = device_name
        self.choices: dict[str, str] = {}  # shape class -> path
        self.timings: dict[str, dict[str, float]] = {}  # shape class -> path -> time
        self._loaded: set[str] = set()  # device names whose disk cache was read

    @property
    def cache_dir(self) -> Path | None:
        if self._cache_dir is not None:
            return self._cache_dir
        env = os.environ.get(CACHE_DIR_ENV)
        return Path(env) if env else None

    def cache_file(self, name: str) -> Path | None:
        directory = self.cache_dir
        if directory is None:
            return None
        return directory / f"fusion-paths-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"

    def _header(self, name: str) -> dict:
        return {"format": CACHE_FORMAT, "device": name, **versions()}

    def _load(self, name: str) -> None:
        if name in self._loaded:
            return
        self._loaded.add(name)
        path = self.cache_file(name)
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            header = {key: data.get(key) for key in self._header(name)}
            if header != self._header(name):
                warnings.warn(
                    f"ignoring the fusion path cache {path}: it was written for {header}, not {self._header(name)}",
                    stacklevel=3,
                )
                return
            choices = data["choices"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items()):
                raise ValueError("choices must map strings to strings")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            warnings.warn(f"ignoring the corrupt fusion path cache {path}: {error}", stacklevel=3)
            return
        for key, path_name in choices.items():
            self.choices.setdefault(key, path_name)

    def _save(self, name: str) -> None:
        path = self.cache_file(name)
        if path is None:
            return
        mine = {k: v for k, v in self.choices.items() if k.endswith(f"|{name}")}
        data = {**self._header(name), "choices": mine, "timings": {k: v for k, v in self.timings.items() if k in mine}}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, path)

    def cached(self, key: str, device: torch.device) -> str | None:
        self._load(self.device_name(device))
        return self.choices.get(key)

    def choose(
        self,
        op: str,
        rows: int,
        n: int,
        k: int,
        dtype: torch.dtype,
        device: torch.device,
        needs_grad: bool,
        candidates: Sequence[str],
        make_step: Callable[[str], Callable[[], None]],
        fallback: str,
    ) -> str:
        """The path for this call: the cached choice of its shape class; else, when the call may be timed,
        the fastest of ``candidates`` (``make_step(path)`` returns one forward+backward on the real tensors);
        else ``fallback`` (not cached)."""
        if torch.compiler.is_compiling():  # traced: no timing, no file access; the choice made in eager or none
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            chosen = self.choices.get(shape_class(op, rows, n, k, dtype, name))
            return chosen if chosen in candidates else fallback
        name = self.device_name(device)
        key = shape_class(op, rows, n, k, dtype, name)
        cached = self.cached(key, device)
        if cached in candidates:
            return cached
        if len(candidates) == 1:
            return candidates[0]
        if not self.may_time(device, needs_grad):
            return fallback
        times = {path: float(self.timer(path, make_step(path))) for path in candidates}
        best = min(candidates, key=lambda path: times[path])
        self.choices[key], self.timings[key] = best, times
        self._save(name)
        return best


_selector = PathSelector()


def path_selector() -> PathSelector:
    """The selector the Triton backend asks."""
    return _selector


@contextlib.contextmanager
def using_path_selector(selector: PathSelector):
    """Within the block, ``selector`` makes the measured choices (tests inject a timer this way)."""
    global _selector
    previous, _selector = _selector, selector
    try:
        yield selector
    finally:
        _selector = previous
