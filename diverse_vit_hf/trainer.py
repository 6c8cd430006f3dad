"""`DiverseTrainingArguments` and `DiverseTrainer`: the Diverse-ViT objective on top of HF `Trainer`.

    L = L_cls_total + c_cos L_cos + c_con L_con + c_attn L_attn + c_w L_w

`compute_loss` returns a per-micro-batch mean and the class sets `loss_is_scaled_for_ga = False`, so the
Trainer divides it by the gradient-accumulation steps exactly once: updates match across accumulation
settings. Each term is accumulated on the device (no host sync per step) and averaged over the logging
window in `log`, next to `loss`, so it reaches `log_history`, TensorBoard and every `report_to` target.

With all coefficients 0, mixing off and the patch mixing loss off, `compute_loss` *is* the stock
`Trainer.compute_loss` (plain DeiT/ViT baseline).

Failure handling (what the stock `Trainer` 5.23 does not do):

- **Non-finite guard** (`--max_consecutive_nonfinite`, default 5; 0 = off). The loss, every loss term and (without a
  GradScaler) the gradient norm of each optimizer step are checked with one fused `torch.isfinite(...).all()` read
  *per optimizer step*, after the window's last backward. A bad step is skipped: its gradients are dropped, so the
  optimizer changes no parameter and no moment (the step still counts: `global_step` and the LR schedule advance).
  It is counted (`nonfinite_steps`, `nonfinite_<term>` in the logs); after N consecutive bad steps training stops
  with `NonFiniteLossError`, before anything is saved, so the last checkpoint is the last good one. The read is a
  host-device sync, the price of detecting the bad step before the update (the stock `logging_nan_inf_filter`
  already reads the loss of every micro-batch).
- **Atomic checkpoints.** `checkpoint-<step>` is written into a hidden staging folder, flushed to disk, then renamed
  into place: a crash (exception, kill, full disk) while saving never leaves a partial checkpoint that
  `get_last_checkpoint` / `--resume_from_checkpoint last` would pick. The final model files are written to a hidden
  temporary folder and moved into `output_dir` one complete file at a time. An `OSError` while saving (e.g. disk full)
  becomes a `CheckpointSaveError` that says what happened and where.
- **Resume.** `resume_from_checkpoint="last"` (or True) takes the newest complete checkpoint, with a clear error if
  there is none. Weights are restored through `from_pretrained` (stock Trainer 5.23 calls `load_state_dict` on the
  saved 4.x-style key names and silently restores only the embeddings and the head of a ViT), after checking that the
  checkpoint's architecture matches the model's. The persistent power-iteration state and the model EMA are
  checkpointed too.
- **Model EMA** (`--model_ema`, DeiT's `--model-ema`): a float32 exponential moving average of the weights, updated
  after every optimizer step that was applied (a step skipped by the non-finite guard or by the fp16 GradScaler leaves
  it unchanged). With `--model_ema_eval` (default when the EMA is on) `evaluate` and the final `save_model` use the EMA
  weights; checkpoints keep the raw weights for resuming plus the EMA in `model_ema.safetensors`, restored on resume.
- **Weight decay** spares biases, every norm weight, the position embeddings and the CLS / distillation / mask tokens
  (DeiT/timm), not only biases and LayerNorms as the stock `Trainer` does.
- **Throughput**: each training log carries `images_per_second`, the training images (all processes) of the logging
  window over its wall time, evaluation and checkpoint saving left out.
- **No pickles, no tokens.** Model folders get `training_args.json` (tokens redacted) instead of `training_args.bin`;
  pickles of `DiverseTrainingArguments` (which the stock Trainer still writes when pushing checkpoints to the Hub)
  carry no Hub token.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length, rotate_checkpoints

from .configuration import DiversityConfig
from .distributed import check_weight_regularizer_supported
from .ema import ModelEMA
from .fileio import atomic_write_text, fsync_path, fsync_tree
from .mixing import PatchMixupCutmix
from .modeling import DiverseModelMixin
from .objective import DiversityObjective
from .optim import NO_DECAY_PARAMETER_NAMES, no_weight_decay_parameter_names
from .regularizers import PowerIterationState
from .sampling import RepeatedAugmentationSampler

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
POWER_STATE_NAME = "power_iteration_state.safetensors"
EMA_STATE_NAME = "model_ema.safetensors"
# Config fields that fix the parameter shapes (num_labels is derived from id2label).
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "num_labels",
)


class NonFiniteLossError(RuntimeError):
    """Training stopped after `max_consecutive_nonfinite` consecutive optimizer steps with NaN/Inf values."""


class CheckpointSaveError(OSError):
    """A checkpoint or the final model could not be written (disk full, permissions, ...). Nothing half-written is
    left where a loader would pick it up."""


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
            "--resume_from_checkpoint last instead)."
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


def check_label_space(dataset: Any, num_labels: int) -> None:
    """Refuse a dataset whose `ClassLabel` has more classes than the model has outputs (checked once, up front,
    instead of per batch on the device)."""
    features = getattr(dataset, "features", None) or {}
    if not features:
        return
    # Only a `datasets` object has features: imported here, the trainer also runs without `datasets` installed
    # (plain torch datasets, the benchmarks on a machine without it).
    from datasets import ClassLabel

    for name, feature in features.items():
        if isinstance(feature, ClassLabel) and feature.num_classes > num_labels:
            raise ValueError(
                f"The dataset's label column {name!r} has {feature.num_classes} classes but the model has "
                f"num_labels={num_labels}. Build the model with num_labels={feature.num_classes} (and id2label)."
            )


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: None (start fresh), `"last"`/True (newest `checkpoint-<step>` in
    `output_dir`) or a path. Raises `ValueError` saying what to do when there is nothing to resume from."""
    if value is None or value is False or (isinstance(value, str) and not value.strip()):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint last: there is no {PREFIX_CHECKPOINT_DIR}-<step> folder in {output_dir}. "
                "Drop the flag to start a new training, or pass the path of a checkpoint folder."
            )
        return last
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise ValueError(
            f"--resume_from_checkpoint {path}: no such folder. Pass a {PREFIX_CHECKPOINT_DIR}-<step> folder written "
            "by the Trainer, or 'last' for the newest one in --output_dir."
        )
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise ValueError(
            f"--resume_from_checkpoint {path}: this folder is not a complete Trainer checkpoint (it has no "
            f"{TRAINER_STATE_NAME}). Pass a {PREFIX_CHECKPOINT_DIR}-<step> folder, or 'last'."
        )
    return path


