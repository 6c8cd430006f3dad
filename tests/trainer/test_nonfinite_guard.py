"""`diverse_vit_hf.trainer.nonfinite_guard`: a step whose loss, any loss term or gradient is not finite is skipped
(weights and optimizer moments unchanged), counted and logged, and training continues; too many consecutive ones stop
training with the last good checkpoint kept. Each check fails with the guard switched off (the stock behaviour, where
one NaN batch destroys the model). Tiny ViTs on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from fixtures.builders import ParameterRecorder, build_trainer, same_weights, snapshot, training_logs
from fixtures.builders import make_args as _make_args
from transformers.trainer_utils import get_last_checkpoint

from diverse_vit_hf import DiverseTrainer, DiverseTrainingArguments, load_diverse_model
from diverse_vit_hf.data.image_datasets import collate_image_batch
from diverse_vit_hf.trainer.nonfinite_guard import NonFiniteLossError, drop_gradients


def make_args(output_dir: Path, **overrides) -> DiverseTrainingArguments:
    return _make_args(output_dir, **{"logging_steps": 1, "learning_rate": 1e-2, **overrides})


def make_trainer(output_dir: Path, model_seed: int = 0, dataset_size: int = 32, collator=None, **overrides):
    return build_trainer(make_args(output_dir, **overrides), model_seed, dataset_size, collator)


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


def test_max_consecutive_nonfinite_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        make_args(tmp_path, max_consecutive_nonfinite=-1)
