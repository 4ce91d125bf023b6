"""The README's promises: it fits on a screen, names both test commands, and its Python code runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_names_both_test_tiers():
    assert len(README.splitlines()) <= 160
    assert "make test " in README and "make test-all" in README


@pytest.mark.parametrize("index", range(len(python_blocks(README))))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    """Each ```python block of the README, executed in a fresh namespace in an empty folder (it writes files)."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = python_blocks(README)[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme_block"})
    if "to_deterministic" in code:  # the training loop: its two outputs load back
        import bayeslayers

        assert bayeslayers.read_metadata(tmp_path / "bayesian_state.safetensors")["layers"]
        assert (tmp_path / "unet" / "config.json").exists()
