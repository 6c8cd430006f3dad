"""Writing a redundancy report: JSON, Markdown rendering and `write_report` (JSON, plots and Markdown, each written
atomically)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.fileio import atomic_write_text
from ..utils.optional import is_available
from .plotting import PLOT_FILES, plot_report
from .probe import QKV_MATRICES
from .redundancy import (
    METRIC_DEFINITIONS,
    SUMMARY_METRICS,
    ModelRedundancy,
    RedundancyReport,
    SummaryMetric,
    finite_mean,
)

logger = logging.getLogger(__name__)
JSON_FILE = "redundancy.json"
MARKDOWN_FILE = "report.md"


def write_json(report: RedundancyReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.5g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def summary_table_markdown(report: RedundancyReport, metrics: Sequence[SummaryMetric] = SUMMARY_METRICS) -> str:
    """Markdown table: one row per summary metric (plus external `metrics` such as accuracy), one column per model."""
    header = "| level | metric | more diverse | " + " | ".join(m.name for m in report.models) + " |"
    rule = "|---|---|---|" + "---:|" * len(report.models)
    rows = [header, rule]
    extra = sorted({k for m in report.models for k in m.metrics})
    for key in extra:
        rows.append(
            f"| task | {key} | higher | " + " | ".join(_format(m.metrics.get(key)) for m in report.models) + " |"
        )
    summaries = [m.summary() for m in report.models]
    for metric in metrics:
        arrow = "lower" if metric.better == "lower" else "higher"
        values = " | ".join(_format(s[metric.key]) for s in summaries)
        rows.append(f"| {metric.level} | {metric.label} | {arrow} | {values} |")
    return "\n".join(rows)


def _per_layer_table(model: ModelRedundancy) -> str:
    rows = ["| layer | patch cos | abs patch cos | patch cos incl. diag | cos(h^l, h^0) | head cos "
            "| head cos (patches) | cos(A^l, A^(l-1)) | Q/K/V cond (mean) | Q/K/V abs row cos (mean) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    emb, att, wts = model.embedding, model.attention, model.weights.matrices
    qkv = [n for n in QKV_MATRICES if n in wts]
    for index, layer in enumerate(emb.layers):
        cells = [emb.patch_cosine[index], emb.patch_abs_cosine[index], emb.patch_cosine_with_diagonal[index],
                 emb.input_cosine[index]]  # fmt: skip
        if layer == 0:
            cells += [None] * 5
        else:
            block = layer - 1
            cells += [att.head_cosine[block], att.head_cosine_patches_only[block], att.cross_layer_head_cosine[block],
                      finite_mean(wts[n]["condition_number"][block] for n in qkv),
                      finite_mean(wts[n]["row_abs_cosine"][block] for n in qkv)]  # fmt: skip
        rows.append(f"| {layer} | " + " | ".join(_format(c) for c in cells) + " |")
    return "\n".join(rows)


def render_markdown(
    report: RedundancyReport, plot_files: dict[str, str] | None = None, title: str | None = None
) -> str:
    """The Markdown report: settings, summary table, plots (relative file names) and per-layer tables."""
    plot_files = plot_files if plot_files is not None else dict(PLOT_FILES)
    settings = report.settings
    lines = [
        f"# {title or 'Redundancy analysis'}",
        "",
        f"{report.num_images} held-out images from `{settings.get('dataset')}` (split `{settings.get('split')}`), "
        "models in eval mode, attention recomputed explicitly per block. Definitions: diverse-vit-hf's "
        '`docs/method.md`, "How to measure redundancy"; each metric is computed per image and averaged over images.',
        "",
        "## Summary",
        "",
        summary_table_markdown(report),
        "",
        "Last block = output of the last block before the final LayerNorm (`h^L`). The *more diverse* column says "
        "which direction means less redundancy; cos(h^L_i, h^0_i) measures how well a patch keeps its identity "
        "(the contrastive term raises it).",
        "",
    ]
    titles = {"embedding": "Patch-embedding level", "attention": "Attention level", "weights": "Weight level"}
    for level in ("embedding", "attention", "weights"):
        if level in plot_files:
            lines += [f"## {titles[level]}", "", f"![{titles[level]}]({plot_files[level]})", ""]
    lines += ["## Per-layer values", ""]
    for model in report.models:
        lines += [f"### {model.name}", "", _per_layer_table(model), ""]
    lines += ["## Definitions", ""]
    lines += [f"- `{key}`: {text}" for key, text in METRIC_DEFINITIONS.items()]
    lines += ["", f"Machine-readable values: `{JSON_FILE}` (schema version {report.schema_version}).", ""]
    return "\n".join(lines)


@dataclass
class ReportFiles:
    """Paths written by `write_report`."""

    json: Path
    markdown: Path
    plots: dict[str, Path]


def write_report(report: RedundancyReport, output_dir: str | os.PathLike, title: str | None = None) -> ReportFiles:
    """Write `redundancy.json`, the three PNG plots and `report.md` into `output_dir` (each file atomically). Without
    matplotlib (the `plots` extra) the plots are left out with a warning: the numbers are all in the JSON and Markdown.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(report, output_dir / JSON_FILE)
    if is_available("matplotlib"):
        plots = plot_report(report, output_dir)
    else:
        logger.warning(
            "Redundancy plots skipped: matplotlib is not installed (pip install 'diverse-vit-hf[plots]'). The report's "
            "JSON and Markdown hold every number."
        )
        plots = {}
    markdown = render_markdown(report, {level: path.name for level, path in plots.items()}, title)
    markdown_path = output_dir / MARKDOWN_FILE
    atomic_write_text(markdown_path, markdown)
    return ReportFiles(json=json_path, markdown=markdown_path, plots=plots)
