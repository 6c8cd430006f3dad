"""Checkpoints that are never half-written, resumes that restore every weight, and output folders that are never
silently overwritten.

- **Atomic checkpoints.** `checkpoint-<step>` is written into a hidden staging folder, given a manifest of its files
  (sizes and SHA-256, `checkpoint_integrity`), flushed to disk, then renamed into place (`publish_folder`): a crash
  (exception, kill, full disk) while saving never leaves a partial checkpoint that `--resume_from_checkpoint
  last`/`auto` would pick. A failed write (`WRITE_ERRORS`: the OS error, or torch's and safetensors' errors around
  one) becomes a `CheckpointSaveError` that says what happened, where, and what to do (`save_error`); when the final
  model cannot be written, it is written to a rescue folder instead.
- **Resume.** `resolve_resume_checkpoint` takes a path, `"last"` (the newest intact checkpoint) or `"auto"` (the
  same, or a fresh start), verifying the checkpoint first. Weights are restored through `from_pretrained`
  (`load_converted_weights`: the stock Trainer calls `load_state_dict` on the 4.x-style key names `save_pretrained`
  writes and silently restores only the embeddings and the head of a ViT), after checking that the checkpoint's
  architecture matches the model's.
- **Used output folders.** `check_output_dir` refuses a new training in a folder that holds one;
  `finished_training` recognises a folder whose training finished.
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
from safetensors import SafetensorError
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..utils.fileio import atomic_write_text, fsync_path, fsync_tree
from .checkpoint_integrity import (
    CheckpointCheck,
    CheckpointDamagedError,
    select_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from .ema import EMA_STATE_NAME

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
    left where a loader would pick it up. `errno` holds the cause's code; the message is the whole explanation."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, without OSError's "[Errno N]" prefix


RESUME_MODES = ("auto", "last")


def _damage_report(checks: list[CheckpointCheck]) -> str:
    return "; ".join(f"{check.path.name}: {check.describe()}" for check in checks)


def resolve_resume_checkpoint(
    value: str | bool | None, output_dir: str, allow_weights_only: bool = False
) -> str | None:
    """The checkpoint folder to resume from, checked (`checkpoint_integrity.verify_checkpoint`) before use.

    `value` is None (start fresh), `"last"`/True (the newest intact `checkpoint-<step>` in `output_dir`; an error when
    there is none), `"auto"` (the same, or None to start fresh when `output_dir` holds no checkpoint: one command for
    the first launch and every requeue) or a checkpoint path. Newer damaged checkpoints are passed over with a warning
    naming the damaged file. A checkpoint without optimizer, scheduler or RNG state (e.g. `--save_only_model`) is
    refused unless `allow_weights_only`.

    Raises:
        ValueError: nothing to resume from (`last`), no such folder.
        CheckpointDamagedError: the given checkpoint (or every checkpoint, with `last`/`auto`) is damaged or lacks
            training state; the message names the files.
    """
    if value is None or value is False or (isinstance(value, str) and not value.strip()):
        return None
    mode = "last" if value is True else value.strip().lower() if isinstance(value, str) else None
    if mode in RESUME_MODES:
        check, passed_over = select_checkpoint(output_dir, allow_weights_only=allow_weights_only)
        if check is not None:
            return _accepted(check)
        if passed_over:
            weights_only = [check for check in passed_over if check.intact]
            hint = (
                " Pass --resume_weights_only to resume from the weights alone (fresh optimizer, restarted lr schedule)."
                if weights_only and len(weights_only) == len(passed_over)
                else ""
            )
            raise CheckpointDamagedError(
                f"--resume_from_checkpoint {mode}: no checkpoint in {output_dir} can be resumed from "
                f"({_damage_report(passed_over)}). Restore the damaged files, pass an older checkpoint folder, or "
                f"start over with --overwrite_output_dir.{hint}"
            )
        if mode == "auto":
            return None
        raise ValueError(
            f"--resume_from_checkpoint last: there is no {PREFIX_CHECKPOINT_DIR}-<step> folder in {output_dir}. "
            "Drop the flag to start a new training, pass --resume_from_checkpoint auto to start or resume "
            "(the same command for the first launch and every requeue), or pass the path of a checkpoint folder."
        )
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise ValueError(
            f"--resume_from_checkpoint {path}: no such folder. Pass a {PREFIX_CHECKPOINT_DIR}-<step> folder written "
            "by the Trainer, 'last' for the newest intact one in --output_dir, or 'auto' (the same, or a fresh start "
            "when there is none)."
        )
    check = verify_checkpoint(path)
    if not check.intact:
        raise CheckpointDamagedError(
            f"--resume_from_checkpoint {path}: the checkpoint is damaged ({'; '.join(check.damaged)}). Pass an older "
            f"{PREFIX_CHECKPOINT_DIR}-<step> folder, or 'last' for the newest intact one in --output_dir."
        )
    if check.missing_state and not allow_weights_only:
        raise CheckpointDamagedError(
            f"--resume_from_checkpoint {path}: the checkpoint holds the weights but not the "
            f"{', '.join(check.missing_state)}, so training cannot continue exactly where it stopped (it was "
            "written with --save_only_model, or files were deleted). Pass --resume_weights_only to continue from the "
            "weights alone (fresh optimizer, restarted learning-rate schedule, unrestored random state), or pass "
            "another checkpoint."
        )
    return _accepted(check)


def _accepted(check: CheckpointCheck) -> str:
    if check.missing_state:
        missing = ", ".join(check.missing_state)
        logger.warning("--resume_weights_only: resuming from the weights of %s without its %s.", check.path, missing)
    return str(check.path)


def finished_training(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The final trainer state of a training that finished in `output_dir` (its final model and `trainer_state.json`
    written, `global_step` at `max_steps`), else None. The example scripts write `trainer_state.json` last."""
    folder = Path(output_dir)
    state_file = folder / TRAINER_STATE_NAME
    weights = any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
    if not (state_file.is_file() and weights and (folder / "config.json").is_file()):
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        finished = int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return state if finished else None


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
            "auto, choose another --output_dir, or pass --overwrite_output_dir to start over (its checkpoints are "
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


