"""The corruption-stage study: its summary numbers on curves with known answers, the uncertainty statistics
against direct computations, and ``--quick`` end to end on the bundled tiny model."""

import itertools
import json
import math
import time

import numpy as np
import pytest

from bayeslayers.integrations.study import analysis
from bayeslayers.integrations.study.parallel import run_parallel, schedule
from bayeslayers.integrations.study.uncertainty import filtering_gain, spearman


def test_dip_area_is_the_area_below_the_running_best():
    fraction = np.linspace(0, 1, 5)  # steps of 0.25
    assert analysis.dip_area(fraction, np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == 0.0
    # rise to 0.8, drop to 0.4, recover: gaps (0, 0, 0.4, 0, 0) -> two trapezoids of 0.25 * 0.4 / 2
    assert analysis.dip_area(fraction, np.array([0.2, 0.8, 0.4, 0.8, 0.9])) == pytest.approx(0.1)
    # lower is better: a rise of 0.5 above the lowest value so far at the middle point
    corruption = np.array([1.0, 1.0, 1.5, 1.0, 1.0])
    assert analysis.dip_area(fraction, corruption, higher_is_better=False) == pytest.approx(0.125)
    assert analysis.dip_area(fraction[::-1], corruption[::-1], higher_is_better=False) == pytest.approx(0.125)


def _rows(curve_of):
    rows = []
    for subject, arm, seed in itertools.product(("a", "b"), ("plain", "bayes"), (0, 1, 2)):
        for step, value in enumerate(curve_of(subject, arm, seed)):
            rows.append(
                {"subject": subject, "arm": arm, "seed": seed, "step": step * 10, "fraction": step / 4, "m": value}
            )
    return rows


def test_arm_table_averages_subjects_per_seed_then_reports_the_seed_spread():
    def curve(subject, arm, seed):
        if arm == "plain":  # a dip of depth 0.3 + seed / 10 at the middle point
            return [0.5, 0.8, 0.5 - seed / 10, 0.8, 0.7 + (subject == "b") * 0.1]
        return [0.5, 0.6, 0.7, 0.8, 0.9 + seed / 100]

    metric = analysis.StudyMetric("m", "m", True)
    table = {e["arm"]: e for e in analysis.arm_table(_rows(curve), ["plain", "bayes"], [metric])}
    plain, bayes = table["plain"], table["bayes"]
    assert plain["seeds"] == bayes["seeds"] == 3
    assert plain["best"] == pytest.approx(0.8) and plain["fraction_of_best"] == pytest.approx(0.25)
    assert plain["final"] == pytest.approx(0.75) and plain["final_std"] == pytest.approx(0.0)
    depths = [0.3 + seed / 10 for seed in range(3)]  # area = 2 trapezoids of 0.25 * depth / 2
    end = 0.25 * 0.1 / 2 / 2  # subject a ends 0.1 below its best: one trapezoid, half the subject mean
    assert plain["dip_area"] == pytest.approx(np.mean([0.25 * d + end for d in depths]))
    assert plain["dip_area_std"] == pytest.approx(np.std([0.25 * d for d in depths], ddof=1))
    assert bayes["dip_area"] == 0.0 and bayes["fraction_of_best"] == 1.0
    assert bayes["best"] == pytest.approx(np.mean([0.9 + s / 100 for s in range(3)]))
    assert bayes["best_std"] == pytest.approx(np.std([0.9 + s / 100 for s in range(3)], ddof=1))
    fraction, mean, std = analysis.mean_curves(_rows(curve), "m", "plain")
    assert np.allclose(fraction, [0, 0.25, 0.5, 0.75, 1]) and mean[2] == pytest.approx(0.4)
    assert std[2] == pytest.approx(0.1)
    assert "| m | plain | 0.800 ± 0.000 | 0.750 ± 0.000 | 0.250 ± 0.000 |" in analysis.markdown_table([plain])


def test_spearman_and_filtering_against_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731 - no ties in continuous draws
    assert spearman(a, b) == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1])
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share a rank
    assert np.isnan(spearman(a, np.ones(40)))
    with pytest.raises(ValueError, match="lengths differ"):
        spearman(a, b[:3])
    quality = np.arange(8.0)
    uncertainty = quality.copy()  # the best images are the most uncertain: dropping 2 loses them
    result = filtering_gain(uncertainty, quality)
    assert result["all"] == pytest.approx(3.5) and result["kept"] == pytest.approx(np.mean(quality[:6]))
    assert result["gain"] == pytest.approx(2.5 - 3.5)


