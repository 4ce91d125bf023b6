"""The documentation's runnable examples run (in CI time) and print what the docs say they print."""

import re
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def test_bayesian_lora_llm_example_trains_and_reports_calibration(one_thread, capsys):
    pytest.importorskip("peft")
    runpy.run_path(str(EXAMPLES / "bayesian_lora_llm.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    pattern = r"(posterior mean|posterior predictive \(K=16\)) +accuracy ([\d.]+) +confidence ([\d.]+) +ECE ([\d.]+)"
    rows = [re.match(pattern, line) for line in lines[-2:]]
    assert all(rows), lines
    for row in rows:
        accuracy, confidence, ece = (float(v) for v in row.groups()[1:])
        assert accuracy > 0.5  # chance is 0.25: the adapter learned the task
        assert 0 <= ece <= 1 and 0.25 <= confidence <= 1
