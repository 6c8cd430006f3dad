"""Per-sample augmentation randomness, for training that resumes exactly.

A random augmentation that draws from the process-global generators (torch's default CPU generator, Python's `random`,
NumPy's global `RandomState`) makes each image's augmentation depend on everything drawn before it: the data loader's
prefetching, which worker process loaded it, and which batches a resumed run skipped. The random states a checkpoint
saves then do not replay what the uninterrupted run drew after it.

Here every training image instead draws from generators seeded by `sample_seed(seed, rank, epoch, index, occurrence)`
just for that image (`seeded_rng`), and the global states are put back afterwards: an image's augmentation depends
only on those five numbers, and the draws of the training step in the main process (Mixup/CutMix, drop path) are not
shifted by loading data. `ImageBatchTransform` (`data.py`) applies the seeds and `SeededImageDataset` (`data.py`)
computes them; `SampleEpochCallback` gives the dataset the epoch under `Trainer`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

_SEED_PERSON = b"dvit-sample"  # blake2b personalisation: these seeds are not any other hash of the same integers
_SPLIT_PERSON = b"dvit-rng-split"


def _pack(*values: int) -> bytes:
    return b"".join(int(value).to_bytes(16, "little", signed=True) for value in values)


def sample_seed(seed: int, rank: int, epoch: int, index: int, occurrence: int = 0) -> int:
    """The 64-bit seed of one training sample's augmentation.

    A stable hash (BLAKE2b, the same on every platform, Python version and process; not Python's salted `hash`) of
    the five integers, so two samples that differ in any of them draw unrelated augmentations.

    Args:
        seed: the training seed (`--seed`).
        rank: the process index (each process its own stream, as DeiT seeds process r with seed + r).
        epoch: the epoch the sample is loaded in: a new augmentation every epoch.
        index: the sample's index in the dataset.
        occurrence: the k-th copy of `index` in one fetch (repeated augmentation puts copies of an image in one batch;
            each copy is augmented differently).
    """
    digest = hashlib.blake2b(_pack(seed, rank, epoch, index, occurrence), digest_size=8, person=_SEED_PERSON)
    return int.from_bytes(digest.digest(), "little")


def _generator_seeds(seed: int) -> tuple[int, int, int]:
    """(torch, Python, NumPy) seeds derived from one 64-bit seed. Separate values: torch's CPU generator and NumPy's
    legacy `RandomState` are both MT19937 initialised from 32 bits the same way, so one value would give both the same
    raw stream."""
    digest = hashlib.blake2b(_pack(seed), digest_size=20, person=_SPLIT_PERSON).digest()
    return (
        int.from_bytes(digest[:8], "little"),
        int.from_bytes(digest[8:16], "little"),
        int.from_bytes(digest[16:], "little"),  # 32 bits: what np.random.seed takes
    )


def seed_global_rng(seed: int) -> None:
    """Seed torch's default CPU generator, Python's `random` and NumPy's global `RandomState` from `seed`.

    Only the CPU generator: `torch.manual_seed` would also reseed every CUDA generator, whose draws (drop path,
    dropout on the GPU) belong to the training step."""
    torch_seed, python_seed, numpy_seed = _generator_seeds(seed)
    torch.default_generator.manual_seed(torch_seed)
    random.seed(python_seed)
    np.random.seed(numpy_seed)


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Save the states of torch's default CPU generator, Python's `random` and NumPy's global `RandomState`, and put
    all three back on exit (also when the body raises): what the body draws does not shift the caller's streams."""
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with the three global generators seeded from `seed` (`seed_global_rng`), restoring their previous
    states afterwards (`preserved_global_rng`)."""
    with preserved_global_rng():
        seed_global_rng(seed)
        yield


class SampleEpochCallback(TrainerCallback):
    """Tells the seeded training dataset (`data.SeededImageDataset`) the epoch at the start of each epoch.

    `state.epoch` is `epoch + (step + 1) / steps_in_epoch` during an epoch, so its floor is the epoch under way, also
    when a run resumes in the middle of one; `on_epoch_begin` runs before the epoch's data iterator (and its workers)
    starts. `DiverseTrainer.get_train_dataloader` sets `dataset`.
    """

    def __init__(self) -> None:
        self.dataset: Any = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.dataset is not None:
            self.dataset.set_epoch(math.floor(state.epoch or 0))


__all__ = ["SampleEpochCallback", "preserved_global_rng", "sample_seed", "seed_global_rng", "seeded_rng"]