def launched_without_accelerator() -> bool:
    """Whether this process is one of several started by a launcher (`torchrun`, `accelerate launch`) on a machine
    with no GPU or other accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def _model_files(folder: Path) -> list[str]:
    """What a training run in `folder` would replace: checkpoints and a saved model."""
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    found += [name for name in ("config.json", "model.safetensors", TRAINER_STATE_NAME) if (folder / name).is_file()]
    return found


def check_output_dir(output_dir: str | os.PathLike, resume_from: str | None, overwrite: bool = False) -> None:
    """Refuse to start a new training in a folder holding checkpoints or a saved model (its checkpoints of the same
    steps and its model would be silently replaced). With `overwrite`, the old `checkpoint-<step>` folders are
    deleted (by the main process) so that `--resume_from_checkpoint last` can only find the new run's checkpoints.

    Call it on every process before training; `resume_from` is the resolved checkpoint (None: a new training).
    """
    folder = Path(output_dir)
    found = _model_files(folder)
    if resume_from is not None or not found:
        return
    if not overwrite:
        listed = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise ValueError(
            f"--output_dir {folder} already holds a training ({listed}). Continue it with --resume_from_checkpoint "
            "last, choose another --output_dir, or pass --overwrite_output_dir to start over (its checkpoints are "
            "deleted)."
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for name in found:
            if name.startswith(PREFIX_CHECKPOINT_DIR):
                shutil.rmtree(folder / name)
        logger.warning("--overwrite_output_dir: starting over in %s (deleted its checkpoints).", folder)


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    values = {key: config.get(key) for key in ARCHITECTURE_KEYS if key != "num_labels"}
    for key in ("image_size", "patch_size"):
        if isinstance(values[key], (list, tuple)):
            values[key] = list(values[key])
    labels = config.get("id2label")
    values["num_labels"] = len(labels) if labels else config.get("num_labels")
    return values


def check_checkpoint_architecture(checkpoint: str | os.PathLike, config: PretrainedConfig) -> None:
    """Refuse to resume from a checkpoint whose `config.json` describes other parameter shapes than `config`,
    naming every differing field (instead of a torch size-mismatch traceback, or a silent partial load)."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return
    saved = _architecture(json.loads(path.read_text(encoding="utf-8")))
    current = _architecture(config.to_dict())
    differences = [
        f"{key}: checkpoint {saved[key]!r}, model {current[key]!r}"
        for key in ARCHITECTURE_KEYS
        if saved[key] is not None and current[key] is not None and saved[key] != current[key]
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was saved from a different architecture than the model being "
            f"trained ({'; '.join(differences)}). Build the model with the checkpoint's settings (the same --model or "
            "--hidden_size/--num_hidden_layers/... flags), or train into a new --output_dir instead of resuming."
        )


