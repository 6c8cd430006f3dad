"""The paper's training recipe (issue 3): named DeiT configs, drop path, weight decay groups, lr scaling and warm-up,
model EMA, eval-only mode and throughput logging. Tiny ViTs on CPU."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import build_trainer, fast_flags, snapshot, tiny_config
from helpers import load_script as _load_script
from helpers import make_args as _make_args
from helpers import make_dataset as _make_dataset
from transformers import DeiTConfig, HfArgumentParser, TrainerCallback, ViTModel

from diverse_vit_hf import (
    DEIT_MODEL_CONFIG_NAMES,
    DiverseDeiTForImageClassification,
    DiverseTrainer,
    DiverseTrainingArguments,
    DiverseViTForImageClassification,
    ModelEMA,
    deit_config,
    load_diverse_model,
)
from diverse_vit_hf.data.image_datasets import collate_image_batch
from diverse_vit_hf.models.modeling import BranchDropout
from diverse_vit_hf.scripts.arguments import ModelArguments, RecipeArguments
from diverse_vit_hf.scripts.model_builder import build_classifier
from diverse_vit_hf.scripts.recipe import apply_recipe, update_steps_per_epoch
from diverse_vit_hf.trainer.ema import EMA_STATE_NAME

FAST = fast_flags()


def make_args(output_dir: Path, **overrides) -> DiverseTrainingArguments:
    defaults = {"logging_steps": 1, "learning_rate": 1e-2, "weight_estimator": "exact"}
    return _make_args(output_dir, **{**defaults, **overrides})


def make_dataset(size: int = 32, seed: int = 0) -> Dataset:
    return _make_dataset(size, seed)


def make_trainer(output_dir: Path, model_seed: int = 0, dataset_size: int = 32, collator=None, **overrides):
    args = make_args(output_dir, **overrides)
    return build_trainer(args, model_seed, dataset_size, collator, eval_dataset=make_dataset(16, seed=1))


def load_script():
    return _load_script(name="run_diverse_recipe")


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


# --------------------------------------------------------------------------------------------------------------------
# 1. Named DeiT configurations


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("deit-tiny", (192, 3, 12)),
        ("deit-small", (384, 6, 12)),
        ("deit-small-24", (384, 6, 24)),
        ("deit-base", (768, 12, 12)),
    ],
)
def test_deit_config_table(name, sizes):
    config = deit_config(name, num_labels=7)
    assert config.model_type == "vit"
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == sizes
    assert config.intermediate_size == 4 * config.hidden_size
    assert (config.patch_size, config.image_size, config.qkv_bias, config.layer_norm_eps) == (16, 224, True, 1e-6)
    assert config.num_labels == 7


def test_deit_tiny_has_the_published_parameter_count_and_overrides_apply():
    model = DiverseViTForImageClassification(deit_config("deit-tiny", num_labels=1000))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.72e6, rel=1e-3)  # DeiT-Ti: 5.7M
    assert deit_config("deit-small", image_size=32).image_size == 32


def test_unknown_config_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"deit-smal'.*deit-tiny, deit-small, deit-small-24, deit-base"):
        deit_config("deit-smal")
    assert DEIT_MODEL_CONFIG_NAMES == ("deit-tiny", "deit-small", "deit-small-24", "deit-base")


def test_script_builds_a_named_config_from_scratch_with_drop_path():
    args = ModelArguments(model_config_name="deit-tiny", drop_path_rate=0.1)
    model, processor = build_classifier(args, ["a", "b", "c"])
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_labels) == (192, 12, 3)
    assert config.id2label == {0: "a", 1: "b", 2: "c"}
    # DeiT's evaluation (shorter edge 224 / 0.875 = 256, center crop 224) is the saved processor: pipelines match it.
    assert processor.size == {"shortest_edge": 256} and processor.crop_size == {"height": 224, "width": 224}
    assert processor.do_center_crop and processor.image_mean[0] == pytest.approx(0.485)
    rates = [layer.dropout.drop_path for layer in model.vit.layers]
    assert (
        rates[0] == 0.0
        and rates[-1] == pytest.approx(0.1)
        and all(isinstance(x.dropout, BranchDropout) for x in model.vit.layers)
    )
    with pytest.raises(ValueError, match="not both"):
        build_classifier(ModelArguments(model="x", model_config_name="deit-tiny"), ["a"])


def test_drop_path_rate_applies_to_a_loaded_checkpoint(tmp_path):
    base = tmp_path / "base"
    model, processor = build_classifier(ModelArguments(hidden_size=32, num_hidden_layers=3), ["a", "b"])
    model.save_pretrained(base)
    processor.save_pretrained(base)
    loaded, _ = build_classifier(ModelArguments(model=str(base), drop_path_rate=0.2), ["a", "b"])
    assert [layer.dropout.drop_path for layer in loaded.vit.layers] == pytest.approx([0.0, 0.1, 0.2])
    assert set(loaded.state_dict()) == set(model.state_dict())  # no new parameters or buffers


def test_recipe_flags_are_documented_cli_flags(tmp_path):
    module = load_script()
    parser = HfArgumentParser((ModelArguments, module.DataArguments, RecipeArguments, DiverseTrainingArguments))
    model_args, _, recipe_args, training_args = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--model_config_name",
            "deit-small-24",
            "--drop_path_rate",
            "0.1",
            "--scale_lr",
            "--warmup_epochs",
            "5",
            "--model_ema",
            "--model_ema_decay",
            "0.999",
            "--use_cpu",
        ]
    )
    assert (model_args.model_config_name, model_args.drop_path_rate) == ("deit-small-24", 0.1)
    assert (recipe_args.scale_lr, recipe_args.warmup_epochs) == (True, 5.0)
    assert (training_args.model_ema, training_args.model_ema_decay, training_args.model_ema_eval) == (True, 0.999, True)
    for dataclass_type in (RecipeArguments, ModelArguments):
        assert all(f.metadata.get("help") for f in fields(dataclass_type)), dataclass_type
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--model_config_name", "vit-huge"])
    with pytest.raises(ValueError, match="model_ema_decay"):
        make_args(tmp_path, model_ema_decay=1.0)


# --------------------------------------------------------------------------------------------------------------------
# 3. Weight decay groups


def _no_decay_names(trainer: DiverseTrainer) -> set[str]:
    trainer.create_optimizer()
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {
        group["weight_decay"]: {by_id[id(p)] for p in group["params"]} for group in trainer.optimizer.param_groups
    }
    assert set(groups) == {0.05, 0.0}
    return groups[0.0]


def test_weight_decay_excludes_biases_norms_position_embeddings_and_tokens(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.05)
    names = {n for n, _ in trainer.model.named_parameters()}
    expected = {
        n for n in names if n.endswith(".bias") or "layernorm" in n or n.endswith(("cls_token", "position_embeddings"))
    }
    assert "vit.embeddings.cls_token" in expected and "vit.embeddings.position_embeddings" in expected
    assert _no_decay_names(trainer) == expected
    decayed = names - expected
    assert all(n.endswith(".weight") and "layernorm" not in n for n in decayed) and "classifier.weight" in decayed


def test_weight_decay_excludes_the_distillation_and_mask_tokens(tmp_path):
    config = DeiTConfig(**tiny_config().to_diff_dict())
    model = DiverseDeiTForImageClassification(config)
    trainer = DiverseTrainer(model=model, args=make_args(tmp_path, weight_decay=0.05))
    no_decay = _no_decay_names(trainer)
    assert {"deit.embeddings.cls_token", "deit.embeddings.distillation_token"} <= no_decay
    assert "deit.embeddings.position_embeddings" in no_decay
    decay = trainer.get_decay_parameter_names(ViTModel(tiny_config(), use_mask_token=True))
    assert "embeddings.patch_embeddings.projection.weight" in decay
    assert not any(n.endswith(("mask_token", "cls_token", "position_embeddings")) for n in decay)


# --------------------------------------------------------------------------------------------------------------------
# 4. --scale_lr and --warmup_epochs


def test_scale_lr_uses_the_global_batch(tmp_path, caplog):
    args = make_args(tmp_path, learning_rate=5e-4, per_device_train_batch_size=16, gradient_accumulation_steps=4)
    with caplog.at_level("INFO", logger="diverse_vit_hf.scripts.recipe"):
        apply_recipe(RecipeArguments(scale_lr=True), args, 1000)
    assert args.learning_rate == pytest.approx(5e-4 * 64 / 512)
    assert "--scale_lr" in caplog.text
    untouched = make_args(tmp_path, learning_rate=5e-4)
    apply_recipe(RecipeArguments(), untouched, 1000)
    assert untouched.learning_rate == 5e-4 and untouched.warmup_steps == 0
    # 1024 = 128 x 8 processes: the paper's 5e-4 becomes 1e-3.
    assert 5e-4 * 128 * 1 * 8 / 512 == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("size", "batch", "accumulation", "drop_last"), [(100, 16, 2, False), (100, 16, 1, True), (40, 8, 3, False)]
)
def test_warmup_epochs_match_the_trainers_steps_per_epoch(tmp_path, size, batch, accumulation, drop_last):
    args = make_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        dataloader_drop_last=drop_last,
    )
    trainer = make_trainer(
        tmp_path,
        dataset_size=size,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        dataloader_drop_last=drop_last,
    )
    batches = len(trainer.get_train_dataloader())
    steps = batches // accumulation + int(batches % accumulation > 0)  # the Trainer's num_update_steps_per_epoch
    assert update_steps_per_epoch(size, args) == steps
    apply_recipe(RecipeArguments(warmup_epochs=2.5), args, size)
    assert args.warmup_steps == max(round(2.5 * steps), 1)
    assert args.get_warmup_steps(10_000) == args.warmup_steps
    with pytest.raises(ValueError, match="warmup_epochs"):
        apply_recipe(RecipeArguments(warmup_epochs=-1), args, size)


# --------------------------------------------------------------------------------------------------------------------
# 5. Model EMA


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


# --------------------------------------------------------------------------------------------------------------------
# 6. Eval-only mode and the end-to-end flags


@pytest.mark.slow
def test_eval_only_mode_writes_metrics_and_no_model(tmp_path):
    module = load_script()
    base = tmp_path / "base"
    model, processor = build_classifier(
        ModelArguments(hidden_size=32, num_hidden_layers=2), [str(d) for d in range(10)]
    )
    model.save_pretrained(base)
    processor.save_pretrained(base)
    out = tmp_path / "eval"
    metrics = module.main(["--model", str(base), "--output_dir", str(out), *FAST, "--do_train", "false", "--do_eval"])
    assert 0.0 <= metrics["eval_top1"] <= 1.0
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_top1"] == pytest.approx(metrics["eval_top1"])
    assert not list(out.glob("*.safetensors")) and not list(out.glob("checkpoint-*"))
    assert not (out / "train_results.json").exists()
    with pytest.raises(ValueError, match="--model"):
        module.main(["--output_dir", str(tmp_path / "x"), *FAST, "--do_train", "false", "--do_eval"])


@pytest.mark.slow
def test_script_trains_with_the_recipe_flags(tmp_path):
    module = load_script()
    out = tmp_path / "run"
    metrics = module.main(
        [
            "--output_dir",
            str(out),
            *FAST,
            "--gradient_accumulation_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--scale_lr",
            "--warmup_epochs",
            "1",
            "--drop_path_rate",
            "0.1",
            "--model_ema",
            "--model_ema_decay",
            "0.9",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
        ]
    )
    assert math.isfinite(metrics["eval_loss"])
    args = json.loads((out / "training_args.json").read_text())
    assert args["learning_rate"] == pytest.approx(1e-3 * 32 / 512)
    assert args["warmup_steps"] == 2  # 64 images / (16 x 2) per step
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("images_per_second" in entry for entry in state["log_history"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
