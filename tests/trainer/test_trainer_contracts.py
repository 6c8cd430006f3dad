"""Contracts of the private `Trainer` methods `DiverseTrainer` overrides (see the list in trainer.py's docstring), and
the gradient-accumulation scaling of a loss the subclass computes itself.

Each test checks, on the stock `Trainer` of the installed transformers, the behaviour the override relies on: who
calls the method, when, and with what. A transformers release that changes it fails here, before the override
silently stops working.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.builders import build_trainer, make_args, make_dataset, tiny_config
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

from diverse_vit_hf.data.image_datasets import collate_image_batch


def _args(tmp_path: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                  save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)  # fmt: skip
    return TrainingArguments(**(values | overrides))


class Recording(Trainer):
    """A stock Trainer that records the calls of the private methods DiverseTrainer overrides."""

    def __init__(self, *args, **kwargs):
        self.calls: list[tuple] = []
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        self.calls.append(("_get_train_sampler", train_dataset))
        return SequentialSampler(train_dataset)  # replaces the stock random sampler entirely

    def _get_output_dir(self, trial):
        self.calls.append(("_get_output_dir", trial))
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        self.calls.append(("_save_checkpoint", self.state.global_step))
        return super()._save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        self.calls.append(("_save", output_dir))
        return super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.calls.append(("_load_from_checkpoint", resume_from_checkpoint))
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        self.calls.append(("_load_best_model",))
        return super()._load_best_model()


def _trainer(tmp_path: Path, **overrides) -> Recording:
    torch.manual_seed(0)
    return Recording(model=ViTForImageClassification(tiny_config()), args=_args(tmp_path, **overrides),
                     train_dataset=make_dataset(16), eval_dataset=make_dataset(8),
                     data_collator=collate_image_batch)  # fmt: skip


def names(trainer: Recording, name: str) -> list[tuple]:
    return [call for call in trainer.calls if call[0] == name]


def test_the_train_dataloader_uses_the_sampler_get_train_sampler_returns(tmp_path):
    """DeiT's repeated-augmentation sampler is returned from `_get_train_sampler`: the training order must be it."""
    trainer = _trainer(tmp_path)
    loader = trainer.get_train_dataloader()
    assert len(names(trainer, "_get_train_sampler")[0][1]) == len(trainer.train_dataset)
    labels = torch.cat([batch["labels"] for batch in loader])
    expected = [int(label) for label in trainer.train_dataset["labels"]]
    assert labels.tolist() == expected  # sequential: the returned sampler's order, not the stock random one


def test_checkpoints_are_written_into_get_output_dir_by_save_checkpoint_through_save(tmp_path):
    """`_save_checkpoint` runs at every save step (after the step count moved on) and writes `checkpoint-<step>` into
    `_get_output_dir(trial)`, with the weights written by `_save`: DiverseTrainer points `_get_output_dir` at a staging
    folder while the stock method runs, then publishes the folder with one rename."""
    trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    sequence = [call for call in trainer.calls if call[0] != "_get_train_sampler"]
    expected = []
    for step in (1, 2):
        expected += [
            ("_save_checkpoint", step),
            ("_get_output_dir", None),
            ("_save", str(tmp_path / f"checkpoint-{step}")),
        ]
    assert sequence[: len(expected)] == expected
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_save_model_writes_through_save(tmp_path):
    """The final `save_model(output_dir)` goes through `_save`, where DiverseTrainer writes training_args.json and
    moves complete files in."""
    trainer = _trainer(tmp_path)
    trainer.save_model(str(tmp_path / "final"))
    assert names(trainer, "_save") == [("_save", str(tmp_path / "final"))]


