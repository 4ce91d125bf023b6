"""Builds and loads a C++ extension in a folder keyed by what went into it, one build at a time.

The folder is ``<root>/<name>_<key>``: ``root`` is torch's extension root (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), ``key`` the first 16 hex digits of a SHA-256 over the sources' bytes, the compiler
and linker flags, the compiler named by ``$CXX``, the torch version and C++ ABI, and the Python ABI. Two
checkouts, two installed versions or two torch builds on one machine therefore never share (or rebuild) each
other's build, and a process never loads a library built from other sources. The module name carries the key
too, so two builds can be loaded side by side in one process. The sources are compiled from a copy inside the
folder, so every checkout or installed copy with the same key writes the same ``build.ninja`` and none of them
makes ninja rebuild what another built.

A first build is serialised by an ``fcntl`` lock on ``<folder>.lock``: the first process compiles, the others wait
and then load its library. The operating system drops the lock when its holder dies, so a killed build never
blocks the next one (torch's own lock file, which would, is removed while the lock is held).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Build:
    """A loaded extension: its module, its folder, and whether this process compiled it."""

    module: object
    directory: Path
    compiled: bool


def build_key(sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """16 hex digits naming the build of ``sources`` with these flags by this compiler, torch and Python."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(Path(source).name.encode() + b"\0" + Path(source).read_bytes() + b"\0")
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")
    for part in (*cflags, "|", *ldflags, "|", os.environ.get("CXX", "c++"), torch.__version__, str(abi)):
        digest.update(str(part).encode() + b"\0")
    digest.update(f"{sys.implementation.cache_tag} {sys.platform}".encode())
    return digest.hexdigest()[:16]


def build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else torch's default extension root."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@contextmanager
def exclusive(path: Path):
    """Holds an exclusive ``fcntl`` lock on ``path`` (created if missing) for the ``with`` block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staged_sources(sources: Sequence[Path], folder: Path) -> list[Path]:
    """Copies of ``sources`` in ``folder`` (written once: the key says their bytes), the paths the build names."""
    folder.mkdir(exist_ok=True)
    staged = [folder / Path(source).name for source in sources]
    for source, copy in zip(sources, staged):
        if not copy.exists():
            shutil.copyfile(source, copy.with_suffix(".tmp"))
            os.replace(copy.with_suffix(".tmp"), copy)
    return staged


def load(
    name: str, sources: Sequence[Path], cflags: Sequence[str] = (), ldflags: Sequence[str] = (), verbose=False
) -> Build:
    """Builds (once per key, machine-wide) and imports the extension ``name`` made of ``sources``.

    The module is named ``<name>_<key>``; the C++ side names it with ``TORCH_EXTENSION_NAME``.
    """
    from torch.utils.cpp_extension import load as torch_load

    key = build_key(sources, cflags, ldflags)
    module_name = f"{name}_{key}"
    directory = build_root() / module_name
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(directory.with_name(module_name + ".lock")):
        compiled = not (directory / f"{module_name}.so").exists()
        (directory / "lock").unlink(missing_ok=True)  # torch's own lock, left behind by a killed build
        module = torch_load(
            name=module_name,
            sources=[str(s) for s in staged_sources(sources, directory / "src")],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(directory),
            verbose=verbose,
        )
    return Build(module, directory, compiled)
