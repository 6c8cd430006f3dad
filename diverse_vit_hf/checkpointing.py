"""Checkpoints that are never half-written, resumes that restore every weight, and output folders that are never
silently overwritten.

- **Atomic checkpoints.** `checkpoint-<step>` is written into a hidden staging folder, flushed to disk, then renamed
  into place (`publish_folder`): a crash (exception, kill, full disk) while saving never leaves a partial checkpoint
  that `get_last_checkpoint` / `--resume_from_checkpoint last` would pick. An `OSError` while saving (e.g. disk full)
  becomes a `CheckpointSaveError` that says what happened and where (`save_error`).
- **Resume.** `resolve_resume_checkpoint("last")` takes the newest complete checkpoint, with a clear error if there is
  none. Weights are restored through `from_pretrained` (`load_converted_weights`: the stock Trainer calls
  `load_state_dict` on the 4.x-style key names `save_pretrained` writes and silently restores only the embeddings and
  the head of a ViT), after checking that the checkpoint's architecture matches the model's.
- **Used output folders.** `check_output_dir` refuses a new training in a folder that holds one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .callbacks import EMA_STATE_NAME
from .fileio import atomic_write_text, fsync_path, fsync_tree

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
POWER_STATE_NAME = "power_iteration_state.safetensors"
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


class CheckpointSaveError(OSError):
    """A checkpoint or the final model could not be written (disk full, permissions, ...). Nothing half-written is
    left where a loader would pick it up."""


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


def publish_folder(staged: Path, final: Path) -> None:
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


def merge_folder(staged: Path, final: Path) -> None:
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


def loads_plain_weights(model: Any, checkpoint: str | os.PathLike, sharded: bool) -> bool:
    """Whether `checkpoint` is restored by `load_converted_weights`: plain single-device/DDP safetensors of a
    `PreTrainedModel` (`sharded`: DeepSpeed/FSDP, which the stock Trainer loads itself)."""
    has_safetensors = any(
        os.path.isfile(os.path.join(checkpoint, name)) for name in ("model.safetensors", "model.safetensors.index.json")
    )
    return isinstance(model, PreTrainedModel) and not sharded and has_safetensors


def load_converted_weights(model: PreTrainedModel, checkpoint: str | os.PathLike) -> None:
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


class AtomicCheckpointsMixin:
    """The checkpoint side of `DiverseTrainer` (a `Trainer` mixin): stage each checkpoint and publish it with one
    rename, add the training state the stock checkpoint lacks (power-iteration vectors, EMA), write
    `training_args.json` instead of a pickle, move the final model's files in complete, and restore weights through
    `from_pretrained`. Each method is a private `Trainer` override whose contract is checked in
    `tests/test_trainer_contracts.py`.

    Needs from the trainer: `power_state` and `ema_callback` (None when unused) besides the stock attributes.
    """

    _checkpoint_staging_root: str | None = None
    _window_excluded: float = 0.0

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the stock `_save_checkpoint` writes into the staging folder.
        if self._checkpoint_staging_root is not None:
            return self._checkpoint_staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Stock checkpoint (weights, optimizer, scheduler, RNG, trainer state) written into a hidden staging folder,
        plus the power-iteration state and the EMA, renamed to `checkpoint-<step>` once complete; then the stock
        rotation (`save_total_limit`)."""
        started = time.perf_counter()
        run_dir = Path(super()._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging_root = run_dir / name, run_dir / f".{name}.saving"  # hidden from the checkpoint glob/regex
        staged = staging_root / name
        if self.args.should_save:
            for leftover in run_dir.glob(f".{PREFIX_CHECKPOINT_DIR}-*.saving"):  # from a process killed mid-save
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        push_to_hub, self.args.push_to_hub = self.args.push_to_hub, False  # pushed below, from the published folder
        self._checkpoint_staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                self._save_training_state(staged)
                if self.state.best_model_checkpoint is not None and Path(self.state.best_model_checkpoint) == staged:
                    self.state.best_model_checkpoint = str(final)
                    self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                publish_folder(staged, final)
            self.accelerator.wait_for_everyone()
            if staged.is_dir():  # files of a process that does not share the main process's file system
                merge_folder(staged, final)
        except OSError as error:
            left = f"Nothing was left half-written: the earlier checkpoints in {run_dir} are untouched."
            raise save_error(error, f"checkpoint {name}", run_dir, left) from error
        finally:
            self._checkpoint_staging_root = None
            self.args.push_to_hub = push_to_hub
            shutil.rmtree(staging_root, ignore_errors=True)
            self._window_excluded += time.perf_counter() - started
        if push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_training_state(self, folder: Path) -> None:
        """What resuming needs beyond the stock checkpoint: the persistent power-iteration vectors and the EMA."""
        state = self.power_state
        if state is not None and state.max_vectors is not None and state.min_vectors is not None:
            tensors = {"max_vectors": state.max_vectors.detach().cpu(), "min_vectors": state.min_vectors.detach().cpu()}
            safetensors.torch.save_file(tensors, str(folder / POWER_STATE_NAME))
        if self.ema_callback is not None:
            self.ema_callback.save(folder)

    def _write_training_args(self, folder: Path) -> None:
        atomic_write_text(folder / "training_args.json", self.args.to_json_string())
        (folder / "training_args.bin").unlink(missing_ok=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stock save, but the training arguments go to `training_args.json` (tokens redacted by
        `TrainingArguments.to_json_string`) instead of a pickled `training_args.bin`: model folders hold no pickle.
        Outside a checkpoint (which is published as a whole), the files are written into a hidden temporary folder
        and each moved into `output_dir` once complete, so a crash never leaves a truncated weight file there."""
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
            left = f"The files already in {folder} were left as they were (no partial file was moved there)."
            raise save_error(error, "the model", folder, left) from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _loads_plain_weights(self, model: nn.Module, checkpoint: str) -> bool:
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False)
        return loads_plain_weights(model, checkpoint, sharded)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        config = getattr(unwrapped, "config", None)
        if isinstance(config, PretrainedConfig):
            check_checkpoint_architecture(resume_from_checkpoint, config)
        if self._loads_plain_weights(unwrapped, resume_from_checkpoint):
            logger.info("Loading model from %s.", resume_from_checkpoint)
            load_converted_weights(unwrapped, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        power_file = Path(resume_from_checkpoint) / POWER_STATE_NAME
        if self.power_state is not None and power_file.is_file():
            self.power_state.load_state_dict(safetensors.torch.load_file(str(power_file), device=str(self.args.device)))
        if self.ema_callback is not None:
            self.ema_callback.load(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        unwrapped = self.accelerator.unwrap_model(self.model)
        if best is not None and self._loads_plain_weights(unwrapped, best):
            logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
            load_converted_weights(unwrapped, best)
        else:
            super()._load_best_model()
        if best is not None and self.ema_callback is not None and (Path(best) / EMA_STATE_NAME).is_file():
            self.ema_callback.load(best)  # the final model is then the best checkpoint's EMA


__all__ = [
    "ARCHITECTURE_KEYS",
    "AtomicCheckpointsMixin",
    "CheckpointSaveError",
    "POWER_STATE_NAME",
    "TRAINER_STATE_NAME",
    "check_checkpoint_architecture",
    "check_output_dir",
    "load_converted_weights",
    "loads_plain_weights",
    "merge_folder",
    "publish_folder",
    "resolve_resume_checkpoint",
    "save_error",
]
