"""DeiT's AdamW parameter groups, for `DiverseTrainer` and for plain training loops."""

from __future__ import annotations

import re

from torch import nn

# Parameters AdamW must not decay (DeiT/timm `no_weight_decay`): learned tokens and position embeddings, by the last
# component of their name. Biases and norm weights are matched separately.
NO_DECAY_PARAMETER_NAMES = ("cls_token", "distillation_token", "mask_token", "position_embeddings", "pos_embed")
_NO_DECAY_PATTERN = re.compile(r"(?:^|\.)(?:" + "|".join(NO_DECAY_PARAMETER_NAMES) + r")$")


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters DeiT/timm exclude from weight decay: every bias, every parameter of a module whose
    class name contains "Norm" (LayerNorm, RMSNorm, ...), the position embeddings and the CLS / distillation / mask
    tokens."""
    excluded = set()
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            excluded.update(
                f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False)
            )
    for name, _ in model.named_parameters():
        if name.endswith("bias") or _NO_DECAY_PATTERN.search(name):
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
