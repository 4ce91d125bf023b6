"""docs/ARCHITECTURE.md's walk of one call, checked against the Python stack at the Triton kernel launches.

The numbered steps of "A call, from BayesLinear.forward to a kernel and back" each start with the qualified
name of a project function; the project's frames on the stack when the sample and gradient kernels launch must
be exactly those, in order (and so the documented hop count is the real one).
"""

import re
import sys
from pathlib import Path

import pytest
import torch

import bayeslayers
from bayeslayers import BayesLinear

ROOT = Path(__file__).resolve().parent.parent
PROJECT = (ROOT / "bayeslayers", ROOT / "kernels")
SECTION = "## A call, from `BayesLinear.forward` to a kernel and back"


def _documented(kind: str) -> list[str]:
    """The qualified names the section's numbered ``kind`` steps (forward / backward) start with."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\s*(\d+)\. \*\*(forward|backward)\*\* `([\w.<>]+)`", section, flags=re.M)
    return [name for _, step_kind, name in steps if step_kind == kind]


def _project_stack() -> list[str]:
    names, frame = [], sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if any(path.is_relative_to(folder) for folder in PROJECT):
            names.append(frame.f_code.co_qualname)
        frame = frame.f_back
    return names[::-1]


class _Recorder:
    """Stands in for a Triton kernel: records the project stack at each launch, then launches."""

    def __init__(self, kernel, stacks):
        self.kernel, self.stacks = kernel, stacks

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.stacks.append(_project_stack())
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    from bayeslayers.kernels.triton import reparam_grad, sample_kl

    stacks = {"forward": [], "backward": []}
    monkeypatch.setattr(
        sample_kl, "_sample_weight_kl_kernel", _Recorder(sample_kl._sample_weight_kl_kernel, stacks["forward"])
    )
    monkeypatch.setattr(
        reparam_grad,
        "_reparameterization_grad_kernel",
        _Recorder(reparam_grad._reparameterization_grad_kernel, stacks["backward"]),
    )
    return stacks


def test_the_documented_call_is_the_call(launches):
    bayeslayers.set_backend("triton")
    layer = BayesLinear(8, 6, init_sigma=0.1)
    x = torch.randn(3, 8, requires_grad=True)
    with bayeslayers.fusion():  # the fixed policy: sample-then-map, the path of every layer map
        y = layer(x)
        (y.square().sum() + layer.kl()).backward()
    assert launches["forward"] == [_documented("forward")]
    assert launches["backward"] == [_documented("backward")]
    hops = len(_documented("forward"))  # calls from BayesLinear.forward to the kernel, the launch included
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert f"**{hops} hops**" in text
