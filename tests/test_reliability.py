"""Reliability (issue 6): non-finite steps, bad input, crashes while saving, resume, determinism, security, soak.

Every protection has a test here that fails when the protection is switched off. Tiny ViTs on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import json
import logging
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from helpers import REPO, build_trainer, fast_flags, load_script, snapshot, tiny_config
from helpers import make_args as _make_args
from helpers import make_dataset as _make_dataset
from PIL import Image as PILImage
from transformers import TrainerCallback, ViTForImageClassification
from transformers.trainer_utils import get_last_checkpoint

from diverse_vit_hf import (
    DiverseTrainer,
    DiverseTrainingArguments,
    DiverseViTForImageClassification,
    load_diverse_model,
)
from diverse_vit_hf.data.image_datasets import UnreadableImageError, collate_image_batch
from diverse_vit_hf.trainer.checkpointing import CheckpointSaveError
from diverse_vit_hf.trainer.nonfinite_guard import NonFiniteLossError, drop_gradients

SECRET = "hf_secretTOKENabcdefghijklmnopqrstuvwxyz0123"
FAST = fast_flags()


def make_args(output_dir: Path, **overrides) -> DiverseTrainingArguments:
    return _make_args(output_dir, **{"logging_steps": 1, "learning_rate": 1e-2, **overrides})


def make_dataset(size: int = 32, seed: int = 0) -> Dataset:
    return _make_dataset(size, seed)


def make_trainer(output_dir: Path, model_seed: int = 0, dataset_size: int = 32, collator=None, **overrides):
    return build_trainer(make_args(output_dir, **overrides), model_seed, dataset_size, collator)


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(first[name], second[name]) for name in first)


class ParameterRecorder(TrainerCallback):
    """The model's weights after every optimizer step (index 0 = before training)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(snapshot(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(snapshot(model))


class NaNOnCalls:
    """A collator that puts a NaN into the images of the given (1-based) calls."""

    def __init__(self, calls: set[int]) -> None:
        self.calls, self.count = calls, 0

    def __call__(self, examples):
        batch = collate_image_batch(examples)
        self.count += 1
        if self.count in self.calls:
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        return batch


def nan_on_calls(function, calls: set[int]):
    """Wrap a regularizer so that the given (1-based) calls return NaN (keeping the graph: NaN * value)."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        value = function(*args, **kwargs)
        return value * float("nan") if count["n"] in calls else value

    return wrapped


def poison_term(trainer: DiverseTrainer, name: str, calls: set[int]) -> None:
    """Make the given calls of one regularizer of the trainer's objective return NaN, through its term table."""
    trainer.objective.terms = tuple(
        dataclasses.replace(term, compute=nan_on_calls(term.compute, calls)) if term.name == name else term
        for term in trainer.objective.terms
    )


