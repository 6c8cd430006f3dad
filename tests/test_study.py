"""scripts.study_statistics (mean/std, Student t, paired intervals, accuracy curves) against independent and hand
computations, and examples/study.py: its report on made-up runs, a study.json of the first schema (absolute folders)
loading and resuming, and end to end on a tiny budget: schema, curves, statistics recomputed from the runs,
--report_only, resuming, a study folder moved elsewhere."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from helpers import REPO, load_script
from transformers import HfArgumentParser

from diverse_vit_hf import DiverseTrainingArguments
from diverse_vit_hf.analysis import SUMMARY_METRICS
from diverse_vit_hf.scripts.arguments import DataArguments, ModelArguments, RecipeArguments
from diverse_vit_hf.scripts.study_statistics import (
    best_point,
    convergence_check,
    curve_from_log_history,
    curve_statistics,
    first_epoch_reaching,
    mean_curve,
    mean_std,
    paired_difference,
    reach_summary,
    student_t_cdf,
    student_t_quantile,
    study_statistics,
    summarize,
    t_quantile,
    t_quantile_method,
)

STUDY_SCRIPT = REPO / "examples" / "study.py"
COMMITTED_STUDY = REPO / "docs" / "study" / "study.json"  # the 12-epoch study, written by the first schema
# t_{0.975, df} to 10 decimals (printed t tables give the first 3: 12.706, 4.303, 2.776, 2.262, 2.045).
T_975 = {1: 12.7062047362, 2: 4.3026527297, 4: 2.7764451052, 9: 2.2621571627, 29: 2.0452296421}
# Five seeds of an arm and its baseline; the interval below is worked out by hand.
ARM = {0: 0.90, 1: 0.92, 2: 0.95, 3: 0.91, 4: 0.93}
BASE = {0: 0.88, 1: 0.90, 2: 0.92, 3: 0.90, 4: 0.90}


def test_mean_std_is_the_sample_standard_deviation():
    values = [0.91, 0.93, 0.90, 0.97, 0.88]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values), abs=1e-15)
    assert std == pytest.approx(statistics.stdev(values), abs=1e-15)
    assert mean_std([]) == (None, None)
    assert mean_std([0.5]) == (0.5, None)
    assert summarize([1.0, None, 3.0]) == {"n": 2, "mean": 2.0, "std": math.sqrt(2.0), "min": 1.0, "max": 3.0}


@pytest.mark.parametrize("df", sorted(T_975))
def test_exact_t_quantile_matches_printed_tables(df):
    assert student_t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-9)
    assert student_t_quantile(0.025, df) == pytest.approx(-T_975[df], abs=1e-9)
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-9)


def test_exact_t_cdf_matches_the_closed_forms_of_one_and_two_degrees_of_freedom():
    for x in (-7.0, -1.3, 0.0, 0.4, 2.0, 30.0):
        assert student_t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-14)  # Cauchy
        assert student_t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-14)
    with pytest.raises(ValueError, match="integer >= 1"):
        student_t_cdf(1.0, 0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        student_t_quantile(1.0, 3)


def test_exact_t_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 8, 13, 30, 101):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995):
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)
        for x in (-4.0, -0.7, 0.0, 1.1, 3.5):
            assert student_t_cdf(x, df) == pytest.approx(stats.t.cdf(x, df), abs=1e-12)


def test_paired_interval_worked_by_hand():
    # d = 0.02, 0.02, 0.03, 0.01, 0.03: mean 0.022; squared deviations sum to 2.8e-4, so std = sqrt(7e-5);
    # se = std / sqrt(5) = 0.00374166; half width = 2.7764451052 x se = 0.01038851.
    paired = paired_difference(ARM, BASE)
    assert paired.seeds == [0, 1, 2, 3, 4] and paired.n == 5
    assert paired.differences == pytest.approx([0.02, 0.02, 0.03, 0.01, 0.03], abs=1e-12)
    assert paired.mean == pytest.approx(0.022, abs=1e-12)
    assert paired.std == pytest.approx(math.sqrt(7e-5), abs=1e-12)
    assert paired.standard_error == pytest.approx(0.0037416574, abs=1e-9)
    assert paired.ci_low == pytest.approx(0.022 - 0.0103885063, abs=1e-9)
    assert paired.ci_high == pytest.approx(0.022 + 0.0103885063, abs=1e-9)
    assert paired.t_statistic == pytest.approx(0.022 / 0.0037416574, rel=1e-8)


def test_paired_interval_matches_scipy_ttest_rel_and_t_interval():
    stats = pytest.importorskip("scipy.stats")
    seeds = sorted(ARM)
    arm, base = [ARM[s] for s in seeds], [BASE[s] for s in seeds]
    paired = paired_difference(ARM, BASE)
    test = stats.ttest_rel(arm, base)
    assert paired.t_statistic == pytest.approx(test.statistic, rel=1e-9)
    assert paired.p_value == pytest.approx(test.pvalue, rel=1e-9)
    low, high = stats.t.interval(
        0.95, len(seeds) - 1, loc=paired.mean, scale=stats.sem([a - b for a, b in zip(arm, base, strict=True)])
    )
    assert (paired.ci_low, paired.ci_high) == pytest.approx((low, high), abs=1e-12)
    low90, high90 = test.confidence_interval(0.90)
    narrower = paired_difference(ARM, BASE, confidence=0.90)
    assert (narrower.ci_low, narrower.ci_high) == pytest.approx((low90, high90), abs=1e-12)


def test_without_scipy_the_exact_quantile_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert "bisection" in t_quantile_method()
    assert t_quantile(0.975, 4) == student_t_quantile(0.975, 4)
    paired = paired_difference(ARM, BASE)
    assert paired.ci_high == pytest.approx(0.022 + 0.0103885063, abs=1e-9)
    assert 0.0 < paired.p_value < 0.05


def test_paired_difference_pairs_by_seed_and_says_when_there_is_no_interval():
    paired = paired_difference({0: 0.5, 1: 0.7, 2: 0.9, 3: None}, {1: 0.6, 2: 0.6, 3: 0.5, 7: 0.1})
    assert paired.seeds == [1, 2] and paired.differences == pytest.approx([0.1, 0.3])
    single = paired_difference({0: 0.5}, {0: 0.25})
    assert single.mean == 0.25 and single.std is None and single.ci_low is None and single.p_value is None
    constant = paired_difference({0: 0.5, 1: 0.75}, {0: 0.25, 1: 0.5})
    assert constant.std == 0.0 and constant.ci_low == constant.ci_high == 0.25 and constant.t_statistic is None
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(ARM, BASE, confidence=95)


def test_study_statistics_groups_by_setting_and_arm_and_pairs_with_the_baseline():
    def run(setting, arm, seed, top1, cos=None):
        return {"setting": setting, "arm": arm, "seed": seed, "metrics": {"top1": top1}, "redundancy": {"cos": cos}}

    runs = [run("a", "diverse", s, v, cos=0.1 * s) for s, v in ARM.items()]
    runs += [run("a", "baseline", s, v, cos=0.2 * s) for s, v in BASE.items()]
    runs += [run("b", "diverse", 0, 0.5)]
    result = study_statistics(runs)
    assert set(result) == {"a", "b"} and set(result["a"]) == {"diverse", "baseline"}
    diverse = result["a"]["diverse"]
    assert diverse["seeds"] == [0, 1, 2, 3, 4]
    assert diverse["summary"]["top1"]["mean"] == pytest.approx(statistics.mean(ARM.values()))
    assert diverse["paired"]["top1"] == paired_difference(ARM, BASE).to_dict()
    assert diverse["paired"]["cos"]["mean"] == pytest.approx(-0.2)
    assert result["a"]["baseline"]["paired"] is None
    assert result["b"]["diverse"]["paired"] is None  # no baseline in that setting
    assert result["b"]["diverse"]["summary"]["cos"] == {"n": 0, "mean": None, "std": None, "min": None, "max": None}


def test_arm_flags_give_the_intended_objectives(tmp_path):
    study = load_script(STUDY_SCRIPT, "study_script")
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, DiverseTrainingArguments))
    args = study.parse_args(["--num_train_epochs", "3"])
    objectives = {}
    for arm in study.ARMS:
        argv = [*study.run_argv(args, "deep", arm, seed=7), "--output_dir", str(tmp_path)]
        model_args, data_args, _, training_args = parser.parse_args_into_dataclasses(args=argv)
        assert (model_args.num_hidden_layers, model_args.hidden_size, training_args.seed) == (12, 64, 7)
        assert (data_args.train_val_split, training_args.num_train_epochs) == (0.2, 3.0)
        assert training_args.mixing_enabled  # every arm keeps the DeiT recipe's Mixup/CutMix
        objectives[arm] = training_args.diversity_dict()
    released = DiverseTrainingArguments(output_dir=str(tmp_path)).diversity_dict()
    assert objectives["diverse"] == released
    coefficients = ("patch_cosine_coef", "patch_contrastive_coef", "attention_cosine_coef", "weight_condition_coef")
    expected_on = {
        "baseline": (),
        "patch": coefficients[:2],
        "attention": coefficients[2:3],
        "weight": coefficients[3:],
    }
    for arm, on in expected_on.items():
        for name in coefficients:
            assert objectives[arm][name] == (released[name] if name in on else 0), (arm, name)
        assert objectives[arm]["patch_mixing_loss"] == (arm == "patch")
    key = study.run_key(["--seed", "1", "--output_dir", "x/y", "--overwrite_output_dir", "--output_dir=z"])
    assert key == ["--seed", "1"]


@pytest.mark.slow
def test_study_runs_resumes_and_reports_from_its_runs(tmp_path, capsys):
    study = load_script(STUDY_SCRIPT, "study_script")
    output = tmp_path / "study"
    # 64 training images in batches of 16: 4 steps an epoch, 2 epochs, evaluated after each (the default).
    argv = ["--output_dir", str(output), "--settings", "tiny", "--arms", "baseline", "diverse", "--seeds", "0", "1",
            "--num_train_epochs", "2", "--max_train_samples", "64", "--max_eval_samples", "32",
            "--redundancy_images", "16", "--per_device_train_batch_size", "16",
            "--extra=--use_cpu --dataloader_num_workers 0"]  # fmt: skip
    first = study.main(argv)
    assert (first["trained"], first["skipped"]) == (4, 0)

    data = json.loads((output / "study.json").read_text())
    assert data["schema_version"] == 2 and {"runs", "statistics", "statistics_method", "arms", "settings"} <= set(data)
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        relative = f"{run['setting']}/{run['arm']}/seed-{run['seed']}"
        folder = output / relative
        assert run["output_dir"] == relative and run["argv"][-2:] == ["--output_dir", relative]
        assert "--overwrite_output_dir" not in run["argv"]
        assert ["--eval_strategy", "epoch"] == run["argv"][run["argv"].index("--eval_strategy") :][:2]
        state = json.loads((folder / "trainer_state.json").read_text())
        assert run["curve"] == curve_from_log_history(state["log_history"]) and run["eval_every_epochs"] == 1
        assert [point["epoch"] for point in run["curve"]] == [1.0, 2.0]
        assert run["curve"][-1]["top1"] == run["metrics"]["top1"]  # the curve ends with the final evaluation
        assert run["argv"][:-2] == study.run_argv(study.parse_args(argv), run["setting"], run["arm"], run["seed"])
        evaluation = json.loads((folder / "eval_results.json").read_text())
        assert (folder / "trainer_state.json").is_file()
        assert run["metrics"]["top1"] == evaluation["eval_top1"] and run["metrics"]["top5"] == evaluation["eval_top5"]
        assert run["metrics"]["eval_loss"] == evaluation["eval_loss"] and run["metrics"]["wall_time_s"] > 0
        redundancy = json.loads((folder / "redundancy.json").read_text())
        assert run["redundancy"] == redundancy["models"][0]["summary"]
        assert set(run["redundancy"]) == {m.key for m in SUMMARY_METRICS}
    by = {(r["arm"], r["seed"]): r["metrics"]["top1"] for r in data["runs"]}
    stats = data["statistics"]["tiny"]
    assert stats["diverse"]["summary"]["top1"]["mean"] == pytest.approx((by["diverse", 0] + by["diverse", 1]) / 2)
    assert stats["diverse"]["paired"]["top1"]["differences"] == pytest.approx(
        [by["diverse", s] - by["baseline", s] for s in (0, 1)]
    )
    curves = data["curve_statistics"]["tiny"]
    assert curves["baseline_final_mean"] == pytest.approx((by["baseline", 0] + by["baseline", 1]) / 2)
    assert [p["epoch"] for p in curves["arms"]["diverse"]["mean_curve"]] == [1.0, 2.0]
    report = (output / "study.md").read_text()
    assert f"| diverse | 2 | {100 * stats['diverse']['summary']['top1']['mean']:.2f} ± " in report
    assert "scipy.stats.t.ppf" in report or "bisection" in report
    assert "### tiny: accuracy against training time" in report and "**Convergence of the baseline.**" in report
    assert "tiny: the baseline's mean top-1 gained " in capsys.readouterr().out
    assert all((output / name).stat().st_size > 0 for name in [*study.PLOTS.values(), study.CURVES_PLOT])

    # Resume: nothing is trained again, study.json's runs are untouched.
    again = study.main(argv)
    assert (again["trained"], again["skipped"]) == (0, 4)
    assert json.loads((output / "study.json").read_text())["runs"] == data["runs"]
    assert "Trained 0 run(s), 4 already in" in capsys.readouterr().out

    # The study folder moved elsewhere (another machine): it resumes and reports there, its folders found.
    moved = tmp_path / "elsewhere" / "study"
    shutil.copytree(output, moved)
    there = study.main([*argv[2:], "--output_dir", str(moved)])
    assert (there["trained"], there["skipped"]) == (0, 4)
    assert json.loads((moved / "study.json").read_text())["runs"] == data["runs"]
    folders = {str(moved / "tiny" / arm / f"seed-{seed}") for arm in ("baseline", "diverse") for seed in (0, 1)}
    assert {r["output_dir"] for r in there["study"]["runs"]} == folders
    assert "`tiny/diverse/seed-1`" in (moved / "study.md").read_text()

    # --report_only recomputes everything from the runs in study.json.
    edited = next(r for r in data["runs"] if (r["arm"], r["seed"]) == ("baseline", 1))
    edited["metrics"]["top1"] = 0.875
    (output / "study.json").write_text(json.dumps(data))
    assert study.main(["--output_dir", str(output), "--report_only"])["trained"] == 0
    updated = json.loads((output / "study.json").read_text())["statistics"]["tiny"]["baseline"]["summary"]["top1"]
    assert updated["mean"] == pytest.approx((by["baseline", 0] + 0.875) / 2)
    assert "| tiny | baseline | 1 | 87.50 |" in (output / "study.md").read_text()

    # A run missing from study.json (crashed after writing its folder) is trained again over its folder.
    data = json.loads((output / "study.json").read_text())
    data["runs"] = [r for r in data["runs"] if (r["arm"], r["seed"]) != ("diverse", 1)]
    (output / "study.json").write_text(json.dumps(data))
    resumed = study.main(argv)
    assert (resumed["trained"], resumed["skipped"]) == (1, 3)
    rerun = next(r for r in resumed["study"]["runs"] if (r["arm"], r["seed"]) == ("diverse", 1))
    assert "--overwrite_output_dir" in rerun["argv"] and len(resumed["study"]["runs"]) == 4


# ---- Accuracy against training time ----------------------------------------------------------------------------------


def curve(*points):
    """A curve from (epoch, top1) pairs."""
    return [{"epoch": float(epoch), "top1": top1} for epoch, top1 in points]


def test_curve_from_log_history_keeps_one_evaluation_per_epoch_in_order():
    log_history = [
        {"loss": 2.3, "epoch": 0.5, "step": 2},
        {"eval_top1": 0.25, "eval_loss": 2.0, "epoch": 1.0, "step": 4},
        {"eval_top1": 0.125, "epoch": 1 / 3, "step": 1},  # logged out of order: sorted by epoch
        {"eval_top1": 0.5, "epoch": 2.0, "step": 8},  # the Trainer's evaluation at the end of training
        {"train_runtime": 3.0, "epoch": 2.0, "step": 8},
        {"eval_top1": 0.5625, "epoch": 2.0, "step": 8},  # run_diverse.py's final evaluation: kept (last)
        {"eval_top1": 0.9},  # no epoch: not a point of the curve
    ]
    assert curve_from_log_history(log_history) == [
        {"epoch": 0.333333, "top1": 0.125},
        {"epoch": 1.0, "top1": 0.25},
        {"epoch": 2.0, "top1": 0.5625},
    ]
    assert curve_from_log_history([{"loss": 1.0, "epoch": 1.0}]) == []


def test_best_point_and_first_epoch_reaching_by_hand():
    run = curve((1, 0.5), (2, 0.8), (3, 0.8), (4, 0.7))
    assert best_point(run) == {"epoch": 2.0, "top1": 0.8}  # a tie: the earliest epoch
    assert best_point([]) is None
    assert first_epoch_reaching(run, 0.75) == 2.0
    assert first_epoch_reaching(run, 0.8) == 2.0  # equal counts as reached
    assert first_epoch_reaching(run, 0.5) == 1.0
    assert first_epoch_reaching(run, 0.81) is None  # never
    assert first_epoch_reaching([], 0.1) is None
    # The target is a mean over seeds: 0.842, 0.8, 0.83, 0.79, 0.848 average to 0.8220000000000001 in floating
    # point; a run at exactly 0.822 ties with it and reaches it.
    target = mean_std([0.842, 0.8, 0.83, 0.79, 0.848])[0]
    assert target > 0.822
    assert first_epoch_reaching(curve((4, 0.81), (8, 0.822)), target) == 8.0


def test_reach_summary_counts_the_runs_and_takes_the_median_of_those_that_reach():
    assert reach_summary([12.0, None, 4.0, 8.0]) == {"n": 4, "reached": 3, "median_epoch": 8.0}
    assert reach_summary([8.0, 4.0]) == {"n": 2, "reached": 2, "median_epoch": 6.0}  # even: mean of the middle two
    assert reach_summary([None, None]) == {"n": 2, "reached": 0, "median_epoch": None}
    assert reach_summary([3.0]) == {"n": 1, "reached": 1, "median_epoch": 3.0}


def test_mean_curve_by_hand():
    runs = [curve((1, 0.5), (2, 0.7)), curve((1, 0.7), (2, 0.9)), curve((1, 0.6))]
    first, second = mean_curve(runs)
    # Epoch 1: 0.5, 0.7, 0.6 -> mean 0.6, std 0.1; half width t(0.975, 2) x 0.1 / sqrt(3) = 0.2484138.
    assert (first["epoch"], first["n"]) == (1.0, 3)
    assert first["mean"] == pytest.approx(0.6, abs=1e-12) and first["std"] == pytest.approx(0.1, abs=1e-12)
    assert (first["ci_low"], first["ci_high"]) == pytest.approx((0.6 - 0.2484138, 0.6 + 0.2484138), abs=1e-7)
    # Epoch 2: only two runs: 0.7, 0.9 -> mean 0.8, std sqrt(0.02); half width t(0.975, 1) x 0.1 = 1.2706205.
    assert (second["epoch"], second["n"]) == (2.0, 2)
    assert second["std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)
    assert second["ci_high"] == pytest.approx(0.8 + 1.2706205, abs=1e-7)
    (single,) = mean_curve([curve((3, 0.4))])  # one seed: no spread, no interval
    assert single == {"epoch": 3.0, "n": 1, "mean": 0.4, "std": None, "ci_low": None, "ci_high": None}
    assert mean_curve([]) == []


def test_convergence_check_by_hand():
    # Every 4 epochs to 48: the last 25% starts at epoch 36; the gain is value(48) - value(36).
    points = [{"epoch": float(e), "mean": 0.5 + 0.01 * e} for e in range(4, 37, 4)]
    flat = [*points, {"epoch": 40.0, "mean": 0.90}, {"epoch": 44.0, "mean": 0.85}, {"epoch": 48.0, "mean": 0.864}]
    result = convergence_check(flat)
    assert (result["start_epoch"], result["end_epoch"]) == (36.0, 48.0)
    assert result["start"] == pytest.approx(0.86) and result["gain"] == pytest.approx(0.004)
    assert result["holds"] is True  # a bump inside the stretch does not count, only the net gain
    rising = [*points, {"epoch": 48.0, "mean": 0.866}]
    assert convergence_check(rising)["gain"] == pytest.approx(0.006) and convergence_check(rising)["holds"] is False
    # Every epoch to 12: the stretch starts at epoch 9; a single run's curve is read with key="top1".
    run = curve(*((e, 0.1 * e if e <= 9 else 0.9) for e in range(1, 13)))
    assert convergence_check(run, key="top1")["start_epoch"] == 9.0 and convergence_check(run, key="top1")["holds"]
    # 10 epochs, evaluated at 5 and 10: the latest evaluation at or before 7.5 is 5.
    assert convergence_check(curve((5, 0.5), (10, 0.6)), key="top1")["start_epoch"] == 5.0
    # No evaluation at or before 0.75 E (or only the final one): not assessed.
    for undefined in (curve((8, 0.5), (10, 0.6)), curve((10, 0.6))):
        result = convergence_check(undefined, key="top1")
        assert result["holds"] is None and result["gain"] is None and result["end_epoch"] == 10.0
    assert convergence_check([])["holds"] is None
    with pytest.raises(ValueError, match="window"):
        convergence_check(flat, window=1.0)


# Made-up curves every 4 epochs to 16, three seeds; the numbers in the tests below are worked out by hand from them.
BASELINE_CURVES = {
    0: curve((4, 0.50), (8, 0.70), (12, 0.80), (16, 0.82)),
    1: curve((4, 0.40), (8, 0.60), (12, 0.78), (16, 0.80)),  # never reaches the mean final 0.82
    2: curve((4, 0.45), (8, 0.65), (12, 0.79), (16, 0.84)),
}
DIVERSE_CURVES = {
    0: curve((4, 0.60), (8, 0.80), (12, 0.83), (16, 0.85)),
    1: curve((4, 0.55), (8, 0.82), (12, 0.84), (16, 0.84)),  # reaches 0.82 at epoch 8 (a tie); best 0.84 at 12
    2: curve((4, 0.50), (8, 0.70), (12, 0.75), (16, 0.79)),  # never reaches it
}


def made_up_run(setting, arm, seed, points, argv=(), output_dir="x"):
    return {
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "argv": [*argv, "--output_dir", output_dir],
        "output_dir": output_dir,
        "metrics": {"top1": points[-1]["top1"] if points else 0.5, "top5": 1.0, "eval_loss": 0.5, "wall_time_s": 10.0},
        "redundancy": None,
        "eval_every_epochs": 4 if points else 0,
        "curve": points or None,
    }


def test_curve_statistics_by_hand():
    runs = [made_up_run("a", "baseline", s, c) for s, c in BASELINE_CURVES.items()]
    runs += [made_up_run("a", "diverse", s, c) for s, c in DIVERSE_CURVES.items()]
    runs += [made_up_run("one", "baseline", 0, curve((1, 0.5), (2, 0.6)))]  # a single seed
    runs += [made_up_run("one", "diverse", 0, curve((1, 0.7), (2, 0.7)))]
    runs += [made_up_run("old", "baseline", 0, None)]  # evaluated only at the end: no curve statistics
    result = curve_statistics(runs)
    assert set(result) == {"a", "one"}

    a = result["a"]
    assert a["baseline_final_mean"] == pytest.approx(0.82, abs=1e-12)  # (0.82 + 0.80 + 0.84) / 3
    baseline, diverse = a["arms"]["baseline"], a["arms"]["diverse"]
    assert [p["mean"] for p in baseline["mean_curve"]] == pytest.approx([0.45, 0.65, 0.79, 0.82])
    assert [e["epoch"] for e in baseline["epochs_to_baseline_final"]] == [16.0, None, 16.0]
    assert baseline["reach"] == {"n": 3, "reached": 2, "median_epoch": 16.0}
    assert diverse["epochs_to_baseline_final"] == [{"seed": 0, "epoch": 12.0}, {"seed": 1, "epoch": 8.0},
                                                   {"seed": 2, "epoch": None}]  # fmt: skip
    assert diverse["reach"] == {"n": 3, "reached": 2, "median_epoch": 10.0}
    # Convergence: the mean curve goes 0.79 (epoch 12) -> 0.82 (epoch 16): +0.03 >= 0.005, not converged. Per seed
    # 0.02, 0.02, 0.05: mean 0.03, std sqrt(0.0003), se 0.01, half width t(0.975, 2) x 0.01 = 0.0430265.
    convergence = a["convergence"]
    assert (convergence["start_epoch"], convergence["end_epoch"]) == (12.0, 16.0)
    assert convergence["gain"] == pytest.approx(0.03) and convergence["holds"] is False
    gain = convergence["seed_gain"]
    assert gain["differences"] == pytest.approx([0.02, 0.02, 0.05]) and gain["mean"] == pytest.approx(0.03)
    assert (gain["ci_low"], gain["ci_high"]) == pytest.approx((0.03 - 0.0430265, 0.03 + 0.0430265), abs=1e-7)

    one = result["one"]  # a single seed: no spread, no interval, but the criterion and the reach still apply
    assert one["baseline_final_mean"] == 0.6 and one["convergence"]["gain"] == pytest.approx(0.1)
    assert one["convergence"]["holds"] is False and one["convergence"]["seed_gain"]["ci_low"] is None
    assert one["arms"]["diverse"]["reach"] == {"n": 1, "reached": 1, "median_epoch": 1.0}
    assert one["arms"]["diverse"]["mean_curve"][0]["std"] is None

    # The best top-1 over the curve goes through the same statistics as the final one: per arm and paired.
    stats = study_statistics(runs)["a"]["diverse"]
    assert stats["summary"]["best_top1"]["mean"] == pytest.approx((0.85 + 0.84 + 0.79) / 3)
    assert stats["summary"]["best_epoch"]["mean"] == pytest.approx((16 + 12 + 16) / 3)
    assert stats["paired"]["best_top1"]["differences"] == pytest.approx([0.03, 0.04, -0.05])
    assert "best_top1" not in study_statistics(runs)["old"]["baseline"]["summary"]


def test_report_has_the_curve_table_and_the_convergence_statement(tmp_path):
    study = load_script(STUDY_SCRIPT, "study_script")
    args = study.parse_args(["--num_train_epochs", "16", "--eval_every_epochs", "4"])
    runs = []
    for arm, curves in (("baseline", BASELINE_CURVES), ("diverse", DIVERSE_CURVES)):
        for seed, points in curves.items():
            folder = str(tmp_path / "deep" / arm / f"seed-{seed}")
            runs.append(made_up_run("deep", arm, seed, points, study.run_argv(args, "deep", arm, seed, 10), folder))
    # shallow: one seed; the baseline gains 0.3 points over its last 4 epochs: converged.
    shallow = {
        "baseline": curve((4, 0.5), (8, 0.7), (12, 0.80), (16, 0.803)),
        "diverse": curve((4, 0.81), (8, 0.81), (12, 0.81), (16, 0.81)),
    }
    for arm, points in shallow.items():
        folder = str(tmp_path / "shallow" / arm / "seed-0")
        runs.append(made_up_run("shallow", arm, 0, points, study.run_argv(args, "shallow", arm, 0, 10), folder))
    data = {"schema_version": study.SCHEMA_VERSION, "runs": runs}
    study.save_study(data, tmp_path / "study.json")
    study.write_report(data, tmp_path)
    report = (tmp_path / "study.md").read_text()

    assert "--eval_strategy steps --eval_steps 40" not in report  # run flags are in study.json, not the report
    assert "Budget of every run: 16.0 epochs, batch 64, lr 0.002, held-out top-1 every 4 epoch(s)" in report
    assert "### deep: accuracy against training time" in report
    assert "| arm | seeds | final top-1 % | final - baseline, pp [95% CI] | best top-1 % |" in report
    rows = {line.split(" | ")[0]: line for line in report.split("### deep: accuracy")[1].splitlines()[:8]}
    # diverse: finals 0.85, 0.84, 0.79 (mean 82.67, std 3.21); minus baseline 0.03, 0.04, -0.05 (mean +0.67); best
    # epochs 16, 12, 16 (14.7 +/- 2.3); 2 of 3 reach 0.82, at epochs 12 and 8 (median 10).
    assert rows["| diverse"].startswith("| diverse | 3 | 82.67 ± 3.21 | +0.67 [")
    assert rows["| diverse"].endswith("| 14.7 ± 2.3 | 2/3 | 10 |")
    assert rows["| baseline"] == (
        "| baseline | 3 | 82.00 ± 2.00 | (reference) | 82.00 ± 2.00 | (reference) | 16.0 ± 0.0 | 2/3 | 16 |"
    )
    assert "**Convergence of the baseline.** Criterion: the baseline's mean curve gains less than 0.5 points" in report
    assert (
        "The mean curve went from 79.00 % at epoch 12 to 82.00 % at epoch 16: a gain of +3.00 points, so "
        "**the criterion does not hold**" in report
    )
    assert "Per seed, over the same epochs: +3.00 [-1.30, +7.30]" in report
    assert "a gain of +0.30 points, so **the criterion holds**" in report  # shallow
    assert "Per seed, over the same epochs: +0.30 (n=1, no CI) pp." in report
    assert "![curves](study_curves.png)" in report
    assert (tmp_path / study.CURVES_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    written = json.loads((tmp_path / "study.json").read_text())
    assert written["schema_version"] == 2
    assert written["curve_statistics"]["deep"]["arms"]["diverse"]["reach"]["reached"] == 2
    for run in written["runs"]:  # folders relative to the study folder
        folder = f"{run['setting']}/{run['arm']}/seed-{run['seed']}"
        assert run["output_dir"] == folder and run["argv"][-2:] == ["--output_dir", folder]
    loaded = study.load_study(tmp_path / "study.json")  # and resolved against it when read
    assert [r["output_dir"] for r in loaded["runs"]] == [r["output_dir"] for r in runs]


def test_eval_flags_follow_eval_every_epochs():
    study = load_script(STUDY_SCRIPT, "study_script")
    assert study.eval_flags(0) == ["--eval_strategy", "no"]
    assert study.eval_flags(1) == ["--eval_strategy", "epoch"]
    assert study.eval_flags(4, epoch_steps=63) == ["--eval_strategy", "steps", "--eval_steps", "252"]
    with pytest.raises(ValueError, match="steps per epoch"):
        study.eval_flags(4)
    with pytest.raises(SystemExit):
        study.parse_args(["--eval_every_epochs", "-1"])
    assert study.parse_args([]).eval_every_epochs == 1


def test_a_study_json_of_the_first_schema_loads_resumes_and_reports(tmp_path, monkeypatch):
    """docs/study/study.json as the first schema wrote it (the absolute folders of the machine that ran it, where the
    committed file now has folders relative to the study), copied elsewhere: its runs are found (same flags: nothing
    trained), and it is rewritten with relative folders."""
    study = load_script(STUDY_SCRIPT, "study_script")
    relative_form = json.loads(COMMITTED_STUDY.read_text())
    assert relative_form["schema_version"] == 2 and not Path(relative_form["runs"][0]["output_dir"]).is_absolute()
    committed = {**relative_form, "schema_version": 1, "runs": []}
    for run in relative_form["runs"]:
        absolute = f"/work/study_run/out/{run['output_dir']}"  # where the first schema's run wrote it
        committed["runs"].append({**run, "output_dir": absolute, "argv": [*run["argv"][:-1], absolute]})
    folder = tmp_path / "copied"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(committed))

    loaded = study.load_study(folder / "study.json")
    for run in loaded["runs"]:
        local = str(folder / run["setting"] / run["arm"] / f"seed-{run['seed']}")
        assert run["output_dir"] == local and run["argv"][-2:] == ["--output_dir", local]

    def no_training(*args, **kwargs):
        raise AssertionError("a run of the committed study was not recognised")

    monkeypatch.setattr(study, "train_run", no_training)
    # The 12-epoch study's command, with --eval_every_epochs 0: its runs evaluated only at the end.
    result = study.main(["--output_dir", str(folder), "--num_train_epochs", "12", "--eval_every_epochs", "0"])
    assert (result["trained"], result["skipped"]) == (0, 50)

    written = json.loads((folder / "study.json").read_text())
    assert written["schema_version"] == 2 and written["curve_statistics"] == {}
    for new, old in zip(written["runs"], committed["runs"], strict=True):
        relative = f"{old['setting']}/{old['arm']}/seed-{old['seed']}"
        assert old["output_dir"].endswith("/" + relative)
        assert new["output_dir"] == relative and new["argv"] == [*old["argv"][:-1], relative]
        assert {k: v for k, v in new.items() if k not in ("argv", "output_dir")} == {
            k: v for k, v in old.items() if k not in ("argv", "output_dir")
        }
    for setting, arms in committed["statistics"].items():
        for arm, entry in arms.items():
            assert written["statistics"][setting][arm]["summary"] == entry["summary"]
    report = (folder / "study.md").read_text()
    assert report.count("No accuracy curve in this setting") == 2 and "![curves]" not in report
    assert "| shallow | baseline | 0 | 84.20 |" in report and "`shallow/baseline/seed-0`" in report
    assert not (folder / study.CURVES_PLOT).exists()
    (folder / "study.json").write_text(json.dumps({**written, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        study.load_study(folder / "study.json")


@pytest.mark.slow
def test_evaluation_every_k_epochs_uses_the_epoch_length(tmp_path, caplog):
    study = load_script(STUDY_SCRIPT, "study_script")
    output = tmp_path / "study"
    # 64 images in batches of 16: 4 steps an epoch; every 2 epochs = every 8 steps; 3 epochs end off the grid.
    argv = ["--output_dir", str(output), "--settings", "tiny", "--arms", "baseline", "--seeds", "0",
            "--num_train_epochs", "3", "--eval_every_epochs", "2", "--max_train_samples", "64",
            "--max_eval_samples", "32", "--redundancy_images", "0", "--per_device_train_batch_size", "16",
            "--extra=--use_cpu --dataloader_num_workers 0"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="study"):
        (run,) = study.main(argv)["study"]["runs"]
    assert "not every 2 epoch(s)" not in caplog.text
    index = run["argv"].index("--eval_strategy")
    assert run["argv"][index : index + 4] == ["--eval_strategy", "steps", "--eval_steps", "8"]
    assert [point["epoch"] for point in run["curve"]] == [2.0, 3.0]
    assert run["curve"][-1]["top1"] == run["metrics"]["top1"] and run["eval_every_epochs"] == 2
