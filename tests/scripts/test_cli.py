"""`diverse-vit train`: the console command's subcommand runs the training script's `main` with the remaining
arguments and its exit codes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.scripts import REPO, SCRIPT_ENV, fast_flags

from diverse_vit_hf.scripts import cli, train
from diverse_vit_hf.trainer.output_folder import OutputFolderLockedError


def test_train_help_lists_the_training_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diverse-vit train")
    flags = ["--model_name_or_path", "--model MODEL_NAME_OR_PATH", "--config_name", "--model_config_name {deit-tiny"]
    for flag in [*flags, "--patch_cosine_coef", "--learning_rate"]:
        assert flag in out, flag


def test_the_command_lists_train(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "train" in capsys.readouterr().out


def test_train_runs_the_scripts_main_with_the_remaining_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(train, "main", lambda argv=None, **kwargs: calls.append((argv, kwargs)) or {})
    assert cli.main(["train", "--model", "x", "args.yaml"]) == 0
    assert calls == [(["--model", "x", "args.yaml"], {"prog": "diverse-vit train"})]


@pytest.mark.parametrize(
    ("error", "code"),
    [(ValueError("bad"), 2), (OSError("gone"), 2), (OutputFolderLockedError("held"), 5)],
)
def test_train_exits_with_the_scripts_codes(monkeypatch, caplog, error, code):
    def fail(argv=None, **kwargs):
        raise error

    monkeypatch.setattr(train, "main", fail)
    with caplog.at_level(logging.ERROR, logger="run_diverse"):
        assert cli.main(["train"]) == code
    assert str(error) in caplog.text


def test_train_lets_a_programming_error_propagate(monkeypatch):
    def fail(argv=None, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(train, "main", fail)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["train"])


def test_train_names_itself_in_unknown_flag_messages(caplog):
    with caplog.at_level(logging.ERROR, logger="run_diverse"):
        assert cli.main(["train", "--modle", "x"]) == 2
    assert "'--modle' (did you mean --model?)" in caplog.text and "`diverse-vit train --help`" in caplog.text


def test_installed_command_train_help():
    command = Path(sys.executable).with_name("diverse-vit")
    if not command.is_file():
        pytest.skip("the diverse-vit console script is not installed next to this Python")
    run = subprocess.run([str(command), "train", "--help"], env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--model_name_or_path" in run.stdout and "usage: diverse-vit train" in run.stdout


@pytest.mark.slow
def test_train_trains_as_the_example_script(tmp_path):
    output = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "diverse_vit_hf.scripts.cli", "train", "--output_dir", str(output), *fast_flags(),
         "--redundancy_images", "0"],
        cwd=REPO,
        env=SCRIPT_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Validation top-1 accuracy:" in run.stdout
    assert json.loads((output / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    again = subprocess.run(
        [sys.executable, "-m", "diverse_vit_hf.scripts.cli", "train", "--output_dir", str(output), *fast_flags()],
        cwd=REPO,
        env=SCRIPT_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 2 and "Traceback" not in again.stderr  # a finished folder: refused, as the script
