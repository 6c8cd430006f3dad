"""Named from-scratch configurations: the DeiT family used in the Diverse-ViT paper.

The configurations are plain `ViTConfig`s (`model_type: vit`), like the non-distilled `facebook/deit-*-patch16-224`
checkpoints on the Hub, so a model trained from one of them saves a checkpoint that vanilla `transformers` loads.
"""

from __future__ import annotations

from typing import Any

from transformers import ViTConfig

# name -> (hidden size D, attention heads H, blocks L). Every DeiT uses 16 px patches on 224 px images and an MLP
# ratio of 4 (Touvron et al. 2021, Table 1; DeiT-Small-24 is the deeper backbone of the Diverse-ViT paper).
DEIT_SIZES: dict[str, tuple[int, int, int]] = {
    "deit-tiny": (192, 3, 12),
    "deit-small": (384, 6, 12),
    "deit-small-24": (384, 6, 24),
    "deit-base": (768, 12, 12),
}
DEIT_MODEL_CONFIG_NAMES = tuple(DEIT_SIZES)


def deit_config(name: str, **overrides: Any) -> ViTConfig:
    """The `ViTConfig` of a DeiT backbone by name, for training from scratch.

    Args:
        name: one of `deit-tiny`, `deit-small`, `deit-small-24`, `deit-base`.
        **overrides: any `ViTConfig` field, e.g. `num_labels`, `id2label`, `label2id`, `image_size`.

    Returns:
        A `ViTConfig` with patch 16, 224 px, MLP ratio 4 (`intermediate_size = 4 * hidden_size`), `qkv_bias=True`,
        `layer_norm_eps=1e-6` (timm's value, not ViTConfig's 1e-12) and no dropout (DeiT regularises with stochastic
        depth instead: see `DiverseModelMixin.set_drop_path_rate`).
    """
    if name not in DEIT_SIZES:
        raise ValueError(
            f"Unknown model config name {name!r}. Choose one of {', '.join(DEIT_MODEL_CONFIG_NAMES)}, or pass --model "
            "with a Hub id or a local checkpoint folder."
        )
    hidden_size, num_heads, num_layers = DEIT_SIZES[name]
    values: dict[str, Any] = {
        "image_size": 224,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "intermediate_size": 4 * hidden_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
        "initializer_range": 0.02,
    }
    values.update(overrides)
    return ViTConfig(**values)


__all__ = ["DEIT_MODEL_CONFIG_NAMES", "DEIT_SIZES", "deit_config"]
