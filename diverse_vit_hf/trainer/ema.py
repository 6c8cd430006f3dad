"""Exponential moving average (EMA) of a model's weights, as DeiT's `--model-ema` (timm `ModelEma`), and the
`TrainerCallback` that updates it and keeps its state in checkpoints.

After every optimizer step: `shadow = decay * shadow + (1 - decay) * weight`, for every floating-point parameter and
buffer (integer buffers are copied). The shadow is kept in float32 whatever the training precision, because with
DeiT's decay 0.99996 the per-step change `(1 - decay) * (weight - shadow)` is far below bf16/fp16 resolution.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import TrainerCallback


class ModelEMA:
    """A float32 shadow copy of a model's parameters and buffers, updated as an exponential moving average.

    Args:
        model: the (unwrapped) model to track; the shadow starts as a copy of its current weights.
        decay: weight of the old average at each update, in [0, 1) (DeiT: 0.99996).
        device: where the shadow lives (default: next to each weight).
    """

    def __init__(self, model: nn.Module, decay: float = 0.99996, device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1) (DeiT uses 0.99996), got {decay}.")
        self.decay = float(decay)
        self.device = torch.device(device) if device is not None else None
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset(model)

    def _tracked(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # state_dict(keep_vars=False) returns detached tensors that share storage with the model.
        return dict(model.state_dict().items())

    def reset(self, model: nn.Module) -> None:
        """Restart the average from the model's current weights."""
        self.shadow = {
            name: value.detach().to(device=self.device or value.device, dtype=self._dtype(value), copy=True)
            for name, value in self._tracked(model).items()
        }

    @staticmethod
    def _dtype(value: torch.Tensor) -> torch.dtype:
        return torch.float32 if value.is_floating_point() else value.dtype

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the model's current weights: `shadow = decay * shadow + (1 - decay) * weight`."""
        current = self._tracked(model)
        missing = set(self.shadow) ^ set(current)
        if missing:
            raise ValueError(
                f"The model's weights do not match the EMA copy (differing names: {sorted(missing)[:5]}). Build the "
                "EMA from the model being trained."
            )
        floats = [name for name, value in self.shadow.items() if value.is_floating_point()]
        if floats:
            shadows = [self.shadow[name] for name in floats]
            weights = [current[name].to(device=self.shadow[name].device, dtype=torch.float32) for name in floats]
            # One fused kernel per device instead of a Python loop over ~150 tensors: lerp(w, 1 - decay) is the EMA.
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)
        for name, value in self.shadow.items():
            if not value.is_floating_point():
                value.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights, by the model's `state_dict` names (float32)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow weights (e.g. from a checkpoint); names and shapes must match."""
        if set(state) != set(self.shadow):
            differing = sorted(set(state) ^ set(self.shadow))
            raise ValueError(
                f"The saved EMA weights do not match the model (differing names: {differing[:5]}). Resume with the "
                "model the checkpoint was trained with."
            )
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(
                    f"The saved EMA weight {name} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(self.shadow[name].shape)}."
                )
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model` (cast to each weight's dtype)."""
        current = self._tracked(model)
        for name, value in self.shadow.items():
            current[name].copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate or save `model` with the EMA weights inside the `with` block; its own weights come back after
        (also on error). Holds one extra copy of the weights meanwhile."""
        current = self._tracked(model)
        backup = {name: value.detach().clone() for name, value in current.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    current[name].copy_(value)


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


__all__ = ["ModelEMA", "EMA_STATE_NAME", "ModelEMACallback"]
