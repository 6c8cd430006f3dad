"""Checkpoints are verified before a resume: real damaged files (truncated, altered, deleted, garbage JSON),
weights-only checkpoints, `last`/`auto` falling back to the newest intact checkpoint, finished runs recognised."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import RUN_DIVERSE, SCRIPT_ENV, build_trainer, fast_flags, make_args

from diverse_vit_hf import load_diverse_model
from diverse_vit_hf.trainer.checkpoint_integrity import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    select_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from diverse_vit_hf.trainer.checkpointing import CheckpointDamagedError, finished_training, resolve_resume_checkpoint


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real run's output folder with checkpoint-1, -2 and -3 (weights, optimizer, scheduler, RNG, manifest)."""
    folder = tmp_path_factory.mktemp("trained")
    args = make_args(folder, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=None)
    build_trainer(args).train()
    return folder


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_every_saved_checkpoint_has_a_manifest_that_verifies(run):
    for step in (1, 2, 3):
        folder = run / f"checkpoint-{step}"
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
def test_damaged_files_are_named_against_the_manifest(run, damage, name, fragment):
    path = run / "checkpoint-3" / name
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
    check = verify_checkpoint(run / "checkpoint-3")
    assert not check.intact and fragment in check.describe()
    with pytest.raises(CheckpointDamagedError, match=rf"checkpoint-3: the checkpoint is damaged \(.*{fragment}"):
        resolve_resume_checkpoint(str(run / "checkpoint-3"), str(run))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda folder: truncate(folder / "model.safetensors"), "model.safetensors is truncated"),
        (lambda folder: truncate(folder / "optimizer.pt"), "optimizer.pt is truncated or not a torch archive"),
        (lambda folder: (folder / "trainer_state.json").write_text("garbage"), "trainer_state.json is not valid JSON"),
        (lambda folder: (folder / INCOMPLETE_MARKER).write_text("in progress"), "did not finish"),
    ],
)
def test_checkpoints_without_a_manifest_get_structural_checks(run, damage, fragment):
    folder = run / "checkpoint-3"
    (folder / MANIFEST_NAME).unlink()  # as the stock Trainer writes them
    assert verify_checkpoint(folder).intact
    damage(folder)
    check = verify_checkpoint(folder)
    assert not check.intact and fragment in check.describe()


def test_last_and_auto_fall_back_to_the_newest_intact_checkpoint(run, caplog):
    truncate(run / "checkpoint-3" / "model.safetensors")
    (run / "checkpoint-2" / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING):
        for mode in ("last", "auto", True):
            assert resolve_resume_checkpoint(mode, str(run)) == str(run / "checkpoint-1")
    warnings = caplog.text
    assert "Skipping" in warnings and "checkpoint-3" in warnings and "model.safetensors has" in warnings
    assert "checkpoint-2" in warnings and "rng_state.pth is missing" in warnings


def test_every_checkpoint_damaged_is_an_error_listing_each(run):
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}" / "optimizer.pt").unlink()
    for mode in ("last", "auto"):
        with pytest.raises(CheckpointDamagedError) as excinfo:
            resolve_resume_checkpoint(mode, str(run))
        message = str(excinfo.value)
        assert all(f"checkpoint-{step}: optimizer.pt is missing" in message for step in (1, 2, 3))
        assert "--overwrite_output_dir" in message


