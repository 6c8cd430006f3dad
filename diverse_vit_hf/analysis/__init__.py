"""Redundancy analysis of ViT-family classifiers at the three levels of Diverse-ViT (the paper's "head-to-toe
assessment"): patch embeddings, attention maps and weights.

Definitions (`docs/method.md`, §7 "How to measure redundancy"), per layer l, on held-out images, model in eval mode:

- embedding, within layer: mean over patch pairs i != j of cos(h^l_i, h^l_j) (`patch_cosine`, signed), the
  same with |cos| (`patch_abs_cosine`), and the diagonal-inclusive mean the training loss uses
  (`patch_cosine_with_diagonal` = 1/P + (P-1)/P x off-diagonal when no token is the zero vector);
- embedding, across layers: mean over patches of cos(h^l_i, h^0_i) (`input_cosine`);
- attention, within layer: mean over heads h != g of cos(vec A^l_h, vec A^l_g), over all N x N entries
  (`head_cosine`) and over the patch-to-patch block only, prefix tokens' rows and columns dropped
  (`head_cosine_patches_only`);
- attention, across layers: mean over heads of cos(vec A^l_h, vec A^(l-1)_h) (`cross_layer_head_cosine`);
- weights, per block and matrix (Q, K, V; optionally o_proj, fc1, fc2): singular values, condition number
  s_max / s_min, stable rank ||W||_F^2 / s_max^2, effective rank exp(entropy(s / sum s)), mean |cos| between
  rows, and (s_max^2 - s_min^2)^2, the quantity the weight regularizer targets.

`h^0` is the embeddings output (patch + position embeddings), `h^l` the output of block l before the final
LayerNorm, and `A^l` block l's softmax attention probabilities `(B, H, N, N)`. Data statistics are computed
per image and averaged over images, so the result does not depend on the batch size.

Attention maps are recomputed explicitly, one block at a time, from forward hooks on each block's `q_proj`
and `k_proj` (fused SDPA/flash kernels never return probabilities), and reduced to the per-layer
statistics at once: only the current and the previous block's maps are alive at any moment.

Modules: `metrics` (pure tensor metrics), `probe` (model checks, weight statistics, forward-hook accumulation),
`redundancy` (the report's data classes and summary), `report` (JSON, Markdown, `write_report`), `plotting`
(matplotlib plots), `driver` (`analyze_model`), `loading` (models, images, preprocessing, `analyze_checkpoints`) and
`callback` (`RedundancyCallback`). Everything public is importable from `diverse_vit_hf.analysis` itself.
"""

from __future__ import annotations

from .callback import DEFAULT_CALLBACK_KEYS, RedundancyCallback
from .driver import analyze_model, check_positive_int, tensor_batches
from .loading import (
    AnalysisImages,
    analyze_checkpoints,
    held_out_split,
    load_analysis_images,
    load_image_processor,
    load_model_for_analysis,
    model_label,
    pixel_batches,
)
from .metrics import (
    PatchSimilarity,
    WeightMatrixStats,
    attention_probabilities,
    cross_layer_head_cosine,
    flattened_head_maps,
    head_cosine,
    input_cosine,
    patch_similarity,
    weight_matrix_stats,
)
from .plotting import PLOT_FILES, plot_report
from .probe import (
    QKV_MATRICES,
    WEIGHT_MATRICES,
    RedundancyProbe,
    RunningMeans,
    check_supported_model,
    check_weight_matrices,
    weight_statistics,
)
from .redundancy import (
    METRIC_DEFINITIONS,
    SCHEMA_VERSION,
    SUMMARY_METRICS,
    AttentionRedundancy,
    EmbeddingRedundancy,
    ModelRedundancy,
    RedundancyReport,
    SummaryMetric,
    WeightRedundancy,
)
from .report import JSON_FILE, ReportFiles, render_markdown, summary_table_markdown, write_json, write_report

__all__ = [
    "DEFAULT_CALLBACK_KEYS",
    "JSON_FILE",
    "METRIC_DEFINITIONS",
    "PLOT_FILES",
    "QKV_MATRICES",
    "SCHEMA_VERSION",
    "SUMMARY_METRICS",
    "WEIGHT_MATRICES",
    "AnalysisImages",
    "AttentionRedundancy",
    "EmbeddingRedundancy",
    "ModelRedundancy",
    "PatchSimilarity",
    "RedundancyCallback",
    "RedundancyProbe",
    "RedundancyReport",
    "ReportFiles",
    "RunningMeans",
    "SummaryMetric",
    "WeightMatrixStats",
    "WeightRedundancy",
    "analyze_checkpoints",
    "analyze_model",
    "attention_probabilities",
    "check_positive_int",
    "check_supported_model",
    "check_weight_matrices",
    "cross_layer_head_cosine",
    "flattened_head_maps",
    "head_cosine",
    "held_out_split",
    "input_cosine",
    "load_analysis_images",
    "load_image_processor",
    "load_model_for_analysis",
    "model_label",
    "patch_similarity",
    "pixel_batches",
    "plot_report",
    "render_markdown",
    "summary_table_markdown",
    "tensor_batches",
    "weight_matrix_stats",
    "weight_statistics",
    "write_json",
    "write_report",
]