# What a failed write raises: the OS error itself, torch's `PytorchStreamWriter` RuntimeError around it, or the
# safetensors error wrapping the Rust I/O error.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)
# Texts of the wrapped errors (torch, safetensors' Rust errors) that carry no errno attribute.
_ERRNO_TEXTS = (
    (errno.ENOSPC, ("No space left", "code: 28", "StorageFull")),
    (getattr(errno, "EDQUOT", 122), ("Disk quota exceeded", "code: 122", "QuotaExceeded")),
    (errno.EROFS, ("Read-only file system", "code: 30", "ReadOnlyFilesystem")),
    (errno.EACCES, ("Permission denied", "code: 13", "PermissionDenied")),
)
_NEARLY_FULL_BYTES = 256 * 2**20


def write_failure_errno(error: BaseException, folder: str | os.PathLike | None = None) -> int | None:
    """The errno behind a failed write: the error's own, one named in a wrapped error's text, or ENOSPC when the text
    names none and `folder`'s file system has less than 256 MiB free (torch reports a full disk as "file write
    failed")."""
    code = getattr(error, "errno", None)
    if code:
        return code
    text = str(error)
    for candidate, patterns in _ERRNO_TEXTS:
        if any(pattern in text for pattern in patterns):
            return candidate
    if folder is not None:
        try:
            if shutil.disk_usage(_existing_parent(Path(folder))).free < _NEARLY_FULL_BYTES:
                return errno.ENOSPC
        except OSError:
            pass
    return None


