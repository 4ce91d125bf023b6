"""The C++ extension build (kernels/cpu/build.py): one folder per hash of sources, flags and toolchain, and a
lock that lets concurrent first builds compile once. A tiny pybind11 source keeps each build to seconds."""

import os
import subprocess
import sys
import time

import pytest

from bayeslayers.kernels import cpu
from bayeslayers.kernels.cpu import build as cpu_build

PROBE = """#include <pybind11/pybind11.h>
int answer() { return ANSWER; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def _source(tmp_path, answer: int, name="probe.cpp"):
    path = tmp_path / name
    path.write_text(PROBE.replace("ANSWER", str(answer)))
    return path


def test_the_cpu_kernels_load_from_the_folder_named_by_their_sources_and_flags():
    path = cpu.extension().__file__
    key = cpu_build.build_key([cpu.SOURCE], cpu.CFLAGS, ["-fopenmp"])
    assert os.path.basename(os.path.dirname(path)) == f"{cpu.EXTENSION_NAME}_{key}"
    assert os.path.dirname(os.path.dirname(path)) == str(cpu_build.build_root())


@pytest.mark.slow
def test_a_changed_source_gives_another_build_and_both_load(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = _source(tmp_path, 1)
    first = cpu_build.load("probe", [source])
    source.write_text(PROBE.replace("ANSWER", "2"))
    second = cpu_build.load("probe", [source])
    assert first.compiled and second.compiled and first.directory != second.directory
    assert first.directory.parent == second.directory.parent == tmp_path / "ext"
    assert (first.module.answer(), second.module.answer()) == (1, 2)
    again = cpu_build.load("probe", [source])
    assert not again.compiled and again.module is second.module
    # A build killed while holding torch's lock file leaves it behind; it must not block the next build.
    source.write_text(PROBE.replace("ANSWER", "3"))
    directory = cpu_build.build_root() / f"probe_{cpu_build.build_key([source], [], [])}"
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    assert cpu_build.load("probe", [source]).module.answer() == 3


def test_two_processes_building_at_once_compile_once(tmp_path):
    source = _source(tmp_path, 42)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    code = (
        "import sys; from bayeslayers.kernels.cpu import build as cpu_build; print('ready', flush=True); "
        f"b = cpu_build.load('probe', [{str(source)!r}]); print(b.compiled, b.module.answer(), b.module.__file__)"
    )
    key = cpu_build.build_key([source], [], [])
    (tmp_path / "ext").mkdir()
    lock = tmp_path / "ext" / f"probe_{key}.lock"
    with cpu_build.exclusive(lock):  # both start their first build while the folder is locked
        procs = [
            subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        for proc in procs:
            assert proc.stdout.readline().decode().strip() == "ready", proc.stderr.read().decode()
        time.sleep(0.5)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        compiled, answer, path = out.decode().split()
        results.append((compiled, int(answer), path))
    assert sorted(r[0] for r in results) == ["False", "True"]
    assert {r[1] for r in results} == {42} and len({r[2] for r in results}) == 1


def test_build_key_reads_every_input(tmp_path):
    a, b = _source(tmp_path, 1, "a.cpp"), _source(tmp_path, 1, "b.cpp")
    base = cpu_build.build_key([a], ["-O3"], [])
    assert cpu_build.build_key([a], ["-O3"], []) == base
    assert len({base, cpu_build.build_key([b], ["-O3"], []), cpu_build.build_key([a], ["-O2"], [])}) == 3
    assert cpu_build.build_key([a], ["-O3"], ["-fopenmp"]) != base
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CXX", "clang++")
        assert cpu_build.build_key([a], ["-O3"], []) != base


def test_two_copies_of_the_same_sources_share_one_build_without_rebuilding_it(tmp_path):
    """Two checkouts (or a checkout and an installed wheel) with the same sources: the second loads the first's
    library, and loading from the first again compiles nothing (ninja sees one build file, not two)."""
    copies = []
    for name in ("checkout_a", "checkout_b"):
        (tmp_path / name).mkdir()
        copies.append(_source(tmp_path / name, 7))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    code = (
        "import sys, os; from bayeslayers.kernels.cpu import build; b = build.load('probe', [sys.argv[1]]); "
        "print(b.compiled, b.module.answer(), os.stat(b.module.__file__).st_mtime_ns)"
    )
    runs = []
    for source in (copies[0], copies[1], copies[0]):
        result = subprocess.run([sys.executable, "-c", code, str(source)], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(result.stdout.split())
    assert [r[:2] for r in runs] == [["True", "7"], ["False", "7"], ["False", "7"]]
    assert runs[0][2] == runs[1][2] == runs[2][2]  # the library was never written again
