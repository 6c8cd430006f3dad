"""Model access (supported-family checks, per-block weight statistics) and streaming accumulation over batches
with forward hooks (`RedundancyProbe`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..models.families import (
    attention_module,
    backbone_layers,
    block_linear,
    block_weight,
    embeddings_output,
    fused_qkv,
    qkv_weights,
)
from ..models.modeling import SUPPORTED_MODEL_TYPES
from .metrics import (
    WeightMatrixStats,
    attention_probabilities,
    cross_layer_head_cosine,
    flattened_head_maps,
    head_cosine,
    input_cosine,
    patch_similarity,
    weight_matrix_stats,
)

# Matrices of one block, in report order (where each lives: `families.BLOCK_LINEAR_PATHS`).
WEIGHT_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
QKV_MATRICES = ("q_proj", "k_proj", "v_proj")


# ---------------------------------------------------------------------------------------------------------------
# Model access
# ---------------------------------------------------------------------------------------------------------------


def check_supported_model(model: nn.Module) -> nn.Module:
    """Return the backbone (the module holding the embeddings, or timm's `norm_pre`, and the blocks) of a supported
    family, or raise a clear ValueError naming the supported model types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"The redundancy analysis supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r} "
            f"({type(model).__name__}). Pass such a checkpoint, e.g. facebook/deit-small-patch16-224."
        )
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, model) if prefix else model
    try:
        embeddings_output(backbone)
    except ValueError as error:
        raise ValueError(f"{type(model).__name__}: {error} Cannot analyze it.") from error
    for index, layer in enumerate(backbone_layers(backbone)):
        try:
            qkv_weights(layer)
        except ValueError as error:
            raise ValueError(f"Block {index + 1}: {error} Cannot analyze it.") from error
    return backbone


def check_weight_matrices(names: Sequence[str]) -> tuple[str, ...]:
    """Validate a selection of per-block matrices (a subset of WEIGHT_MATRICES), returned in canonical order."""
    names = tuple(names)
    unknown = [n for n in names if n not in WEIGHT_MATRICES]
    if unknown or not names:
        raise ValueError(f"Weight matrices must be a non-empty subset of {WEIGHT_MATRICES}, got {list(names)}.")
    return tuple(n for n in WEIGHT_MATRICES if n in names)


def weight_statistics(model: nn.Module, matrices: Sequence[str] = QKV_MATRICES) -> dict[str, list[WeightMatrixStats]]:
    """Per-block `WeightMatrixStats` of the chosen matrices: `{name: [block 1, ..., block L]}`."""
    layers = backbone_layers(check_supported_model(model))
    return {name: [weight_matrix_stats(block_weight(layer, name)) for layer in layers] for name in
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
    """Forward hooks on a ViT-family backbone that reduce hidden states and attention maps to per-image statistics
    while the model runs, and add them to `RunningMeans`.

    Hooks: the embeddings (`h^0`; timm: `norm_pre`'s output), every block's output (`h^l`), and every block's
    `q_proj`/`k_proj` (timm: the fused `qkv`, with its `q_norm`/`k_norm`) (the attention map of block l is
    recomputed when its keys are ready, reduced, and kept only until block l + 1 has used it for the cross-layer
    metric). Use as a context manager; the hooks are removed on exit.
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
        self._mask: torch.Tensor | None = None
        self._key: tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], None]] | None = None

    @property
    def num_layers(self) -> int:
        return len(backbone_layers(self.backbone))

    def __enter__(self) -> RedundancyProbe:
        self._handles.append(embeddings_output(self.backbone).register_forward_hook(self._on_embeddings))
        for index, layer in enumerate(backbone_layers(self.backbone), start=1):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
            qkv = fused_qkv(layer)
            if self.attention and qkv is not None:
                self._handles.append(qkv.register_forward_hook(self._qkv_hook(index, attention_module(layer))))
            elif self.attention:
                attention = attention_module(layer)
                # BEiT's relative position bias reaches the kernel as the additive attention mask: keep it.
                self._handles.append(attention.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
                self._handles.append(block_linear(layer, "q_proj").register_forward_hook(self._query_hook))
                self._handles.append(
                    block_linear(layer, "k_proj").register_forward_hook(self._key_hook(index, attention))
                )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._first = self._query = self._previous_maps = self._mask = self._key = None

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
            self._first = self._query = self._previous_maps = self._key = None
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

    def _mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) else None

    def _query_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._key is not None:
            (key, reduce), self._key = self._key, None
            reduce(output.detach(), key)
        else:
            self._query = output.detach()

    def _key_hook(self, layer: int, attention: nn.Module) -> Callable[..., None]:
        """The hook on `k_proj` of block `layer`; the block's map is reduced once both its queries and keys exist
        (transformers' older layout computes the keys first, the newer one the queries)."""
        num_heads = getattr(attention, "num_attention_heads", self.config.num_attention_heads)
        scaling = getattr(attention, "scaling", None)

        def reduce(query: torch.Tensor, key: torch.Tensor) -> None:
            scale = scaling if scaling is not None else (query.shape[-1] // num_heads) ** -0.5
            mask, self._mask = self._mask, None
            self._reduce_map(layer, attention_probabilities(query, key, num_heads, scale, mask))

        def on_key(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._query is not None:
                query, self._query = self._query, None
                reduce(query, output.detach())
            else:
                self._key = (output.detach(), reduce)

        return on_key

    def _qkv_hook(self, layer: int, attention: nn.Module) -> Callable[..., None]:
        """The hook on timm's fused `qkv` of block `layer`: its output `(B, N, 3 * H * d)` splits into Q, K, V as
        timm's `Attention.forward` splits it; `q_norm`/`k_norm` (identities unless QK-norm) and `scale` as there."""
        num_heads, scale = attention.num_heads, attention.scale

        def on_qkv(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            batch, tokens, _ = output.shape
            qkv = output.detach().reshape(batch, tokens, 3, num_heads, -1)
            query = attention.q_norm(qkv[:, :, 0]).flatten(2)
            key = attention.k_norm(qkv[:, :, 1]).flatten(2)
            self._reduce_map(layer, attention_probabilities(query, key, num_heads, scale))

        return on_qkv

    def _reduce_map(self, layer: int, probs: torch.Tensor) -> None:
        """Add block `layer`'s `(B, H, N, N)` attention probabilities to the statistics, and keep its flattened maps
        (the only map kept) for block `layer + 1`'s cross-layer metric."""
        num_heads = probs.shape[1]
        prefix = probs.shape[-1] - self._expected_patches
        maps = flattened_head_maps(probs)
        if num_heads >= 2:
            self.stats.add("head_cosine", layer, head_cosine(maps))
            self.stats.add("head_cosine_patches_only", layer, head_cosine(flattened_head_maps(probs, prefix)))
        if self._previous_maps is not None:
            self.stats.add("cross_layer_head_cosine", layer, cross_layer_head_cosine(maps, self._previous_maps))
        del probs
        self._previous_maps = maps
