"""examples/study.py, the study tool: the arms' flags give the intended objectives, its report on made-up runs
(curve table, convergence statement), evaluation every k epochs, a study.json of the first schema (absolute folders)
loading and resuming, end to end on a tiny budget: schema, curves, statistics recomputed from the runs,
--report_only, resuming, a study folder moved elsewhere; --merge of studies run in parallel and what it refuses, and
the study folder's lock against a real second process."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.scripts import EXAMPLES, REPO, SCRIPT_ENV, load_script
from fixtures.study_runs import BASELINE_CURVES, DIVERSE_CURVES, curve, made_up_run
from transformers import HfArgumentParser

from diverse_vit_hf import DiverseTrainingArguments
from diverse_vit_hf.analysis import SUMMARY_METRICS
from diverse_vit_hf.scripts.arguments import DataArguments, ModelArguments, RecipeArguments
from diverse_vit_hf.scripts.study_statistics import (
    curve_from_log_history,
)
from diverse_vit_hf.trainer.output_folder import OutputFolderLockedError

STUDY_SCRIPT = EXAMPLES / "study.py"
COMMITTED_STUDY = REPO / "docs" / "study" / "study.json"  # the 12-epoch study, written by the first schema


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


def made_up_study(folder: Path, study, seeds, curves=(("baseline", BASELINE_CURVES), ("diverse", DIVERSE_CURVES))):
    """A study folder as `study.py --seeds <seeds> --num_train_epochs 16 --eval_every_epochs 4` leaves it: a run
    folder per run (holding a marker file naming it) and study.json."""
    args = study.parse_args(["--num_train_epochs", "16", "--eval_every_epochs", "4"])
    runs = []
    for arm, by_seed in curves:
        for seed in seeds:
            run_dir = folder / "deep" / arm / f"seed-{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "eval_results.json").write_text(json.dumps({"arm": arm, "seed": seed}))
            argv = study.run_argv(args, "deep", arm, seed, 63)  # 63 steps an epoch: 4,000 digits in batches of 64
            runs.append(made_up_run("deep", arm, seed, by_seed[seed], argv, str(run_dir)))
    study.save_study({"schema_version": study.SCHEMA_VERSION, "runs": runs}, folder / "study.json")


def test_merge_takes_in_the_runs_of_studies_run_in_parallel(tmp_path, capsys, monkeypatch):
    """Seeds trained by parallel processes into their own folders: --merge copies each run and its folder into the
    study, whose report then covers them all, and which then resumes as if it had trained them."""
    study = load_script(STUDY_SCRIPT, "study_script")
    main, parallel = tmp_path / "main", tmp_path / "parallel"
    made_up_study(main, study, seeds=[0, 1])
    made_up_study(parallel, study, seeds=[2])
    before = json.loads((parallel / "study.json").read_text())

    result = study.main(["--output_dir", str(main), "--merge", str(parallel), "--report_only"])
    written = json.loads((main / "study.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in written["runs"]) == [
        (a, s) for a in ("baseline", "diverse") for s in range(3)
    ]
    for run in written["runs"]:
        folder = f"deep/{run['arm']}/seed-{run['seed']}"
        assert run["output_dir"] == folder and run["argv"][-2:] == ["--output_dir", folder]
        assert json.loads((main / folder / "eval_results.json").read_text()) == {"arm": run["arm"], "seed": run["seed"]}
    assert written["statistics"]["deep"]["diverse"]["summary"]["top1"]["n"] == 3
    assert "`deep/diverse/seed-2`" in (main / "study.md").read_text()
    assert result["merged"] == 2 and ", 2 merged from --merge." in capsys.readouterr().out
    assert json.loads((parallel / "study.json").read_text()) == before  # the source is left as it was
    assert not list(main.glob("deep/*/*.merging")) and not list(main.rglob(".diverse-vit.lock"))

    # Merged again: nothing copied. The merged study resumes with the three seeds' command: nothing trained.
    assert study.merge_studies(study.load_study(main / "study.json"), main, [str(parallel)]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("a merged run was not recognised as this study's run")

    monkeypatch.setattr(study, "train_run", no_training)
    again = study.main(["--output_dir", str(main), "--settings", "deep", "--arms", "baseline", "diverse", "--seeds",
                        "0", "1", "2", "--num_train_epochs", "16", "--eval_every_epochs", "4"])  # fmt: skip
    assert (again["trained"], again["skipped"]) == (0, 6)


def made_up_reference(folder: Path, study, epochs: str, seeds, extra=()) -> None:
    """`made_up_study`'s runs at another budget: --num_train_epochs `epochs`, the curves cut there."""
    args = study.parse_args(["--num_train_epochs", epochs, "--eval_every_epochs", "4", *extra])
    runs = []
    for arm, by_seed in (("baseline", BASELINE_CURVES), ("diverse", DIVERSE_CURVES)):
        for seed in seeds:
            points = [p for p in by_seed[seed] if p["epoch"] <= float(epochs)]
            argv = study.run_argv(args, "deep", arm, seed, 63)
            runs.append(made_up_run("deep", arm, seed, points, argv, str(folder / "deep" / arm / f"seed-{seed}")))
    folder.mkdir(parents=True)
    study.save_study({"schema_version": study.SCHEMA_VERSION, "runs": runs}, folder / "study.json")


