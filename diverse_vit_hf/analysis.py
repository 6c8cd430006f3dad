"""Redundancy analysis of ViT/DeiT classifiers at the three levels of Diverse-ViT (the paper's "head-to-toe
assessment"): patch embeddings, attention maps and weights.

Definitions (`shared/method.md`, "How to measure redundancy"), per layer l, on held-out images, model in eval mode:

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
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .fileio import atomic_write, atomic_write_text
from .regularizers import unit_vectors

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUPPORTED_MODEL_TYPES = ("vit", "deit")
NORM_EPS = 1e-8
# Matrices of one block, in report order, and where each lives inside a ViT/DeiT layer.
WEIGHT_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
QKV_MATRICES = ("q_proj", "k_proj", "v_proj")
_MATRIX_PARENT = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
                  "fc1": "mlp", "fc2": "mlp"}  # fmt: skip
PLOT_FILES = {
    "embedding": "redundancy_embedding.png",
    "attention": "redundancy_attention.png",
    "weights": "redundancy_weights.png",
}
JSON_FILE = "redundancy.json"
MARKDOWN_FILE = "report.md"

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
# Pure metric functions. Inputs of any float dtype; every computation runs in float32 (data) or float64 (weights).
# ---------------------------------------------------------------------------------------------------------------


def _off_diagonal_mean(gram: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of a batch of square matrices `(B, M, M)` -> `(B,)`."""
    size = gram.shape[-1]
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1).sum(dim=-1)
    return (gram.sum(dim=(-2, -1)) - diagonal) / (size * (size - 1))


@dataclass
class PatchSimilarity:
    """Per-image within-layer patch similarities, each `(B,)` float32."""

    cosine: torch.Tensor
    abs_cosine: torch.Tensor
    cosine_with_diagonal: torch.Tensor


def patch_similarity(hidden_states: torch.Tensor, num_prefix_tokens: int) -> PatchSimilarity:
    """Within-layer patch-token cosine similarity of each image.

    Args:
        hidden_states: `(B, N, D)` tokens of one layer; the first `num_prefix_tokens` (CLS, distillation) are dropped.
        num_prefix_tokens: K, number of leading non-patch tokens.

    Returns:
        `PatchSimilarity` with the signed and absolute off-diagonal means over the P x (P - 1) patch pairs and the
        diagonal-inclusive mean over all P x P entries (what `patch_cosine_loss(variant="signed")` computes).
    """
    if hidden_states.ndim != 3:
        raise ValueError(f"`hidden_states` must be (batch, tokens, hidden), got shape {tuple(hidden_states.shape)}.")
    units = unit_vectors(hidden_states[:, num_prefix_tokens:].float())  # (B, P, D)
    num_patches = units.shape[1]
    if num_patches < 2:
        raise ValueError(
            f"Patch similarity needs at least 2 patch tokens, got {num_patches} (tokens {hidden_states.shape[1]}, "
            f"prefix {num_prefix_tokens}). Use larger images or smaller patches."
        )
    gram = torch.bmm(units, units.transpose(1, 2))  # (B, P, P)
    return PatchSimilarity(
        cosine=_off_diagonal_mean(gram),
        abs_cosine=_off_diagonal_mean(gram.abs()),
        cosine_with_diagonal=gram.mean(dim=(1, 2)),
    )


