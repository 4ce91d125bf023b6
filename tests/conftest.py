"""Test configuration: Triton kernels run under the interpreter on CPU-only machines.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before any test imports
``bayeslayers.kernels``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    import bayeslayers

    torch.manual_seed(1234)
    yield
    bayeslayers.set_backend(None)


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like return NaN-filled (float) or sentinel-filled (int) tensors during the test, so
    an element a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
