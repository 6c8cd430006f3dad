"""`DiverseTrainingArguments` and `DiverseTrainer`: the Diverse-ViT objective on top of HF `Trainer`.

    L = L_cls_total + c_cos L_cos + c_con L_con + c_attn L_attn + c_w L_w

`compute_loss` returns a per-micro-batch mean and the class sets `loss_is_scaled_for_ga = False`, so the
Trainer divides it by the gradient-accumulation steps exactly once: updates match across accumulation
settings. Each term is accumulated on the device (no host sync per step) and averaged over the logging
window in `log`, next to `loss`, so it reaches `log_history`, TensorBoard and every `report_to` target.

With all coefficients 0, mixing off and the patch mixing loss off, `compute_loss` *is* the stock
`Trainer.compute_loss` (plain DeiT/ViT baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel
from torch import nn
from transformers import Trainer, TrainingArguments

from .configuration import DiversityConfig
from .mixing import PatchMixupCutmix, smoothed_one_hot
from .modeling import DiverseModelMixin, atomic_write_text
from .regularizers import (
    PowerIterationState,
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    soft_target_cross_entropy,
    weight_condition_loss,
)


@dataclass
class DiverseTrainingArguments(TrainingArguments, DiversityConfig):
    """`TrainingArguments` plus every option of the Diverse-ViT objective (see `DiversityConfig`).

    Defaults are the authors' released settings. Two stock defaults differ: `label_smoothing_factor` is 0.1
    (DeiT recipe, folded into the mixed soft targets) and `remove_unused_columns` is False (image datasets
    are transformed lazily and the raw `image` column must reach the transform).
    """

    label_smoothing_factor: float = field(
        default=0.1,
        metadata={"help": "Label smoothing applied to one-hot labels before Mixup/CutMix (DeiT recipe: 0.1)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop dataset columns the model's forward does not take. Keep False with lazy transforms."},
    )

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        self.validate_diversity()
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"`label_smoothing_factor` must lie in [0, 1), got {self.label_smoothing_factor}.")


def check_label_space(dataset: Any, num_labels: int) -> None:
    """Refuse a dataset whose `ClassLabel` has more classes than the model has outputs (checked once, up front,
    instead of per batch on the device)."""
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, ClassLabel) and feature.num_classes > num_labels:
            raise ValueError(
                f"The dataset's label column {name!r} has {feature.num_classes} classes but the model has "
                f"num_labels={num_labels}. Build the model with num_labels={feature.num_classes} (and id2label)."
            )


class DiverseTrainer(Trainer):
    """`Trainer` whose loss adds the three levels of diversity regularizers and patch-level mixing.

    Training batches are dicts with `pixel_values` `(B, C, H, W)` and `labels` `(B,)`; when mixing is on they
    are mixed here, on the device. Batches that were already mixed (e.g. by `PatchMixCollator`) carry soft
    `labels` `(B, C)` and `patch_labels` `(B, P, C)` and are used as they are. Evaluation batches are never
    mixed and their loss is the stock classification loss.
    """

    # compute_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: DiverseTrainingArguments | None = None, **kwargs: Any):
        if args is None:
            args = DiverseTrainingArguments(output_dir="diverse_vit_output")
        self.diversity = DiversityConfig.from_object(args)
        super().__init__(model=model, args=args, **kwargs)
        # The model's own loss kwargs (num_items_in_batch) would scale the loss for accumulation a second time.
        self.model_accepts_loss_kwargs = False
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not self.diversity.is_plain_baseline and not isinstance(unwrapped, DiverseModelMixin):
            raise TypeError(
                f"DiverseTrainer needs a DiverseViTForImageClassification or DiverseDeiTForImageClassification, got "
                f"{type(unwrapped).__name__}. Load the checkpoint with diverse_vit_hf.load_diverse_model(...), or set "
                "every coefficient to 0 with --no_mixing --no_patch_mixing_loss to train a plain model."
            )
        self.mixer = None
        if self.diversity.mixing_enabled:
            self.mixer = PatchMixupCutmix(
                num_classes=unwrapped.config.num_labels,
                patch_size=unwrapped.config.patch_size,
                mixup_alpha=args.mixup_alpha,
                cutmix_alpha=args.cutmix_alpha,
                switch_prob=args.mix_switch_prob,
                prob=args.mix_prob,
                label_smoothing=args.label_smoothing_factor,
            )
        for dataset in (self.train_dataset, self.eval_dataset):
            check_label_space(dataset, unwrapped.config.num_labels)
        self.power_state = PowerIterationState() if args.power_persistent else None
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    def _classification_targets(
        self, inputs: dict[str, Any], num_labels: int, num_patches: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return `(pixel_values, targets (B, C), patch_targets (B, P, C))` for a training batch."""
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if "patch_labels" in inputs:
            return pixel_values, labels, inputs["patch_labels"]
        if labels.is_floating_point():
            raise ValueError(
                "Soft `labels` need matching `patch_labels` (B, P, C); pass class indices and let DiverseTrainer mix, "
                "or use PatchMixCollator."
            )
        if self.mixer is not None:
            mixed = self.mixer(pixel_values, labels)
            return mixed.pixel_values, mixed.targets, mixed.patch_targets
        targets = smoothed_one_hot(labels, num_labels, self.args.label_smoothing_factor)
        return pixel_values, targets, targets.unsqueeze(1).expand(-1, num_patches, -1)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if self.diversity.is_plain_baseline or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

        cfg = self.diversity
        unwrapped: DiverseModelMixin = self.accelerator.unwrap_model(model)
        prefix = unwrapped.num_prefix_tokens
        pixel_values = inputs["pixel_values"]
        rows, cols = pixel_values.shape[-2:]
        patch = unwrapped.config.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
        num_patches = (rows // patch_h) * (cols // patch_w)
        pixel_values, targets, patch_targets = self._classification_targets(
            inputs, unwrapped.config.num_labels, num_patches
        )
        outputs = model(pixel_values=pixel_values, return_diversity_outputs=True)

        if cfg.patch_mixing_loss:
            loss_cls = patch_mixing_loss(outputs.token_logits, targets, patch_targets, prefix)
        else:
            loss_cls = soft_target_cross_entropy(outputs.logits, targets)
        terms = {"loss_cls": loss_cls}
        total = loss_cls
        if cfg.patch_cosine_coef > 0:
            terms["loss_patch_cosine"] = patch_cosine_loss(
                outputs.last_block_hidden_state, prefix, cfg.patch_cosine_variant
            )
            total = total + cfg.patch_cosine_coef * terms["loss_patch_cosine"]
        if cfg.patch_contrastive_coef > 0:
            terms["loss_patch_contrastive"] = patch_contrastive_loss(
                outputs.first_hidden_state, outputs.last_block_hidden_state, prefix, cfg.patch_contrastive_detach_first
            )
            total = total + cfg.patch_contrastive_coef * terms["loss_patch_contrastive"]
        if cfg.attention_cosine_coef > 0:
            terms["loss_attention_cosine"] = attention_cosine_loss(outputs.first_block_attention_probs)
            total = total + cfg.attention_cosine_coef * terms["loss_attention_cosine"]
        if cfg.weight_condition_coef > 0:
            terms["loss_weight_condition"] = weight_condition_loss(
                unwrapped.attention_projection_weights(),
                estimator=cfg.weight_estimator,
                num_iterations=cfg.power_iterations,
                state=self.power_state,
            )
            total = total + cfg.weight_condition_coef * terms["loss_weight_condition"]
        self._record_terms(terms)
        return (total, outputs) if return_outputs else total

    def _record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
        self._term_count += 1

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stock save, but the training arguments go to `training_args.json` (tokens redacted by
        `TrainingArguments.to_json_string`) instead of a pickled `training_args.bin`: model folders hold no pickle."""
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        atomic_write_text(folder / "training_args.json", self.args.to_json_string())
        (folder / "training_args.bin").unlink(missing_ok=True)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss term, averaged over the micro-batches since the last training log, then log."""
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update(zip(names, means.tolist(), strict=True))
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)


__all__ = ["DiverseTrainer", "DiverseTrainingArguments"]
