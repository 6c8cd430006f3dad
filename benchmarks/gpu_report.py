#!/usr/bin/env python
"""Turn the outputs of `benchmarks/gpu_run.sh` into the Markdown section for `benchmarks/RESULTS.md`.

    python benchmarks/gpu_report.py OUT_FOLDER > section.md

Reads what the run left in the folder (`env.txt`, `precision.json`, `overhead.json`, `compile.json`,
`train_state.json`); a missing or unreadable file is reported as such in the section, never invented. Every
number printed is one of those files' numbers; the targets are the GPU performance targets of `TARGETS`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The GPU performance targets (diversified / plain step): (ratio, quantity, bound, "le" or "ge").
TARGETS = [
    ("b/a", "time", 1.05, "le"),
    ("b/a", "memory", 1.10, "le"),
]
NAIVE_TARGET = 1.3  # c/b >= 1.3 in step time or in memory


def load_json(folder: Path, name: str) -> tuple[dict | None, str]:
    path = folder / name
    if not path.is_file():
        logs = "train.log and stderr.log" if name == "train_state.json" else "stderr.log"
        return None, f"`{name}` was not written (the stage failed or did not run; see {logs})"
    text = path.read_text()
    if not text.strip():
        return None, f"`{name}` is empty: its stage failed before printing a result (see stderr.log)"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as error:
        return None, f"`{name}` is not valid JSON ({error}); see stderr.log"


def overhead_section(report: dict, title: str) -> list[str]:
    memory_kind = "peak MiB" if report["device"].startswith("cuda") else "activation MiB"
    lines = [
        f"### {title}",
        "",
        f"{report['config']}, {report['image_size']} px, patch {report['patch_size']}, batch {report['batch_size']}, "
        f"{report['dtype']} on {report['machine']}{', torch.compile' if report['compiled'] else ''}; median of "
        f"{report['repeats']} alternating steps after {report['warmup']} warm-up steps; memory = "
        f"{report['memory_kind']}.",
        "",
        f"| variant | step ms | img/s | {memory_kind} | GFLOP |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, row in report["variants"].items():
        lines.append(
            f"| {key} {row['description']} | {row['median_s'] * 1e3:.1f} | {row['images_per_s']:.0f} | "
            f"{row['memory_mib']:.0f} | {row.get('gflops', float('nan')):.1f} |"
        )
    ratios = []
    for name, key in (("b/a", "ratio_b_over_a"), ("c/b", "ratio_c_over_b")):
        if key in report:
            ratio = report[key]
            text = f"{name}: time {ratio['time']:.3f}"
            per_round = ratio.get("time_per_round")
            if per_round and per_round["ci95"]:
                low, high = per_round["ci95"]
                text += f" (per round {per_round['median']:.3f}, 95% CI [{low:.3f}, {high:.3f}])"
            text += f", memory {ratio['memory']:.3f}"
            if "flops" in ratio:
                text += f", FLOPs {ratio['flops']:.3f}"
            ratios.append(text)
    if ratios:
        lines += ["", f"**{'. '.join(ratios)}.**"]
    return lines


def targets_section(report: dict) -> list[str]:
    lines = ["", "| target (GPU, DeiT-Small bf16) | measured | |", "|---|---:|---|"]
    for ratio, quantity, bound, _ in TARGETS:
        key = "ratio_b_over_a"
        if key in report:
            value = report[key][quantity]
            lines.append(f"| {ratio} {quantity} <= {bound} | {value:.3f} | {'met' if value <= bound else 'missed'} |")
    if "ratio_c_over_b" in report:
        naive = report["ratio_c_over_b"]
        best = max(naive["time"], naive["memory"])
        verdict = "met" if best >= NAIVE_TARGET else "missed"
        lines.append(
            f"| c/b >= {NAIVE_TARGET} in time or memory | {naive['time']:.3f} / {naive['memory']:.3f} | {verdict} |"
        )
    return lines


def precision_section(report: dict) -> list[str]:
    lines = [
        "### Mixed precision and host syncs",
        "",
        f"`benchmarks/precision_check.py --config {report['config']} --batch_size {report['batch_size']}` on "
        f"{report['machine']}: {report['passed']} of {report['passed'] + report['failed']} checks passed.",
        "",
        "| dtype | check | | detail |",
        "|---|---|---|---|",
    ]
    for row in report["checks"]:
        lines.append(f"| {row['dtype']} | {row['check']} | {'ok' if row['ok'] else '**FAIL**'} | {row['detail']} |")
    return lines


def training_section(state: dict, command: str) -> list[str]:
    history = state.get("log_history", [])
    windows = [entry for entry in history if "images_per_second" in entry]
    summary = next((entry for entry in reversed(history) if "train_samples_per_second" in entry), {})
    lines = [
        "### bf16 training run on synthetic images",
        "",
        f"`{command}` with `--bf16`, on an image folder written by `benchmarks/synthetic_imagefolder.py` (DeiT "
        f"augmentation, resized to the model's 224 px, all regularizers, patch mixing loss): "
        f"{state.get('global_step', '?')} optimizer steps.",
        "",
        "| step | loss | loss_cls | images/s (window) |",
        "|---:|---:|---:|---:|",
    ]
    for entry in windows:
        lines.append(
            f"| {entry['step']} | {entry.get('loss', float('nan')):.4f} | {entry.get('loss_cls', float('nan')):.4f} | "
            f"{entry['images_per_second']:.1f} |"
        )
    if summary:
        lines += [
            "",
            f"Whole run: {summary['train_samples_per_second']:.0f} images/s over {summary['train_runtime']:.1f} s "
            "(Trainer's figure, start-up and the first steps included).",
        ]
    return lines


def train_command(folder: Path) -> str:
    """The `command:` line gpu_run.sh writes at the top of train.log."""
    log = folder / "train.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return next((line.removeprefix("command: ") for line in lines if line.startswith("command: ")), "run_diverse.py")


def build_report(folder: Path) -> str:
    lines = ["## GPU (bf16)", ""]
    env = folder / "env.txt"
    if env.is_file():
        lines += ["Machine and versions (`env.txt`):", "", "```", *env.read_text().strip().splitlines(), "```", ""]
    sections = [
        ("overhead.json", lambda r: [*overhead_section(r, "Step time and memory"), *targets_section(r)]),
        ("compile.json", lambda r: overhead_section(r, "torch.compile")),
        ("precision.json", precision_section),
        ("train_state.json", lambda r: training_section(r, train_command(folder))),
    ]
    for name, render in sections:
        report, problem = load_json(folder, name)
        if report is None:
            lines += [f"- {problem}", ""]
            continue
        lines += [*render(report), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        sys.exit("usage: python benchmarks/gpu_report.py OUT_FOLDER (the folder benchmarks/gpu_run.sh wrote)")
    text = build_report(Path(argv[0]))
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
