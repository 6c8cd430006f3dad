"""Training-time callback: a redundancy summary of the model logged at every evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .driver import analyze_model, check_positive_int, tensor_batches
from .redundancy import SUMMARY_METRICS

DEFAULT_CALLBACK_KEYS = (
    "patch_cos_last",
    "patch_abs_cos_last",
    "patch_input_cos_last",
    "attn_cos_block1",
    "attn_cos_mean",
    "qkv_cond_mean",
    "qkv_row_abs_cos_mean",
    "qkv_cond_gap_sum",
)


class RedundancyCallback(TrainerCallback):
    """Logs a redundancy summary of the model at every evaluation, on a fixed small set of images.

    Values are logged through `trainer.log` as `redundancy/<key>` (e.g. `redundancy/patch_cos_last`,
    `redundancy/attn_cos_block1`, `redundancy/qkv_cond_mean`), so they reach `log_history` and every `report_to`
    integration. Callbacks are not handed the trainer, so bind it with `attach`:

        RedundancyCallback(eval_dataset, num_images=64).attach(trainer)

    Args:
        images: `(n, C, H, W)` preprocessed pixel values, or a dataset/sequence whose items are dicts with a
            `pixel_values` tensor (e.g. an evaluation dataset with the eval transform set).
        num_images: how many of them to use (the first `num_images`, the same at every evaluation).
        batch_size: images per forward.
        keys: which summary keys to log (see `SUMMARY_METRICS`).
        prefix: prefix of the logged names.
    """

    def __init__(
        self,
        images: torch.Tensor | Sequence[dict[str, Any]],
        num_images: int = 32,
        batch_size: int = 32,
        keys: Sequence[str] = DEFAULT_CALLBACK_KEYS,
        prefix: str = "redundancy/",
    ) -> None:
        check_positive_int(num_images, "num_images")
        check_positive_int(batch_size, "batch_size")
        known = {m.key for m in SUMMARY_METRICS}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"Unknown summary keys {unknown}; choose from {sorted(known)}.")
        if len(images) == 0:
            raise ValueError("RedundancyCallback needs at least one image.")
        self.images = images
        self.num_images = num_images
        self.batch_size = batch_size
        self.keys = tuple(keys)
        self.prefix = prefix
        self.trainer: Any = None
        self._pixel_values: torch.Tensor | None = None

    def attach(self, trainer: Any) -> RedundancyCallback:
        """Bind the trainer whose `log` receives the values, and register this callback with it."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def pixel_values(self) -> torch.Tensor:
        """The fixed `(n, C, H, W)` images, gathered once."""
        if self._pixel_values is None:
            count = min(self.num_images, len(self.images))
            if isinstance(self.images, torch.Tensor):
                pixels = self.images[:count]
            else:
                pixels = torch.stack([self.images[i]["pixel_values"] for i in range(count)])
            self._pixel_values = pixels.detach().cpu()
        return self._pixel_values

    def compute(self, model: nn.Module) -> dict[str, float]:
        """The logged values for `model` (no gradient, eval mode, training mode restored)."""
        result = analyze_model(
            model, tensor_batches(self.pixel_values(), self.batch_size), name="training", progress=False
        )
        summary = result.summary()
        return {self.prefix + k: float(summary[k]) for k in self.keys if summary[k] is not None}

    def on_evaluate(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if self.trainer is None:
            raise RuntimeError(
                "RedundancyCallback is not bound to a trainer; register it with "
                "`RedundancyCallback(...).attach(trainer)` instead of `callbacks=[...]`/`add_callback`."
            )
        target = model if model is not None else self.trainer.model
        unwrapped = self.trainer.accelerator.unwrap_model(target)
        self.trainer.log(self.compute(unwrapped))
        return control
