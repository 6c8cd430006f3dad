"""The classifier an example script trains and its image processor: a Hub or local checkpoint to fine-tune
(`--model_name_or_path`), a named DeiT configuration trained from scratch (`--config_name`), or the small demo ViT
built from the size flags; then stochastic depth (`--drop_path_rate`)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoImageProcessor, DeiTImageProcessor, ViTConfig, ViTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..data.augmentation import DEIT_EVAL_CROP_PCT
from ..models.modeling import DiverseModelMixin, DiverseViTForImageClassification, load_diverse_model
from ..models.presets import deit_config
from .arguments import ModelArguments

logger = logging.getLogger(__name__)


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
    if model_args.model_name_or_path is not None:
        if model_args.config_name is not None:
            raise ValueError(
                "Pass either --model_name_or_path (a checkpoint to fine-tune) or --config_name (a DeiT trained from "
                "scratch), not both."
            )
        model = load_diverse_model(
            model_args.model_name_or_path,
            allow_pickle=model_args.allow_pickle,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        return model, processor
    if model_args.config_name is not None:
        config = deit_config(
            model_args.config_name,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            problem_type="single_label_classification",
        )
        size = config.image_size
        # DeiT's evaluation: shorter edge to size / 0.875 (bicubic), center crop to size. Saved with the model, so a
        # pipeline preprocesses as training evaluated.
        processor = DeiTImageProcessor(
            size={"shortest_edge": int(size / DEIT_EVAL_CROP_PCT)},
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


__all__ = ["build_classifier"]