def training_logs(trainer: DiverseTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# --------------------------------------------------------------------------------------------------------------------
# Non-finite guard


@pytest.mark.parametrize(
    ("source", "accumulation", "bad_term"),
    [
        ("pixels", 1, "loss_cls"),
        ("pixels", 2, "loss_cls"),
        ("regularizer", 1, "loss_patch_contrastive"),
    ],
    ids=["nan-pixels", "nan-pixels-accumulated", "nan-regularizer"],
)
def test_nonfinite_step_is_skipped_counted_and_training_continues(tmp_path, source, accumulation, bad_term):
    """Step 2 is poisoned: the weights (and optimizer moments) stay as after step 1, step 3 updates them again."""
    # With accumulation the Trainer fetches `accumulation` batches per step: poison the first of step 2.
    collator = NaNOnCalls({accumulation + 1}) if source == "pixels" else None
    trainer = make_trainer(
        tmp_path,
        collator=collator,
        max_steps=3,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        weight_decay=0.05,
    )
    if source == "regularizer":
        poison_term(trainer, "loss_patch_contrastive", {2})  # one objective call per micro-batch: call 2 is step 2
    recorder = ParameterRecorder()
    trainer.add_callback(recorder)
    trainer.train()

    before, after_good, after_bad, after_next = recorder.weights
    assert not same_weights(before, after_good)
    assert same_weights(after_good, after_bad), "the poisoned step changed the model"
    assert not same_weights(after_bad, after_next), "training did not resume after the poisoned step"
    assert all(torch.isfinite(value).all() for value in after_next.values())
    # The optimizer skipped step 2 entirely: its moments were updated twice in three steps.
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {2}

    logs = training_logs(trainer)
    assert [entry["nonfinite_steps"] for entry in logs] == [0, 1, 1]
    assert logs[1][f"nonfinite_{bad_term}"] == 1
    assert "nonfinite_grad_norm" not in logs[1] and "nonfinite_loss" not in logs[1]
    if source == "regularizer":
        assert "nonfinite_loss_cls" not in logs[1]
    for entry in logs:  # the bad window's values are not averaged into the logged terms
        assert all(math.isfinite(entry[name]) for name in entry if name.startswith("loss"))
    assert trainer.nonfinite_steps == 1 and trainer.nonfinite_terms[bad_term] == 1


def test_nonfinite_gradients_with_a_finite_loss_are_skipped(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, mixing=False)
    calls = {"n": 0}

    def poison_once(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    trainer.model.classifier.weight.register_hook(poison_once)
    recorder = ParameterRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    _, after_good, after_bad, after_next = recorder.weights
    assert same_weights(after_good, after_bad) and not same_weights(after_bad, after_next)
    assert training_logs(trainer)[1]["nonfinite_grad_norm"] == 1


def test_without_the_guard_a_nan_batch_destroys_the_model(tmp_path):
    """What the guard prevents: with --max_consecutive_nonfinite 0 (stock behaviour) the NaN update is applied."""
    trainer = make_trainer(tmp_path, collator=NaNOnCalls({1}), max_steps=1, max_consecutive_nonfinite=0)
    trainer.train()
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "nonfinite_steps" not in training_logs(trainer)[0]


def test_consecutive_nonfinite_steps_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    # Steps 1-2 are good (checkpoint-2 is saved), every later step has a NaN patch cosine term.
    trainer = make_trainer(
        tmp_path,
        dataset_size=64,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        max_consecutive_nonfinite=3,
    )
    poison_term(trainer, "loss_patch_cosine", set(range(3, 100)))
    recorder = ParameterRecorder()
    trainer.add_callback(recorder)
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.train()
    message = str(excinfo.value)
    assert "loss_patch_cosine" in message and "--max_consecutive_nonfinite 3" in message
    assert "optimizer step 5" in message and "resume_from_checkpoint auto" in message
    good = recorder.weights[2]
    assert same_weights(good, snapshot(trainer.model)), "a skipped step changed the model"
    last = get_last_checkpoint(str(tmp_path))
    assert Path(last).name in ("checkpoint-2", "checkpoint-4")  # checkpoint-4 holds the unchanged step-2 weights
    reloaded = load_diverse_model(last)
    assert same_weights(good, snapshot(reloaded))
    assert not list(tmp_path.glob(".*")), "a staging folder was left behind"


def test_drop_gradients_makes_a_grad_scaler_skip_the_step():
    """fp16 on a GPU uses a GradScaler, which asserts it saw a gradient: dropping leaves it one NaN to skip on."""
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale((parameter * 2).sum()).backward()
    drop_gradients([parameter], scaler)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(parameter.detach(), torch.ones(3))
    assert scaler.get_scale() < 2.0**8
    drop_gradients([parameter])
    assert parameter.grad is None


def test_single_image_batch_left_by_skipping_is_trained_unmixed(tmp_path):
    """A configured batch of 1 is refused up front (test_run_diverse); a batch of 1 at run time (an epoch's incomplete
    last batch, or what --corrupt_images skip left) is trained without mixing instead of crashing the run."""
    trainer = make_trainer(tmp_path, mixing=True, weight_estimator="exact")
    model = trainer.model.train()
    single = {"pixel_values": torch.randn(1, 3, 16, 16), "labels": torch.tensor([2])}
    loss = trainer.compute_loss(model, single)
    trainer.objective.mixer = None  # the same batch, explicitly unmixed
    assert torch.isfinite(loss) and loss.item() == pytest.approx(trainer.compute_loss(model, single).item(), rel=1e-6)
    with pytest.raises(ValueError, match="--no_mixing"):
        make_trainer(tmp_path, per_device_train_batch_size=1)


def test_max_consecutive_nonfinite_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        make_args(tmp_path, max_consecutive_nonfinite=-1)


# --------------------------------------------------------------------------------------------------------------------
# Bad input (the cases not already covered by test_modeling / test_mixing / test_data / test_run_diverse / test_trainer)


def write_image_folder(root: Path, broken: bool = True, only_broken: bool = False) -> tuple[Path, Path, list[str]]:
    """A tiny imagefolder (train/ and val/, classes a and b) with one garbage and one truncated PNG in train/."""
    rng = np.random.default_rng(0)
    bad = []
    for split, count in (("train", 4), ("val", 2)):
        for label in "ab":
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(0 if only_broken and split == "train" else count):
                array = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                PILImage.fromarray(array).save(folder / f"{index}.png")
    if broken or only_broken:
        (root / "train" / "a" / "garbage.png").write_bytes(b"this is not an image")
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (root / "train" / "b" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        bad = [str(root / "train" / "a" / "garbage.png"), str(root / "train" / "b" / "truncated.png")]
    return root / "train", root / "val", bad


def test_corrupt_image_fails_with_its_path_by_default(tmp_path):
    train, val, bad = write_image_folder(tmp_path / "images")
    module = load_script()
    flags = ["--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(tmp_path / "out"), *FAST]
    with pytest.raises(UnreadableImageError) as excinfo:
        module.main(flags)
    message = str(excinfo.value)
    assert any(path in message for path in bad), message
    assert "--corrupt_images skip" in message


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    train, val, bad = write_image_folder(tmp_path / "images")
    module = load_script()
    flags = ["--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(tmp_path / "out"), *FAST]
    with caplog.at_level(logging.WARNING):  # batches of 4, 4, 2: a skipped image may leave a single one (not mixed)
        metrics = module.main([*flags, "--corrupt_images", "skip", "--per_device_train_batch_size", "4"])
    assert metrics["skipped_images"] == 2
    assert all(path in caplog.text for path in bad)
    assert "2 unreadable image(s) were skipped" in caplog.text


def test_only_corrupt_images_left_after_skipping(tmp_path):
    train, val, _ = write_image_folder(tmp_path / "images", only_broken=True)
    module = load_script()
    flags = ["--train_dir", str(train), "--validation_dir", str(val), "--output_dir", str(tmp_path / "out"), *FAST]
    with pytest.raises(UnreadableImageError, match="All 2 images of a batch were unreadable"):
        module.main([*flags, "--corrupt_images", "skip"])


def test_missing_image_folder_is_reported(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match=r"--train_dir .*no such folder"):
        module.main(["--train_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), *FAST])


def test_labels_out_of_the_model_range_are_refused_before_training(tmp_path):
    features = Features({"pixel_values": Sequence(Value("float32")), "labels": ClassLabel(num_classes=7)})
    dataset = Dataset.from_dict({"pixel_values": [[0.0]] * 7, "labels": list(range(7))}, features=features)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"7 classes but the model has num_labels=4.*num_labels=7"):
        DiverseTrainer(
            model=DiverseViTForImageClassification(tiny_config()), args=make_args(tmp_path), train_dataset=dataset
        )


def test_unknown_regularizer_option_is_reported_by_the_parser(tmp_path, capsys):
    module = load_script()
    with pytest.raises(SystemExit) as excinfo:
        module.main(["--output_dir", str(tmp_path), "--weight_estimator", "lanczos"])
    assert excinfo.value.code == 2
    assert "invalid choice: 'lanczos'" in capsys.readouterr().err


def test_unknown_flag_is_reported_with_the_closest_flag(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match=r"'--patch_cosine_coeff'.*did you mean --patch_cosine_coef\?.*--help"):
        module.main(["--output_dir", str(tmp_path), "--patch_cosine_coeff", "0.1"])


def test_resume_last_without_a_checkpoint_is_reported(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match="no checkpoint-<step> folder"):
        module.main(["--output_dir", str(tmp_path / "empty"), "--resume_from_checkpoint", "last", *FAST])


def test_resume_from_a_checkpoint_of_another_architecture_names_both(tmp_path):
    make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    torch.manual_seed(0)
    wider = DiverseViTForImageClassification(tiny_config(hidden_size=48, intermediate_size=96))
    trainer = DiverseTrainer(
        model=wider,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=make_dataset(),
        data_collator=collate_image_batch,
    )
    with pytest.raises(ValueError) as excinfo:
        trainer.train(resume_from_checkpoint="last")
    message = str(excinfo.value)
    assert "hidden_size: checkpoint 32, model 48" in message and "intermediate_size: checkpoint 64, model 96" in message
    assert "checkpoint-1" in message and "--output_dir" in message


# --------------------------------------------------------------------------------------------------------------------
# Faults: crash while saving, resume, disk full


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
        args=make_args(
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


def test_same_seed_gives_identical_losses(tmp_path):
    # The Trainer seeds every RNG when it is created (not in train()): create each one right before training it.
    runs = []
    for name in ("first", "second"):
        runs.append(make_trainer(tmp_path / name, max_steps=4))
        runs[-1].train()
    first, second = (losses_by_step(trainer) for trainer in runs)
    assert len(first) == 4 and first == second
    assert same_weights(snapshot(runs[0].model), snapshot(runs[1].model))


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
# Security


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


def test_pickle_only_checkpoints_are_refused_unless_allowed(tmp_path):
    torch.manual_seed(0)
    stock = ViTForImageClassification(tiny_config())
    stock.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"pickle files .*allow_pickle=True \(--allow_pickle"):
        load_diverse_model(str(tmp_path))
    model = load_diverse_model(str(tmp_path), allow_pickle=True)
    assert same_weights(snapshot(stock), snapshot(model))
    module = load_script()
    with pytest.raises(OSError, match="--allow_pickle"):
        module.main(["--model", str(tmp_path), "--output_dir", str(tmp_path / "out"), *FAST])


def test_no_trust_remote_code_anywhere():
    sources = [*(REPO / "diverse_vit_hf").rglob("*.py"), *(REPO / "examples").rglob("*.py")]
    offenders = [str(path) for path in sources if "trust_remote_code" in path.read_text(encoding="utf-8")]
    assert len(sources) > 5 and offenders == []


def test_hub_token_is_never_written_or_logged(tmp_path, caplog, capsys):
    with caplog.at_level(logging.DEBUG):
        trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, hub_token=SECRET)
        trainer.train()
        trainer.save_model()
        trainer.save_state()
        print(trainer.args)
    assert SECRET not in caplog.text and SECRET not in "".join(capsys.readouterr())
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    saved = json.loads((tmp_path / "training_args.json").read_text())
    assert saved["hub_token"] == "<HUB_TOKEN>"
    # The stock Trainer pickles the arguments (training_args.bin, uploaded when pushing checkpoints): no token there.
    assert SECRET.encode() not in pickle.dumps(trainer.args)
    assert copy.deepcopy(trainer.args).hub_token == SECRET and copy.copy(trainer.args).hub_token == SECRET


def test_model_card_has_no_token_and_no_local_path(tmp_path):
    hub = pytest.importorskip("diverse_vit_hf.hub.model_card")
    output = tmp_path / "run"
    trainer = make_trainer(output, max_steps=1, hub_token=SECRET)
    trainer.train()
    trainer.save_model()
    card = str(hub.card_from_folder(output, repo_id="someone/diverse-vit-test"))
    assert SECRET not in card
    assert str(tmp_path) not in card and str(Path.home()) not in card
    assert not re.search(r"/(tmp|home|work|root)/", card)


# --------------------------------------------------------------------------------------------------------------------
# Load: many short epochs with evaluation and checkpoint rotation


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# Measured on CPU: +0.0 to +1.5 MiB between epoch 5 and the last epoch; the bound leaves room for allocator noise.
RSS_GROWTH_BOUND_MIB = 32.0


@pytest.mark.slow
def test_soak_many_short_epochs_keep_memory_flat_and_disk_bounded(tmp_path):
    if not Path("/proc/self/status").is_file():
        pytest.skip("RSS is read from /proc/self/status (Linux)")
    module = load_script()
    samples: list[tuple[int, float, int]] = []
    begin: list[float] = []
    output = tmp_path / "soak"

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begin.append(rss_mib())

        def on_epoch_end(self, args, state, control, **kwargs):
            samples.append((round(state.epoch), rss_mib(), len(list(output.glob("checkpoint-*")))))

    class ProbedTrainer(module.DiverseTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Probe())

    module.DiverseTrainer = ProbedTrainer
    epochs = 30
    module.main(
        [
            "--output_dir",
            str(output),
            *FAST,
            "--num_train_epochs",
            str(epochs),
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "16",
            "--save_total_limit",
            "2",
            "--logging_steps",
            "1",
        ]
    )
    assert len(samples) == epochs
    # Checkpoints are saved after the epoch-end callbacks: at most save_total_limit + the one being written.
    assert max(count for _, _, count in samples) <= 2
    assert len(list(output.glob("checkpoint-*"))) == 2 and not list(output.glob(".*"))
    warm = samples[4][1]  # after a few epochs: allocator pools, lazy imports and caches are warm
    end = samples[-1][1]
    print(
        f"\nsoak RSS: train begin {begin[0]:.1f} MiB, epoch 1 {samples[0][1]:.1f} MiB, epoch 5 {warm:.1f} MiB, "
        f"end (epoch {epochs}) {end:.1f} MiB, peak {max(rss for _, rss, _ in samples):.1f} MiB"
    )
    assert end - warm < RSS_GROWTH_BOUND_MIB, samples


# ------------------------------------------------------------------------------------------------ output folder


def test_a_new_training_into_a_used_output_dir_is_refused(tmp_path):
    from diverse_vit_hf.trainer.checkpointing import check_output_dir

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
    from diverse_vit_hf.trainer.checkpointing import check_output_dir

    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("kept")
    check_output_dir(tmp_path, None, overwrite=True)
    assert not (tmp_path / "checkpoint-5").exists() and (tmp_path / "notes.txt").read_text() == "kept"


def test_launcher_processes_without_an_accelerator_are_detected(monkeypatch):
    """What switches use_cpu on (gloo DDP) under torchrun / accelerate on a machine without a GPU; the end-to-end
    launches are in test_distributed.py."""
    from diverse_vit_hf.trainer.training_args import launched_without_accelerator

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched_without_accelerator()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_without_accelerator() == (not torch.cuda.is_available())
