"""The classifiers the example scripts train: named from-scratch configurations (the DeiT family used in the
Diverse-ViT paper), the small demo ViT, or a checkpoint to fine-tune, each with its image processor.

The configurations are plain `ViTConfig`s (`model_type: vit`), like the non-distilled `facebook/deit-*-patch16-224`
checkpoints on the Hub, so a model trained from one of them saves a checkpoint that vanilla `transformers` loads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from transformers import AutoImageProcessor, DeiTImageProcessor, ViTConfig, ViTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .modeling import DiverseModelMixin, DiverseViTForImageClassification, load_diverse_model

if TYPE_CHECKING:
    from .arguments import ModelArguments

logger = logging.getLogger(__name__)
# DeiT evaluates at a center crop of 87.5% of the resized image (timm's crop_pct).
DEIT_CROP_PCT = 0.875

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


def build_classifier(model_args: ModelArguments, labels: list[str]) -> tuple[DiverseModelMixin, Any]:
    """The diverse classifier and its image processor: from a checkpoint, a named DeiT config, or a small ViT from
    scratch; then stochastic depth (`--drop_path_rate`)."""
    model, processor = _build_classifier(model_args, labels)
    if model_args.drop_path_rate > 0:
        rates = model.set_drop_path_rate(model_args.drop_path_rate)
        logger.info(
            "Stochastic depth: drop path rate %.3f in the last block (per block: %s)",
            rates[-1],
            [round(r, 4) for r in rates],
        )
    return model, processor


def _build_classifier(model_args: ModelArguments, labels: list[str]):
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if model_args.model is not None:
        if model_args.model_config_name is not None:
            raise ValueError(
                "Pass either --model (a checkpoint to fine-tune) or --model_config_name (a DeiT trained from scratch), "
                "not both."
            )
        model = load_diverse_model(
            model_args.model,
            allow_pickle=model_args.allow_pickle,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
        processor = AutoImageProcessor.from_pretrained(model_args.model)
        return model, processor
    if model_args.model_config_name is not None:
        config = deit_config(
            model_args.model_config_name,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            problem_type="single_label_classification",
        )
        size = config.image_size
        # DeiT's evaluation: shorter edge to size / 0.875 (bicubic), center crop to size. Saved with the model, so a
        # pipeline preprocesses as training evaluated.
        processor = DeiTImageProcessor(
            size={"shortest_edge": int(size / DEIT_CROP_PCT)},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
            resample=PILImageResampling.BICUBIC,
        )
        return DiverseViTForImageClassification(config), processor
    config = ViTConfig(
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        problem_type="single_label_classification",
    )
    size = model_args.image_size
    if size % model_args.patch_size:
        raise ValueError(
            f"--image_size {size} is not a multiple of --patch_size {model_args.patch_size}; choose sizes that divide."
        )
    processor = ViTImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BICUBIC,  # as the training transforms, so pipelines see the same inputs
    )
    return DiverseViTForImageClassification(config), processor


__all__ = ["DEIT_CROP_PCT", "DEIT_MODEL_CONFIG_NAMES", "DEIT_SIZES", "build_classifier", "deit_config"]
