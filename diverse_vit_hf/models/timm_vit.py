"""timm's `VisionTransformer` inside transformers' `TimmWrapperForImageClassification`: which timm checkpoints the
diversified class (`modeling.DiverseTimmWrapperForImageClassification`) takes, and the timm-specific pieces of its
diversity forward.

A timm Hub repository (`timm/deit_small_patch16_224.fb_in1k`, ...) has a `config.json` with `architecture` and
`pretrained_cfg` and no `model_type`; transformers reads it as a `TimmWrapperConfig` (`model_type: timm_wrapper`)
and builds `timm.create_model(architecture, pretrained=False, num_classes=..., **model_args)` into `timm_model`.
Supported is the plain timm ViT: `VisionTransformer` with pre-norm `Block`s and the standard fused-qkv `Attention`
(ViT, DeiT, DeiT-III, AugReg, DINOv2 and the register variants, with or without layer scale, QK-norm, class token),
pooled by its class token (`global_pool="token"`) or by the mean of the patch tokens (`"avg"`). Everything else is
refused by `check_timm_vision_transformer`, with the reason.

What the regularizers read (`docs/method.md` §9):

- `h^0`: the output of `norm_pre`, i.e. the tokens entering block 1 (patch embedding, prefix tokens, position
  embeddings, dropout; `norm_pre` is an identity except for pre-normed models such as CLIP's);
- `h^L`: the input of `norm` (an identity for heads that normalise after pooling, `fc_norm`);
- `A^1`: block 1's softmax probabilities on timm's unfused path, where they pass through `attn.attn_drop` (captured
  there, before the dropout); only block 1 leaves the fused kernel;
- the per-token logits: the model's own head applied to each token in place of what it pools,
  `head(head_drop(fc_norm(x_t)))` with `x = norm(h^L)` (`timm_token_head_parts`);
- K = `num_prefix_tokens` (class token + registers);
- Q, K, V: the row blocks of each block's fused `qkv` weight (`families.qkv_weights`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUPPORTED_GLOBAL_POOLS = ("token", "avg")
# global_pool -> why it is refused (the error says so).
UNSUPPORTED_GLOBAL_POOLS = {
    "": "the model has no pooling, so it gives per-token outputs, not image logits",
    "map": "the head pools with a learned-query attention block (MAP): the image logits come from one more "
    "attention over all tokens, and a single token's logits through it are not defined by the method",
    "prr": "the head pools with an extra attention block over all tokens (PRR), so a single token's logits through it "
    "are not defined by the method",
    "max": "max pooling is not a mean over the patches, for which the per-token logits of the patch-wise loss are "
    "defined (docs/method.md §9); no timm ViT checkpoint on the Hub uses it",
    "avgmax": "avg+max pooling is not a mean over the patches, for which the per-token logits of the patch-wise loss "
    "are defined (docs/method.md §9); no timm ViT checkpoint on the Hub uses it",
}
# The configuration attributes the package reads from every family's config, set on a TimmWrapperConfig from the
# built timm model (`timm_config_attributes`) and never saved: the saved config.json is timm's.
TIMM_CONFIG_ATTRIBUTES = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
SUPPORTED_EXAMPLES = (
    "timm/deit_small_patch16_224.fb_in1k, timm/vit_base_patch16_224.augreg2_in21k_ft_in1k, "
    "timm/vit_small_patch14_reg4_dinov2.lvd142m"
)


def _timm_classes() -> dict[str, type]:
    from timm.layers import PatchEmbed
    from timm.models import vision_transformer

    return {
        "VisionTransformer": vision_transformer.VisionTransformer,
        "Block": vision_transformer.Block,
        "Attention": vision_transformer.Attention,
        "PatchEmbed": PatchEmbed,
    }


def _refuse(architecture: str, reason: str) -> ValueError:
    return ValueError(
        f"The timm checkpoint's architecture {architecture!r} is not supported by Diverse-ViT: {reason}. Supported "
        "timm checkpoints are plain ViTs (timm's VisionTransformer with pre-norm blocks and the standard fused-qkv "
        "attention: ViT, DeiT, DeiT-III, AugReg, DINOv2 and register variants) pooled by the class token "
        f"(global_pool 'token') or by the mean of the patch tokens ('avg'), e.g. {SUPPORTED_EXAMPLES}."
    )


def check_timm_vision_transformer(model: nn.Module, architecture: str) -> None:
    """Refuse, with the reason, a timm model the diversity forward cannot read.

    Raises:
        ValueError: `model` is not a plain timm `VisionTransformer` (another architecture, a distilled DeiT),
            pools other than by its class token or mean, has blocks other than timm's pre-norm `Block` with the
            standard `Attention`, a patch embedding other than `PatchEmbed`, or active patch dropout.
    """
    classes = _timm_classes()
    kind = type(model).__name__
    if not isinstance(model, classes["VisionTransformer"]):
        raise _refuse(
            architecture,
            f"it builds a timm {kind}, not a VisionTransformer; the method needs one global sequence of prefix and "
            "patch tokens through every block with an N x N attention map per head (convolutional and hierarchical "
            "models such as ResNet or Swin have none)",
        )
    if type(model) is not classes["VisionTransformer"]:
        if hasattr(model, "dist_token") or hasattr(model, "head_dist"):
            raise _refuse(
                architecture,
                f"it is a distilled DeiT ({kind}) with two heads, on the class and the distillation token, averaged "
                "at inference and trained against a teacher's predictions; the Diverse-ViT paper trains the "
                "non-distilled DeiT: use timm/deit_*_patch16_224.fb_in1k",
            )
        raise _refuse(architecture, f"it builds {kind}, a subclass of VisionTransformer with its own forward")
    pool = model.global_pool
    if getattr(model, "attn_pool", None) is not None or pool not in SUPPORTED_GLOBAL_POOLS:
        reason = UNSUPPORTED_GLOBAL_POOLS.get(pool, "an unknown pooling")
        raise _refuse(architecture, f"its global_pool is {pool!r}: {reason}")
    if not isinstance(model.patch_embed, classes["PatchEmbed"]):
        raise _refuse(
            architecture,
            f"its patch embedding is a {type(model.patch_embed).__name__} (e.g. a CNN stem of a hybrid ViT), not "
            "timm's PatchEmbed: the patch grid of the patch-wise CutMix labels would not be the image's",
        )
    if not isinstance(model.patch_drop, nn.Identity):
        raise _refuse(
            architecture,
            "it drops patch tokens in training (patch_drop_rate > 0), which removes and reorders them: the patch-wise "
            "labels and the h^0/h^L pairs need every patch in place; build it with model_args patch_drop_rate 0",
        )
    for index, block in enumerate(model.blocks, start=1):
        if type(block) is not classes["Block"]:
            raise _refuse(
                architecture,
                f"block {index} is a {type(block).__name__}, not timm's pre-norm Block (post-norm and parallel blocks "
                "have no separate attention output and fused-qkv attention the method reads)",
            )
        if type(block.attn) is not classes["Attention"]:
            raise _refuse(
                architecture,
                f"block {index}'s attention is a {type(block.attn).__name__}, not timm's standard Attention (one "
                "softmax map per head from a fused qkv projection)",
            )


def timm_config_attributes(model: nn.Module) -> dict[str, Any]:
    """The configuration attributes other families' configs carry (`TIMM_CONFIG_ATTRIBUTES`), read from a checked
    timm `VisionTransformer`: image and patch size (an int when square), channels, width, depth, heads, MLP width."""

    def size(value: Any) -> int | list[int]:
        value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
        return int(value[0]) if value[0] == value[1] else [int(v) for v in value]

    embed, first = model.patch_embed, model.blocks[0]
    return {
        "image_size": size(embed.img_size) if embed.img_size is not None else None,
        "patch_size": size(embed.patch_size),
        "num_channels": int(embed.proj.in_channels),
        "hidden_size": int(model.embed_dim),
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": int(first.attn.num_heads),
        "intermediate_size": int(first.mlp.fc1.out_features),
    }


def default_pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """A `pretrained_cfg` for a timm ViT built from a bare `TimmWrapperConfig` (no checkpoint's): what
    `TimmWrapperImageProcessor` and timm's loader need, in the form `save_config_for_hf` writes it. The architecture's
    registered preprocessing (interpolation, crop_pct, crop mode, mean, std) with the model's own input size and class
    count; no tag, source or license (these are not that checkpoint's weights)."""
    source = dict(getattr(model, "pretrained_cfg", None) or {})
    dropped = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "architecture", "tag", "license"}
    kept_null = {"pool_size", "first_conv", "classifier"}
    config = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in source.items()
        if key not in dropped and (value is not None or key in kept_null)
    }
    height, width = model.patch_embed.img_size
    config.update(custom_load=False, input_size=[int(model.patch_embed.proj.in_channels), height, width])
    config.update(num_classes=int(model.num_classes), first_conv="patch_embed.proj", classifier="head")
    for key, value in (("interpolation", "bicubic"), ("crop_pct", 0.9), ("crop_mode", "center"),
                       ("mean", [0.485, 0.456, 0.406]), ("std", [0.229, 0.224, 0.225])):  # fmt: skip
        config.setdefault(key, value)
    return config


