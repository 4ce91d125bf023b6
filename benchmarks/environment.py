"""What a results row records about the run: device, versions, commit, date, machine load."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=_REPO, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    """Short HEAD commit, with '-dirty' when bayeslayers/ or benchmarks/ hold uncommitted changes."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "bayeslayers", "benchmarks")
    return f"{head}-dirty" if head and dirty else head


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def load_note() -> str:
    """1-minute load average and core count (a loaded machine makes CPU timings noisy)."""
    try:
        return f"loadavg {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return ""


def environment(device: torch.device, notes: str = "") -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    import bayeslayers

    note = "; ".join(n for n in (load_note(), notes) if n)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "bayeslayers": bayeslayers.__version__,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "notes": note,
    }