def test_uncertainty_summary_per_run():
    rows = []
    for seed in (0, 1):
        for i in range(8):
            rows.append({"arm": "bnn", "subject": "s", "seed": seed, "uncertainty": float(i), "corruption": float(i)})
            rows[-1]["judge_subject_similarity"] = float(-i if seed == 0 else i)
    summary = {e["metric"]: e for e in analysis.uncertainty_summary(rows)}
    assert set(summary) == {"judge_subject_similarity", "corruption"}  # metrics missing from the rows are left out
    assert summary["corruption"]["spearman"] == pytest.approx(1.0) and summary["corruption"]["runs"] == 2
    assert summary["judge_subject_similarity"]["spearman"] == pytest.approx(0.0)
    assert summary["judge_subject_similarity"]["spearman_std"] == pytest.approx(np.std([-1, 1], ddof=1))
    assert summary["corruption"]["gain"] == pytest.approx(np.mean(np.arange(6.0)) - 3.5)


def test_schedule_waits_for_the_first_task_of_each_shared_key():
    tasks = [("star", 0), ("circle", 0), ("star", 1), ("square", 0), ("circle", 1), ("star", 2)]
    assert schedule(tasks, lambda task: task[0]) == [None, None, 0, None, 1, 0]


@pytest.mark.slow
def test_run_parallel_returns_results_in_task_order_and_raises_a_failed_task():
    finished = []
    results = run_parallel(
        divmod,
        [(7, 2), (9, 4), (1, 1)],
        jobs=2,
        threads=1,
        shared_key=lambda t: t[1] > 1,
        on_done=lambda t, r: finished.append(t),
    )
    assert results == [(3, 1), (2, 1), (1, 0)]
    assert sorted(finished) == [(1, 1), (7, 2), (9, 4)]
    with pytest.raises(ValueError, match="math domain error"):
        run_parallel(math.sqrt, [(4.0,), (-1.0,)], jobs=2, threads=1)
    with pytest.raises(ValueError, match="jobs and threads"):
        run_parallel(divmod, [(1, 1)], jobs=0, threads=1)


def test_settings_from_flags_per_training_mode():
    from bayeslayers.integrations.study import arms, cli

    default = cli.settings_from_args(cli.parse_args([]))
    assert default.kl_weight == {"full": 1e-4, "lora": 0.0} and default == arms.FULL
    assert "dreambooth-bnn-ivon" in default.arms and not any(a.endswith("-sigma") for a in default.arms)
    both = cli.settings_from_args(cli.parse_args(["--kl_weight", "0.5", "--kl_weight_lora", "2"]))
    assert both.kl_weight == {"full": 0.5, "lora": 2.0}
    rate = cli.settings_from_args(cli.parse_args(["--learning_rate_full", "1e-5", "--seeds", "4,5"]))
    assert rate.learning_rate == {"full": 1e-5, "lora": 1e-3} and rate.seeds == (4, 5)
    with pytest.raises(SystemExit):
        cli.parse_args(["--jobs", "0"])


def test_sigma_table_reads_each_runs_final_movement():
    rows = []
    for arm, seed, mean in (("a", 0, 1.2), ("a", 1, 1.4), ("b", 0, 1.0)):
        for step in (0, 10):  # every row of a run carries the run's final values
            rows.append({"arm": arm, "subject": "s", "seed": seed, "step": step, "sigma_ratio/all/mean": mean})
            rows[-1].update({"sigma_ratio/all/p05": mean - 0.1, "sigma_ratio/all/p95": mean + 0.1})
    rows.append({"arm": "plain", "subject": "s", "seed": 0, "step": 0})
    table = {e["arm"]: e for e in analysis.sigma_table(rows, ["plain", "a", "b"])}
    assert set(table) == {"a", "b"} and table["a"]["runs"] == 2
    assert table["a"]["mean"] == pytest.approx(1.3) and table["a"]["p05_min"] == pytest.approx(1.1)
    assert table["a"]["p95_max"] == pytest.approx(1.5)
    assert "| a | 2 | 1.3000 (1.2000..1.4000)" in analysis.sigma_markdown(list(table.values()))


