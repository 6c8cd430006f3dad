"""Checkpoints that are checked before anything is resumed from them.

Every checkpoint this project writes carries a manifest, `checkpoint_manifest.json`: each file's path, size and
SHA-256, written last, inside the staging folder, before the folder is published with one rename. Before resuming,
`verify_checkpoint` compares the folder with its manifest, so a truncated, overwritten or deleted file is found and
named instead of surfacing as a bare `SafetensorError` / `PytorchStreamReader` traceback, or as a silent resume with
a fresh optimizer. Checkpoints without a manifest (written by the stock `Trainer`) get structural checks: the JSON
files parse, safetensors headers cover their files, torch archives have their central directory.

`select_checkpoint` picks the newest intact `checkpoint-<step>` of a folder, with a warning for each newer damaged
one it passes over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
# transformers' just-in-time checkpoint marks a folder it is still writing with this file.
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_HASH_CHUNK = 1 << 22


class CheckpointDamagedError(ValueError):
    """A checkpoint cannot be resumed from: a file is missing, truncated or altered, or training state is absent."""


@dataclass
class CheckpointCheck:
    """What `verify_checkpoint` found in one checkpoint folder.

    Attributes:
        path: the checkpoint folder.
        damaged: one line per damaged or missing file, naming it (empty: the files are intact).
        missing_state: the training state a full resume needs that the folder lacks (optimizer, lr scheduler, RNG
            state), e.g. a `--save_only_model` checkpoint.
        has_manifest: whether the folder carries a manifest (else only structural checks were possible).
    """

    path: Path
    damaged: list[str] = field(default_factory=list)
    missing_state: list[str] = field(default_factory=list)
    has_manifest: bool = False

    @property
    def intact(self) -> bool:
        return not self.damaged

    def describe(self) -> str:
        return "; ".join(self.damaged + [f"no {what}" for what in self.missing_state])


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, global_step: int | None = None) -> Path:
    """Write `checkpoint_manifest.json` into `folder`, listing every file below it (size and SHA-256). Call it once
    the folder is complete and before it is published."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME and not path.name.startswith("."):
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "global_step": global_step, "files": files}
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path.name} is not valid JSON ({error})"
    return None


def _structural_problem(path: Path) -> str | None:
    """A damage found without a manifest: unparsable JSON, a safetensors file shorter than its header says, a torch
    archive without its central directory."""
    size = path.stat().st_size
    if path.suffix == ".json":
        return _json_problem(path)
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            header_size = int.from_bytes(head, "little")
            if header_size > size - 8:
                return f"{path.name} is truncated (its header alone needs {header_size + 8} bytes, it has {size})"
            try:
                header = json.loads(handle.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return f"{path.name} has a damaged header"
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        needed = 8 + header_size + max(ends, default=0)
        if size < needed:
            return f"{path.name} is truncated ({size} of {needed} bytes)"
        return None
    if path.suffix in (".pt", ".pth", ".bin"):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or not a torch archive"
    return None


def _missing_state(names: set[str]) -> list[str]:
    """The resume state a plain (single-device/DDP) checkpoint lacks. Sharded checkpoints keep their optimizer in
    per-rank files or folders, matched by prefix."""
    missing = []
    if not any(name.startswith(("optimizer", "global_step")) or "optim" in name for name in names):
        missing.append("optimizer state (optimizer.pt)")
    if "scheduler.pt" not in names:
        missing.append("learning-rate scheduler state (scheduler.pt)")
    if not any(name.startswith("rng_state") for name in names):
        missing.append("random-number state (rng_state.pth)")
    return missing


def verify_checkpoint(folder: str | os.PathLike) -> CheckpointCheck:
    """Check a checkpoint folder against its manifest (or structurally, without one). Never raises for damage: the
    result lists it."""
    folder = Path(folder)
    check = CheckpointCheck(path=folder)
    if not folder.is_dir():
        check.damaged.append(f"{folder} is not a folder")
        return check
    names = {path.relative_to(folder).as_posix() for path in folder.rglob("*")}
    if INCOMPLETE_MARKER in names:
        check.damaged.append(f"{INCOMPLETE_MARKER} is there: the save that wrote this folder did not finish")
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        check.has_manifest = True
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            listed = manifest["files"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            check.damaged.append(f"{MANIFEST_NAME} is damaged ({type(error).__name__}: {error})")
            listed = {}
        for name, expected in sorted(listed.items()):
            path = folder / name
            if not path.is_file():
                check.damaged.append(f"{name} is missing")
            elif path.stat().st_size != expected["size"]:
                check.damaged.append(f"{name} has {path.stat().st_size} bytes, {expected['size']} were written")
            elif file_sha256(path) != expected["sha256"]:
                check.damaged.append(f"{name} was altered after it was written (checksum mismatch)")
    else:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (problem := _structural_problem(path)):
                check.damaged.append(problem)
    if "trainer_state.json" not in names:
        check.damaged.append("trainer_state.json is missing")
    if not any(name.startswith(("model", "pytorch_model")) for name in names):
        check.damaged.append("the model weights (model.safetensors) are missing")
    check.missing_state = _missing_state(names)
    return check


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder name, None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, newest (highest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=lambda path: checkpoint_step(path), reverse=True)


def select_checkpoint(
    output_dir: str | os.PathLike, allow_weights_only: bool = False
) -> tuple[CheckpointCheck | None, list[CheckpointCheck]]:
    """The check of the newest checkpoint of `output_dir` that can be resumed from (None: there is none), and the
    checks of the newer ones passed over.

    A checkpoint is usable when its files are intact and, unless `allow_weights_only`, it holds the optimizer,
    scheduler and RNG state. Each checkpoint passed over is logged as a warning naming what is wrong with it.
    """
    passed_over: list[CheckpointCheck] = []
    for path in list_checkpoints(output_dir):
        check = verify_checkpoint(path)
        if check.intact and (allow_weights_only or not check.missing_state):
            for skipped in passed_over:
                logger.warning("Skipping %s: %s. Resuming from %s instead.", skipped.path, skipped.describe(), path)
            return check, passed_over
        passed_over.append(check)
    return None, passed_over


__all__ = [
    "INCOMPLETE_MARKER",
    "MANIFEST_NAME",
    "CheckpointCheck",
    "CheckpointDamagedError",
    "checkpoint_step",
    "file_sha256",
    "list_checkpoints",
    "select_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]
