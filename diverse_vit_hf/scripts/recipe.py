"""The DeiT recipe's learning-rate arithmetic: linear scaling with the global batch and warm-up in epochs."""

from __future__ import annotations

import logging
import math
from typing import Any

from .arguments import RecipeArguments

logger = logging.getLogger(__name__)


def global_train_batch_size(training_args: Any) -> int:
    """Images per optimizer step over all processes."""
    return (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(training_args.world_size, 1)
    )


def update_steps_per_epoch(num_train_images: int, training_args: Any) -> int:
    """Optimizer steps per epoch, as the Trainer counts them: each process reads ceil(n / processes) images in batches
    of per_device_train_batch_size (the last one partial unless --dataloader_drop_last), and a partial accumulation
    window at the end of the epoch still makes a step."""
    per_process = math.ceil(num_train_images / max(training_args.world_size, 1))
    batch = training_args.per_device_train_batch_size
    batches = per_process // batch if training_args.dataloader_drop_last else math.ceil(per_process / batch)
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def apply_recipe(recipe_args: RecipeArguments, training_args: Any, num_train_images: int) -> None:
    """Apply `--scale_lr` and `--warmup_epochs` to the training arguments (in place), with a log line each."""
    if recipe_args.warmup_epochs < 0 or not math.isfinite(recipe_args.warmup_epochs):
        raise ValueError(f"--warmup_epochs must be a finite number >= 0 (paper: 5), got {recipe_args.warmup_epochs}.")
    if recipe_args.scale_lr:
        global_batch = global_train_batch_size(training_args)
        base = training_args.learning_rate
        training_args.learning_rate = base * global_batch / 512
        logger.info(
            "--scale_lr: learning rate %g x global batch %d / 512 = %g", base, global_batch, training_args.learning_rate
        )
    if recipe_args.warmup_epochs > 0:
        steps_per_epoch = update_steps_per_epoch(num_train_images, training_args)
        # At least one step: TrainingArguments reads a warmup_steps below 1 as a fraction of the training.
        warmup = max(round(recipe_args.warmup_epochs * steps_per_epoch), 1)
        logger.info(
            "--warmup_epochs %g: %d warm-up steps (%d optimizer steps per epoch; replaces --warmup_steps %g)",
            recipe_args.warmup_epochs,
            warmup,
            steps_per_epoch,
            training_args.warmup_steps,
        )
        training_args.warmup_steps = warmup


__all__ = ["apply_recipe", "global_train_batch_size", "update_steps_per_epoch"]