def test_reused_rows_add_other_arms_of_a_study_with_the_same_settings(tmp_path):
    from bayeslayers.integrations.study import arms, cli

    settings = arms.FULL.replace(arms=("dreambooth-bnn-sigma",), subjects=("checker_star",), seeds=(0, 1))
    (tmp_path / "settings.json").write_text(json.dumps(arms.FULL.__dict__, default=list))
    rows = [
        {"subject": "checker_star", "arm": "lora", "seed": 0, "fraction": 0.5, "judge_shape_accuracy": 0.25},
        {"subject": "checker_star", "arm": "lora", "seed": 2, "fraction": 0.5, "judge_shape_accuracy": 0.5},
        {"subject": "ring_circle", "arm": "lora", "seed": 0, "fraction": 0.5, "judge_shape_accuracy": 0.5},
        {"subject": "checker_star", "arm": "dreambooth-bnn-sigma", "seed": 0, "fraction": 0.5},
        {"subject": "checker_star", "arm": "lora", "seed": 1, "fraction": 0.0, "judge_shape_accuracy": float("nan")},
    ]
    cli.write_csv(tmp_path / "evaluations.csv", rows)
    reused, images = cli.reused_rows(tmp_path, settings)
    assert images == [] and len(reused) == 2
    assert reused[0] == rows[0] and math.isnan(reused[1]["judge_shape_accuracy"])
    with pytest.raises(ValueError, match="other settings \\(max_train_steps\\)"):
        cli.reused_rows(tmp_path, settings.replace(max_train_steps=7))


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    """``--quick`` (one subject, one seed, every arm, a few steps) in two worker processes writes the CSV,
    curves, table and the uncertainty analysis, within its 5-minute budget; a second, sequential call reuses the
    finished runs."""
    from bayeslayers.integrations.study import arms, cli
    from bayeslayers.integrations.study.runner import SubjectData

    started = time.perf_counter()
    report = cli.main(cli.parse_args(["--quick", "--output_dir", str(tmp_path), "--jobs", "2"]))
    minutes = (time.perf_counter() - started) / 60
    assert minutes < 5, f"--quick took {minutes:.1f} min"
    quick = arms.QUICK
    rows = (tmp_path / "evaluations.csv").read_text().splitlines()
    assert len(rows) - 1 == len(quick.arms) * (quick.evaluations + 1)  # step 0, every eval_steps, the end
    for name in ("curves.png", "results.md", "results.json", "uncertainty_images.csv"):
        assert (tmp_path / name).stat().st_size > 0
    table = json.loads((tmp_path / "results.json").read_text())["table"]
    assert {e["arm"] for e in table} == set(quick.arms)
    bayesian = {a for a in quick.arms if arms.ARMS[a].bayesian}
    assert {e["arm"] for e in report["uncertainty"]} == bayesian
    moved = {e["arm"]: max(abs(e["p05"] - 1), abs(e["p95"] - 1)) for e in report["sigma"]}  # final sigma/sigma_0
    assert set(moved) == bayesian
    assert moved["dreambooth-bnn-ivon"] > moved["dreambooth-bnn"] > 0  # IVON sets sigma from its curvature
    images = (tmp_path / "uncertainty_images.csv").read_text().splitlines()
    per_run = len(SubjectData.bundled(quick.subjects[0]).eval_prompts) * quick.uncertainty_images_per_prompt
    assert len(images) - 1 == len(bayesian) * per_run
    first = (tmp_path / "evaluations.csv").read_text()
    started = time.perf_counter()
    cli.main(cli.parse_args(["--quick", "--output_dir", str(tmp_path), "--jobs", "1"]))
    assert time.perf_counter() - started < 30  # nothing retrained
    assert (tmp_path / "evaluations.csv").read_text() == first
    with pytest.raises(ValueError, match="other settings \\(max_train_steps\\)"):
        cli.main(cli.parse_args(["--quick", "--output_dir", str(tmp_path), "--max_train_steps", "6"]))


def test_a_run_stopped_by_a_signal_is_not_recorded_as_finished(tmp_path, monkeypatch):
    from bayeslayers.integrations import dreambooth
    from bayeslayers.integrations.study import arms, runner

    monkeypatch.setattr(dreambooth, "main", lambda args: {"interrupted": True, "step": 3})
    subject = runner.SubjectData.bundled("checker_star")
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        runner.run_one(subject, "lora-bnn-sigma", 0, arms.QUICK, tmp_path)
    assert not (runner.run_dir(tmp_path, subject.name, "lora-bnn-sigma", 0) / "rows.json").exists()


