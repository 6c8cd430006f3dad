"""`diverse_vit_hf.scripts.study_statistics` (mean/std, Student t, paired intervals, accuracy curves) against
independent computations (scipy, `statistics`, printed t tables) and by-hand computations. The study tool built on it
(examples/study.py) is tested in tests/scripts/test_study.py."""

from __future__ import annotations

import math
import statistics
import sys

import pytest
from fixtures.study_runs import BASELINE_CURVES, DIVERSE_CURVES, curve, made_up_run

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


# ---- Accuracy against training time ----------------------------------------------------------------------------------


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
