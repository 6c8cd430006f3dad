"""Where the regularizers' inputs live inside each supported Hugging Face vision transformer.

transformers' ViT family shares one block design (pre-norm attention + MLP over `[prefix tokens, patch tokens]`) but
not one attribute layout: the blocks are `backbone.layers` (ViT, DeiT, BEiT, ViT-MSN, I-JEPA) or
`backbone.encoder.layer` (DINOv2), and a block's projections are `attention.q_proj` (the layout transformers moved
to in 5.x) or `attention.attention.query` (the older one, still DINOv2's in transformers 5.9). timm's
`VisionTransformer` (inside transformers' `TimmWrapperForImageClassification`, `timm_vit.py`) keeps its blocks in
`blocks` (an `nn.Sequential`), projects Q, K and V with one fused `attn.qkv` (rows `[Q; K; V]`), and its tokens enter
block 1 from `norm_pre` and leave the last block into `norm`. These small functions find them by structure, so the
model classes, the weight term and the redundancy analysis read every family the same way. The per-family classes
and their heads are in `modeling.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Canonical name of a block's matrix -> where it lives, newest layout first (timm's output projection last; its
# Q, K and V share the fused `attn.qkv`: see `qkv_weights`).
BLOCK_LINEAR_PATHS: dict[str, tuple[str, ...]] = {
    "q_proj": ("attention.q_proj", "attention.attention.query"),
    "k_proj": ("attention.k_proj", "attention.attention.key"),
    "v_proj": ("attention.v_proj", "attention.attention.value"),
    "o_proj": ("attention.o_proj", "attention.output.dense", "attn.proj"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}
QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def backbone_layers(backbone: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The transformer blocks of a backbone (`layers`, `encoder.layer`, or timm's `blocks`), in order.

    Raises:
        ValueError: the backbone has none of them (not a ViT-family layout).
    """
    for path in ("layers", "encoder.layer", "blocks"):
        layers = _get(backbone, path)
        if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
            return layers
    raise ValueError(
        f"{type(backbone).__name__} has no `layers`, `encoder.layer` or `blocks` list of transformer blocks; it is "
        "not a ViT-family backbone this package can read."
    )


def block_linear(layer: nn.Module, name: str) -> nn.Linear:
    """One of a block's matrices by its canonical name (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `fc1`, `fc2`).

    Raises:
        ValueError: no linear layer at any known path for that name.
    """
    if name not in BLOCK_LINEAR_PATHS:
        raise ValueError(f"Unknown block matrix {name!r}; expected one of {tuple(BLOCK_LINEAR_PATHS)}.")
    for path in BLOCK_LINEAR_PATHS[name]:
        module = _get(layer, path)
        if isinstance(module, nn.Linear):
            return module
    raise ValueError(
        f"{type(layer).__name__} has no {name} linear layer (looked for {', '.join(BLOCK_LINEAR_PATHS[name])})."
    )


def fused_qkv(layer: nn.Module) -> nn.Linear | None:
    """timm's fused query-key-value projection of a block (`attn.qkv`, rows `[Q; K; V]`), or None (separate
    projections, the transformers layout)."""
    module = _get(layer, "attn.qkv")
    return module if isinstance(module, nn.Linear) else None


def qkv_weights(
    layer: nn.Module, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value weights of a block, each `(D_attn, D)`.

    transformers' layout has three linear layers; timm's has one fused `qkv` whose rows `0:C`, `C:2C`, `2C:3C` are
    Q, K and V (C = D_attn, as timm's `Attention.forward` splits its output). `gather` (e.g. FSDP2's
    `distributed.full_weight`) is applied to each stored parameter before anything is sliced: once to the fused
    matrix, so a sharded `qkv` is all-gathered whole and then split.
    """
    gather = gather if gather is not None else (lambda weight: weight)
    qkv = fused_qkv(layer)
    if qkv is not None:
        weight = gather(qkv.weight)
        if weight.shape[0] % 3:
            raise ValueError(f"The fused qkv weight of {type(layer).__name__} has {weight.shape[0]} rows, not 3 x C.")
        query, key, value = weight.chunk(3, dim=0)
        return query, key, value
    query, key, value = (gather(block_linear(layer, name).weight) for name in QKV_NAMES)
    return query, key, value


def block_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """One of a block's weight matrices by its canonical name (`q_proj`, ..., `fc2`): the linear layer's weight, or
    for Q, K and V of timm's fused `qkv` its row block (`qkv_weights`)."""
    if name in QKV_NAMES and fused_qkv(layer) is not None:
        return qkv_weights(layer)[QKV_NAMES.index(name)]
    return block_linear(layer, name).weight


def attention_module(layer: nn.Module) -> nn.Module:
    """The module of a block that owns the query projection (and calls the attention kernel with itself as
    `module`, the one the block-1 capture flags); timm's `attn`, which owns the fused `qkv`."""
    for path in ("attention.q_proj", "attention.attention.query", "attn.qkv"):
        if isinstance(_get(layer, path), nn.Linear):
            return _get(layer, path.rsplit(".", 1)[0])
    raise ValueError(f"{type(layer).__name__} has no attention module with a query projection.")


def embeddings_output(backbone: nn.Module) -> nn.Module:
    """The module whose output is `h^0`, the tokens entering block 1: `embeddings` (transformers: patch projection,
    prefix tokens, position embeddings, dropout), or timm's `norm_pre` (called after its patch embedding, prefix
    tokens, position embeddings, dropout and patch dropout; an `nn.Identity` unless the model normalises there)."""
    for name in ("embeddings", "norm_pre"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(backbone).__name__} has no `embeddings` (or timm `norm_pre`); cannot read h^0.")


def final_norm(backbone: nn.Module) -> nn.Module:
    """The backbone's last module before the head (`layernorm`, timm's `norm`; an `nn.Identity` where a mean-pooled
    head normalises after pooling). Its input is `h^L`, the last block's output."""
    for name in ("layernorm", "norm"):
        norm = getattr(backbone, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(
        f"{type(backbone).__name__} has no final `layernorm` (or timm `norm`); cannot read the last block's output."
    )


__all__ = [
    "BLOCK_LINEAR_PATHS",
    "QKV_NAMES",
    "attention_module",
    "backbone_layers",
    "block_linear",
    "block_weight",
    "embeddings_output",
    "final_norm",
    "fused_qkv",
    "qkv_weights",
]
