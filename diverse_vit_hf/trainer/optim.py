"""DeiT's AdamW parameter groups, for `DiverseTrainer` and for plain training loops."""

from __future__ import annotations

import re

from torch import nn

# Parameters AdamW must not decay (timm's `no_weight_decay` of ViT, DeiT, BEiT and DINOv2): learned tokens, position
# embeddings and BEiT's relative position bias tables, by the last component of their name, in transformers' names
# and in timm's own (`timm_model.cls_token`, `reg_token`, `dist_token`, `pos_embed` of a TimmWrapper model). Biases,
# norm weights and every other 1-D parameter (layer scales) are matched separately, as timm's
# `param_groups_weight_decay` does.
NO_DECAY_PARAMETER_NAMES = (
    "cls_token",
    "distillation_token",
    "dist_token",
    "mask_token",
    "register_tokens",
    "reg_token",
    "position_embeddings",
    "pos_embed",
    "relative_position_bias_table",
)
_NO_DECAY_PATTERN = re.compile(r"(?:^|\.)(?:" + "|".join(NO_DECAY_PARAMETER_NAMES) + r")$")


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters DeiT/timm exclude from weight decay: every bias and every other 1-D parameter (layer
    scales), every parameter of a module whose class name contains "Norm" (LayerNorm, RMSNorm, ...), the position
    embeddings and relative position bias tables, and the CLS / distillation / mask / register tokens."""
    excluded = set()
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            excluded.update(
                f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False)
            )
    for name, parameter in model.named_parameters():
        if name.endswith("bias") or parameter.ndim <= 1 or _NO_DECAY_PATTERN.search(name):
            excluded.add(name)
    return excluded


def adamw_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """`[{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}]` (trainable
    parameters only), the groups `DiverseTrainer` builds, for `torch.optim.AdamW` in a plain training loop."""
    excluded = no_weight_decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in trainable if name not in excluded], "weight_decay": weight_decay},
        {"params": [p for name, p in trainable if name in excluded], "weight_decay": 0.0},
    ]


__all__ = ["NO_DECAY_PARAMETER_NAMES", "adamw_parameter_groups", "no_weight_decay_parameter_names"]