def test_report_only_puts_the_reused_arms_beside_the_new_ones(tmp_path):
    """--report_only --reuse_dir docs/study: the committed arms' rows (same subject and seed) and a new arm's
    finished run in one table, with the new arm's final sigma / sigma_0 and its uncertainty rows."""
    from pathlib import Path

    from bayeslayers.integrations.study import cli
    from bayeslayers.integrations.study.runner import run_dir

    committed = Path(__file__).resolve().parents[1] / "docs" / "study"
    old = [r for r in cli.read_csv(committed / "evaluations.csv") if r["arm"] == "lora-bnn" and r["seed"] == 0]
    old = [r for r in old if r["subject"] == "checker_star"]
    run = run_dir(tmp_path, "checker_star", "lora-bnn-sigma", 0)
    run.mkdir(parents=True)
    rows = [{**r, "arm": "lora-bnn-sigma", "sigma_ratio/all/mean": 1.5, "sigma_ratio/all/p05": 0.1} for r in old]
    for row in rows:
        row["sigma_ratio/all/p95"] = 3.0
        row["judge_prompt_accuracy"] = row["judge_prompt_accuracy"] - 0.1
    (run / "rows.json").write_text(json.dumps(rows))
    images = [r for r in cli.read_csv(committed / "uncertainty_images.csv") if r["arm"] == "lora-bnn"]
    images = [{**r, "arm": "lora-bnn-sigma"} for r in images if r["subject"] == "checker_star" and r["seed"] == 0]
    (run / "uncertainty.json").write_text(json.dumps(images))
    flags = ["--report_only", "--arms", "lora-bnn-sigma", "--subjects", "checker_star", "--seeds", "0"]
    report = cli.main(cli.parse_args([*flags, "--reuse_dir", str(committed), "--output_dir", str(tmp_path)]))
    committed_arms = dict.fromkeys(r["arm"] for r in cli.read_csv(committed / "evaluations.csv"))
    arms = [a for a in committed_arms if a != "lora-bnn-sigma"] + ["lora-bnn-sigma"]
    assert list(dict.fromkeys(e["arm"] for e in report["table"])) == arms
    final = {(e["arm"], e["metric"]): e["final"] for e in report["table"]}
    shift = final[("lora-bnn", "judge_prompt_accuracy")] - final[("lora-bnn-sigma", "judge_prompt_accuracy")]
    assert shift == pytest.approx(0.1)
    assert [e for e in report["sigma"] if e["arm"] == "lora-bnn-sigma"] == [
        {
            "arm": "lora-bnn-sigma",
            "runs": 1,
            **{f"{s}{e}": v for s, v in (("mean", 1.5), ("p05", 0.1), ("p95", 3.0)) for e in ("", "_min", "_max")},
        }
    ]
    spearman = {(e["arm"], e["metric"]): e["spearman"] for e in report["uncertainty"]}
    assert spearman[("lora-bnn", "judge_prompt_accuracy")] == spearman[("lora-bnn-sigma", "judge_prompt_accuracy")]
    assert report["reused"]["arms"] == arms[:-1]
    assert "Final sigma / sigma_0" in (tmp_path / "results.md").read_text()


def test_plot_only_redraws_the_committed_curves_in_two_rows(tmp_path):
    """``--plot_only`` redraws curves.png from a finished study's evaluations.csv and settings.json alone."""
    import shutil
    from pathlib import Path

    from PIL import Image

    from bayeslayers.integrations.study import cli

    committed = Path(__file__).resolve().parents[1] / "docs" / "study"
    for name in ("evaluations.csv", "settings.json"):
        shutil.copy(committed / name, tmp_path / name)
    result = cli.main(cli.parse_args(["--plot_only", "--output_dir", str(tmp_path)]))
    assert result == {"curves": str(tmp_path / "curves.png")}
    width, height = Image.open(tmp_path / "curves.png").size
    assert 1.2 < width / height < 2.0  # five metrics: two rows of three panels, not one row of five
    rows = cli.read_csv(tmp_path / "evaluations.csv")
    assert isinstance(rows[0]["seed"], int) and isinstance(rows[0]["judge_subject_similarity"], float)


