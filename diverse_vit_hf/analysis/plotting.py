"""Plots of a redundancy report: one PNG per level, layers on the x-axis, one color per model (matplotlib is
imported when plotting, not with the package)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..utils.fileio import atomic_write
from ..utils.optional import require
from .probe import WEIGHT_MATRICES
from .redundancy import ModelRedundancy, RedundancyReport

PLOT_FILES = {
    "embedding": "redundancy_embedding.png",
    "attention": "redundancy_attention.png",
    "weights": "redundancy_weights.png",
}

_MATRIX_STYLES = {"q_proj": "-", "k_proj": "--", "v_proj": ":", "o_proj": "-.", "fc1": (0, (5, 1)), "fc2": (0, (1, 3))}


def _plot_lines(axis: Any, report: RedundancyReport, get: Callable[[ModelRedundancy], tuple[list, list]], **style):
    colors = [f"C{i}" for i in range(10)]
    for index, model in enumerate(report.models):
        xs, ys = get(model)
        if len(xs) != len(ys):  # e.g. a weight matrix this model was not analysed for
            continue
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", color=colors[index % 10], **style)


def _finish_axis(axis: Any, title: str, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)


def _model_legend(figure: Any, report: RedundancyReport, extra: Sequence[tuple[str, Any]] = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", label=m.name) for i, m in enumerate(report.models)]
    handles += [Line2D([], [], color="gray", linestyle=style, label=label) for label, style in extra]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)


def plot_report(report: RedundancyReport, output_dir: str | os.PathLike) -> dict[str, Path]:
    """One PNG per level (embedding, attention, weights): layers on the x-axis, one color per model."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    paths: dict[str, Path] = {}

    def save(figure: Any, level: str) -> None:
        figure.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = output_dir / PLOT_FILES[level]
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        plt.close(figure)
        paths[level] = path

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    _plot_lines(axes[0], report, lambda m: (m.embedding.layers, m.embedding.patch_cosine), linestyle="-")
    _plot_lines(axes[0], report, lambda m: (m.embedding.layers, m.embedding.patch_abs_cosine), linestyle="--")
    _finish_axis(axes[0], "Within layer: patch cos (off-diagonal)", "layer (0 = embeddings)")
    _plot_lines(axes[1], report, lambda m: (m.embedding.layers, m.embedding.input_cosine), linestyle="-")
    _finish_axis(axes[1], "Across layers: cos(h^l_i, h^0_i)", "layer (0 = embeddings)")
    figure.suptitle("Patch-embedding level")
    _model_legend(figure, report, [("signed cos", "-"), ("|cos|", "--")])
    save(figure, "embedding")

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    _plot_lines(axes[0], report, lambda m: (m.attention.layers, m.attention.head_cosine), linestyle="-")
    _plot_lines(axes[0], report, lambda m: (m.attention.layers, m.attention.head_cosine_patches_only), linestyle="--")
    _finish_axis(axes[0], "Within block: cos between heads", "block")
    _plot_lines(axes[1], report, lambda m: (m.attention.layers, m.attention.cross_layer_head_cosine), linestyle="-")
    _finish_axis(axes[1], "Across blocks: cos(A^l_h, A^(l-1)_h)", "block")
    figure.suptitle("Attention level")
    _model_legend(figure, report, [("all tokens", "-"), ("patches only", "--")])
    save(figure, "attention")

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    names = [n for n in WEIGHT_MATRICES if any(n in m.weights.matrices for m in report.models)]
    for axis, (key, title) in zip(
        axes.flat,
        [("condition_number", "Condition number s_max/s_min"), ("row_abs_cosine", "Mean |cos| between rows"),
         ("stable_rank", "Stable rank"), ("effective_rank", "Effective rank")],
        strict=True,
    ):  # fmt: skip
        for name in names:
            _plot_lines(axis, report,
                        lambda m, n=name, k=key: (m.weights.layers, m.weights.matrices.get(n, {}).get(k, [])),
                        linestyle=_MATRIX_STYLES[name])  # fmt: skip
        if key == "condition_number":
            axis.set_yscale("log")
        _finish_axis(axis, title, "block")
    figure.suptitle("Weight level")
    _model_legend(figure, report, [(n, _MATRIX_STYLES[n]) for n in names])
    save(figure, "weights")
    return paths
