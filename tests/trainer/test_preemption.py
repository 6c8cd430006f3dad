"""Signals end a training with a complete checkpoint (a real signal sent to this process), and a run killed with
SIGKILL at random moments, inside saves too, then started again with the same command, ends bitwise where the
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.builders import build_trainer, make_args, make_dataset, snapshot
from fixtures.scripts import REPO, RUN_DIVERSE, SCRIPT_ENV
from safetensors.torch import load_file
from transformers import TrainerCallback

from diverse_vit_hf.trainer.checkpoint_integrity import verify_checkpoint
from diverse_vit_hf.trainer.preemption import parse_stop_signals


class SignalAtStep(TrainerCallback):
    """Sends a real signal to this process during the optimizer step `step` (before it ends)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_stops(tmp_path, signum):
    common = dict(max_steps=8, save_strategy="steps", save_steps=100, eval_strategy="steps", eval_steps=1)
    held_out = make_dataset(16, seed=1)
    reference = build_trainer(make_args(tmp_path / "reference", **common), dataset_size=48, eval_dataset=held_out)
    reference.train()
    previous = signal.getsignal(signum)
    stopped = build_trainer(make_args(tmp_path / "stopped", **common), dataset_size=48, eval_dataset=held_out)
    stopped.add_callback(SignalAtStep(3, signum))
    stopped.train()
    assert stopped.stopped_by_signal == signal.Signals(signum).name and stopped.state.global_step == 3
    assert signal.getsignal(signum) is previous, "the handler was not restored"
    checkpoint = tmp_path / "stopped" / "checkpoint-3"
    assert verify_checkpoint(checkpoint).intact and not verify_checkpoint(checkpoint).missing_state
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir() if not p.name.startswith(".")) == ["checkpoint-3"]
    assert not any("eval_loss" in entry for entry in stopped.state.log_history if entry["step"] == 3)
    resumed = build_trainer(
        make_args(tmp_path / "stopped", **common), dataset_size=48, model_seed=9, eval_dataset=held_out
    )
    resumed.train(resume_from_checkpoint="auto")
    assert resumed.stopped_by_signal is None and resumed.state.global_step == 8
    expected, got = snapshot(reference.model), snapshot(resumed.model)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_stop_signals_are_parsed_and_uncatchable_ones_refused(tmp_path):
    assert parse_stop_signals("SIGTERM, usr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_stop_signals("") == []
    for bad in ("SIGKILL", "SIGNOPE"):
        with pytest.raises(ValueError, match="is not a signal a process can catch"):
            make_args(tmp_path, stop_signals=bad)
    assert build_trainer(make_args(tmp_path, stop_signals="")).signal_callback is None


def test_transformers_jit_checkpoint_is_refused_with_what_to_use(tmp_path):
    args = make_args(tmp_path)
    if not hasattr(args, "enable_jit_checkpoint"):
        pytest.skip("this transformers release has no --enable_jit_checkpoint")
    args.enable_jit_checkpoint = True
    with pytest.raises(ValueError, match=r"--enable_jit_checkpoint is not supported.*--stop_signals"):
        build_trainer(args)


# --------------------------------------------------------------------------------------------------------------------
# Crash consistency: random SIGKILLs, each followed by the start-or-resume command


def crash_consistency_command(output: Path) -> list[str]:
    flags = ["--max_train_samples", "96", "--max_eval_samples", "16", "--hidden_size", "32", "--num_hidden_layers", "2",
             "--per_device_train_batch_size", "16", "--max_steps", "18", "--save_strategy", "steps", "--save_steps",
             "2", "--save_total_limit", "2", "--logging_steps", "1", "--drop_path_rate", "0.1", "--redundancy_images",
             "0", "--disable_tqdm", "true", "--use_cpu", "--output_dir", str(output),
             "--resume_from_checkpoint", "auto"]  # fmt: skip
    return [sys.executable, str(RUN_DIVERSE), *flags]


def kill_at_a_random_moment(command: list[str], output: Path, log: Path, rng: random.Random) -> int:
    """Start the command and SIGKILL it after 1-3 more logged training steps, half of the time at the moment a
    checkpoint is being staged. Returns the exit code (0 when it finished first)."""
    steps_wanted, inside_a_save = rng.randint(1, 3), rng.random() < 0.5
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=SCRIPT_ENV, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        logged = log.read_text(errors="replace").count("'loss'")
        if logged >= steps_wanted and (not inside_a_save or list(output.glob(".checkpoint-*.saving"))):
            process.kill()
            break
        time.sleep(0.001 if logged >= steps_wanted else 0.05)
    process.wait(timeout=60)
    return process.returncode


@pytest.mark.slow
def test_random_kills_then_the_same_command_end_where_the_uninterrupted_run_ends(tmp_path):
    reference = tmp_path / "reference"
    run = subprocess.run(crash_consistency_command(reference), cwd=REPO, env=SCRIPT_ENV, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    crashed = tmp_path / "crashed"
    command = crash_consistency_command(crashed)
    rng = random.Random(int(os.environ.get("CRASH_TEST_SEED", "0")))
    codes = [kill_at_a_random_moment(command, crashed, tmp_path / f"run-{i}.log", rng) for i in range(4)]
    final = subprocess.run(command, cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert codes.count(-signal.SIGKILL) >= 2, f"too few kills landed during training: {codes}"
    expected = load_file(str(reference / "model.safetensors"))
    got = load_file(str(crashed / "model.safetensors"))
    differing = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not differing, f"after kills {codes}: {differing[:5]} differ"
    state = json.loads((crashed / "trainer_state.json").read_text())
    assert state["global_step"] == 18
    reference_losses = {e["step"]: e["loss"] for e in json.loads((reference / "trainer_state.json").read_text())[
        "log_history"] if "loss" in e}  # fmt: skip
    crashed_losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert crashed_losses == reference_losses