def is_timm_checkpoint_config(config: dict[str, Any]) -> bool:
    """Whether a `config.json` (as a dict) is a timm checkpoint's: `architecture` and `pretrained_cfg`, the keys that
    route it to transformers' TimmWrapper (and that timm's own loader reads)."""
    return isinstance(config.get("architecture"), str) and isinstance(config.get("pretrained_cfg"), dict)


def timm_checkpoint_details(config: dict[str, Any]) -> dict[str, Any]:
    """`timm_config_attributes` of the model a timm `config.json` describes, built on the meta device (no memory, no
    weights) from `architecture`, `num_classes` and `model_args`, and checked like the diversified class checks it.

    Raises:
        ValueError: the installed timm does not know the architecture, or it is not a supported timm ViT.
    """
    import timm

    architecture = config["architecture"]
    try:
        with torch.device("meta"):
            model = timm.create_model(
                architecture,
                pretrained=False,
                num_classes=int(config.get("num_classes") or 0),
                **(config.get("model_args") or {}),
            )
    except RuntimeError as error:
        raise ValueError(f"timm {timm.__version__} cannot build {architecture!r}: {error}") from error
    check_timm_vision_transformer(model, architecture)
    return timm_config_attributes(model)


def timm_token_head_parts(
    model: nn.Module, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Image logits and the linear form of the per-token logits of a timm ViT, from `forward_features`' output
    `x = norm(h^L)`.

    The per-token logits are the model's own head applied to each token in place of what it pools:
    `z_t = head(head_drop(fc_norm(x_t)))` (`forward_head` without the pooling). With the class-token head
    (`global_pool="token"`, `fc_norm` an identity) that is `W norm(h_t) + b`, and the image logits, timm's own
    `forward_head(x)`, are the class token's. With the average-pooled head the image logits are the mean of the
    (prefix-free) tokens, then `fc_norm`, then the head, so `z_t = W LN_pool(h_t) + b` for heads that normalise after
    pooling (`norm` an identity), as for BEiT's mean pooling, and `W norm(h_t) + b`, whose patch mean is the image
    logits, for those that normalise before (`fc_norm` an identity).

    Args:
        features: `(B, N, D)` the output of `forward_features`.

    Returns:
        `(logits (B, C), token_features (B, N, D), weight (C, D), bias (C,) or None)`: the per-token logits are
        `token_features @ weight.T + bias`.
    """
    if not isinstance(model.head, nn.Linear):
        raise ValueError(
            "The timm model has no linear classification head (num_classes 0): load it with num_labels > 0 to "
            "compute per-token logits."
        )
    return model.forward_head(features), model.head_drop(model.fc_norm(features)), model.head.weight, model.head.bias


def set_timm_drop_path_rate(model: nn.Module, drop_path_rate: float) -> list[float]:
    """Stochastic depth with timm's own modules and schedule: block i gets `DropPath(i / (L - 1) * drop_path_rate)`
    on both residual branches (`drop_path1`, `drop_path2`), an `nn.Identity` at rate 0, exactly what
    `timm.create_model(..., drop_path_rate=r)` builds (`calculate_drop_path_rates`). No parameters: the saved
    checkpoint is unchanged. Returns the per-block rates."""
    from timm.layers import DropPath

    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"`drop_path_rate` must lie in [0, 1) (DeiT uses 0.1), got {drop_path_rate}.")
    blocks = model.blocks
    rates = torch.linspace(0.0, drop_path_rate, len(blocks)).tolist() if len(blocks) > 1 else [drop_path_rate]
    for block, rate in zip(blocks, rates, strict=True):
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, (DropPath(rate) if rate > 0 else nn.Identity()).train(block.training))
    return rates


def uses_reentrant_checkpointing() -> bool:
    """Whether timm runs activation checkpointing re-entrantly (`TIMM_REENTRANT_CKPT=1`; off by default)."""
    try:
        from timm.layers import use_reentrant_ckpt
    except ImportError:  # timm before the switch: torch's default, re-entrant
        return True
    return bool(use_reentrant_ckpt())


__all__ = [
    "SUPPORTED_GLOBAL_POOLS",
    "TIMM_CONFIG_ATTRIBUTES",
    "UNSUPPORTED_GLOBAL_POOLS",
    "check_timm_vision_transformer",
    "default_pretrained_cfg",
    "is_timm_checkpoint_config",
    "set_timm_drop_path_rate",
    "timm_checkpoint_details",
    "timm_config_attributes",
    "timm_token_head_parts",
    "uses_reentrant_checkpointing",
]
