"""Imports from a source checkout with no install (``PYTHONPATH=<checkout>``, ``python -m`` from its root).

setup.py installs the checkout's top-level ``kernels/`` and ``integrations/`` as ``bayeslayers.kernels`` and
``bayeslayers.integrations``. Where this package runs from the checkout itself (no ``kernels`` folder inside it,
``setup.py`` beside it), a finder maps those two names to the checkout's folders, so the same code runs
installed, installed in editable mode, or straight from the tree (as on a machine where nothing can be installed).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
MAPPED = ("kernels", "integrations")


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``bayeslayers.kernels`` and ``bayeslayers.integrations`` in the checkout beside the package."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != "bayeslayers" or name not in MAPPED:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def map_source_tree() -> bool:
    """Installs the finder when this package is a checkout's; returns whether it did."""
    root = PACKAGE.parent
    in_checkout = not (PACKAGE / "kernels").is_dir() and (root / "setup.py").is_file()
    if not in_checkout or not all((root / name / "__init__.py").is_file() for name in MAPPED):
        return False
    if not any(isinstance(finder, SourceTreeFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceTreeFinder(root))
    return True


map_source_tree()
