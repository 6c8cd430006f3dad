"""`diverse_vit_hf.trainer.training_args.DiverseTrainingArguments`: every option of the method is a validated
command-line flag, the Hub token never reaches a file, a log or a pickle, and launcher processes without an
accelerator are detected."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from fixtures.builders import build_trainer, make_args
from transformers import HfArgumentParser

from diverse_vit_hf import DiverseTrainingArguments
from diverse_vit_hf.trainer.training_args import launched_without_accelerator

SECRET = "hf_secretTOKENabcdefghijklmnopqrstuvwxyz0123"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("patch_cosine_coef", -0.5, "patch_cosine_coef"),
        ("weight_condition_coef", float("nan"), ">= 0"),
        ("attention_cosine_coef", float("inf"), "finite"),
        ("weight_estimator", "lanczos", "weight_estimator"),
        ("patch_cosine_variant", "absolute", "patch_cosine_variant"),
        ("power_iterations", 0, "power_iterations"),
        ("mix_prob", 1.5, "mix_prob"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_args(tmp_path / "out", **{field: value})


def test_every_option_is_a_cli_flag(tmp_path):
    parser = HfArgumentParser(DiverseTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--patch_cosine_coef",
            "0.25",
            "--no_mixing",
            "--weight_estimator",
            "exact",
            "--power_persistent",
            "--power_iterations",
            "3",
            "--no_patch_mixing_loss",
            "--use_cpu",
        ]
    )
    assert (args.patch_cosine_coef, args.mixing, args.weight_estimator) == (0.25, False, "exact")
    assert (args.power_persistent, args.power_iterations, args.patch_mixing_loss) == (True, 3, False)
    assert args.patch_contrastive_coef == 0.5 and args.attention_cosine_coef == 1e-4
    assert args.weight_condition_coef == 5e-4 and args.label_smoothing_factor == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--weight_estimator", "nope"])


def test_hub_token_is_never_written_or_logged(tmp_path, caplog, capsys):
    with caplog.at_level(logging.DEBUG):
        args = make_args(tmp_path, logging_steps=1, learning_rate=1e-2, max_steps=2, save_strategy="steps",
                         save_steps=1, hub_token=SECRET)  # fmt: skip
        trainer = build_trainer(args)
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


def test_launcher_processes_without_an_accelerator_are_detected(monkeypatch):
    """What switches use_cpu on (gloo DDP) under torchrun / accelerate on a machine without a GPU; the end-to-end
    launches are in tests/trainer/test_distributed_training.py."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched_without_accelerator()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_without_accelerator() == (not torch.cuda.is_available())
