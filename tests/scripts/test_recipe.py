"""`diverse_vit_hf.scripts.recipe` and the recipe flags of examples/run_diverse.py: `--scale_lr` (the global batch),
`--warmup_epochs` (the Trainer's steps per epoch), the flags documented on the command line, eval-only mode and a run
with every recipe flag (throughput logged). The named DeiT configurations, weight decay groups and the model EMA are
tested with their modules (tests/models/test_presets.py, tests/trainer/test_optim.py, tests/trainer/test_ema.py).
Tiny ViTs on CPU."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
from fixtures.builders import make_recipe_args as make_args
from fixtures.builders import make_recipe_trainer as make_trainer
from fixtures.scripts import fast_flags
from fixtures.scripts import load_script as _load_script
from transformers import HfArgumentParser

from diverse_vit_hf import (
    DiverseTrainingArguments,
)
from diverse_vit_hf.scripts.arguments import ModelArguments, RecipeArguments
from diverse_vit_hf.scripts.model_builder import build_classifier
from diverse_vit_hf.scripts.recipe import apply_recipe, update_steps_per_epoch

FAST = fast_flags()


def load_script():
    return _load_script(name="run_diverse_recipe")


# --------------------------------------------------------------------------------------------------------------------
# The recipe flags


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
    assert (model_args.config_name, model_args.drop_path_rate) == ("deit-small-24", 0.1)
    assert (recipe_args.scale_lr, recipe_args.warmup_epochs) == (True, 5.0)
    assert (training_args.model_ema, training_args.model_ema_decay, training_args.model_ema_eval) == (True, 0.999, True)
    for dataclass_type in (RecipeArguments, ModelArguments):
        assert all(f.metadata.get("help") for f in fields(dataclass_type)), dataclass_type
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--model_config_name", "vit-huge"])
    with pytest.raises(ValueError, match="model_ema_decay"):
        make_args(tmp_path, model_ema_decay=1.0)


# --------------------------------------------------------------------------------------------------------------------
# --scale_lr and --warmup_epochs


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
# Eval-only mode and the end-to-end flags


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