def test_weights_only_checkpoints_need_the_explicit_flag(tmp_path, caplog):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True)
    build_trainer(args).train()
    checkpoint = tmp_path / "checkpoint-2"
    check = verify_checkpoint(checkpoint)
    assert check.intact and "optimizer state (optimizer.pt)" in check.missing_state
    with pytest.raises(CheckpointDamagedError, match=r"not the optimizer state.*--resume_weights_only"):
        resolve_resume_checkpoint(str(checkpoint), str(tmp_path))
    with pytest.raises(CheckpointDamagedError, match=r"--resume_weights_only"):
        resolve_resume_checkpoint("auto", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint("auto", str(tmp_path), allow_weights_only=True) == str(checkpoint)
    assert "without its optimizer state" in caplog.text
    # The trainer honours the flag end to end: a weights-only resume trains on from the saved weights.
    resumed = build_trainer(make_args(tmp_path, max_steps=3, resume_weights_only=True))
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 3


def test_auto_starts_fresh_only_when_there_is_no_checkpoint(tmp_path):
    assert resolve_resume_checkpoint("auto", str(tmp_path / "missing")) is None
    assert resolve_resume_checkpoint("auto", str(tmp_path)) is None
    with pytest.raises(ValueError, match=r"no checkpoint-<step> folder.*--resume_from_checkpoint auto"):
        resolve_resume_checkpoint("last", str(tmp_path))


def test_a_staged_folder_and_an_unpublished_incomplete_one_are_never_picked(run):
    staged = run / ".checkpoint-9.saving" / "checkpoint-9"
    shutil.copytree(run / "checkpoint-3", staged)
    jit = run / "checkpoint-8"
    shutil.copytree(run / "checkpoint-3", jit)
    (jit / MANIFEST_NAME).unlink()
    (jit / INCOMPLETE_MARKER).write_text("in progress")
    chosen, passed_over = select_checkpoint(run)
    assert chosen.path == run / "checkpoint-3" and [check.path.name for check in passed_over] == ["checkpoint-8"]


def test_manifest_lists_nested_files_and_skips_hidden_ones(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / ".hidden").write_bytes(b"y")
    write_manifest(tmp_path, 7)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert list(manifest["files"]) == ["sub/a.bin"] and manifest["files"]["sub/a.bin"]["size"] == 10


def test_a_resumed_run_at_its_last_step_is_not_trained_further(run):
    before = load_diverse_model(str(run / "checkpoint-3")).state_dict()
    trainer = build_trainer(make_args(run, max_steps=3), model_seed=5)  # other initial weights: all must be loaded
    result = trainer.train(resume_from_checkpoint="last")
    assert result.global_step == 3 and trainer.state.global_step == 3
    assert not (run / "checkpoint-4").exists()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    longer = build_trainer(make_args(run, max_steps=4))  # a larger budget does continue
    assert longer.train(resume_from_checkpoint="last").global_step == 4


def test_finished_training_needs_the_final_model_and_the_final_state(tmp_path):
    assert finished_training(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 5, "max_steps": 10}))
    assert finished_training(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 10}))
    assert finished_training(tmp_path)["global_step"] == 10
    (tmp_path / "trainer_state.json").write_text("garbage")
    assert finished_training(tmp_path) is None


@pytest.mark.slow
def test_the_script_names_a_damaged_checkpoint_and_auto_resumes_from_an_intact_one(tmp_path):
    output = tmp_path / "out"
    flags = [*fast_flags(), "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps",
             "1", "--save_total_limit", "3", "--redundancy_images", "0", "--output_dir", str(output)]  # fmt: skip
    command = [sys.executable, str(RUN_DIVERSE), *flags]
    first = subprocess.run(command, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("model.safetensors", "README.md", "trainer_state.json"):
        (output / name).unlink()  # as if killed before the end
    truncate(output / "checkpoint-6" / "optimizer.pt")
    explicit = subprocess.run(
        [*command, "--resume_from_checkpoint", str(output / "checkpoint-6")],
        env=SCRIPT_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    assert "checkpoint-6: the checkpoint is damaged (optimizer.pt has" in explicit.stderr
    assert "Traceback" not in explicit.stderr + explicit.stdout
    auto = subprocess.run(
        [*command, "--resume_from_checkpoint", "auto"], env=SCRIPT_ENV, capture_output=True, text=True, timeout=600
    )
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "Skipping" in auto.stderr and "Resuming from" in auto.stderr and "checkpoint-4" in auto.stderr
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6
    again = subprocess.run(
        [*command, "--resume_from_checkpoint", "auto"], env=SCRIPT_ENV, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "finished at step 6 of 6; nothing to do" in again.stdout, again.stderr[-2000:]