def test_corruption_study_settings_and_its_bundled_model():
    from bayeslayers.integrations import tiny_sd
    from bayeslayers.integrations.study import arms, cli

    corruption = cli.settings_from_args(cli.parse_args(["--corruption"]))
    assert corruption == arms.CORRUPTION and corruption.resolution == 64 and arms.FULL.resolution == 32
    assert corruption.arms == ("dreambooth", "dreambooth-bnn") and corruption.eval_steps == 50  # every 5 %
    smoke = cli.settings_from_args(cli.parse_args(["--corruption", "--quick"]))
    assert smoke.model == "tiny-sd-64" and smoke.max_train_steps == arms.QUICK.max_train_steps
    assert smoke.subjects == ("fine_checker_star",) and smoke.uncertainty_samples == 0
    with pytest.raises(ValueError, match="--subjects: unknown or no names \\['checker_star'\\]"):
        cli.settings_from_args(cli.parse_args(["--corruption", "--subjects", "checker_star"]))
    with pytest.raises(ValueError, match="--subjects: unknown or no names \\['fine_checker_star'\\]"):
        cli.settings_from_args(cli.parse_args(["--subjects", "fine_checker_star"]))
    model, flags = cli.model_flags(cli.parse_args(["--corruption"]), corruption)
    assert flags == ["--pretrained_model_name_or_path", model, "--resolution", "64"]
    assert model == str(tiny_sd.assets_dir(64) / "pipeline")
    assert cli.model_flags(cli.parse_args([]), arms.FULL) == (None, [])
    user = cli.parse_args(["--corruption", "--pretrained_model_name_or_path", "sd15", "--resolution", "512"])
    assert cli.model_flags(user, corruption) == (
        "sd15",
        ["--pretrained_model_name_or_path", "sd15", "--resolution", "512"],
    )


def test_settings_a_saved_study_does_not_record_take_their_defaults(tmp_path):
    """docs/study's settings.json predates ``model``: it reads as the 32 px model's, not as the 64 px one's."""
    from bayeslayers.integrations.study import arms, cli

    saved = json.loads(json.dumps(arms.FULL.__dict__, default=list))
    del saved["model"]
    current = json.loads(json.dumps(arms.FULL.__dict__, default=list))
    assert cli.settings_differ(saved, current) == []
    assert cli.settings_differ(saved, {**current, "model": "tiny-sd-64"}) == ["model"]
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings \\(.*model"):
        cli.check_settings(tmp_path, arms.CORRUPTION)


def test_grid_shows_each_arm_at_evenly_spaced_steps_and_the_plain_arms_corruption_peak(tmp_path):
    from PIL import Image

    from bayeslayers.integrations.study import grids
    from bayeslayers.integrations.study.runner import run_dir

    steps, colours = (0, 10, 20, 30, 40), {"dreambooth": 60, "dreambooth-bnn": 200}
    rows = []
    for arm, seed, step in itertools.product(colours, (0, 1), steps):
        peak = 1.0 + (arm == "dreambooth") * (step == 30) * (1 + seed)  # plain peaks at step 30 in both seeds
        rows.append({"subject": "s", "arm": arm, "seed": seed, "step": step, "corruption": peak})
        folder = run_dir(tmp_path, "s", arm, seed) / "eval" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (colours[arm], step, 40 * i)).save(folder / f"{i:03d}.png")
    assert grids.dip_step(rows, "s", "dreambooth") == 30 and grids.dip_step(rows, "t", "dreambooth") is None
    assert grids.grid_steps(rows, "s", 3, dip=30) == [0, 20, 30, 40]
    with pytest.raises(ValueError, match="columns must be >= 2"):
        grids.grid_steps(rows, "s", 1, dip=None)
    (path,) = grids.write_grids(tmp_path, rows, list(colours))
    assert path == tmp_path / "grid_s.png"
    grid = np.asarray(Image.open(path))
    side, label_w, label_h, pad = 16, 110, 14, 4  # 8 px images at 2x
    cell_w = 2 * side + pad
    for i, arm in enumerate(colours):
        for j, step in enumerate((0, 10, 20, 30, 40)):  # 5 evenly spaced columns include the dip
            for k in range(2):
                y, x = label_h + i * (side + pad) + side // 2, label_w + j * cell_w + k * side + side // 2
                assert tuple(grid[y, x]) == (colours[arm], step, 40 * k)
    assert grids.write_grids(tmp_path, rows, [*colours, "lora"]) == []  # an arm without saved images: no grid
