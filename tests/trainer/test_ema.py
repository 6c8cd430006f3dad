"""`diverse_vit_hf.trainer.ema`: the model EMA (`--model_ema`) follows the explicit recurrence in float32, swaps in
and out, is left unchanged by a skipped non-finite step, is what evaluation and the final model use (with
`--model_ema_eval`), and is restored on resume. Tiny ViTs on CPU."""

from __future__ import annotations

import pytest
import torch
from fixtures.builders import make_recipe_args as make_args
from fixtures.builders import make_recipe_dataset as make_dataset
from fixtures.builders import make_recipe_trainer as make_trainer
from fixtures.builders import snapshot, tiny_config
from transformers import TrainerCallback

from diverse_vit_hf import (
    DiverseTrainer,
    DiverseViTForImageClassification,
    ModelEMA,
    load_diverse_model,
)
from diverse_vit_hf.data.image_datasets import collate_image_batch
from diverse_vit_hf.trainer.ema import EMA_STATE_NAME


class WeightRecorder(TrainerCallback):
    """The model's weights after every optimizer step (`on_step_end`: after the step, before the next one)."""

    def __init__(self, trainer: DiverseTrainer) -> None:
        self.trainer = trainer
        self.weights: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(snapshot(model))
        self.ema.append({k: v.clone() for k, v in self.trainer.ema.state_dict().items()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(snapshot(model))
        self.ema.append({k: v.clone() for k, v in self.trainer.ema.state_dict().items()})


def test_model_ema_update_swap_and_state():
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config()).to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.9)
    assert all(value.dtype == torch.float32 for value in ema.state_dict().values())
    expected = {k: v.float().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.float()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    raw = snapshot(model)
    with ema.swapped_into(model):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, expected[k].to(torch.bfloat16))
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.5)
    with pytest.raises(ValueError, match="do not match"):
        ema.load_state_dict({"nope": torch.zeros(1)})


@pytest.mark.slow
def test_trainer_ema_follows_the_explicit_recurrence_and_logs_throughput(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, logging_steps=2, model_ema=True, model_ema_decay=0.5)
    recorder = WeightRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert len(recorder.weights) == 5  # initial + after each of the 4 optimizer steps
    expected = {k: v.float() for k, v in recorder.weights[0].items()}
    for step, weights in enumerate(recorder.weights[1:], start=1):
        expected = {k: 0.5 * expected[k] + 0.5 * weights[k].float() for k in expected}
        for k, v in recorder.ema[step].items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7, msg=f"step {step}: {k}")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["images_per_second"] > 0 for entry in logs)


@pytest.mark.slow
def test_a_skipped_nonfinite_step_leaves_the_ema_unchanged(tmp_path):
    class NaNOnSecondBatch:
        def __init__(self) -> None:
            self.count = 0

        def __call__(self, examples):
            batch = collate_image_batch(examples)
            self.count += 1
            if self.count == 2:
                batch["pixel_values"][0, 0, 0, 0] = float("nan")
            return batch

    trainer = make_trainer(tmp_path, max_steps=3, collator=NaNOnSecondBatch(), model_ema=True, model_ema_decay=0.5)
    recorder = WeightRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.nonfinite_steps == 1
    _, after_good, after_bad, after_next = recorder.ema
    assert all(torch.equal(after_good[k], after_bad[k]) for k in after_good), "the skipped step moved the EMA"
    assert not all(torch.equal(after_bad[k], after_next[k]) for k in after_bad)
    assert all(torch.isfinite(v).all() for v in after_next.values())


@pytest.mark.slow
def test_evaluation_and_final_model_use_the_ema_weights(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=3, model_ema=True, model_ema_decay=0.5)
    trainer.train()
    raw = snapshot(trainer.model)
    metrics = trainer.evaluate()
    assert all(torch.equal(raw[k], v) for k, v in trainer.model.state_dict().items()), "evaluate left EMA weights in"
    trainer.save_model(str(tmp_path / "final"))
    assert all(torch.equal(raw[k], v) for k, v in trainer.model.state_dict().items())

    saved = load_diverse_model(str(tmp_path / "final"))
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, trainer.ema.state_dict()[k])
    plain = DiverseTrainer(
        model=saved,
        args=make_args(tmp_path / "plain"),
        eval_dataset=make_dataset(16, seed=1),
        data_collator=collate_image_batch,
    )
    reference = plain.evaluate()
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)
    raw_metrics = make_trainer(tmp_path / "raw", max_steps=3, model_ema=True, model_ema_decay=0.5, model_ema_eval=False)
    raw_metrics.train()
    assert raw_metrics.evaluate()["eval_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_restores_the_ema(tmp_path):
    common = dict(
        dataset_size=48, max_steps=4, save_strategy="steps", save_steps=2, model_ema=True, model_ema_decay=0.7
    )
    reference = make_trainer(tmp_path / "reference", **common)
    reference.train()
    checkpoint = tmp_path / "reference" / "checkpoint-2"
    assert (checkpoint / EMA_STATE_NAME).is_file()

    resumed = make_trainer(tmp_path / "reference", model_seed=123, **common)  # different weights: all from disk
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for k, v in reference.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