def input_cosine(
    hidden_states: torch.Tensor, first_hidden_states: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """Mean over patches of cos(h^l_i, h^0_i) per image.

    Args:
        hidden_states: `(B, N, D)` tokens of layer l.
        first_hidden_states: `(B, N, D)` tokens entering block 1 (`h^0`).

    Returns:
        `(B,)` float32.
    """
    if hidden_states.shape != first_hidden_states.shape:
        raise ValueError(
            f"Layer tokens {tuple(hidden_states.shape)} and input tokens {tuple(first_hidden_states.shape)} differ."
        )
    current = unit_vectors(hidden_states[:, num_prefix_tokens:].float())
    first = unit_vectors(first_hidden_states[:, num_prefix_tokens:].float())
    return (current * first).sum(dim=-1).mean(dim=-1)


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, num_heads: int, scaling: float) -> torch.Tensor:
    """Softmax attention probabilities recomputed from a block's projected queries and keys (no mask, as in ViT).

    Args:
        query, key: `(B, N, H * d)` outputs of `q_proj` / `k_proj`.
        num_heads: H.
        scaling: the block's softmax scale (d ** -0.5).

    Returns:
        `(B, H, N, N)` float32 probabilities, equal to the eager kernel's before dropout.
    """
    batch, tokens, width = query.shape
    if width % num_heads:
        raise ValueError(f"Projection width {width} is not divisible by the {num_heads} attention heads.")
    q = query.float().view(batch, tokens, num_heads, -1).transpose(1, 2)
    k = key.float().view(batch, key.shape[1], num_heads, -1).transpose(1, 2)
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)


def flattened_head_maps(attention_probs: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Unit-norm flattened attention map of each head, optionally without the prefix tokens' rows and columns.

    Args:
        attention_probs: `(B, H, N, N)`.
        num_prefix_tokens: rows/columns to drop first (0 keeps the full map).

    Returns:
        `(B, H, M)` with M = N^2 or P^2.
    """
    if attention_probs.ndim != 4:
        raise ValueError(f"`attention_probs` must be (batch, heads, N, N), got {tuple(attention_probs.shape)}.")
    maps = attention_probs[:, :, num_prefix_tokens:, num_prefix_tokens:].float()
    return unit_vectors(maps.flatten(start_dim=2))


def head_cosine(head_maps: torch.Tensor) -> torch.Tensor:
    """Mean cosine over head pairs h != g of unit head maps `(B, H, M)` -> `(B,)`."""
    if head_maps.shape[1] < 2:
        raise ValueError(f"Cross-head similarity needs at least 2 heads, got {head_maps.shape[1]}.")
    return _off_diagonal_mean(torch.bmm(head_maps, head_maps.transpose(1, 2)))


def cross_layer_head_cosine(head_maps: torch.Tensor, previous_head_maps: torch.Tensor) -> torch.Tensor:
    """Mean over heads of cos(vec A^l_h, vec A^(l-1)_h) from unit head maps `(B, H, M)` of two blocks -> `(B,)`."""
    if head_maps.shape != previous_head_maps.shape:
        raise ValueError(
            f"Attention maps of consecutive blocks differ in shape: {tuple(head_maps.shape)} vs "
            f"{tuple(previous_head_maps.shape)}."
        )
    return (head_maps * previous_head_maps).sum(dim=-1).mean(dim=-1)


@dataclass
class WeightMatrixStats:
    """Spectral statistics of one `nn.Linear` weight `(D_out, D_in)`, computed in float64."""

    singular_values: list[float]
    condition_number: float
    stable_rank: float
    effective_rank: float
    row_abs_cosine: float
    condition_gap: float


def weight_matrix_stats(weight: torch.Tensor) -> WeightMatrixStats:
    """Singular values, condition number, stable rank, effective rank, mean |row cos| and (s_max^2 - s_min^2)^2.

    s_min is the smallest of the min(D_out, D_in) singular values; for a square Q/K/V matrix the condition gap is
    exactly the per-matrix term of `weight_condition_loss(estimator="exact")`. A zero matrix gets condition number
    inf and ranks 0.
    """
    if weight.ndim != 2 or min(weight.shape) < 1:
        raise ValueError(f"`weight` must be a non-empty (D_out, D_in) matrix, got shape {tuple(weight.shape)}.")
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    singular = torch.linalg.svdvals(w)
    s_max, s_min = singular[0].item(), singular[-1].item()
    if s_max == 0.0:
        stable_rank = effective_rank = 0.0
    else:
        stable_rank = (singular.pow(2).sum() / singular[0] ** 2).item()
        p = singular / singular.sum()
        p = p[p > 0]
        effective_rank = math.exp(-(p * p.log()).sum().item())
    if w.shape[0] >= 2:
        rows = unit_vectors(w)
        row_abs_cosine = _off_diagonal_mean((rows @ rows.T).abs().unsqueeze(0)).item()
    else:
        row_abs_cosine = float("nan")
    return WeightMatrixStats(
        singular_values=singular.tolist(),
        condition_number=s_max / s_min if s_min > 0 else float("inf"),
        stable_rank=stable_rank,
        effective_rank=effective_rank,
        row_abs_cosine=row_abs_cosine,
        condition_gap=(s_max**2 - s_min**2) ** 2,
    )


# ---------------------------------------------------------------------------------------------------------------
# Model access
# ---------------------------------------------------------------------------------------------------------------


def check_supported_model(model: nn.Module) -> nn.Module:
    """Return the ViT/DeiT backbone (the module holding `embeddings` and `layers`) or raise a clear ValueError."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"The redundancy analysis supports ViT and DeiT models (config model_type 'vit' or 'deit'), got "
            f"{model_type!r} ({type(model).__name__}). Pass a ViT/DeiT checkpoint such as "
            "facebook/deit-small-patch16-224."
        )
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, model) if prefix else model
    layers = getattr(backbone, "layers", None)
    if getattr(backbone, "embeddings", None) is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no `embeddings` and `layers` (transformers 5.x ViT/DeiT layout); "
            "cannot analyze it."
        )
    for index, layer in enumerate(layers):
        attention = getattr(layer, "attention", None)
        if not all(isinstance(getattr(attention, name, None), nn.Linear) for name in ("q_proj", "k_proj")):
            raise ValueError(f"Block {index + 1} has no attention.q_proj/k_proj linear layers; cannot analyze it.")
    return backbone


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = getattr(getattr(layer, _MATRIX_PARENT[name], None), name, None)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"A block has no {_MATRIX_PARENT[name]}.{name} linear layer.")
    return module