def drop_gradients(parameters: Iterable[nn.Parameter], scaler: Any | None = None) -> None:
    """Discard the accumulated gradients so that the coming optimizer step changes nothing.

    torch optimizers skip parameters whose `.grad` is None: no update, no weight decay, no moment update. A
    `GradScaler` asserts that it saw at least one gradient, so with an enabled scaler one gradient is set to NaN
    instead: the scaler then skips the step itself (and backs off its scale, its usual reaction to non-finite values).
    """
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    for parameter in trainable:
        parameter.grad = None
    if scaler is not None and trainable and (not hasattr(scaler, "is_enabled") or scaler.is_enabled()):
        trainable[0].grad = torch.full_like(trainable[0], float("nan"))


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors, on the first tensor's device (non-finite as soon as one element is)."""
    device = tensors[0].device
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))


def _publish_folder(staged: Path, final: Path) -> None:
    """Give a completely written folder its final name with one rename, so no reader ever sees it half-written. A
    folder already there (the same step saved again after a resume) is renamed aside first, then deleted."""
    fsync_tree(staged)
    replaced = None
    if final.exists():
        replaced = final.parent / f".{final.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staged, final)
    fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _merge_folder(staged: Path, final: Path) -> None:
    """Move the files of `staged` into `final` (per-process files such as `rng_state_<rank>.pth` on a machine that
    does not share the main process's file system)."""
    final.mkdir(parents=True, exist_ok=True)
    for entry in staged.iterdir():
        os.replace(entry, final / entry.name)


def save_error(error: OSError, what: str, folder: str | os.PathLike, left: str) -> CheckpointSaveError:
    """A `CheckpointSaveError` saying what could not be written, where, why, what is left and what to do."""
    if error.errno == errno.ENOSPC:
        reason = "the disk is full (no space left on device)"
    elif error.errno == getattr(errno, "EDQUOT", None):
        reason = "the disk quota is exceeded"
    else:
        reason = error.strerror or str(error)
    return CheckpointSaveError(
        error.errno,
        f"Could not save {what} to {folder}: {reason} ({type(error).__name__}: {error}). {left} Free some space (or "
        "lower --save_total_limit, or pass --save_only_model) or choose another --output_dir, then resume with "
        "--resume_from_checkpoint last.",
    )


