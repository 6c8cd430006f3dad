"""`diverse_vit_hf.trainer.checkpointing`: atomic checkpoints (a crash or a full disk while saving never leaves a
partial checkpoint, the previous one stays loadable), the resume (`resolve_resume_checkpoint`: `last`/`auto` fall back
to the newest intact checkpoint, weights-only checkpoints need the explicit flag, a finished run is not trained
further, another architecture is named), full-weight reloads (`load_best_model_at_end`), what the folders hold
(safetensors weights, known pickles only in checkpoints) and used output folders (`check_output_dir`).

Tiny ViTs on CPU; `checkpointed_run` (tests/conftest.py) is a copy of a real 3-checkpoint run to damage.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from fixtures.builders import (
    build_trainer,
    make_args,
    same_weights,
    snapshot,
    tiny_config,
    training_logs,
)
from fixtures.builders import make_dataset as _make_dataset
from fixtures.scripts import RUN_DIVERSE, SCRIPT_ENV, fast_flags, load_script

from diverse_vit_hf import (
    DiverseTrainer,
    DiverseTrainingArguments,
    DiverseViTForImageClassification,
    load_diverse_model,
)
from diverse_vit_hf.data.image_datasets import collate_image_batch
from diverse_vit_hf.trainer.checkpoint_integrity import verify_checkpoint
from diverse_vit_hf.trainer.checkpointing import (
    CheckpointDamagedError,
    CheckpointSaveError,
    check_output_dir,
    finished_training,
    resolve_resume_checkpoint,
)


def logged_args(output_dir: Path, **overrides) -> DiverseTrainingArguments:
    """`make_args` logging every step, learning rate 1e-2; `overrides` win."""
    return make_args(output_dir, **{"logging_steps": 1, "learning_rate": 1e-2, **overrides})


def make_dataset(size: int = 32, seed: int = 0) -> Dataset:
    return _make_dataset(size, seed)


def make_trainer(output_dir: Path, model_seed: int = 0, dataset_size: int = 32, collator=None, **overrides):
    return build_trainer(logged_args(output_dir, **overrides), model_seed, dataset_size, collator)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------------------------------
# Resume: which checkpoint, checked before use


def test_last_and_auto_fall_back_to_the_newest_intact_checkpoint(checkpointed_run, caplog):
    truncate(checkpointed_run / "checkpoint-3" / "model.safetensors")
    (checkpointed_run / "checkpoint-2" / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING):
        for mode in ("last", "auto", True):
            assert resolve_resume_checkpoint(mode, str(checkpointed_run)) == str(checkpointed_run / "checkpoint-1")
    warnings = caplog.text
    assert "Skipping" in warnings and "checkpoint-3" in warnings and "model.safetensors has" in warnings
    assert "checkpoint-2" in warnings and "rng_state.pth is missing" in warnings


def test_every_checkpoint_damaged_is_an_error_listing_each(checkpointed_run):
    for step in (1, 2, 3):
        (checkpointed_run / f"checkpoint-{step}" / "optimizer.pt").unlink()
    for mode in ("last", "auto"):
        with pytest.raises(CheckpointDamagedError) as excinfo:
            resolve_resume_checkpoint(mode, str(checkpointed_run))
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


def test_a_resumed_run_at_its_last_step_is_not_trained_further(checkpointed_run):
    before = load_diverse_model(str(checkpointed_run / "checkpoint-3")).state_dict()
    # Other initial weights: all must be loaded.
    trainer = build_trainer(make_args(checkpointed_run, max_steps=3), model_seed=5)
    result = trainer.train(resume_from_checkpoint="last")
    assert result.global_step == 3 and trainer.state.global_step == 3
    assert not (checkpointed_run / "checkpoint-4").exists()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    longer = build_trainer(make_args(checkpointed_run, max_steps=4))  # a larger budget does continue
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


def test_resume_last_without_a_checkpoint_is_reported(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match="no checkpoint-<step> folder"):
        module.main(["--output_dir", str(tmp_path / "empty"), "--resume_from_checkpoint", "last", *fast_flags()])


def test_resume_from_a_checkpoint_of_another_architecture_names_both(tmp_path):
    make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    torch.manual_seed(0)
    wider = DiverseViTForImageClassification(tiny_config(hidden_size=48, intermediate_size=96))
    trainer = DiverseTrainer(
        model=wider,
        args=logged_args(tmp_path, max_steps=2),
        train_dataset=make_dataset(),
        data_collator=collate_image_batch,
    )
    with pytest.raises(ValueError) as excinfo:
        trainer.train(resume_from_checkpoint="last")
    message = str(excinfo.value)
    assert "hidden_size: checkpoint 32, model 48" in message and "intermediate_size: checkpoint 64, model 96" in message
    assert "checkpoint-1" in message and "--output_dir" in message


# --------------------------------------------------------------------------------------------------------------------
# Faults while saving: a crash, a full disk


def losses_by_step(trainer: DiverseTrainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in training_logs(trainer)}


def test_crash_inside_a_checkpoint_save_keeps_the_previous_one_and_resume_continues_the_trajectory(
    tmp_path, monkeypatch
):
    common = dict(dataset_size=48, max_steps=6, save_strategy="steps", save_steps=2)
    reference = make_trainer(tmp_path / "reference", **common)
    reference.train()
    expected = losses_by_step(reference)

    # Crash inside the second checkpoint save (checkpoint-4), after its weights and optimizer were written.
    original = DiverseTrainer._save_rng_state
    calls = {"n": 0}

    def crash_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash inside the save")
        return original(self, output_dir)

    run = tmp_path / "crashed"
    crashed = make_trainer(run, **common)
    monkeypatch.setattr(DiverseTrainer, "_save_rng_state", crash_on_second_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["checkpoint-2"], "partial checkpoint"
    load_diverse_model(str(run / "checkpoint-2"))  # the previous checkpoint loads
    # What a hard kill (no cleanup) would leave: a hidden staging folder. Resuming must not pick it.
    leftover = run / ".checkpoint-4.saving" / "checkpoint-4"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")

    resumed = make_trainer(run, model_seed=123, **common)  # fresh, different weights: all must come from disk
    resumed.train(resume_from_checkpoint="last")
    got = losses_by_step(resumed)  # steps 1-2 come from checkpoint-2's trainer_state.json, 3-6 were trained again
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert same_weights(snapshot(reference.model), snapshot(resumed.model))
    assert not leftover.parent.exists(), "the next save did not clean the killed save's staging folder"


def test_load_best_model_at_end_restores_every_weight_of_the_best_checkpoint(tmp_path):
    """The stock Trainer's best-model reload has the same partial-load problem as resume: checked with the best
    checkpoint (step 1) older than the last step (2)."""
    calls = {"n": 0}

    def decreasing_score(prediction):
        calls["n"] += 1
        return {"score": -calls["n"]}

    torch.manual_seed(0)
    trainer = DiverseTrainer(
        model=DiverseViTForImageClassification(tiny_config()),
        args=logged_args(
            tmp_path,
            max_steps=2,
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(8, seed=1),
        data_collator=collate_image_batch,
        compute_metrics=decreasing_score,
    )
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-1"
    best = load_diverse_model(trainer.state.best_model_checkpoint)
    last = load_diverse_model(str(tmp_path / "checkpoint-2"))
    assert same_weights(snapshot(best), snapshot(trainer.model))
    assert not same_weights(snapshot(last), snapshot(trainer.model))


def test_disk_full_during_a_checkpoint_save(tmp_path, monkeypatch):
    real_save = torch.save
    optimizer_saves = {"n": 0}

    def save_until_disk_full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            optimizer_saves["n"] += 1
            if optimizer_saves["n"] == 2:  # the first checkpoint fits; the second fills the disk half-way
                Path(f).write_bytes(b"half an optimizer state")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(CheckpointSaveError) as excinfo:
        trainer.train()
    message = str(excinfo.value)
    assert excinfo.value.errno == errno.ENOSPC
    assert "checkpoint checkpoint-2" in message and str(tmp_path) in message and "disk is full" in message
    assert "resume_from_checkpoint auto" in message and "save_only_model" not in message
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoint-1"]
    load_diverse_model(str(tmp_path / "checkpoint-1"))


def test_disk_full_during_the_final_model_save_keeps_the_previous_files(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.save_model()
    before = (tmp_path / "model.safetensors").read_bytes()
    trainer.train()

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a weight file")  # what a full disk leaves: a truncated file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full)
    with pytest.raises(CheckpointSaveError, match=rf"Could not save the model to {re.escape(str(tmp_path))}: the disk"):
        trainer.save_model()
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".saving-*"))
    load_diverse_model(str(tmp_path))


def test_a_failed_final_save_names_only_a_verified_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full)
    with pytest.raises(CheckpointSaveError) as excinfo:
        trainer.save_model()
    assert f"The newest intact checkpoint, {tmp_path / 'checkpoint-2'}, can be resumed" in str(excinfo.value)
    for step in (1, 2):  # damaged after it was written: no longer offered
        optimizer = tmp_path / f"checkpoint-{step}" / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(CheckpointSaveError, match="No intact checkpoint of this run is left"):
        trainer.save_model()


# --------------------------------------------------------------------------------------------------------------------
# What the folders hold


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def test_only_safetensors_in_the_model_folder_and_known_pickles_in_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, power_persistent=True)
    trainer.train()
    trainer.save_model()
    top_level = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert "model.safetensors" in top_level and "training_args.json" in top_level
    assert not [name for name in top_level if name.endswith(PICKLE_SUFFIXES)]
    checkpoint = tmp_path / "checkpoint-2"
    # Trainer's resume state stays torch pickles (loaded back with weights_only=True); weights are safetensors.
    pickles = sorted(p.name for p in checkpoint.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    assert pickles == ["optimizer.pt", "rng_state.pth", "scheduler.pt"]
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "power_iteration_state.safetensors").is_file()
    # The persistent power-iteration vectors are part of the training state and come back on resume.
    fresh = make_trainer(tmp_path / "fresh", power_persistent=True)
    fresh._load_from_checkpoint(str(checkpoint))
    assert torch.equal(fresh.power_state.max_vectors, trainer.power_state.max_vectors)
    assert torch.equal(fresh.power_state.min_vectors, trainer.power_state.min_vectors)


# --------------------------------------------------------------------------------------------------------------------
# Used output folders


def test_a_new_training_into_a_used_output_dir_is_refused(tmp_path):
    check_output_dir(tmp_path / "missing", None)  # nothing there: fine
    (tmp_path / "notes.txt").write_text("unrelated")
    check_output_dir(tmp_path, None)  # unrelated files only: fine
    (tmp_path / "checkpoint-20").mkdir()
    with pytest.raises(ValueError, match=r"checkpoint-20.*--resume_from_checkpoint auto.*--overwrite_output_dir"):
        check_output_dir(tmp_path, None)
    check_output_dir(tmp_path, str(tmp_path / "checkpoint-20"))  # resuming it: fine
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        check_output_dir(saved, None)


def test_overwrite_output_dir_deletes_only_the_old_checkpoints(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("kept")
    check_output_dir(tmp_path, None, overwrite=True)
    assert not (tmp_path / "checkpoint-5").exists() and (tmp_path / "notes.txt").read_text() == "kept"


# --------------------------------------------------------------------------------------------------------------------
# End to end: examples/run_diverse.py with a damaged checkpoint


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