def check_weight_matrices(names: Sequence[str]) -> tuple[str, ...]:
    """Validate a selection of per-block matrices (a subset of WEIGHT_MATRICES), returned in canonical order."""
    names = tuple(names)
    unknown = [n for n in names if n not in WEIGHT_MATRICES]
    if unknown or not names:
        raise ValueError(f"Weight matrices must be a non-empty subset of {WEIGHT_MATRICES}, got {list(names)}.")
    return tuple(n for n in WEIGHT_MATRICES if n in names)


def weight_statistics(model: nn.Module, matrices: Sequence[str] = QKV_MATRICES) -> dict[str, list[WeightMatrixStats]]:
    """Per-block `WeightMatrixStats` of the chosen matrices: `{name: [block 1, ..., block L]}`."""
    layers = check_supported_model(model).layers
    return {name: [weight_matrix_stats(_linear(layer, name).weight) for layer in layers] for name in
            check_weight_matrices(matrices)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Streaming accumulation over batches with forward hooks
# ---------------------------------------------------------------------------------------------------------------

EMBEDDING_KEYS = ("patch_cosine", "patch_abs_cosine", "patch_cosine_with_diagonal", "input_cosine")
ATTENTION_KEYS = ("head_cosine", "head_cosine_patches_only", "cross_layer_head_cosine")


class RunningMeans:
    """Sums of per-image statistics, per key and layer, in float64 on the CPU; `mean` divides by the image count."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], float] = {}
        self.counts: dict[tuple[str, int], int] = {}

    def add(self, key: str, layer: int, per_image: torch.Tensor) -> None:
        values = per_image.detach().to(device="cpu", dtype=torch.float64)
        self.sums[(key, layer)] = self.sums.get((key, layer), 0.0) + values.sum().item()
        self.counts[(key, layer)] = self.counts.get((key, layer), 0) + values.numel()

    def mean(self, key: str, layer: int) -> float | None:
        count = self.counts.get((key, layer), 0)
        return self.sums[(key, layer)] / count if count else None


class RedundancyProbe:
    """Forward hooks on a ViT/DeiT backbone that reduce hidden states and attention maps to per-image statistics
    while the model runs, and add them to `RunningMeans`.

    Hooks: the embeddings (`h^0`), every block's output (`h^l`), and every block's `q_proj`/`k_proj` (the attention
    map of block l is recomputed when its keys are ready, reduced, and kept only until block l + 1 has used it for
    the cross-layer metric). Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, embedding: bool = True, attention: bool = True) -> None:
        self.backbone = check_supported_model(model)
        self.config = model.config
        self.embedding = embedding
        self.attention = attention
        self.stats = RunningMeans()
        self.num_images = 0
        self.num_prefix_tokens: int | None = None
        self.num_patches: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._first: torch.Tensor | None = None
        self._query: torch.Tensor | None = None
        self._previous_maps: torch.Tensor | None = None
        self._expected_patches: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.backbone.layers)

    def __enter__(self) -> RedundancyProbe:
        self._handles.append(self.backbone.embeddings.register_forward_hook(self._on_embeddings))
        for index, layer in enumerate(self.backbone.layers, start=1):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
            if self.attention:
                attention = layer.attention
                self._handles.append(attention.q_proj.register_forward_hook(self._query_hook))
                self._handles.append(attention.k_proj.register_forward_hook(self._key_hook(index, attention)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._first = self._query = self._previous_maps = None

    def run(self, model: nn.Module, pixel_values: torch.Tensor) -> None:
        """One batch `(B, C, H, W)` through `model` (already in eval mode, on its device), statistics accumulated."""
        if not self._handles:
            raise RuntimeError("RedundancyProbe.run must be called inside `with RedundancyProbe(model) as probe:`.")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must be (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        patch = self.config.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
        self._expected_patches = (pixel_values.shape[-2] // patch_h) * (pixel_values.shape[-1] // patch_w)
        parameter = next(model.parameters())
        try:
            with torch.no_grad():
                model(pixel_values=pixel_values.to(device=parameter.device, dtype=parameter.dtype))
        finally:
            self._first = self._query = self._previous_maps = None
        self.num_images += pixel_values.shape[0]

    # -- hooks -------------------------------------------------------------------------------------------------

    def _prefix(self, hidden: torch.Tensor) -> int:
        prefix = hidden.shape[1] - self._expected_patches
        if prefix < 0:
            raise ValueError(f"The model produced {hidden.shape[1]} tokens for {self._expected_patches} patches.")
        self.num_prefix_tokens, self.num_patches = prefix, self._expected_patches
        return prefix

    def _hidden_stats(self, layer: int, hidden: torch.Tensor) -> None:
        prefix = self._prefix(hidden)
        similarity = patch_similarity(hidden, prefix)
        self.stats.add("patch_cosine", layer, similarity.cosine)
        self.stats.add("patch_abs_cosine", layer, similarity.abs_cosine)
        self.stats.add("patch_cosine_with_diagonal", layer, similarity.cosine_with_diagonal)
        self.stats.add("input_cosine", layer, input_cosine(hidden, self._first, prefix))

    def _on_embeddings(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        # h^0 is needed by every block's cross-layer metric, so it is the one tensor kept through the forward.
        self._first = hidden.detach()
        self._previous_maps = None
        if self.embedding:
            self._hidden_stats(0, self._first)

    def _layer_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.embedding:
                self._hidden_stats(layer, (output[0] if isinstance(output, tuple) else output).detach())

        return hook

    def _query_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._query = output.detach()

    def _key_hook(self, layer: int, attention: nn.Module) -> Callable[..., None]:
        num_heads = getattr(attention, "num_attention_heads", self.config.num_attention_heads)
        scaling = getattr(attention, "scaling", None)

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._query is None:
                raise RuntimeError(f"Block {layer}: k_proj ran before q_proj; unexpected attention layout.")
            query, self._query = self._query, None
            scale = scaling if scaling is not None else (query.shape[-1] // num_heads) ** -0.5
            probs = attention_probabilities(query, output.detach(), num_heads, scale)  # (B, H, N, N)
            prefix = probs.shape[-1] - self._expected_patches
            maps = flattened_head_maps(probs)
            if num_heads >= 2:
                self.stats.add("head_cosine", layer, head_cosine(maps))
                self.stats.add("head_cosine_patches_only", layer, head_cosine(flattened_head_maps(probs, prefix)))
            if self._previous_maps is not None:
                self.stats.add("cross_layer_head_cosine", layer, cross_layer_head_cosine(maps, self._previous_maps))
            del probs
            self._previous_maps = maps  # the only map kept: block l + 1 compares against it

        return hook


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


def _finite_mean(values: Iterable[float | None]) -> float | None:
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
            "patch_cos_mean": _finite_mean(emb.patch_cosine[1:]),
            "patch_input_cos_last": emb.input_cosine[-1],
            "attn_cos_block1": att.head_cosine[0] if att.head_cosine else None,
            "attn_cos_mean": _finite_mean(att.head_cosine),
            "attn_cos_patches_mean": _finite_mean(att.head_cosine_patches_only),
            "attn_cross_layer_cos_mean": _finite_mean(att.cross_layer_head_cosine),
            "qkv_cond_mean": _finite_mean(qkv_values("condition_number")),
            "qkv_row_abs_cos_mean": _finite_mean(qkv_values("row_abs_cosine")),
            "qkv_stable_rank_mean": _finite_mean(qkv_values("stable_rank")),
            "qkv_eff_rank_mean": _finite_mean(qkv_values("effective_rank")),
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
# Analysis drivers
# ---------------------------------------------------------------------------------------------------------------


def analyze_model(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    name: str = "model",
    weight_matrices: Sequence[str] = QKV_MATRICES,
    progress: bool = True,
    total_batches: int | None = None,
) -> ModelRedundancy:
    """Analyze one model on batches of pixel values `(B, C, H, W)` (already preprocessed for it).

    The model is put in eval mode for the analysis and returned to its previous mode afterwards.
    """
    from tqdm.auto import tqdm

    check_supported_model(model)
    matrices = check_weight_matrices(weight_matrices)
    was_training = model.training
    model.eval()
    try:
        with RedundancyProbe(model) as probe:
            for pixel_values in tqdm(batches, total=total_batches, desc=f"analyzing {name}", disable=not progress,
                                     unit="batch"):  # fmt: skip
                probe.run(model, pixel_values)
    finally:
        model.train(was_training)
    if probe.num_images == 0:
        raise ValueError("No images were given to the analysis; pass at least one batch.")
    stats, num_layers = probe.stats, probe.num_layers
    embedding = EmbeddingRedundancy(
        layers=list(range(num_layers + 1)),
        **{key: [stats.mean(key, layer) for layer in range(num_layers + 1)] for key in EMBEDDING_KEYS},
    )
    attention = AttentionRedundancy(
        layers=list(range(1, num_layers + 1)),
        **{key: [stats.mean(key, layer) for layer in range(1, num_layers + 1)] for key in ATTENTION_KEYS},
    )
    weights = WeightRedundancy(
        layers=list(range(1, num_layers + 1)),
        matrices={n: {k: [getattr(s, k) for s in per_block] for k in WeightMatrixStats.__dataclass_fields__}
                  for n, per_block in weight_statistics(model, matrices).items()},
    )  # fmt: skip
    config = model.config
    return ModelRedundancy(
        name=name,
        model_type=config.model_type,
        num_layers=num_layers,
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        num_prefix_tokens=probe.num_prefix_tokens,
        num_patches=probe.num_patches,
        num_images=probe.num_images,
        embedding=embedding,
        attention=attention,
        weights=weights,
    )


def _batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return value


def tensor_batches(pixel_values: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split `(n, C, H, W)` pixel values into batches of at most `batch_size` images."""
    check_positive_int(batch_size, "batch_size")
    return iter(pixel_values.split(batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Loading models, images and preprocessing (used by the CLI and the example)
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r} ({error}); use auto, cpu, cuda or cuda:N.") from error


def load_model_for_analysis(name_or_path: str, device: str | torch.device | None = None) -> nn.Module:
    """Load a ViT/DeiT classifier (Hub id or local folder) for analysis, with a clear error for anything else."""
    from transformers import AutoConfig

    from .modeling import load_diverse_model

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a model config from {name_or_path!r}: pass a local folder holding config.json or a Hub "
            f"model id (needs network). ({type(error).__name__}: {error})"
        ) from error
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path!r} has model_type {config.model_type!r}; the redundancy analysis supports ViT and DeiT "
            "(model_type 'vit' or 'deit'), e.g. facebook/deit-small-patch16-224."
        )
    model = load_diverse_model(name_or_path)
    return model.to(resolve_device(device)).eval()


def load_image_processor(name_or_path: str, model: nn.Module) -> Any:
    """The checkpoint's image processor; without one, a ViT processor at the model's image size (mean/std 0.5)."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        size = model.config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        logger.warning(
            "%s has no image processor config; resizing to %dx%d and normalising with mean=std=0.5. Save the "
            "training image processor next to the weights for exact preprocessing.",
            name_or_path, height, width,
        )  # fmt: skip
        return ViTImageProcessor(size={"height": height, "width": width}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def pixel_batches(
    images: Sequence[Any], processor: Any, batch_size: int, num_channels: int = 3
) -> Iterator[torch.Tensor]:
    """Preprocess PIL images in batches with `processor`, converted to RGB (3 channels) or L (1 channel) first."""
    check_positive_int(batch_size, "batch_size")
    mode = "RGB" if num_channels == 3 else "L"
    for chunk in _batched(images, batch_size):
        converted = [image.convert(mode) if image.mode != mode else image for image in chunk]
        yield processor(images=converted, return_tensors="pt")["pixel_values"]


@dataclass
class AnalysisImages:
    """Images to analyze (PIL, a fixed order shared by every model) and where they came from."""

    images: list[Any]
    dataset: str
    split: str


def _image_column(dataset: Any, image_column: str | None) -> str:
    from datasets import Image

    from .data import IMAGE_COLUMN_CANDIDATES

    columns = list(dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"The dataset has no image column {image_column!r} (columns: {columns}).")
        return image_column
    typed = [c for c in columns if isinstance(dataset.features.get(c), Image)]
    if typed:
        return typed[0]
    named = [c for c in IMAGE_COLUMN_CANDIDATES if c in columns]
    if named:
        return named[0]
    raise ValueError(f"Could not find an image column among {columns}; pass --image_column.")


def held_out_split(dataset: Any, held_out_fraction: float, seed: int) -> Any:
    """The held-out part of a single-split dataset, exactly as `examples/run_diverse.py` splits it (same seed and
    fraction give the images the model did not train on): stratified by a ClassLabel `label` column when present."""
    from datasets import ClassLabel

    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"`held_out_fraction` must lie in (0, 1), got {held_out_fraction}.")
    labels = [c for c in dataset.column_names if isinstance(dataset.features.get(c), ClassLabel)]
    stratify = labels[0] if labels else None
    return dataset.train_test_split(test_size=held_out_fraction, seed=seed, stratify_by_column=stratify)["test"]


def load_analysis_images(
    dataset: str,
    num_images: int,
    seed: int = 42,
    held_out_fraction: float = 0.1,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str | None = None,
) -> AnalysisImages:
    """Up to `num_images` held-out images, in a fixed order.

    `dataset` is an embedded offline set (`mnist`, `digits`, `lfw`), split like `examples/run_diverse.py` does
    (`held_out_fraction`, `seed`), or a Hub/local dataset for `datasets.load_dataset` (its validation/test split, or
    `split`, else a held-out part of train). Fewer images than asked are used (with a warning) if the split is smaller.
    """
    from datasets import DatasetDict, load_dataset

    from .data import EMBEDDED_DATASETS, load_embedded_dataset

    check_positive_int(num_images, "num_images")
    if dataset in EMBEDDED_DATASETS:
        if split not in (None, "heldout"):
            raise ValueError(f"The embedded dataset {dataset!r} has one split, held out as 'heldout'; got {split!r}.")
        chosen, split_name = held_out_split(load_embedded_dataset(dataset), held_out_fraction, seed), "heldout"
    else:
        try:
            loaded = load_dataset(dataset, dataset_config)
        except Exception as error:  # datasets raises many types (FileNotFound, DatasetNotFound, ConnectionError, ...)
            raise ValueError(
                f"Unknown dataset {dataset!r}: it is not one of the embedded data sets {sorted(EMBEDDED_DATASETS)} and "
                f"datasets.load_dataset could not load it ({type(error).__name__}: {error}). Pass mnist, digits, lfw, "
                "a local dataset folder, or a Hub dataset id (needs network)."
            ) from error
        if not isinstance(loaded, DatasetDict):
            loaded = DatasetDict({"train": loaded})
        if split is not None and split != "heldout":
            if split not in loaded:
                raise ValueError(f"The dataset {dataset!r} has no split {split!r} (splits: {list(loaded)}).")
            chosen, split_name = loaded[split], split
        else:
            split_name = next((s for s in ("validation", "valid", "val", "test") if s in loaded), None)
            if split_name is not None:
                chosen = loaded[split_name]
            elif "train" in loaded:
                chosen, split_name = held_out_split(loaded["train"], held_out_fraction, seed), "heldout"
            else:
                raise ValueError(
                    f"The dataset {dataset!r} has no train/validation/test split (splits: {list(loaded)})."
                )
    column = _image_column(chosen, image_column)
    if len(chosen) < num_images:
        logger.warning("Only %d images in %s/%s; analyzing all of them (asked for %d).", len(chosen), dataset,
                       split_name, num_images)  # fmt: skip
    chosen = chosen.shuffle(seed=seed).select(range(min(num_images, len(chosen))))
    if len(chosen) == 0:
        raise ValueError(f"The {split_name} split of {dataset!r} is empty.")
    return AnalysisImages(images=list(chosen[column]), dataset=dataset, split=split_name)


def model_label(name_or_path: str) -> str:
    """A display name with no local directory in it: the folder name of a local path, the Hub id otherwise."""
    path = Path(name_or_path)
    if path.exists():
        resolved = path.resolve()
        return resolved.name or str(name_or_path)
    return name_or_path


def analyze_checkpoints(
    models: Sequence[str],
    images: AnalysisImages,
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    weight_matrices: Sequence[str] = QKV_MATRICES,
    progress: bool = True,
    seed: int = 42,
) -> RedundancyReport:
    """Load and analyze each checkpoint (Hub id or local folder) on the same images, one model in memory at a time."""
    if not models:
        raise ValueError("Pass at least one model to analyze.")
    check_positive_int(batch_size, "batch_size")
    matrices = check_weight_matrices(weight_matrices)
    if names is None:
        names = [model_label(m) for m in models]
    names = list(names)
    if len(names) != len(models):
        raise ValueError(f"Got {len(names)} names for {len(models)} models; give one --name per --model or none.")
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique, got {names}; pass distinct --name values.")
    target = resolve_device(device)
    results = []
    for source, name in zip(models, names, strict=True):
        model = load_model_for_analysis(source, target)
        processor = load_image_processor(source, model)
        batches = pixel_batches(images.images, processor, batch_size, model.config.num_channels)
        total = math.ceil(len(images.images) / batch_size)
        results.append(analyze_model(model, batches, name, matrices, progress, total))
        del model
    settings = {
        "dataset": images.dataset,
        "split": images.split,
        "batch_size": batch_size,
        "seed": seed,
        "device": target.type,
        "weight_matrices": list(matrices),
        "norm_eps": NORM_EPS,
    }
    return RedundancyReport(models=results, settings=settings, num_images=len(images.images))


# ---------------------------------------------------------------------------------------------------------------
# Outputs: JSON, plots, Markdown (all written atomically)
# ---------------------------------------------------------------------------------------------------------------


def write_json(report: RedundancyReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


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
    import matplotlib

    matplotlib.use("Agg")
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
                      _finite_mean(wts[n]["condition_number"][block] for n in qkv),
                      _finite_mean(wts[n]["row_abs_cosine"][block] for n in qkv)]  # fmt: skip
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
        "models in eval mode, attention recomputed explicitly per block. Definitions: Diverse-ViT `method.md`, "
        '"How to measure redundancy"; each metric is computed per image and averaged over images.',
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
    """Write `redundancy.json`, the three PNG plots and `report.md` into `output_dir` (each file atomically)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(report, output_dir / JSON_FILE)
    plots = plot_report(report, output_dir)
    markdown = render_markdown(report, {level: path.name for level, path in plots.items()}, title)
    markdown_path = output_dir / MARKDOWN_FILE
    atomic_write_text(markdown_path, markdown)
    return ReportFiles(json=json_path, markdown=markdown_path, plots=plots)


# ---------------------------------------------------------------------------------------------------------------
# Training-time callback
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_CALLBACK_KEYS = (
    "patch_cos_last",
    "patch_abs_cos_last",
    "patch_input_cos_last",
    "attn_cos_block1",
    "attn_cos_mean",
    "qkv_cond_mean",
    "qkv_row_abs_cos_mean",
    "qkv_cond_gap_sum",
)


class RedundancyCallback(TrainerCallback):
    """Logs a redundancy summary of the model at every evaluation, on a fixed small set of images.

    Values are logged through `trainer.log` as `redundancy/<key>` (e.g. `redundancy/patch_cos_last`,
    `redundancy/attn_cos_block1`, `redundancy/qkv_cond_mean`), so they reach `log_history` and every `report_to`
    integration. Callbacks are not handed the trainer, so bind it with `attach`:

        RedundancyCallback(eval_dataset, num_images=64).attach(trainer)

    Args:
        images: `(n, C, H, W)` preprocessed pixel values, or a dataset/sequence whose items are dicts with a
            `pixel_values` tensor (e.g. an evaluation dataset with the eval transform set).
        num_images: how many of them to use (the first `num_images`, the same at every evaluation).
        batch_size: images per forward.
        keys: which summary keys to log (see `SUMMARY_METRICS`).
        prefix: prefix of the logged names.
    """

    def __init__(
        self,
        images: torch.Tensor | Sequence[dict[str, Any]],
        num_images: int = 32,
        batch_size: int = 32,
        keys: Sequence[str] = DEFAULT_CALLBACK_KEYS,
        prefix: str = "redundancy/",
    ) -> None:
        check_positive_int(num_images, "num_images")
        check_positive_int(batch_size, "batch_size")
        known = {m.key for m in SUMMARY_METRICS}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"Unknown summary keys {unknown}; choose from {sorted(known)}.")
        if len(images) == 0:
            raise ValueError("RedundancyCallback needs at least one image.")
        self.images = images
        self.num_images = num_images
        self.batch_size = batch_size
        self.keys = tuple(keys)
        self.prefix = prefix
        self.trainer: Any = None
        self._pixel_values: torch.Tensor | None = None

    def attach(self, trainer: Any) -> RedundancyCallback:
        """Bind the trainer whose `log` receives the values, and register this callback with it."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def pixel_values(self) -> torch.Tensor:
        """The fixed `(n, C, H, W)` images, gathered once."""
        if self._pixel_values is None:
            count = min(self.num_images, len(self.images))
            if isinstance(self.images, torch.Tensor):
                pixels = self.images[:count]
            else:
                pixels = torch.stack([self.images[i]["pixel_values"] for i in range(count)])
            self._pixel_values = pixels.detach().cpu()
        return self._pixel_values

    def compute(self, model: nn.Module) -> dict[str, float]:
        """The logged values for `model` (no gradient, eval mode, training mode restored)."""
        result = analyze_model(
            model, tensor_batches(self.pixel_values(), self.batch_size), name="training", progress=False
        )
        summary = result.summary()
        return {self.prefix + k: float(summary[k]) for k in self.keys if summary[k] is not None}

    def on_evaluate(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if self.trainer is None:
            raise RuntimeError(
                "RedundancyCallback is not bound to a trainer; register it with "
                "`RedundancyCallback(...).attach(trainer)` instead of `callbacks=[...]`/`add_callback`."
            )
        target = model if model is not None else self.trainer.model
        unwrapped = self.trainer.accelerator.unwrap_model(target)
        self.trainer.log(self.compute(unwrapped))
        return control


__all__ = [
    "DEFAULT_CALLBACK_KEYS",
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
