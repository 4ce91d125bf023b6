"""The demo's figure and its verdict: four captioned panels of >= 256 px with a colour bar, and the arm ahead named
from the numbers whichever it is."""

import pytest
import torch
from PIL import Image

from bayeslayers.integrations import demo


def _metrics(similarity, shape, corruption):
    return {"subject_similarity": similarity, "shape_accuracy": shape, "corruption_score": corruption}


def test_ahead_names_the_leading_arm_for_each_metric():
    lines = demo.ahead({"baseline": _metrics(0.835, 0.781, 0.2), "bayesian": _metrics(0.795, 0.781, 0.1)})
    assert lines[0].startswith("subject_similarity: plain DreamBooth ahead")
    assert lines[1] == "shape_accuracy: tie (0.781)"
    assert lines[2].startswith("corruption_score: DreamBooth-BNN ahead")  # lower is cleaner
    lines = demo.ahead({"baseline": _metrics(0.7, 0.5, 0.3), "bayesian": _metrics(0.8, 0.6, 0.4)})
    assert lines[0].startswith("subject_similarity: DreamBooth-BNN ahead")
    assert lines[2].startswith("corruption_score: plain DreamBooth ahead")


@pytest.mark.parametrize("panel_px", [256, 320])
def test_demo_figure_has_four_panels_of_at_least_256_px(tmp_path, panel_px):
    torch.manual_seed(0)
    images = [torch.rand(n, 3, 32, 32) * 2 - 1 for n in (5, 32, 32)]
    metrics = {"baseline": _metrics(0.8, 0.7, 0.2), "bayesian": _metrics(0.79, 0.75, 0.21)}
    path = demo.demo_figure(*images, torch.rand(32, 32).numpy() * 0.05, metrics, tmp_path / "demo.png", panel_px)
    width, height = Image.open(path).size
    assert width >= 4 * panel_px and height >= panel_px
