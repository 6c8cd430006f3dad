"""Two CPU processes (torchrun, gloo) give the same training as one process at the same global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from fixtures.scripts import RUN_DIVERSE, SCRIPT_ENV, WORKERS, run_checked
from safetensors.torch import load_file

SCRIPT = RUN_DIVERSE
ENV = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}
# Deterministic on both sides: no mixing (partners would differ per shard), no random augmentation, exact
# eigenvalues (no random power-iteration vectors), no dropout (the from-scratch config has none).
COMMON = [
    "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "4", "--logging_steps", "1",
    "--hidden_size", "32", "--num_hidden_layers", "2", "--augmentation", "none", "--no_mixing",
    "--weight_estimator", "exact", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
    "--use_cpu", "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
]  # fmt: skip
TERMS = ("loss_cls", "loss_patch_cosine", "loss_patch_contrastive", "loss_attention_cosine", "loss_weight_condition")


def _run(command: list[str]) -> None:
    run_checked(command, env=ENV)


def _logged_terms(folder: Path) -> list[dict[str, float]]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [{k: entry[k] for k in ("loss", *TERMS)} for entry in history if "loss_cls" in entry]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    _run([sys.executable, str(SCRIPT), "--output_dir", str(single), "--per_device_train_batch_size", "8", *COMMON])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
          str(SCRIPT), "--output_dir", str(double), "--per_device_train_batch_size", "4", *COMMON])  # fmt: skip

    one, two = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert one.keys() == two.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)

    single_terms, double_terms = _logged_terms(single), _logged_terms(double)
    assert len(single_terms) == len(double_terms) == 4
    assert single_terms[0]["loss"] != single_terms[-1]["loss"], "no training happened: the comparison is vacuous"
    for a, b in zip(single_terms, double_terms, strict=True):
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name

    # Only rank 0 writes: one set of files, no per-rank duplicates.
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())


DRAWS = WORKERS / "distributed_draws.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# The README's multi-process CPU forms (accelerate needs --multi_gpu to start more than one process).
CPU_LAUNCHERS = {
    "torchrun": [*TORCHRUN, "--master_port", "29561"],
    "accelerate-multi_gpu": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port", "29562"],
}  # fmt: skip
SMALL_RUN = (
    "--max_steps 6 --per_device_train_batch_size 16 --max_train_samples 640 --max_eval_samples 32 --hidden_size 32 "
    "--num_hidden_layers 2 --disable_tqdm true --redundancy_images 0 --save_strategy steps --save_steps 3"
).split()


@pytest.mark.slow
def test_each_rank_draws_its_own_randomness_and_a_rerun_draws_the_same(tmp_path):
    """DeiT seeds process r with seed + r: the ranks' Mixup/CutMix draws and drop-path masks differ, and a rerun with
    the same seed repeats them exactly. Launched without use_cpu on a machine without a GPU: still real DDP."""
    first, second = tmp_path / "first", tmp_path / "second"
    for out, port in ((first, "29551"), (second, "29552")):
        out.mkdir()
        _run([*TORCHRUN, "--master_port", port, str(DRAWS), str(out)])
    runs = [[json.loads((out / f"draws-{rank}.json").read_text()) for rank in (0, 1)] for out in (first, second)]
    for rank0, rank1 in runs:
        assert rank0["world_size"] == rank1["world_size"] == 2
        assert rank0["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert len(rank0["mixes"]) == 4 and len(rank0["drop_path_masks"]) > 0
        assert rank0["mixes"] != rank1["mixes"], "both ranks drew the same Mixup/CutMix choices and lambdas"
        assert rank0["drop_path_masks"] != rank1["drop_path_masks"], "both ranks drew the same drop-path masks"
    assert runs[0] == runs[1], "a rerun with the same seed drew different randomness"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(CPU_LAUNCHERS))
def test_cpu_launch_without_use_cpu_trains_one_synchronised_model(tmp_path, launcher):
    """The README's multi-process CPU commands, without --use_cpu: one DDP training over both processes (the epoch
    advances by the global batch of 2 x 16 images per step), not two unsynchronised trainings writing one folder."""
    out = tmp_path / "run"
    _run([*CPU_LAUNCHERS[launcher], str(SCRIPT), "--output_dir", str(out), *SMALL_RUN])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # 640 training images in global batches of 2 x 16: 20 steps an epoch (one process alone would need 40).
    assert state["epoch"] == pytest.approx(6 / 20)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