def test_resume_calls_load_from_checkpoint_and_the_stock_load_drops_a_vits_blocks(tmp_path):
    """`train(resume_from_checkpoint=...)` restores the weights through `_load_from_checkpoint`. The stock method
    restores only what matches the 5.x module names, which `save_pretrained`'s 4.x key names of a ViT's blocks do not:
    DiverseTrainer reloads through `from_pretrained`. When a transformers release fixes the stock load, the second half
    fails: the override can then go."""
    first = _trainer(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = _trainer(tmp_path / "b", max_steps=1, learning_rate=0.0)
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert names(resumed, "_load_from_checkpoint") == [("_load_from_checkpoint", str(checkpoint))]
    block = "vit.layers.0.attention.q_proj.weight"
    assert torch.equal(resumed.model.state_dict()[block], before[block]), "the stock load now restores the blocks"
    assert not torch.equal(before[block], trained[block])  # otherwise the check above proves nothing


def test_load_best_model_at_end_calls_load_best_model(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, eval_strategy="steps",
                       eval_steps=1, load_best_model_at_end=True)  # fmt: skip
    trainer.train()
    assert names(trainer, "_load_best_model") == [("_load_best_model",)]


def test_the_overridden_signatures_are_the_stock_ones():
    """DiverseTrainer's overrides take the stock parameters (a renamed parameter would be passed by keyword)."""
    from diverse_vit_hf import DiverseTrainer

    for name in ("_get_train_sampler", "_get_output_dir", "_save_checkpoint", "_save", "_load_from_checkpoint",
                 "_load_best_model", "compute_loss", "training_step", "create_model_card", "log"):  # fmt: skip
        stock = list(inspect.signature(getattr(Trainer, name)).parameters)
        ours = list(inspect.signature(getattr(DiverseTrainer, name)).parameters)
        assert ours[: len(stock)] == stock or (ours[-1] == "kwargs" and ours[:-1] == stock[: len(ours) - 1]), name
    # DiverseTrainer publishes checkpoints itself, then pushes them with the stock (private) method.
    assert list(inspect.signature(Trainer._push_from_checkpoint).parameters) == ["self", "checkpoint_folder"]


class OwnLoss(Trainer):
    """A stock Trainer that computes its own per-micro-batch mean loss with DiverseTrainer's two settings for it
    (`loss_is_scaled_for_ga = False`; `model_accepts_loss_kwargs = False`, so the model's loss kwargs do not count
    as a scaling), and records each micro-batch, the loss `compute_loss` returned, what `training_step` returned and
    the gradients the optimizer step receives. Sequential batches, as in `Recording`."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        self.batches, self.losses, self.step_losses, self.gradients = [], [], [], []
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.add_callback(GradientRecorder(self))

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batches.append({name: value.detach().clone() for name, value in inputs.items()})
        outputs = model(pixel_values=inputs["pixel_values"])
        loss = F.cross_entropy(outputs.logits, inputs["labels"])
        self.losses.append(loss.detach().clone())
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_losses.append(loss.detach().clone())
        return loss


class GradientRecorder(TrainerCallback):
    def __init__(self, trainer: OwnLoss) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer.gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def _own_loss_step(tmp_path: Path, trainer_class: type[OwnLoss] = OwnLoss) -> tuple[OwnLoss, dict[str, torch.Tensor]]:
    """One optimizer step (plain SGD, no clipping) of 2 accumulated micro-batches of 4 images. Returns the trainer
    and the gradients by hand: the mean over the micro-batches of each one's loss gradient at the initial weights."""
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config())
    reference = copy.deepcopy(model)
    args = _args(tmp_path, max_steps=1, gradient_accumulation_steps=2, optim="sgd", max_grad_norm=0.0)
    trainer = trainer_class(model=model, args=args, train_dataset=make_dataset(8), data_collator=collate_image_batch)
    trainer.train()
    assert len(trainer.batches) == 2 and not torch.equal(trainer.batches[0]["labels"], trainer.batches[1]["labels"])
    expected: dict[str, torch.Tensor] = {}
    for batch in trainer.batches:
        reference.zero_grad()
        F.cross_entropy(reference(pixel_values=batch["pixel_values"]).logits, batch["labels"]).backward()
        for name, parameter in reference.named_parameters():
            expected[name] = expected.get(name, 0) + parameter.grad / 2
    return trainer, expected


def test_a_loss_not_scaled_for_accumulation_is_divided_by_the_accumulation_steps_once(tmp_path):
    """DiverseTrainer's `compute_loss` returns a per-micro-batch mean: the stock `training_step` must divide it by the
    accumulation steps exactly once, so the accumulated gradient is the mean of the micro-batches' gradients
    (recomputed by hand) and updates match across accumulation settings."""
    from diverse_vit_hf import DiverseTrainer

    assert DiverseTrainer.loss_is_scaled_for_ga is OwnLoss.loss_is_scaled_for_ga
    assert build_trainer(make_args(tmp_path / "diverse")).model_accepts_loss_kwargs is False
    trainer, expected = _own_loss_step(tmp_path / "run")
    assert len(trainer.step_losses) == 2 and len(trainer.gradients) == 1
    for returned, computed in zip(trainer.step_losses, trainer.losses, strict=True):
        torch.testing.assert_close(returned, computed / 2, rtol=0, atol=0)
    for name, gradient in trainer.gradients[0].items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(
    not hasattr(Trainer, "loss_is_scaled_for_ga"), reason="this transformers decides from the model's loss kwargs only"
)
def test_the_trainer_reads_loss_is_scaled_for_ga(tmp_path):
    """The control of the test above: the same loss declared as scaled is used as it is (gradients summed over the
    micro-batches, twice their mean), so it is the attribute that decides the division."""
    scaled, expected = _own_loss_step(tmp_path, type("ScaledOwnLoss", (OwnLoss,), {"loss_is_scaled_for_ga": True}))
    for returned, computed in zip(scaled.step_losses, scaled.losses, strict=True):
        torch.testing.assert_close(returned, computed, rtol=0, atol=0)
    for name, gradient in scaled.gradients[0].items():
        torch.testing.assert_close(gradient, 2 * expected[name], rtol=1e-5, atol=1e-7, msg=name)
