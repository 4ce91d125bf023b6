"""The benchmark harness runs end to end in --quick mode and writes the documented CSV schema (not speeds)."""

import csv
from pathlib import Path

import pytest

from benchmarks import kernel_throughput, plot, run, table, unet_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "results.csv"

BAYESLAYERS_CPU = ("reference", "torch", "cpp")


@pytest.mark.slow
def test_quick_benchmark_writes_rows_for_every_provider(tmp_path):
    path = run.main(
        run.parse_args(["--ops", "linear,conv2d,lora,unet", "--device", "cpu", "--out", str(tmp_path), "--quick"])
    )
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0].keys()) == run.FIELDS
    seen = {(r["op"], r["provider"], r["mode"]) for r in rows}
    for op in run.OPS:
        for provider in ("deterministic", *BAYESLAYERS_CPU):
            for mode in ("forward", "backward", "full"):
                assert (op, provider, mode) in seen
    for op in ("linear", "conv2d"):
        assert (op, "bayesian-torch", "full") in seen
    assert not any(r["provider"] == "triton" for r in rows)  # GPU only
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["device"] and r["torch"] and r["commit"] and r["date"]
        if r["provider"] == "deterministic":
            assert float(r["ratio_to_deterministic"]) == 1.0 and r["saved_bytes_per_weight"] == ""
        else:
            assert float(r["saved_bytes_per_weight"]) > 0
        assert (r["peak_bytes"] != "") == (r["mode"] == "full")
    linear = {r["provider"]: r for r in rows if r["op"] == "linear" and r["mode"] == "full"}
    assert float(linear["torch"]["saved_bytes"]) < float(linear["reference"]["saved_bytes"])

    pngs = plot.plot(plot.load_rows(path), tmp_path)
    tag = plot.device_tag(rows[0]["device"])
    assert tag.startswith("cpu-"), tag
    assert {p.name for p in pngs} == {f"{op}_{tag}.png" for op in run.OPS} and all(p.stat().st_size for p in pngs)
    text = table.markdown(plot.load_rows(path))
    assert "| linear | 64x40x48 | torch |" in text and "| unet |" in text
    assert "| linear | 64x40x48 |" in table.summary(plot.load_rows(path))


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed results")
def test_benchmark_summary_is_generated_from_the_committed_csv():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert table.replace_readme_block(page, table.summary(plot.load_rows(RESULTS))) == page


def test_kernel_throughput_reports_ns_per_weight_against_the_probe(tmp_path):
    from bayeslayers.kernels import cpu

    args = ["--sizes", "8192,4099", "--repeats", "3", "--probe_mib", "4", "--out", str(tmp_path)]
    with open(kernel_throughput.main(kernel_throughput.parse_args(args)), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0].keys()) == kernel_throughput.FIELDS
    assert {(r["kernel"], r["weights"]) for r in rows} == {
        (k, n) for k in kernel_throughput.KERNEL_BYTES for n in ("8192", "4099")
    }
    for r in rows:
        floor = int(r["bytes_per_weight"]) / float(r["probe_gbps"])
        assert float(r["floor_ns_per_weight"]) == pytest.approx(floor, rel=1e-2)
        assert float(r["floor_fraction"]) == pytest.approx(floor / float(r["ns_per_weight"]), rel=2e-2)
        assert r["isa"] == cpu.instruction_set() and r["device"] and r["commit"]


def test_unet_step_ratio_interleaves_both_presets(tmp_path):
    rows = unet_step.main(["--config", "micro", "--latent_size", "8", "--steps", "2", "--out", str(tmp_path)])
    assert [r["preset"] for r in rows] == ["dreambooth-bnn", "dreambooth-bnn-lora"]
    for r in rows:
        assert r["bayesian_weights"] > 0 and r["ratio"] == pytest.approx(r["bayesian_s"] / r["deterministic_s"], 1e-2)
    with open(tmp_path / "unet_step_cpu.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_cpu_peak_counts_the_frees_of_blocks_allocated_before_the_call():
    """A step that drops a 4 MiB buffer from before the call, allocates its replacement and a 4 MiB temporary
    peaks 4 MiB above the start (the profiler misses such frees in its first session)."""
    import torch

    from benchmarks.measure import peak_bytes

    size = 1 << 20  # float32 elements: 4 MiB
    state = {"buffer": torch.ones(size)}

    def step():
        state["buffer"] = None
        state["buffer"] = torch.ones(size)
        temporary = torch.ones(size)
        del temporary

    assert peak_bytes(step, torch.device("cpu")) == 4 * size


@pytest.mark.slow
def test_optimizer_step_benchmark_times_every_design_and_writes_its_table(tmp_path, monkeypatch):
    """On a tiny UNet in place of SD1.5: every design trains (the Bayesian ones convert and step) and the table
    has one row per design, ratios to the plain step."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import optimizer_step

    def tiny():
        torch.manual_seed(0)
        return UNet2DConditionModel(**unet_step.unet_config("micro"))

    monkeypatch.setattr(optimizer_step, "sd15_unet", tiny)
    optimizer_step.main(["--resolution", "64", "--steps", "1", "--out", str(tmp_path)])
    with open(tmp_path / "optimizer_step_sd15.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["design"] for r in rows] == list(optimizer_step.DESIGNS)
    assert [r["optimizer"] for r in rows] == ["AdamW", "AdamW", "FusedBayesAdamW", "IVON"]
    assert all(float(r["median_s"]) > 0 for r in rows)
    assert "| 1.00x |" in (tmp_path / "optimizer_step_sd15.md").read_text()
