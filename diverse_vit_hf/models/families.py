"""Where the regularizers' inputs live inside each supported Hugging Face vision transformer.

transformers' ViT family shares one block design (pre-norm attention + MLP over `[prefix tokens, patch tokens]`) but
not one attribute layout: the blocks are `backbone.layers` (ViT, DeiT, BEiT, ViT-MSN, I-JEPA) or
`backbone.encoder.layer` (DINOv2), and a block's projections are `attention.q_proj` (the layout transformers moved
to in 5.x) or `attention.attention.query` (the older one, still DINOv2's in transformers 5.9). These small functions
find them by structure, so the model classes, the weight term and the redundancy analysis read every family the
same way. The per-family classes and their heads are in `modeling.py`.
"""

from __future__ import annotations

from torch import nn

# Canonical name of a block's matrix -> where it lives, newest layout first.
BLOCK_LINEAR_PATHS: dict[str, tuple[str, ...]] = {
    "q_proj": ("attention.q_proj", "attention.attention.query"),
    "k_proj": ("attention.k_proj", "attention.attention.key"),
    "v_proj": ("attention.v_proj", "attention.attention.value"),
    "o_proj": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def backbone_layers(backbone: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a backbone (`layers`, or `encoder.layer`), in order.

    Raises:
        ValueError: the backbone has neither (not a ViT-family layout).
    """
    for path in ("layers", "encoder.layer"):
        layers = _get(backbone, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"{type(backbone).__name__} has no `layers` or `encoder.layer` list of transformer blocks; it is not a "
        "ViT-family backbone this package can read."
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


def attention_module(layer: nn.Module) -> nn.Module:
    """The module of a block that owns the query projection and calls the attention kernel with itself as `module`
    (the one the block-1 capture flags)."""
    for path in ("attention.q_proj", "attention.attention.query"):
        if isinstance(_get(layer, path), nn.Linear):
            return _get(layer, path.rsplit(".", 1)[0])
    raise ValueError(f"{type(layer).__name__} has no attention module with a query projection.")


def final_norm(backbone: nn.Module) -> nn.Module:
    """The backbone's last module before the head (`layernorm`; an `nn.Identity` where a mean-pooled head normalises
    after pooling). Its input is `h^L`, the last block's output."""
    norm = getattr(backbone, "layernorm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"{type(backbone).__name__} has no final `layernorm`; cannot read the last block's output.")
    return norm


__all__ = ["BLOCK_LINEAR_PATHS", "attention_module", "backbone_layers", "block_linear", "final_norm"]
