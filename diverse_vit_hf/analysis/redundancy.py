"""The redundancy report's data: per-level results of one model (`EmbeddingRedundancy`, `AttentionRedundancy`,
`WeightRedundancy`), the per-model summary (`SUMMARY_METRICS`) and the report of several models (`RedundancyReport`,
JSON schema version 1)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .probe import QKV_MATRICES

SCHEMA_VERSION = 1

METRIC_DEFINITIONS = {
    "patch_cosine": "mean over patch pairs i != j of cos(h^l_i, h^l_j), signed; prefix tokens dropped",
    "patch_abs_cosine": "mean over patch pairs i != j of |cos(h^l_i, h^l_j)|",
    "patch_cosine_with_diagonal": "mean of the full P x P cosine matrix (the training loss) = 1/P + (P-1)/P x "
    "patch_cosine",
    "input_cosine": "mean over patches i of cos(h^l_i, h^0_i): the same patch at the input and at layer l",
    "head_cosine": "mean over heads h != g of cos(vec A^l_h, vec A^l_g), all N x N entries",
    "head_cosine_patches_only": "as head_cosine on the P x P patch-to-patch block (prefix rows/columns dropped)",
    "cross_layer_head_cosine": "mean over heads h of cos(vec A^l_h, vec A^(l-1)_h); undefined for block 1",
    "singular_values": "singular values of the nn.Linear weight (D_out x D_in), descending",
    "condition_number": "s_max / s_min over the min(D_out, D_in) singular values",
    "stable_rank": "||W||_F^2 / s_max^2",
    "effective_rank": "exp(entropy(s / sum(s))) (Roy & Vetterli 2007)",
    "row_abs_cosine": "mean over row pairs i != j of |cos(W_i, W_j)| (rows = output units)",
    "condition_gap": "(s_max^2 - s_min^2)^2, per matrix the quantity of the weight regularizer",
}


@dataclass(frozen=True)
class SummaryMetric:
    """One scalar of the per-model summary: key, level, human label and which direction means more diverse."""

    key: str
    level: str
    label: str
    better: str  # "lower" or "higher"


SUMMARY_METRICS = (
    SummaryMetric("patch_cos_last", "embedding", "patch cos, last block (signed, off-diagonal)", "lower"),
    SummaryMetric("patch_abs_cos_last", "embedding", "abs patch cos, last block (off-diagonal)", "lower"),
    SummaryMetric("patch_cos_with_diag_last", "embedding", "patch cos incl. diagonal, last block (loss 1a)", "lower"),
    SummaryMetric("patch_cos_mean", "embedding", "patch cos, mean over blocks", "lower"),
    SummaryMetric("patch_input_cos_last", "embedding", "cos(h^L_i, h^0_i), same patch (coverage)", "higher"),
    SummaryMetric("attn_cos_block1", "attention", "head cos, block 1 (loss 2)", "lower"),
    SummaryMetric("attn_cos_mean", "attention", "head cos, mean over blocks", "lower"),
    SummaryMetric("attn_cos_patches_mean", "attention", "head cos without prefix tokens, mean over blocks", "lower"),
    SummaryMetric("attn_cross_layer_cos_mean", "attention", "cos(A^l_h, A^(l-1)_h), mean over blocks", "lower"),
    SummaryMetric("qkv_cond_mean", "weights", "Q/K/V condition number, mean", "lower"),
    SummaryMetric("qkv_row_abs_cos_mean", "weights", "Q/K/V abs row cos, mean", "lower"),
    SummaryMetric("qkv_stable_rank_mean", "weights", "Q/K/V stable rank, mean", "higher"),
    SummaryMetric("qkv_eff_rank_mean", "weights", "Q/K/V effective rank, mean", "higher"),
    SummaryMetric("qkv_cond_gap_sum", "weights", "sum over Q/K/V of (s_max^2 - s_min^2)^2 (loss 3, exact)", "lower"),
)


# ---------------------------------------------------------------------------------------------------------------
# Report data classes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingRedundancy:
    """Per-layer patch-embedding metrics; index 0 is `h^0` (embeddings output), index l the output of block l."""

    layers: list[int]
    patch_cosine: list[float | None]
    patch_abs_cosine: list[float | None]
    patch_cosine_with_diagonal: list[float | None]
    input_cosine: list[float | None]


@dataclass
class AttentionRedundancy:
    """Per-block attention metrics (blocks 1..L); `cross_layer_head_cosine[0]` is None (block 1 has no predecessor)."""

    layers: list[int]
    head_cosine: list[float | None]
    head_cosine_patches_only: list[float | None]
    cross_layer_head_cosine: list[float | None]


@dataclass
class WeightRedundancy:
    """Per-block weight statistics: `matrices[name][field]` is a list over blocks 1..L."""

    layers: list[int]
    matrices: dict[str, dict[str, list[Any]]]


def finite_mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


@dataclass
class ModelRedundancy:
    """All metrics of one model. `metrics` holds numbers measured elsewhere (e.g. evaluation accuracy)."""

    name: str
    model_type: str
    num_layers: int
    num_heads: int
    hidden_size: int
    num_prefix_tokens: int | None
    num_patches: int | None
    num_images: int
    embedding: EmbeddingRedundancy
    attention: AttentionRedundancy
    weights: WeightRedundancy
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | None]:
        """Scalar summary keyed by `SUMMARY_METRICS` keys (None where undefined, e.g. one head)."""
        emb, att = self.embedding, self.attention
        qkv = [self.weights.matrices[n] for n in QKV_MATRICES if n in self.weights.matrices]

        def qkv_values(key: str) -> list[float]:
            return [v for m in qkv for v in m[key]]

        gaps = qkv_values("condition_gap")
        return {
            "patch_cos_last": emb.patch_cosine[-1],
            "patch_abs_cos_last": emb.patch_abs_cosine[-1],
            "patch_cos_with_diag_last": emb.patch_cosine_with_diagonal[-1],
            "patch_cos_mean": finite_mean(emb.patch_cosine[1:]),
            "patch_input_cos_last": emb.input_cosine[-1],
            "attn_cos_block1": att.head_cosine[0] if att.head_cosine else None,
            "attn_cos_mean": finite_mean(att.head_cosine),
            "attn_cos_patches_mean": finite_mean(att.head_cosine_patches_only),
            "attn_cross_layer_cos_mean": finite_mean(att.cross_layer_head_cosine),
            "qkv_cond_mean": finite_mean(qkv_values("condition_number")),
            "qkv_row_abs_cos_mean": finite_mean(qkv_values("row_abs_cosine")),
            "qkv_stable_rank_mean": finite_mean(qkv_values("stable_rank")),
            "qkv_eff_rank_mean": finite_mean(qkv_values("effective_rank")),
            "qkv_cond_gap_sum": sum(gaps) if gaps else None,
        }


def _json_safe(value: Any) -> Any:
    """JSON has no inf/NaN: non-finite floats become None (documented in the schema)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class RedundancyReport:
    """The analysis of one or more models on the same images. Serialised as `redundancy.json` (schema version 1):

    `{"schema_version": 1, "num_images", "settings": {...}, "definitions": {...},
      "models": [{"name", "model_type", ..., "embedding": {"layers": [0..L], <metric>: [...]},
                  "attention": {"layers": [1..L], ...}, "weights": {"layers": [1..L], "matrices": {...}},
                  "summary": {...}, "metrics": {...}}]}`. Non-finite numbers are written as null.
    """

    models: list[ModelRedundancy]
    settings: dict[str, Any]
    num_images: int
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        models = []
        for model in self.models:
            entry = asdict(model)
            entry["summary"] = model.summary()
            models.append(entry)
        return _json_safe(
            {
                "schema_version": self.schema_version,
                "num_images": self.num_images,
                "settings": self.settings,
                "definitions": METRIC_DEFINITIONS,
                "models": models,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RedundancyReport:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"Unsupported redundancy report schema_version {version!r}; this library reads {SCHEMA_VERSION}."
            )
        models = []
        for entry in data["models"]:
            entry = {k: v for k, v in entry.items() if k != "summary"}
            models.append(
                ModelRedundancy(
                    **{k: v for k, v in entry.items() if k not in ("embedding", "attention", "weights")},
                    embedding=EmbeddingRedundancy(**entry["embedding"]),
                    attention=AttentionRedundancy(**entry["attention"]),
                    weights=WeightRedundancy(**entry["weights"]),
                )
            )
        return cls(models=models, settings=data["settings"], num_images=data["num_images"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> RedundancyReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------------------------
# Outputs: JSON, Markdown (all written atomically)
# ---------------------------------------------------------------------------------------------------------------