def test_budget_reference_compares_the_same_runs_at_two_budgets(tmp_path):
    """A 16-epoch study against its 8-epoch runs: per arm the paired change of the final top-1 and of the gap to the
    baseline (worked out by hand from the made-up curves), in study.json and the report, kept by a later
    --report_only; a reference that differs in more than the budget, has no study.json or is the study itself is
    refused."""
    study = load_script(STUDY_SCRIPT, "study_script")
    main, shorter = tmp_path / "main", tmp_path / "shorter"
    made_up_study(main, study, seeds=[0, 1, 2])
    made_up_reference(shorter, study, "8", seeds=[0, 1, 2])
    study.main(["--output_dir", str(main), "--report_only", "--budget_reference", str(shorter)])

    written = json.loads((main / "study.json").read_text())
    assert written["budget_reference"]["folder"] == "../shorter"
    assert written["budget_reference"]["epochs"] == {"deep": ["8.0"]}
    comparison = written["budget_comparison"]["deep"]
    # baseline finals 0.70, 0.60, 0.65 at 8 epochs; 0.82, 0.80, 0.84 at 16: +0.12, +0.20, +0.19.
    assert comparison["baseline"]["change"]["differences"] == pytest.approx([0.12, 0.20, 0.19])
    assert comparison["baseline"]["gap_change"] is None
    # diverse: 0.80, 0.82, 0.70 -> 0.85, 0.84, 0.79; gaps 0.10, 0.22, 0.05 -> 0.03, 0.04, -0.05.
    assert comparison["diverse"]["change"]["mean"] == pytest.approx(0.16 / 3)
    assert comparison["diverse"]["gap_change"]["differences"] == pytest.approx([-0.07, -0.18, -0.10])
    report = (main / "study.md").read_text()
    assert "### deep: against the same runs at 8.0 epochs" in report
    assert "| baseline | 3 | 65.00 ± 5.00 | 82.00 ± 2.00 | +17.00 [" in report
    rows = [line for line in report.splitlines() if line.startswith("| diverse | 3 | 77.33")]
    assert len(rows) == 1 and "| +5.33 [" in rows[0] and "| -11.67 [" in rows[0]

    study.main(["--output_dir", str(main), "--report_only"])  # the comparison stays with the study
    assert "### deep: against the same runs at 8.0 epochs" in (main / "study.md").read_text()

    other = tmp_path / "other_lr"
    made_up_reference(other, study, "8", seeds=[0], extra=["--learning_rate", "0.001"])
    with pytest.raises(ValueError, match=r"its run deep/baseline/seed-0 differs from this study's in more than the"):
        study.main(["--output_dir", str(main), "--report_only", "--budget_reference", str(other)])
    with pytest.raises(ValueError, match=r"no study.json there"):
        study.main(["--output_dir", str(main), "--report_only", "--budget_reference", str(tmp_path)])
    with pytest.raises(ValueError, match=r"this study's own folder"):
        study.main(["--output_dir", str(main), "--report_only", "--budget_reference", str(main)])


