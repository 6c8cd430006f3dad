"""The exact resume that per-sample augmentation seeds give (the seeds themselves: tests/data/test_sample_seeding.py).

`DiverseTrainer` loads its image training data through the seeded wrapper, so a resumed run draws the same
augmentations as the uninterrupted one; the slow tests resume `examples/run_diverse.py` and
`examples/run_diverse_no_trainer.py` from a mid-epoch checkpoint and compare every weight bit for bit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from fixtures.builders import make_args, make_dataset, tiny_config
from fixtures.scripts import RUN_DIVERSE, RUN_DIVERSE_NO_TRAINER, SCRIPT_ENV, fast_flags, run_checked
from safetensors.torch import load_file

from diverse_vit_hf import DiverseTrainer, DiverseViTForImageClassification
from diverse_vit_hf.data.image_datasets import (
    SeededImageDataset,
    collate_image_batch,
)

# ---- DiverseTrainer -----------------------------------------------------------------------------------------------


def test_the_trainer_loads_its_image_training_data_through_the_seeded_wrapper(augmented_digits, tmp_path):
    _, train, _ = augmented_digits
    args = make_args(tmp_path, seed=9, dataloader_num_workers=0)
    torch.manual_seed(0)
    trainer = DiverseTrainer(
        model=DiverseViTForImageClassification(tiny_config(num_labels=10, image_size=28)),
        args=args,
        train_dataset=train,
        eval_dataset=train,
        data_collator=collate_image_batch,
    )
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.dataset, SeededImageDataset)
    assert (loader.dataset.seed, loader.dataset.rank, loader.dataset.dataset) == (9, args.process_index, train)
    assert trainer.train_dataset is train  # swapped only while the loader was built
    callback = trainer.sample_epoch_callback
    assert callback in trainer.callback_handler.callbacks and callback.dataset is loader.dataset
    assert trainer.get_eval_dataloader().dataset is train  # evaluation is never wrapped

    before = torch.get_rng_state()
    batch = next(iter(loader))  # starting the iterator and loading: nothing drawn from the global generator
    assert torch.equal(torch.get_rng_state(), before)
    assert batch["pixel_values"].shape == (8, 3, 28, 28)

    plain = DiverseTrainer(
        model=DiverseViTForImageClassification(tiny_config()),
        args=args,
        train_dataset=make_dataset(16),
        data_collator=collate_image_batch,
    )
    assert not isinstance(plain.get_train_dataloader().dataset, SeededImageDataset)


# ---- End to end: resume from a mid-epoch checkpoint, bit for bit ---------------------------------------------------

STEPS, CHECKPOINT = 10, 6  # 64 images in batches of 16: 4 steps an epoch; step 6 is in the middle of epoch 1


def _run_diverse(output: Path, flags: list[str]) -> None:
    common = [*fast_flags(max_train_samples=64, max_eval_samples=16, batch_size=16), "--max_steps", str(STEPS),
              "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps",
              str(CHECKPOINT), "--redundancy_images", "0", "--seed", "5"]  # fmt: skip
    run_checked([sys.executable, str(RUN_DIVERSE), "--output_dir", str(output), *common, *flags], timeout=600)


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    differ = {k: (first[k] - second[k]).abs().max().item() for k in first if not torch.equal(first[k], second[k])}
    assert not differ, f"{len(differ)} of {len(first)} tensors differ, max |diff| {max(differ.values()):.3g}"


def _logged_after(folder: Path, step: int) -> list[dict]:
    """The losses (total and every term), gradient norm and learning rate logged after `step`."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    kept = ("grad_norm", "learning_rate", "step")
    return [
        {k: v for k, v in entry.items() if k.startswith("loss") or k in kept}
        for entry in history
        if "loss" in entry and entry["step"] > step
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "resumed_flags"),
    [
        (["--drop_path_rate", "0.1"], []),
        (["--augmentation", "deit", "--dataloader_num_workers", "2"], []),
        # Resumed with persistent workers where the first run had none: the workers do not change the trajectory.
        (["--drop_path_rate", "0.1"], ["--dataloader_num_workers", "2", "--dataloader_persistent_workers", "true"]),
    ],
    ids=["light-mixing-droppath-0-workers", "deit-mixing-2-workers", "light-droppath-0-then-2-persistent-workers"],
)
def test_run_diverse_resumed_mid_epoch_ends_with_the_same_weights(tmp_path, flags, resumed_flags):
    """Random augmentation (light crops or DeiT's RandAugment + random erasing), Mixup/CutMix (on by default) and drop
    path: resuming from checkpoint-6 of a 10-step run (mid epoch 1; the rest crosses into epoch 2) logs the same losses
    and ends with bitwise the same weights."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run_diverse(whole, flags)
    resumed.mkdir()
    checkpoint = shutil.copytree(whole / f"checkpoint-{CHECKPOINT}", resumed / f"checkpoint-{CHECKPOINT}")
    _run_diverse(resumed, [*flags, *resumed_flags, "--resume_from_checkpoint", str(checkpoint)])

    expected, got = _logged_after(whole, CHECKPOINT), _logged_after(resumed, CHECKPOINT)
    assert [e["step"] for e in got] == list(range(CHECKPOINT + 1, STEPS + 1))
    assert got == expected
    _assert_same_weights(whole, resumed)


@pytest.mark.slow
def test_run_diverse_no_trainer_resumed_mid_epoch_with_augmentation_and_workers_ends_with_the_same_weights(tmp_path):
    """The plain Accelerate loop: light augmentation, Mixup/CutMix and 2 data-loader workers, resumed from
    checkpoint-6 (mid epoch 1 of 4-step epochs) of a 10-step run."""
    flags = ("--max_train_samples 64 --max_eval_samples 16 --hidden_size 32 --num_hidden_layers 2 "
             "--per_device_train_batch_size 16 --logging_steps 1 --seed 3 --warmup_steps 0 --max_train_steps 10 "
             "--checkpointing_steps 6 --save_total_limit 0 --dataloader_num_workers 2").split()  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    env = {**SCRIPT_ENV, "OMP_NUM_THREADS": "2"}
    run_checked([sys.executable, str(RUN_DIVERSE_NO_TRAINER), "--output_dir", str(whole), *flags], env=env, timeout=600)
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-6", resumed / "checkpoint-6")
    run_checked([sys.executable, str(RUN_DIVERSE_NO_TRAINER), "--output_dir", str(resumed), *flags,
                 "--resume_from_checkpoint", "last"], env=env, timeout=600)  # fmt: skip

    expected = [e for e in json.loads((whole / "log_history.json").read_text()) if e["step"] > 6]
    got = json.loads((resumed / "log_history.json").read_text())
    assert [e["step"] for e in got] == list(range(7, 11))
    assert got == expected
    _assert_same_weights(whole, resumed)
