"""examples/run_diverse_no_trainer.py: the plain Accelerate loop optimises exactly what DiverseTrainer does; its flags'
names and aliases, log levels per process and one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import datasets
import pytest
import transformers
from fixtures.scripts import REPO, RUN_DIVERSE, RUN_DIVERSE_NO_TRAINER, SCRIPT_ENV, load_script, run_checked

from diverse_vit_hf.hub.model_card import validate_card_offline

NO_TRAINER = RUN_DIVERSE_NO_TRAINER
ENV = {**SCRIPT_ENV, "OMP_NUM_THREADS": "2"}
# The same data, model, seed and recipe for both scripts (every regularizer and Mixup/CutMix on, by default).
COMMON = (
    "--max_train_samples 128 --max_eval_samples 32 --hidden_size 32 --num_hidden_layers 2 "
    "--per_device_train_batch_size 16 --logging_steps 1 --seed 3 --learning_rate 2e-3 --weight_decay 0.05 "
    "--warmup_steps 0"
).split()


def _run(command: list[str]) -> None:
    run_checked(command, env=ENV, timeout=600)


@pytest.mark.slow
def test_first_steps_equal_the_trainer_path_and_the_result_is_a_plain_checkpoint(tmp_path):
    loop, trainer = tmp_path / "loop", tmp_path / "trainer"
    _run([sys.executable, str(NO_TRAINER), "--output_dir", str(loop), "--max_train_steps", "3",
          "--checkpointing_steps", "2", *COMMON])  # fmt: skip
    _run([sys.executable, str(RUN_DIVERSE), "--output_dir", str(trainer), "--max_steps", "3",
          "--use_cpu", "--save_strategy", "no", "--redundancy_images", "0", *COMMON])  # fmt: skip

    ours = json.loads((loop / "log_history.json").read_text())
    theirs = [e for e in json.loads((trainer / "trainer_state.json").read_text())["log_history"] if "loss_cls" in e]
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] == [1, 2, 3]
    names = ["loss", "loss_cls", "loss_patch_cosine", "loss_patch_contrastive", "loss_attention_cosine",
             "loss_weight_condition"]  # fmt: skip
    for a, b in zip(ours, theirs, strict=True):
        for name in names:
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (a["step"], name)
    assert ours[0]["loss"] != ours[-1]["loss"], "nothing was trained: the comparison would be vacuous"

    config = json.loads((loop / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert (loop / "model.safetensors").is_file() and not list(loop.glob("*.bin"))
    assert (loop / "checkpoint-2").is_dir() and not list(loop.glob(".checkpoint-*"))
    card = validate_card_offline(loop / "README.md")
    assert "diverse-vit" in card.data.tags


@pytest.mark.slow
def test_resuming_the_loop_continues_the_same_trajectory(tmp_path):
    """Resuming from the checkpoint of step 2 (copied into a fresh folder) logs the same step 3 as the uninterrupted
    run: weights, optimizer, scheduler and random states are all restored. (No random augmentation: the images a
    data loader prefetched before the checkpoint was written were augmented with draws no checkpoint holds.)"""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    flags = [*COMMON, "--max_train_steps", "3", "--checkpointing_steps", "2", "--augmentation", "none"]
    _run([sys.executable, str(NO_TRAINER), "--output_dir", str(whole), *flags])
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    _run([sys.executable, str(NO_TRAINER), "--output_dir", str(resumed), *flags, "--resume_from_checkpoint", "last"])
    third = json.loads((whole / "log_history.json").read_text())[-1]
    logged = json.loads((resumed / "log_history.json").read_text())
    assert [e["step"] for e in logged] == [3]
    for name in ("loss", "loss_cls", "loss_patch_cosine", "loss_weight_condition"):
        assert logged[0][name] == pytest.approx(third[name], rel=1e-6), name


# ---- Flags, log levels and errors (no training) ---------------------------------------------------------------------


@pytest.fixture
def no_trainer(monkeypatch):
    """The script as a module, its data loading replaced by the embedded digits' first images, and its model builder
    by one that records what it was given and the log levels at that point, then stops."""
    module = load_script(NO_TRAINER, "run_diverse_no_trainer_flags")
    module.built = []

    class Stop(Exception):
        pass

    def build(model_args, labels):
        levels = (
            module.logger.getEffectiveLevel(),
            transformers.utils.logging.get_verbosity(),
            datasets.utils.logging.get_verbosity(),
        )
        module.built.append((model_args, levels))
        raise Stop

    monkeypatch.setattr(module, "build_classifier", build)
    module.Stop = Stop
    saved = module.logger.level, transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    yield module
    module.logger.setLevel(saved[0])
    transformers.utils.logging.set_verbosity(saved[1])
    datasets.utils.logging.set_verbosity(saved[2])
    sys.modules.pop("run_diverse_no_trainer_flags", None)


FLAGS = ["--max_train_samples", "16", "--max_eval_samples", "8"]


def test_model_name_or_path_and_its_alias_are_the_same_flag(no_trainer, tmp_path):
    for flag in ("--model_name_or_path", "--model"):
        with pytest.raises(no_trainer.Stop):
            no_trainer.main([flag, "some/checkpoint", "--output_dir", str(tmp_path / flag), *FLAGS])
    (by_name, _), (by_alias, _) = no_trainer.built
    assert by_name == by_alias and by_name.model_name_or_path == "some/checkpoint"


@pytest.mark.parametrize("main_process", [True, False])
def test_logs_print_once(no_trainer, monkeypatch, tmp_path, main_process):
    class Accelerator(no_trainer.Accelerator):
        is_local_main_process = main_process

    monkeypatch.setattr(no_trainer, "Accelerator", Accelerator)
    with pytest.raises(no_trainer.Stop):
        no_trainer.main(["--output_dir", str(tmp_path), *FLAGS])
    script_level = logging.INFO if main_process else logging.WARNING
    assert no_trainer.built[0][1] == (script_level, logging.WARNING, logging.WARNING)


def test_unknown_flags_name_the_closest_flag(no_trainer, tmp_path):
    with pytest.raises(ValueError, match=r"'--modl' \(did you mean --model\?\).*run_diverse_no_trainer.py --help"):
        no_trainer.main(["--modl", "x", "--output_dir", str(tmp_path)])


def test_bad_flags_exit_2_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(NO_TRAINER), "--learnig_rate", "1", "--output_dir", str(tmp_path)],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "did you mean --learning_rate?" in run.stderr and "Traceback" not in run.stderr
