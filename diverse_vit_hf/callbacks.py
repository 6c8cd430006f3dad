"""`TrainerCallback`s of `DiverseTrainer`: the model EMA (DeiT's `--model-ema`), which owns its state."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn
from transformers import TrainerCallback

from .ema import ModelEMA

logger = logging.getLogger(__name__)

EMA_STATE_NAME = "model_ema.safetensors"


class ModelEMACallback(TrainerCallback):
    """A float32 exponential moving average of the weights, updated right after every applied optimizer step
    (`on_optimizer_step` runs after `optimizer.step()`, before the gradients are zeroed). A step that the non-finite
    guard or the fp16 GradScaler skipped leaves it unchanged. Checkpoints carry it in `model_ema.safetensors`.

    Args:
        model: the unwrapped model to average (the shadow starts as a copy of its weights).
        decay: EMA decay per optimizer step (DeiT: 0.99996).
        step_was_skipped: tells whether the latest optimizer step changed nothing.

    Attributes:
        ema: the `ModelEMA`.
    """

    def __init__(self, model: nn.Module, decay: float, step_was_skipped: Callable[[], bool]) -> None:
        self.model = model
        self.ema = ModelEMA(model, decay=decay)
        self.step_was_skipped = step_was_skipped

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.step_was_skipped():
            self.ema.update(self.model)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the EMA into a checkpoint folder (safetensors, with its decay)."""
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.ema.state_dict().items()}
        metadata = {"decay": str(self.ema.decay)}
        safetensors.torch.save_file(tensors, str(Path(folder) / EMA_STATE_NAME), metadata=metadata)

    def load(self, checkpoint: str | os.PathLike) -> None:
        """Restore the EMA saved with a checkpoint; a checkpoint without one restarts it from the model's weights."""
        path = Path(checkpoint) / EMA_STATE_NAME
        if path.is_file():
            self.ema.load_state_dict(safetensors.torch.load_file(str(path), device="cpu"))
            return
        logger.warning(
            "%s has no %s (it was trained without --model_ema): the EMA restarts from the checkpoint's weights.",
            checkpoint,
            EMA_STATE_NAME,
        )
        self.ema.reset(self.model)


__all__ = ["EMA_STATE_NAME", "ModelEMACallback"]
