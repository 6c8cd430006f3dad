"""Per-sample augmentation seeds (`data.sample_seeding`, `data.image_datasets.SeededImageDataset`).

Each training image draws its random augmentation from `sample_seed(seed, rank, epoch, index, occurrence)`, never
from the process-global generators, so the images prefetched before a checkpoint, the batches a resumed run skips and
the workers' seeds do not change what a resumed run draws. Checked here against computations done by hand: the seed,
the restored global states, the wrapper, data-loader workers and the epoch callback. The trainer's use of it and the
bitwise resume it gives are in tests/trainer/test_exact_resume.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from fixtures.builders import make_dataset
from torch.utils.data import DataLoader
from transformers import TrainerState

from diverse_vit_hf.data.image_datasets import (
    SeededImageDataset,
    apply_image_transform,
    collate_image_batch,
    seeded_training_dataset,
)
from diverse_vit_hf.data.sample_seeding import SampleEpochCallback, sample_seed, seeded_rng


def _pixels(rows: list[dict]) -> list[torch.Tensor]:
    return [row["pixel_values"] for row in rows]


def _global_draws() -> tuple[list[float], float, list[float]]:
    return torch.rand(4).tolist(), random.random(), np.random.rand(4).tolist()


def _global_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


# ---- The seed -------------------------------------------------------------------------------------------------


def test_sample_seed_is_a_stable_64_bit_value_that_changes_with_every_input():
    base = (3, 1, 2, 17, 0)
    seed = sample_seed(*base)
    assert seed == sample_seed(*base) and 0 <= seed < 2**64
    # Pinned: the same on every platform, Python version and process (no salted `hash`), so checkpoints of one
    # machine resume with the same augmentations on another.
    assert seed == sample_seed(seed=3, rank=1, epoch=2, index=17, occurrence=0) == 18150710698385139796
    for position in range(5):
        for delta in (1, -1, 1000):
            changed = list(base)
            changed[position] += delta
            assert sample_seed(*changed) != seed, (position, delta)
    # Not symmetric in its inputs: swapping two of them gives another seed.
    assert sample_seed(1, 3, 2, 17, 0) != seed and sample_seed(3, 1, 17, 2, 0) != seed
    seeds = {sample_seed(0, 0, epoch, index) for epoch in range(20) for index in range(500)}
    assert len(seeds) == 20 * 500


def test_seeded_rng_leaves_the_global_streams_exactly_where_they_were():
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    expected = _global_draws()  # what the caller draws next without the context

    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    with seeded_rng(sample_seed(0, 0, 0, 5)):
        inside = _global_draws()
    assert _global_draws() == expected
    with seeded_rng(sample_seed(0, 0, 0, 5)):
        assert _global_draws() == inside  # deterministic for a seed
    with seeded_rng(sample_seed(0, 0, 0, 6)):
        other = _global_draws()
    assert all(a != b for a, b in zip(other, inside, strict=True))  # torch, Python and NumPy all reseeded

    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    with pytest.raises(RuntimeError), seeded_rng(1):
        _global_draws()
        raise RuntimeError("the body failed")
    assert _global_draws() == expected  # restored on the way out of a failing body too


# ---- The wrapper --------------------------------------------------------------------------------------------------


def test_each_row_is_the_transform_applied_by_hand_under_its_own_seed(augmented_digits):
    raw, train, transform = augmented_digits
    seeded = SeededImageDataset(train, seed=7, rank=1)
    seeded.set_epoch(2)
    indices = [3, 5, 3, 0]
    rows = seeded.__getitems__(indices)
    for row, index, occurrence in zip(rows, indices, [0, 0, 1, 0], strict=True):
        with seeded_rng(sample_seed(7, 1, 2, index, occurrence)):
            expected = transform(raw[index]["image"])
        assert torch.equal(row["pixel_values"], expected), (index, occurrence)
        assert row["labels"] == raw[index]["label"]
    assert len(seeded) == len(train) and seeded.features == train.features and seeded.dataset is train
    assert torch.equal(seeded[5]["pixel_values"], rows[1]["pixel_values"])  # __getitem__: occurrence 0


def test_an_image_depends_on_its_index_and_epoch_only(augmented_digits):
    _, train, _ = augmented_digits
    seeded = SeededImageDataset(train, seed=0)
    first = dict(zip([1, 2, 3], _pixels(seeded.__getitems__([1, 2, 3])), strict=True))
    again = dict(zip([9, 3, 1], _pixels(seeded.__getitems__([9, 3, 1])), strict=True))
    assert torch.equal(first[1], again[1]) and torch.equal(first[3], again[3])  # other batch, other order
    assert torch.equal(seeded[2]["pixel_values"], first[2])

    seeded.set_epoch(1)
    assert seeded.epoch == 1
    assert not torch.equal(seeded[1]["pixel_values"], first[1])  # another epoch, another augmentation
    seeded.set_epoch(0)
    assert torch.equal(seeded[1]["pixel_values"], first[1])
    other_rank = SeededImageDataset(train, seed=0, rank=1)
    assert not torch.equal(other_rank[1]["pixel_values"], first[1])  # each process its own augmentations


def test_copies_of_an_image_in_one_fetch_are_augmented_differently(augmented_digits):
    _, train, _ = augmented_digits
    copies = _pixels(SeededImageDataset(train, seed=0).__getitems__([4, 4, 4]))
    assert not any(torch.equal(copies[i], copies[j]) for i, j in ((0, 1), (0, 2), (1, 2)))


def test_a_fetch_leaves_the_callers_global_random_states_untouched(augmented_digits):
    _, train, _ = augmented_digits
    before = _global_states()
    train.__getitems__([0, 1, 2])  # sanity: unseeded, the augmentation draws from the global generators
    assert not torch.equal(torch.get_rng_state(), before[0])

    before = _global_states()
    SeededImageDataset(train, seed=0).__getitems__([0, 1, 2, 1])
    after = _global_states()
    assert torch.equal(after[0], before[0]) and after[1] == before[1]
    assert all(np.array_equal(a, b) for a, b in zip(after[2], before[2], strict=True))


def test_the_row_seeds_are_cleared_and_an_unwrapped_fetch_is_unseeded(augmented_digits):
    _, train, _ = augmented_digits
    batch_transform = train.format["format_kwargs"]["transform"]
    SeededImageDataset(train, seed=0).__getitems__([0, 1])
    assert batch_transform.row_seeds is None
    torch.manual_seed(0)
    first = train[0]["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(train[0]["pixel_values"], first)  # unseeded: the global generator, as before
    assert not torch.equal(train[0]["pixel_values"], first)
    batch_transform.row_seeds = [1, 2, 3]  # seeds for other rows than the call's: refused, not misapplied
    try:
        with pytest.raises(RuntimeError, match="row seeds"):
            train.__getitems__([0, 1])
    finally:
        batch_transform.row_seeds = None


def test_only_a_dataset_with_an_image_batch_transform_is_wrapped(augmented_digits):
    raw, train, _ = augmented_digits
    assert isinstance(seeded_training_dataset(train, 0), SeededImageDataset)
    assert seeded_training_dataset(raw, 0) is None  # no transform
    assert seeded_training_dataset(make_dataset(4), 0) is None  # tensors, no image transform
    stream = apply_image_transform(raw.to_iterable_dataset(), augmented_digits[2], "image", "label")
    assert seeded_training_dataset(stream, 0) is None  # a stream is not wrapped
    with pytest.raises(TypeError, match="apply_image_transform"):
        SeededImageDataset(raw, seed=0)


# ---- Data-loader workers ------------------------------------------------------------------------------------------


def _epochs(seeded: SeededImageDataset, loader: DataLoader, epochs: int = 2) -> list[torch.Tensor]:
    batches = []
    for epoch in range(epochs):
        seeded.set_epoch(epoch)  # in the main process, before the epoch's iterator starts
        batches.extend(batch["pixel_values"] for batch in loader)
    return batches


@pytest.mark.parametrize(
    "loader_kwargs",
    [
        {"num_workers": 2},
        {"num_workers": 2, "persistent_workers": True},
        {"num_workers": 2, "multiprocessing_context": "spawn", "persistent_workers": True},
    ],
    ids=["fork", "fork-persistent", "spawn-persistent"],
)
def test_workers_load_exactly_what_the_main_process_loads(augmented_digits, loader_kwargs):
    _, train, _ = augmented_digits
    # A fixed order with a repeated index (repeated augmentation's copies): only the seeds differ between loaders.
    order = [5, 3, 5, 8, 1, 0, 2, 7, 9, 4, 6, 11]
    reference = SeededImageDataset(train.select(range(12)), seed=4)
    expected = _epochs(reference, DataLoader(reference, batch_size=4, sampler=order, collate_fn=collate_image_batch))
    assert not torch.equal(expected[0], expected[3])  # epoch 0 and epoch 1 differ

    seeded = SeededImageDataset(train.select(range(12)), seed=4)
    loader = DataLoader(seeded, batch_size=4, sampler=order, collate_fn=collate_image_batch, **loader_kwargs)
    got = _epochs(seeded, loader)
    assert len(got) == len(expected) == 6
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"batch {i} (epoch {i // 3}) differs"


# ---- The epoch callback -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("state_epoch", "epoch"), [(0.0, 0), (0.625, 0), (2.0, 2), (2.9375, 2), (3.0, 3)])
def test_the_epoch_callback_gives_the_epoch_under_way(augmented_digits, state_epoch, epoch):
    """`state.epoch` is exactly the integer epoch at an epoch start, and `epoch + (step + 1) / steps` in a resumed
    checkpoint's state: its floor is the epoch to augment for."""
    seeded = SeededImageDataset(augmented_digits[1], seed=0, epoch=7)
    callback, state = SampleEpochCallback(), TrainerState(epoch=state_epoch)
    callback.on_epoch_begin(None, state, None)  # no dataset yet: nothing to do
    callback.dataset = seeded
    callback.on_epoch_begin(None, state, None)
    assert seeded.epoch == epoch
