"""The benchmark harness runs end to end in --quick mode and writes the documented CSV schema."""

import csv

from benchmarks import plot, run, table


def test_quick_benchmark_writes_rows_for_every_provider(tmp_path):
    path = run.main(run.parse_args(["--ops", "linear,conv2d,lora,unet", "--device", "cpu", "--out", str(tmp_path),
                                    "--quick", "--min_run_time", "0.01"]))
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0].keys()) == run.FIELDS
    seen = {(r["op"], r["provider"]) for r in rows}
    for op in ("linear", "conv2d", "lora", "unet"):
        assert (op, "deterministic") in seen and (op, "reference") in seen and (op, "torch") in seen
    assert ("linear", "bayesian-torch") in seen and ("conv2d", "bayesian-torch") in seen
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        assert r["provider"] != "deterministic" or float(r["ratio_to_deterministic"]) == 1.0
    torch_rows = [r for r in rows if r["op"] == "linear" and r["provider"] == "torch" and r["mode"] == "full"]
    ref_rows = [r for r in rows if r["op"] == "linear" and r["provider"] == "reference" and r["mode"] == "full"]
    assert float(torch_rows[0]["saved_bytes"]) < float(ref_rows[0]["saved_bytes"])
    assert plot.plot(plot.latest_run(plot.load_rows(path)), tmp_path)
    assert "| linear |" in table.markdown(plot.latest_run(plot.load_rows(path)))
