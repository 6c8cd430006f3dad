"""diverse_vit_hf.study (mean/std, Student t, paired intervals) against independent computations, and
examples/study.py end to end: schema, statistics recomputed from the runs, --report_only, resuming."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from helpers import REPO, load_script
from transformers import HfArgumentParser

from diverse_vit_hf import DiverseTrainingArguments
from diverse_vit_hf.analysis import SUMMARY_METRICS
from diverse_vit_hf.arguments import DataArguments, ModelArguments, RecipeArguments
from diverse_vit_hf.study import (
    mean_std,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
    study_statistics,
    summarize,
    t_quantile,
    t_quantile_method,
)

STUDY_SCRIPT = REPO / "examples" / "study.py"
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
    argv = ["--output_dir", str(output), "--settings", "tiny", "--arms", "baseline", "diverse", "--seeds", "0", "1",
            "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32", "--redundancy_images", "16",
            "--per_device_train_batch_size", "16", "--extra=--use_cpu --dataloader_num_workers 0"]  # fmt: skip
    first = study.main(argv)
    assert (first["trained"], first["skipped"]) == (4, 0)

    data = json.loads((output / "study.json").read_text())
    assert data["schema_version"] == 1 and {"runs", "statistics", "statistics_method", "arms", "settings"} <= set(data)
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        folder = output / run["setting"] / run["arm"] / f"seed-{run['seed']}"
        assert run["output_dir"] == str(folder) and run["argv"][-2:] == ["--output_dir", str(folder)]
        assert "--overwrite_output_dir" not in run["argv"]
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
    report = (output / "study.md").read_text()
    assert f"| diverse | 2 | {100 * stats['diverse']['summary']['top1']['mean']:.2f} ± " in report
    assert "scipy.stats.t.ppf" in report or "bisection" in report
    assert all((output / name).stat().st_size > 0 for name in study.PLOTS.values())

    # Resume: nothing is trained again, study.json's runs are untouched.
    again = study.main(argv)
    assert (again["trained"], again["skipped"]) == (0, 4)
    assert json.loads((output / "study.json").read_text())["runs"] == data["runs"]
    assert "Trained 0 run(s), 4 already in" in capsys.readouterr().out

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