class _ModelEMACallback(TrainerCallback):
    """Updates the trainer's EMA right after each optimizer step (`on_optimizer_step` runs after `optimizer.step()`,
    before the gradients are zeroed)."""

    def __init__(self, trainer: DiverseTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._update_ema()


class DiverseTrainer(Trainer):
    """`Trainer` whose loss adds the three levels of diversity regularizers and patch-level mixing.

    Training batches are dicts with `pixel_values` `(B, C, H, W)` and `labels` `(B,)`; when mixing is on they
    are mixed here, on the device. Batches that were already mixed (e.g. by `PatchMixCollator`) carry soft
    `labels` `(B, C)` and `patch_labels` `(B, P, C)` and are used as they are. Evaluation batches are never
    mixed and their loss is the stock classification loss.

    See the module docstring for what it does on non-finite losses, crashes while saving, and resuming.

    Attributes:
        ema: the `ModelEMA` of the weights with `--model_ema`, else None.
        nonfinite_steps: optimizer steps skipped by the non-finite guard since this trainer was created.
        nonfinite_terms: how often each value was non-finite in a skipped step (`loss_<term>`, `loss` for the
            total, `grad_norm` for gradients that were non-finite while every loss term was finite).
    """

    # compute_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: DiverseTrainingArguments | None = None, **kwargs: Any):
        if args is None:
            args = DiverseTrainingArguments(output_dir="diverse_vit_output")
        self.diversity = DiversityConfig.from_object(args)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size != launched:
            raise RuntimeError(
                f"{launched} processes were launched, but the training arguments set up {args.world_size}: each "
                "process would train its own model on all the data and write the same output folder. On a machine "
                "without a GPU pass --use_cpu (DDP over gloo); otherwise check the launcher's settings."
            )
        super().__init__(model=model, args=args, **kwargs)
        # The stock Trainer seeds every process with the same seed, so under DDP all ranks would draw the same
        # Mixup/CutMix choice, lambda and box, drop-path masks and augmentations. DeiT seeds each process with
        # seed + rank; the data order stays shared through `data_seed` (set by DiverseTrainingArguments).
        set_seed(args.seed + args.process_index)
        self.card_inputs: Any = None  # a `hub.CardInputs` for the model card written with the final model
        # FSDP / ZeRO-3 shard Q, K, V outside the forward: refuse the weight-level regularizer there (distributed.py).
        check_weight_regularizer_supported(self.model, self.diversity.weight_condition_coef, self.accelerator)
        # The model's own loss kwargs (num_items_in_batch) would scale the loss for accumulation a second time.
        self.model_accepts_loss_kwargs = False
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not self.diversity.is_plain_baseline and not isinstance(unwrapped, DiverseModelMixin):
            raise TypeError(
                f"DiverseTrainer needs a DiverseViTForImageClassification or DiverseDeiTForImageClassification, got "
                f"{type(unwrapped).__name__}. Load the checkpoint with diverse_vit_hf.load_diverse_model(...), or set "
                "every coefficient to 0 with --no_mixing --no_patch_mixing_loss to train a plain model."
            )
        if self.diversity.needs_diversity_outputs:
            # Switch block 1 to its eager kernel now rather than in the first diversified forward: under
            # --torch_compile that forward is traced, and set_attn_implementation (it reads source code) would break
            # the graph there.
            unwrapped.install_block1_attention_capture()
        self.objective = DiversityObjective(
            self.diversity,
            num_labels=unwrapped.config.num_labels,
            patch_size=unwrapped.config.patch_size,
            label_smoothing=args.label_smoothing_factor,
        )
        if self.objective.mixer is not None and args.per_device_train_batch_size < 2:
            raise ValueError(
                "Mixup/CutMix needs at least 2 images per batch (each image is mixed with another one), but "
                f"--per_device_train_batch_size is {args.per_device_train_batch_size}. Increase the per-device "
                "batch size, or pass --no_mixing."
            )
        for dataset in (self.train_dataset, self.eval_dataset):
            check_label_space(dataset, unwrapped.config.num_labels)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        # Non-finite guard: the current accumulation window's values wait in _window_sums until the window's last
        # micro-batch has been checked; only then do they join the logged sums.
        self.max_consecutive_nonfinite = int(getattr(args, "max_consecutive_nonfinite", 5))
        self._guard_enabled = self.max_consecutive_nonfinite > 0
        if self._guard_enabled and self.is_deepspeed_enabled:
            logger.warning(
                "The non-finite guard cannot skip DeepSpeed optimizer steps (the engine keeps its own gradients); it "
                "is off. DeepSpeed's fp16 loss scaler still skips overflowing steps."
            )
            self._guard_enabled = False
        self._in_training_step = False
        self._window_sums: dict[str, torch.Tensor] = {}
        self._window_count = 0
        self._consecutive_nonfinite = 0
        self.nonfinite_steps = 0
        self.nonfinite_terms: Counter[str] = Counter()
        self._checkpoint_staging_root: str | None = None
        self._last_step_skipped = False
        # Throughput of the logging window: training images seen and wall time outside evaluation/saving.
        self._window_images = 0
        self._window_start = time.perf_counter()
        self._window_excluded = 0.0
        self.ema: ModelEMA | None = None
        self._ema_eval = bool(getattr(args, "model_ema_eval", True))
        if getattr(args, "model_ema", False):
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(
                    "--model_ema needs the full weights on every process; it does not support DeepSpeed or FSDP "
                    "(sharded parameters). Use DDP (plain `accelerate launch` / `torchrun`) or drop --model_ema."
                )
            self.ema = ModelEMA(unwrapped, decay=args.model_ema_decay)
            self.add_callback(_ModelEMACallback(self))

    # ---- Optimizer ------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """The stock sampler, or DeiT's repeated-augmentation sampler with `--repeated_augmentations > 1`."""
        if self.args.repeated_augmentations <= 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not has_length(dataset):
            raise ValueError(
                "--repeated_augmentations needs a training dataset with a length; a streamed dataset has none. "
                "Drop --streaming or use --repeated_augmentations 1."
            )
        return RepeatedAugmentationSampler(
            len(dataset),
            num_repeats=self.args.repeated_augmentations,
            num_replicas=self.args.world_size,
            batch_size=self.args.per_device_train_batch_size,
            seed=self.args.seed,
        )

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters AdamW decays: the stock rule (no biases, no LayerNorm weights) minus every other
        norm weight, the position embeddings and the CLS / distillation / mask tokens, as in DeiT/timm
        (`optim.no_weight_decay_parameter_names`)."""
        excluded = no_weight_decay_parameter_names(model)
        return [name for name in super().get_decay_parameter_names(model) if name not in excluded]

    # ---- Model EMA ------------------------------------------------------------------------------------------------

    def _update_ema(self) -> None:
        """One EMA step after an applied optimizer step; a step the guard or the GradScaler skipped changes nothing."""
        if self.ema is None:
            return
        if self._last_step_skipped or self.accelerator.optimizer_step_was_skipped:
            return
        self.ema.update(self.accelerator.unwrap_model(self.model))

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Stock `evaluate`, on the EMA weights with `--model_ema` (and `--model_ema_eval`)."""
        started = time.perf_counter()
        try:
            if self.ema is None or not self._ema_eval:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            with self.ema.swapped_into(self.accelerator.unwrap_model(self.model)):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._window_excluded += time.perf_counter() - started

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Stock `save_model`; with `--model_ema` (and `--model_ema_eval`) the final model is saved with the EMA
        weights. Checkpoints (`_internal_call`) keep the raw weights, which resuming needs, and the EMA beside them."""
        if self.ema is None or not self._ema_eval or _internal_call:
            return super().save_model(output_dir, _internal_call)
        with self.ema.swapped_into(self.accelerator.unwrap_model(self.model)):
            return super().save_model(output_dir, _internal_call)

    def create_model_card(self, finetuned_from: str | None = None, dataset: str | None = None, **kwargs: Any) -> None:
        """Write the project's model card (`README.md`: coefficients, recipe, evaluation results as model-index,
        base model, dataset, redundancy summary and plots when `redundancy.json` is there) into `output_dir`, from
        what the saved model folder holds and `self.card_inputs`. Replaces the stock Trainer card, so
        `push_to_hub` publishes this one. Other stock arguments (`language`, `tags`, ...) are not used."""
        if not self.is_world_process_zero():
            return
        from dataclasses import replace

        from .hub import CardInputs, card_from_folder, save_model_card

        inputs = self.card_inputs if self.card_inputs is not None else CardInputs()
        overrides = {"base_model": finetuned_from, "dataset_name": dataset}
        inputs = replace(inputs, **{key: value for key, value in overrides.items() if value is not None})
        repo_id = self.args.hub_model_id if self.args.hub_model_id and "/" in self.args.hub_model_id else None
        card = card_from_folder(self.args.output_dir, repo_id=repo_id, inputs=inputs)
        save_model_card(card, self.args.output_dir, token=self.args.hub_token)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any) -> Any:
        """Save the final model, write the project's card (`create_model_card`) and upload the model folder in one
        commit with `hub.push_model_folder` (weights, configs, card, redundancy files; no checkpoints, optimizer
        states or pickles) to `--hub_model_id` (`namespace/name`). Returns the `CommitInfo` (None on other
        processes)."""
        from .hub import push_model_folder

        if self.hub_model_id is None:  # called with --push_to_hub off: create the repository as the stock one does
            self.init_hf_repo(token=kwargs.get("token"), private=kwargs.get("private"))
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**{k: kwargs[k] for k in ("finetuned_from", "dataset") if k in kwargs})
        return push_model_folder(
            self.args.output_dir,
            repo_id=self.hub_model_id,
            token=kwargs.get("token") or self.args.hub_token,
            commit_message=commit_message or "Upload Diverse-ViT model",
            revision=kwargs.get("revision") or getattr(self.args, "hub_revision", None),
            create_repo=False,
        )

    def _save_ema_state(self, folder: Path) -> None:
        if self.ema is None:
            return
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.ema.state_dict().items()}
        safetensors.torch.save_file(tensors, str(folder / EMA_STATE_NAME), metadata={"decay": str(self.ema.decay)})

    def _load_ema_state(self, checkpoint: str | os.PathLike) -> None:
        """Restore the EMA saved with a checkpoint; a checkpoint without one restarts the EMA from its weights."""
        if self.ema is None:
            return
        path = Path(checkpoint) / EMA_STATE_NAME
        if path.is_file():
            self.ema.load_state_dict(safetensors.torch.load_file(str(path), device="cpu"))
        else:
            logger.warning(
                "%s has no %s (it was trained without --model_ema): the EMA restarts from the checkpoint's weights.",
                checkpoint,
                EMA_STATE_NAME,
            )
            self.ema.reset(self.accelerator.unwrap_model(self.model))

    @property
    def mixer(self) -> PatchMixupCutmix | None:
        """The objective's batch Mixup/CutMix (None when mixing is off)."""
        return self.objective.mixer

    @property
    def power_state(self) -> PowerIterationState | None:
        """The objective's persistent power-iteration vectors (checkpointed with the training state)."""
        return self.objective.power_state

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """`DiversityObjective` on training batches; the stock loss for evaluation and for the plain baseline."""
        if self.diversity.is_plain_baseline or not model.training:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
            if model.training:
                self._record_total(result[0] if return_outputs else result)
            return result
        result = self.objective(model, inputs, unwrapped_model=self.accelerator.unwrap_model(model))
        self._record_total(result.loss)
        self._record_terms(result.terms)
        return (result.loss, result.outputs) if return_outputs else result.loss

    def _record_total(self, total: torch.Tensor) -> None:
        """Keep the total loss of a guarded micro-batch for the window's finite check (no host sync)."""
        if self._in_training_step:
            value = total.detach().float().reshape(())
            self._window_sums["loss"] = self._window_sums["loss"] + value if "loss" in self._window_sums else value

    def _record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        # Under the guard, a micro-batch's terms wait in the window sums until the window is known to be finite.
        guarded = self._in_training_step
        sums = self._window_sums if guarded else self._term_sums
        for name, value in terms.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
        if guarded:
            self._window_count += 1
        else:
            self._term_count += 1

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Stock forward + backward; after the last micro-batch of an accumulation window, the non-finite guard.

        A bad micro-batch is back-propagated like the others (its NaN gradients are dropped with the whole window),
        which keeps every process in step under DDP and needs no host read per micro-batch.
        """
        pixel_values = inputs.get("pixel_values") if isinstance(inputs, dict) else None
        if pixel_values is not None:
            self._window_images += int(pixel_values.shape[0])  # shape metadata: no device sync
        self._last_step_skipped = False
        if not self._guard_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        self._in_training_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        if self.accelerator.sync_gradients:  # the Trainer sets it on the window's last micro-batch
            self._finish_window(model)
        return loss

    def _finish_window(self, model: nn.Module) -> None:
        """Check the window's loss, terms and gradients; skip the optimizer step when any is NaN/Inf."""
        names = sorted(self._window_sums)
        values = [self._window_sums[name] for name in names]
        window_terms = {name: value for name, value in self._window_sums.items() if name != "loss"}
        window_count = self._window_count
        self._window_sums, self._window_count = {}, 0
        # With a GradScaler, inf gradients are the scaler's business (it skips the step and lowers the scale).
        if self.accelerator.scaler is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                names.append("grad_norm")
                values.append(_total_norm(grads))
        if not values:
            return
        device = self.args.device
        finite = torch.isfinite(torch.stack([value.reshape(()).to(device) for value in values]))
        all_finite = finite.all()
        if self.accelerator.num_processes > 1:  # every process must take the same decision
            all_finite = self.accelerator.reduce(all_finite.float(), reduction="sum") == self.accelerator.num_processes
        if bool(all_finite):  # the guard's single device-to-host read per optimizer step
            for name, value in window_terms.items():
                self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
            self._term_count += window_count
            self._consecutive_nonfinite = 0
            return

        bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]
        # Name the most specific culprits: a bad term makes the total and the gradients bad too.
        reported = [n for n in bad if n not in ("loss", "grad_norm")] or bad[:1] or ["values on another process"]
        drop_gradients(model.parameters(), self.accelerator.scaler)
        self._last_step_skipped = True  # the EMA must not move either
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        self.nonfinite_terms.update(reported)
        step = self.state.global_step + 1
        logger.warning(
            "Optimizer step %d skipped (no parameter update): non-finite %s. %d consecutive, %d in total.",
            step,
            ", ".join(reported),
            self._consecutive_nonfinite,
            self.nonfinite_steps,
        )
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"Training stopped at optimizer step {step}: the last {self._consecutive_nonfinite} steps all had "
                f"non-finite values (last: {', '.join(reported)}) and were skipped without changing the model "
                f"(--max_consecutive_nonfinite {self.max_consecutive_nonfinite}). The model still holds the weights "
                f"of the last good step and the checkpoints in {self.args.output_dir} are intact. Check the data for "
                "NaN/Inf pixels, lower the learning rate or the regularizer coefficients (or use --weight_estimator "
                "exact), then resume with --resume_from_checkpoint last."
            )

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """Stock `train`, where `resume_from_checkpoint` may also be `"last"` (= True: the newest checkpoint in
        `output_dir`); a missing or incomplete checkpoint gives a clear `ValueError` before anything starts."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._consecutive_nonfinite = 0
        self._window_images, self._window_start, self._window_excluded = 0, time.perf_counter(), 0.0
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    # ---- Saving ---------------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the stock `_save_checkpoint` writes into the staging folder.
        if self._checkpoint_staging_root is not None:
            return self._checkpoint_staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Stock checkpoint (weights, optimizer, scheduler, RNG, trainer state), written into a hidden staging folder
        and renamed to `checkpoint-<step>` only once complete; then the stock rotation (`save_total_limit`)."""
        started = time.perf_counter()
        try:
            self._save_checkpoint_atomically(model, trial)
        finally:
            self._window_excluded += time.perf_counter() - started

    def _save_checkpoint_atomically(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = run_dir / name
        staging_root = run_dir / f".{name}.saving"  # hidden: neither the checkpoint glob nor its regex matches it
        staged = staging_root / name
        if self.args.should_save:
            for leftover in run_dir.glob(f".{PREFIX_CHECKPOINT_DIR}-*.saving"):  # from a process killed mid-save
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        push_to_hub = self.args.push_to_hub
        self._checkpoint_staging_root = str(staging_root)
        self.args.push_to_hub = False  # pushed below, from the published folder (uploads run in the background)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                self._save_power_state(staged)
                self._save_ema_state(staged)
                if self.state.best_model_checkpoint is not None and Path(self.state.best_model_checkpoint) == staged:
                    self.state.best_model_checkpoint = str(final)
                    self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                _publish_folder(staged, final)
            self.accelerator.wait_for_everyone()
            if staged.is_dir():  # files of a process that does not share the main process's file system
                _merge_folder(staged, final)
        except OSError as error:
            raise save_error(
                error,
                f"checkpoint {name}",
                run_dir,
                f"Nothing was left half-written: the earlier checkpoints in {run_dir} are untouched.",
            ) from error
        finally:
            self._checkpoint_staging_root = None
            self.args.push_to_hub = push_to_hub
            shutil.rmtree(staging_root, ignore_errors=True)
        if push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_power_state(self, folder: Path) -> None:
        """The persistent power-iteration vectors belong to the training state: checkpoint them (safetensors)."""
        state = self.power_state
        if state is None or state.max_vectors is None or state.min_vectors is None:
            return
        tensors = {"max_vectors": state.max_vectors.detach().cpu(), "min_vectors": state.min_vectors.detach().cpu()}
        safetensors.torch.save_file(tensors, str(folder / POWER_STATE_NAME))

    def _write_training_args(self, folder: Path) -> None:
        atomic_write_text(folder / "training_args.json", self.args.to_json_string())
        (folder / "training_args.bin").unlink(missing_ok=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stock save, but the training arguments go to `training_args.json` (tokens redacted by
        `TrainingArguments.to_json_string`) instead of a pickled `training_args.bin`: model folders hold no pickle.

        Outside a checkpoint (which is published as a whole), the files are written into a hidden temporary folder
        and each moved into `output_dir` once complete, so a crash never leaves a truncated weight file there.
        """
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self._checkpoint_staging_root is not None or not self.args.should_save:
            super()._save(str(folder), state_dict)
            if self.args.should_save:
                self._write_training_args(folder)
            return
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".saving-*"):  # from a process killed mid-save
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
        try:
            super()._save(str(staging), state_dict)
            self._write_training_args(staging)
            fsync_tree(staging)
            for entry in sorted(staging.iterdir()):
                target = folder / entry.name
                if entry.is_dir() and target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
            fsync_path(folder)
        except OSError as error:
            raise save_error(
                error,
                "the model",
                folder,
                f"The files already in {folder} were left as they were (no partial file was moved there).",
            ) from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ---- Loading --------------------------------------------------------------------------------------------------

    def _loads_plain_weights(self, model: nn.Module, checkpoint: str) -> bool:
        """Whether `checkpoint` is restored by `_load_converted_weights` (plain single-device/DDP safetensors)."""
        special = self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False)
        has_safetensors = any(
            os.path.isfile(os.path.join(checkpoint, name))
            for name in ("model.safetensors", "model.safetensors.index.json")
        )
        return isinstance(model, PreTrainedModel) and not special and has_safetensors

    def _load_converted_weights(self, model: PreTrainedModel, checkpoint: str) -> None:
        """Load a saved checkpoint's weights into `model` through `from_pretrained`, which maps the 4.x-style key
        names `save_pretrained` writes back to the 5.x module names (the stock Trainer's `load_state_dict` does not:
        transformers PR #48822), then copy them strictly: every parameter restored, every shape checked."""
        loaded = type(model).from_pretrained(checkpoint, use_safetensors=True, local_files_only=True)
        source, target = loaded.state_dict(), model.state_dict()
        mismatched = [
            f"{key}: checkpoint {tuple(source[key].shape)}, model {tuple(value.shape)}"
            for key, value in target.items()
            if key in source and source[key].shape != value.shape
        ]
        if mismatched:
            raise ValueError(
                f"Cannot resume from {checkpoint}: its weights have other shapes than the model being trained "
                f"({'; '.join(mismatched[:5])}). Build the model with the checkpoint's settings, or train into a new "
                "--output_dir instead of resuming."
            )
        model.load_state_dict(source, strict=True)
        del loaded, source

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        config = getattr(unwrapped, "config", None)
        if isinstance(config, PretrainedConfig):
            check_checkpoint_architecture(resume_from_checkpoint, config)
        if self._loads_plain_weights(unwrapped, resume_from_checkpoint):
            logger.info("Loading model from %s.", resume_from_checkpoint)
            self._load_converted_weights(unwrapped, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        power_file = Path(resume_from_checkpoint) / POWER_STATE_NAME
        if self.power_state is not None and power_file.is_file():
            self.power_state.load_state_dict(safetensors.torch.load_file(str(power_file), device=str(self.args.device)))
        self._load_ema_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        unwrapped = self.accelerator.unwrap_model(self.model)
        if best is not None and self._loads_plain_weights(unwrapped, best):
            logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
            self._load_converted_weights(unwrapped, best)
        else:
            super()._load_best_model()
        if best is not None and (Path(best) / EMA_STATE_NAME).is_file():
            self._load_ema_state(best)  # the final model is then the best checkpoint's EMA

    # ---- Logging --------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss term, averaged over the micro-batches since the last training log, and the non-finite
        guard's counters (since this trainer was created), and the window's training throughput, then log."""
        if "loss" in logs:
            self._log_throughput(logs)
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update(zip(names, means.tolist(), strict=True))
            self._term_sums, self._term_count = {}, 0
        if "loss" in logs and self._guard_enabled:
            logs["nonfinite_steps"] = self.nonfinite_steps
            logs.update({f"nonfinite_{name}": count for name, count in sorted(self.nonfinite_terms.items())})
        super().log(logs, start_time)

    def _log_throughput(self, logs: dict[str, float]) -> None:
        """`images_per_second`: training images of all processes since the last training log over the window's wall
        time, evaluation and checkpoint saving left out. One host read per log, none per step."""
        elapsed = time.perf_counter() - self._window_start - self._window_excluded
        images = self._window_images
        if self.accelerator.num_processes > 1:
            count = torch.tensor(float(images), device=self.args.device)
            images = int(self.accelerator.reduce(count, reduction="sum").item())
        if images and elapsed > 0:
            logs["images_per_second"] = round(images / elapsed, 3)
        self._window_images, self._window_start, self._window_excluded = 0, time.perf_counter(), 0.0


__all__ = [
    "CheckpointSaveError",
    "DiverseTrainer",
    "DiverseTrainingArguments",
    "EMA_STATE_NAME",
    "NO_DECAY_PARAMETER_NAMES",
    "NonFiniteLossError",
    "check_checkpoint_architecture",
    "drop_gradients",
    "resolve_resume_checkpoint",
]