def test_merge_refuses_what_it_cannot_take_in_whole(tmp_path):
    """Each refusal says what was wrong and copies nothing of that source."""
    study = load_script(STUDY_SCRIPT, "study_script")
    main = tmp_path / "main"
    made_up_study(main, study, seeds=[0])
    snapshot = (main / "study.json").read_text()

    def refused(source: Path, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            study.main(["--output_dir", str(main), "--merge", str(source), "--report_only"])
        assert (main / "study.json").read_text() == snapshot and not (main / "deep" / "baseline" / "seed-2").exists()

    refused(tmp_path / "nowhere", "no study.json there")
    refused(main, "this study's own folder")
    other_flags = tmp_path / "other_flags"  # seed 0 again, at another learning rate; seed 2 new
    made_up_study(other_flags, study, seeds=[0, 2])
    data = json.loads((other_flags / "study.json").read_text())
    for run in data["runs"]:
        run["argv"][run["argv"].index("--learning_rate") + 1] = "0.001"
    (other_flags / "study.json").write_text(json.dumps(data))
    refused(other_flags, "deep/baseline/seed-0 was trained with other flags")
    orphan = tmp_path / "orphan"
    made_up_study(orphan, study, seeds=[2])
    (main / "deep" / "diverse" / "seed-2").mkdir()  # an interrupted run of this study left its folder
    refused(orphan, "exists but this study records no run there")
    (main / "deep" / "diverse" / "seed-2").rmdir()
    shutil.rmtree(orphan / "deep" / "diverse" / "seed-2")
    refused(orphan, "its run deep/diverse/seed-2, .* is missing")


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from diverse_vit_hf.trainer.output_folder import OutputFolderLock
with OutputFolderLock(sys.argv[1]):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


def test_a_study_folder_in_use_by_another_process_is_refused(tmp_path):
    """Two study processes in one folder would each rewrite study.json without the other's runs; a study being
    trained cannot be merged from either. A real second process holds the lock."""
    study = load_script(STUDY_SCRIPT, "study_script")
    busy, main = tmp_path / "busy", tmp_path / "main"
    made_up_study(busy, study, seeds=[1])
    made_up_study(main, study, seeds=[0])
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(busy), str(ready)], cwd=REPO, env=SCRIPT_ENV)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the lock holder did not start"
        cli = subprocess.run([sys.executable, str(STUDY_SCRIPT), "--output_dir", str(busy), "--report_only"],
                             cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert (
            cli.returncode == 2
            and f"--output_dir {busy} is in use by another training (process {holder.pid}" in cli.stderr
        )
        with pytest.raises(OutputFolderLockedError, match=f"process {holder.pid}"):
            study.main(["--output_dir", str(main), "--merge", str(busy), "--report_only"])
        assert len(json.loads((main / "study.json").read_text())["runs"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert study.main(["--output_dir", str(main), "--merge", str(busy), "--report_only"])["merged"] == 2


COMMITTED_CONVERGED = REPO / "docs" / "study" / "converged"


def test_the_committed_converged_study_report_is_what_its_runs_give(tmp_path):
    """docs/study/converged: 30 runs, n = 5 per arm and setting, every run with its accuracy curve and folders relative
    to the study; --report_only on a copy recomputes its statistics and report from the runs and gives the committed
    report (but the line naming the installed scipy)."""
    study = load_script(STUDY_SCRIPT, "study_script")
    committed = json.loads((COMMITTED_CONVERGED / "study.json").read_text())
    assert len(committed["runs"]) == 30
    for setting in ("shallow", "deep"):
        for arm in ("baseline", "diverse", "patch"):
            runs = [r for r in committed["runs"] if (r["setting"], r["arm"]) == (setting, arm)]
            assert sorted(r["seed"] for r in runs) == [0, 1, 2, 3, 4]
            for run in runs:
                assert run["output_dir"] == f"{setting}/{arm}/seed-{run['seed']}"
                assert [p["epoch"] for p in run["curve"]] == [4.0 * k for k in range(1, 9)]
                assert run["curve"][-1]["top1"] == run["metrics"]["top1"]
    copy = tmp_path / "converged"
    shutil.copytree(COMMITTED_CONVERGED, copy)
    study.main(["--output_dir", str(copy), "--report_only"])
    recomputed = json.loads((copy / "study.json").read_text())
    assert recomputed["runs"] == committed["runs"]
    assert recomputed["statistics"] == committed["statistics"]
    assert recomputed["curve_statistics"] == committed["curve_statistics"]

    def without_versions(report: str) -> list[str]:
        return [line for line in report.splitlines() if "t quantile:" not in line]

    assert without_versions((copy / "study.md").read_text()) == without_versions(
        (COMMITTED_CONVERGED / "study.md").read_text()
    )


COMMITTED_CONVERGED48 = REPO / "docs" / "study" / "converged48"


def test_the_committed_48_epoch_study_report_is_what_its_runs_give(tmp_path):
    """docs/study/converged48: the deep setting's 15 runs at 48 epochs, n = 5 per arm, curves every 4 epochs, compared
    run by run with the 32-epoch study beside it; --report_only on copies of both, reading the 32-epoch finals again,
    recomputes the statistics and the comparison and gives the committed report (but the line naming the installed
    scipy)."""
    study = load_script(STUDY_SCRIPT, "study_script")
    committed = json.loads((COMMITTED_CONVERGED48 / "study.json").read_text())
    assert {(r["setting"], r["arm"], r["seed"]) for r in committed["runs"]} == {
        ("deep", arm, seed) for arm in ("baseline", "diverse", "patch") for seed in range(5)
    }
    for run in committed["runs"]:
        assert run["output_dir"] == f"deep/{run['arm']}/seed-{run['seed']}"
        assert [p["epoch"] for p in run["curve"]] == [4.0 * k for k in range(1, 13)]
        assert run["curve"][-1]["top1"] == run["metrics"]["top1"]
    assert committed["budget_reference"]["folder"] == "../converged"
    assert committed["budget_reference"]["epochs"] == {"deep": ["32.0"]}
    shutil.copytree(COMMITTED_CONVERGED, tmp_path / "converged")
    copy = tmp_path / "converged48"
    shutil.copytree(COMMITTED_CONVERGED48, copy)
    # The 32-epoch finals are read again from the copy of that study, not taken from the committed study.json.
    study.main(["--output_dir", str(copy), "--report_only", "--budget_reference", str(tmp_path / "converged")])
    recomputed = json.loads((copy / "study.json").read_text())
    for key in ("runs", "statistics", "curve_statistics", "budget_reference", "budget_comparison"):
        assert recomputed[key] == committed[key], key
    assert all(entry["change"]["n"] == 5 for entry in recomputed["budget_comparison"]["deep"].values())

    def without_versions(report: str) -> list[str]:
        return [line for line in report.splitlines() if "t quantile:" not in line]

    assert without_versions((copy / "study.md").read_text()) == without_versions(
        (COMMITTED_CONVERGED48 / "study.md").read_text()
    )
