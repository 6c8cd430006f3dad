"""`DiverseTrainingArguments`: every `TrainingArguments` field, every option of the Diverse-ViT objective
(`DiversityConfig`) and the trainer's own (non-finite guard, EMA, repeated augmentation, output folder policy)."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ..losses.configuration import DiversityConfig
from .preemption import DEFAULT_STOP_SIGNALS, parse_stop_signals

logger = logging.getLogger(__name__)


def launched_without_accelerator() -> bool:
    """Whether this process is one of several started by a launcher (`torchrun`, `accelerate launch`) on a machine
    with no GPU or other accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


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
    max_consecutive_nonfinite: int = field(
        default=5,
        metadata={
            "help": "Non-finite guard: an optimizer step whose loss, any loss term or gradient is NaN/Inf is skipped "
            "(no parameter update), counted and logged (nonfinite_steps, nonfinite_<term>); after this many "
            "consecutive skipped steps training stops with an error, leaving the last checkpoint intact. 0 disables "
            "the guard (stock behaviour: the update is applied). Costs one device-to-host read per optimizer step."
        },
    )

    model_ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average (EMA) of the weights, updated after every applied optimizer "
            "step (DeiT --model-ema). With --model_ema_eval it is what evaluation and the final saved model use."
        },
    )
    model_ema_decay: float = field(
        default=0.99996,
        metadata={"help": "EMA decay per optimizer step, in [0, 1) (DeiT: 0.99996)."},
    )
    model_ema_eval: bool = field(
        default=True,
        metadata={
            "help": "With --model_ema: evaluate and save the final model with the EMA weights (checkpoints keep the "
            "raw weights for resuming, plus the EMA). --model_ema_eval false evaluates and saves the raw weights and "
            "only checkpoints the EMA. The paper reports the raw model."
        },
    )
    repeated_augmentations: int = field(
        default=1,
        metadata={
            "help": "DeiT repeated augmentation: each training image is used this many times per epoch, each copy "
            "augmented differently and sent to a different process, with the epoch kept as long as without "
            "repetition (DeiT: 3). 1 disables it. Needs a dataset with a length (not --streaming)."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new training in an --output_dir that already holds checkpoints or a saved model: its "
            "checkpoint-<step> folders are deleted first. Without it such a run is refused (resume it with "
            "--resume_from_checkpoint auto instead)."
        },
    )

    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "Allow --resume_from_checkpoint on a checkpoint that holds the weights but not the optimizer, "
            "learning-rate scheduler or random state (written with --save_only_model, or with those files lost). "
            "What is lost: AdamW's moments restart from zero, the learning-rate schedule restarts from its first "
            "step, and the data augmentation and mixing draws differ from the interrupted run's. Without it such a "
            "checkpoint is refused, naming what it lacks."
        },
    )
    stop_signals: str = field(
        default=DEFAULT_STOP_SIGNALS,
        metadata={
            "help": "Signals that end training gracefully, comma-separated: the optimizer step under way finishes, a "
            "complete checkpoint is written, and the example scripts exit with code 75 without evaluating or "
            "writing a final model (SLURM and Kubernetes send SIGTERM before a kill; SLURM's --signal=USR1@90 "
            "sends SIGUSR1). Rerun the same command with --resume_from_checkpoint auto to continue. Under several "
            "processes all stop after the same step. An empty string leaves the signals' default action (exit)."
        },
    )

    def __post_init__(self) -> None:
        if launched_without_accelerator() and not self.use_cpu:
            # Without this, TrainingArguments on a machine with no accelerator initialises the process group but not
            # DDP: every process would train its own model on all the data and write the same output folder.
            logger.warning(
                "Launched as %s processes on a machine without a GPU: training with DDP on the CPU (gloo), as with "
                "--use_cpu.",
                os.environ.get("WORLD_SIZE"),
            )
            self.use_cpu = True
        if self.data_seed is None:
            # DiverseTrainer seeds each process with seed + rank; the data order must stay the same on every process,
            # so the sampler gets its own seed (Accelerate would otherwise take it from the per-process RNG).
            self.data_seed = self.seed
        TrainingArguments.__post_init__(self)
        self.validate_diversity()
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"`label_smoothing_factor` must lie in [0, 1), got {self.label_smoothing_factor}.")
        if not isinstance(self.max_consecutive_nonfinite, int) or self.max_consecutive_nonfinite < 0:
            raise ValueError(
                "`max_consecutive_nonfinite` must be an integer >= 0 (0 disables the non-finite guard), got "
                f"{self.max_consecutive_nonfinite!r}."
            )
        parse_stop_signals(self.stop_signals)  # an unknown name fails here, not at the first signal
        if not 0.0 <= self.model_ema_decay < 1.0:
            raise ValueError(f"`model_ema_decay` must lie in [0, 1) (DeiT: 0.99996), got {self.model_ema_decay}.")
        if not isinstance(self.repeated_augmentations, int) or self.repeated_augmentations < 1:
            raise ValueError(
                f"`repeated_augmentations` must be an integer >= 1 (1 disables it, DeiT uses 3), got "
                f"{self.repeated_augmentations!r}."
            )

    def __getstate__(self) -> dict[str, Any]:
        """Pickles never carry Hub tokens: every `*_token` field is dropped. The stock Trainer pickles the arguments
        to `training_args.bin` (and uploads that file when pushing checkpoints to the Hub)."""
        state = self.__dict__.copy()
        for key in state:
            if key.endswith("_token"):
                state[key] = None
        return state

    def __copy__(self) -> DiverseTrainingArguments:
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)  # copies keep their token (only pickles drop it)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> DiverseTrainingArguments:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


__all__ = ["DiverseTrainingArguments", "launched_without_accelerator"]
