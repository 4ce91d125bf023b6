"""Optional pure-Python packages from a folder of wheels, for a machine with no network (``tools/fetch_wheels.sh``).

Each wheel whose distribution the interpreter lacks is installed into a scratch folder with
``pip install --no-index --no-deps --target``; the folder goes first on ``sys.path`` and ``PYTHONPATH`` (for
subprocesses). A distribution the interpreter already has keeps its own version. Then each optional module is
imported: what still fails is reported with the reason (no wheel, or the import error naming what is missing).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# module -> (distribution, what needs it, the name whose import proves it works: both load lazily)
OPTIONAL = {
    "diffusers": ("diffusers", "the SD1.5 UNet step and the diffusers-based tests", "UNet2DConditionModel"),
    "bayesian_torch": ("bayesian-torch", "the bayesian-torch baseline", "layers.LinearReparameterization"),
}


@dataclass
class WheelReport:
    installed: list[str] = field(default_factory=list)  # wheels installed into the target
    kept: list[str] = field(default_factory=list)  # wheels skipped: the interpreter has that distribution
    missing: dict[str, str] = field(default_factory=dict)  # module -> why it cannot be imported
    target: str = ""

    def lines(self) -> list[str]:
        out = [f"installed from wheels into {self.target}: {', '.join(self.installed)}"] if self.installed else []
        out += [f"wheel not used (already installed): {', '.join(self.kept)}"] if self.kept else []
        out += [f"missing {module} ({OPTIONAL[module][1]} skipped): {why}" for module, why in self.missing.items()]
        return out


def distribution_name(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (``diffusers-0.42.1-py3-none-any.whl`` -> diffusers)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_missing(wheel_dir: Path, target: Path) -> WheelReport:
    """Installs the wheels in ``wheel_dir`` the interpreter lacks into ``target`` and checks the optional modules."""
    report = WheelReport(target=str(target))
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    needed = [w for w in wheels if not _installed(distribution_name(w))]
    report.kept = [w.name for w in wheels if w not in needed]
    if needed:
        target.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        run = subprocess.run([*command, "--target", str(target), *map(str, needed)], capture_output=True, text=True)
        if run.returncode:
            report.missing = {m: f"pip could not install the wheels: {run.stderr.strip()[-300:]}" for m in OPTIONAL}
            return report
        report.installed = [w.name for w in needed]
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
        importlib.invalidate_caches()
    for module, (distribution, _, name) in OPTIONAL.items():
        if importlib.util.find_spec(module) is None:
            report.missing[module] = f"not installed and no {distribution} wheel in {wheel_dir}"
            continue
        try:
            package, _, attribute = f"{module}.{name}".rpartition(".")
            getattr(importlib.import_module(package), attribute)
        except Exception as error:  # e.g. a requirement that has no wheel: the message names it
            report.missing[module] = f"import fails: {type(error).__name__}: {str(error)[:200]}"
    return report
