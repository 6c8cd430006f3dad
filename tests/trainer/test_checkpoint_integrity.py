"""`diverse_vit_hf.trainer.checkpoint_integrity`: every saved checkpoint has a manifest (sizes, SHA-256) that
verifies; real damaged files (truncated, altered, deleted, garbage JSON) are named against it, checkpoints without one
get structural checks, and staged or unpublished folders are never picked. Which checkpoint a resume uses is tested in
tests/trainer/test_checkpointing.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diverse_vit_hf.trainer.checkpoint_integrity import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    select_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from diverse_vit_hf.trainer.checkpointing import CheckpointDamagedError, resolve_resume_checkpoint


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_every_saved_checkpoint_has_a_manifest_that_verifies(checkpointed_run):
    for step in (1, 2, 3):
        folder = checkpointed_run / f"checkpoint-{step}"
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        assert manifest["global_step"] == step
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
            manifest["files"]
        )
        check = verify_checkpoint(folder)
        assert check.intact and not check.missing_state and check.has_manifest, check.describe()


@pytest.mark.parametrize(
    "damage, name, fragment",
    [
        ("truncate", "model.safetensors", "model.safetensors has"),
        ("truncate", "optimizer.pt", "optimizer.pt has"),
        ("delete", "optimizer.pt", "optimizer.pt is missing"),
        ("delete", "scheduler.pt", "scheduler.pt is missing"),
        ("garbage", "trainer_state.json", "trainer_state.json has"),
        ("garbage", "config.json", "config.json has"),
        ("flip", "model.safetensors", "model.safetensors was altered"),
    ],
)
def test_damaged_files_are_named_against_the_manifest(checkpointed_run, damage, name, fragment):
    path = checkpointed_run / "checkpoint-3" / name
    if damage == "truncate":
        truncate(path)
    elif damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_text("{not json")
    else:  # one flipped byte, same size: only the checksum sees it
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    check = verify_checkpoint(checkpointed_run / "checkpoint-3")
    assert not check.intact and fragment in check.describe()
    with pytest.raises(CheckpointDamagedError, match=rf"checkpoint-3: the checkpoint is damaged \(.*{fragment}"):
        resolve_resume_checkpoint(str(checkpointed_run / "checkpoint-3"), str(checkpointed_run))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda folder: truncate(folder / "model.safetensors"), "model.safetensors is truncated"),
        (lambda folder: truncate(folder / "optimizer.pt"), "optimizer.pt is truncated or not a torch archive"),
        (lambda folder: (folder / "trainer_state.json").write_text("garbage"), "trainer_state.json is not valid JSON"),
        (lambda folder: (folder / INCOMPLETE_MARKER).write_text("in progress"), "did not finish"),
    ],
)
def test_checkpoints_without_a_manifest_get_structural_checks(checkpointed_run, damage, fragment):
    folder = checkpointed_run / "checkpoint-3"
    (folder / MANIFEST_NAME).unlink()  # as the stock Trainer writes them
    assert verify_checkpoint(folder).intact
    damage(folder)
    check = verify_checkpoint(folder)
    assert not check.intact and fragment in check.describe()


def test_a_staged_folder_and_an_unpublished_incomplete_one_are_never_picked(checkpointed_run):
    staged = checkpointed_run / ".checkpoint-9.saving" / "checkpoint-9"
    shutil.copytree(checkpointed_run / "checkpoint-3", staged)
    jit = checkpointed_run / "checkpoint-8"
    shutil.copytree(checkpointed_run / "checkpoint-3", jit)
    (jit / MANIFEST_NAME).unlink()
    (jit / INCOMPLETE_MARKER).write_text("in progress")
    chosen, passed_over = select_checkpoint(checkpointed_run)
    assert chosen.path == checkpointed_run / "checkpoint-3" and [check.path.name for check in passed_over] == [
        "checkpoint-8"
    ]


def test_manifest_lists_nested_files_and_skips_hidden_ones(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / ".hidden").write_bytes(b"y")
    write_manifest(tmp_path, 7)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert list(manifest["files"]) == ["sub/a.bin"] and manifest["files"]["sub/a.bin"]["size"] == 10
