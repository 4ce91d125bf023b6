"""The dependency rules of docs/ARCHITECTURE.md, read from the source: integrations -> core -> kernels.

The core (``bayeslayers/``) imports no diffusers, transformers, peft, benchmarks, tools or integrations (one
exception: ``peft_lora.py``, the peft adapter layers, imports peft and loads only once peft is imported); the
kernels (``kernels/``, installed as ``bayeslayers.kernels``) import no core module and no model library.
Every import statement counts, also the ones inside functions.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"bayeslayers": ROOT / "bayeslayers", "bayeslayers.kernels": ROOT / "kernels"}
MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "accelerate")


def _imports(package: str, folder: Path):
    """(file, absolute module name) for every import in the package's source (relative imports resolved)."""
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        module_package = ".".join([package, *parts[:-1]])  # what a level-1 relative import is relative to
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    yield path, node.module
                    continue
                base = module_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield path, ".".join(base + ([node.module] if node.module else []))


def _starts(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_import_walk_sees_relative_and_local_imports():
    kernels = {(p.name, name) for p, name in _imports("bayeslayers.kernels", PACKAGES["bayeslayers.kernels"])}
    assert ("philox.py", "bayeslayers.kernels.seeds") in kernels  # from ..seeds, two levels up
    assert ("fused.py", "bayeslayers.kernels.paths.timing") in kernels
    core = {name for _, name in _imports("bayeslayers", PACKAGES["bayeslayers"])}
    assert "bayeslayers.kernels.paths.fused" in core  # imported inside a method


def test_core_imports_no_model_library_benchmark_tool_or_integration():
    banned = (*MODEL_LIBRARIES, "benchmarks", "tools", "bayeslayers.integrations")
    found = [
        (p.relative_to(ROOT), n) for p, n in _imports("bayeslayers", PACKAGES["bayeslayers"]) if _starts(n, banned)
    ]
    peft_layers = ROOT / "bayeslayers" / "peft_lora.py"
    assert not [(p, n) for p, n in found if not (p == peft_layers.relative_to(ROOT) and _starts(n, ("peft",)))]
    assert "bayeslayers.peft_lora" not in {n for _, n in _imports("bayeslayers", PACKAGES["bayeslayers"])}


@pytest.mark.parametrize("banned", [("bayeslayers",), MODEL_LIBRARIES + ("benchmarks", "tools")])
def test_kernels_import_no_core_module(banned):
    found = [
        (p.relative_to(ROOT), n)
        for p, n in _imports("bayeslayers.kernels", PACKAGES["bayeslayers.kernels"])
        if _starts(n, banned) and not _starts(n, ("bayeslayers.kernels",))
    ]
    assert not found