def is_write_failure(error: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether an error raised while saving is a failed write: any `OSError`, or a torch/safetensors error whose
    text or errno says so (a programming error inside a save stays what it is)."""
    if isinstance(error, OSError):
        return True
    if not isinstance(error, WRITE_ERRORS):
        return False
    text = str(error).lower()
    return write_failure_errno(error, folder) is not None or "write" in text or "serializ" in text


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def save_error(error: BaseException, what: str, folder: str | os.PathLike, left: str) -> CheckpointSaveError:
    """A `CheckpointSaveError` saying what could not be written, where, why, what is left and what to do, for any
    of `WRITE_ERRORS` (a plain `OSError`, torch's or safetensors' errors around one)."""
    code = write_failure_errno(error, folder)
    if code == errno.ENOSPC:
        reason, advice = "the disk is full (no space left on device)", "Free some space (or lower --save_total_limit)"
    elif code == getattr(errno, "EDQUOT", 122):
        reason, advice = "the disk quota is exceeded", "Free some space (or lower --save_total_limit)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = "the folder is read-only" if code == errno.EROFS else "permission denied"
        advice = "Make the folder writable"
    else:
        reason, advice = getattr(error, "strerror", None) or str(error), "Fix the cause above"
    return CheckpointSaveError(
        code,
        f"Could not save {what} to {folder}: {reason} ({type(error).__name__}: {error}). {left} {advice} or choose "
        "another --output_dir, then resume with --resume_from_checkpoint auto.",
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
    `tests/trainer/test_trainer_contracts.py`.

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
            self.accelerator.wait_for_everyone()  # every process's files (rng_state_<rank>.pth) are in
            if self.args.should_save:
                write_manifest(staged, self.state.global_step)
                publish_folder(staged, final)
            self.accelerator.wait_for_everyone()
            if staged.is_dir():  # files of a process that does not share the main process's file system
                merge_folder(staged, final)
        except WRITE_ERRORS as error:
            if not is_write_failure(error, run_dir):
                raise
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
        staging: Path | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in folder.glob(".saving-*"):  # from a process killed mid-save
                shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
            super()._save(str(staging), state_dict)
            self._write_training_args(staging)
            fsync_tree(staging)
            for entry in sorted(staging.iterdir()):
                target = folder / entry.name
                if entry.is_dir() and target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
            fsync_path(folder)
        except WRITE_ERRORS as error:
            if not is_write_failure(error, folder):
                raise
            if staging is not None:  # now: on a full disk its space is what the rescue below may need
                shutil.rmtree(staging, ignore_errors=True)
                staging = None
            left = f"The files already in {folder} were left as they were (no partial file was moved there). "
            left += self._rescue_final_model(folder, state_dict)
            raise save_error(error, "the model", folder, left) from error
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _rescue_final_model(self, folder: Path, state_dict: dict | None) -> str:
        """After the final model could not be written to `folder`: write it into a new folder under the temporary
        directory (`TMPDIR`, usually another file system), so the training is not lost. Returns what to tell the
        user."""
        rescue = Path(tempfile.gettempdir()) / f"diverse-vit-rescued-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        newest, _ = select_checkpoint(folder)  # verified: the message only calls intact what is
        fallback = (
            f"The newest intact checkpoint, {newest.path}, can be resumed with --resume_from_checkpoint auto once "
            "there is space, and the final model is written at the end."
            if newest is not None
            else "No intact checkpoint of this run is left to resume from."
        )
        try:
            rescue.mkdir(parents=True)
            super()._save(str(rescue), state_dict)
            self._write_training_args(rescue)
            fsync_tree(rescue)
        except WRITE_ERRORS as error:
            shutil.rmtree(rescue, ignore_errors=True)
            logger.error("Could not write the trained model to %s either: %s", rescue, error)
            return f"Writing it to {rescue} instead failed too ({error}). {fallback}"
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            try:
                self.processing_class.save_pretrained(str(rescue))
            except WRITE_ERRORS:
                pass
        return (
            f"The trained model was saved to {rescue} instead (weights, config, image processor): copy that folder "
            f"to where you want it (it loads with from_pretrained). {fallback}"
        )

    @property
    def shards_parameters(self) -> bool:
        """Whether the Trainer runs with sharded parameters (DeepSpeed ZeRO or FSDP, including FSDP on XLA)."""
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False))

    def _loads_plain_weights(self, model: nn.Module, checkpoint: str) -> bool:
        return loads_plain_weights(model, checkpoint, self.shards_parameters)

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
    "RESUME_MODES",
    "TRAINER_STATE_NAME",
    "WRITE_ERRORS",
    "check_checkpoint_architecture",
    "check_output_dir",
    "finished_training",
    "is_write_failure",
    "load_converted_weights",
    "loads_plain_weights",
    "merge_folder",
    "publish_folder",
    "resolve_resume_checkpoint",
    "save_error",
    "write_failure_errno",
]
