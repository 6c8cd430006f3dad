"""Two CPU processes (torchrun, gloo) give the same training as one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_diverse.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
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
    run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


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
