"""Repeated augmentation: after Accelerate's batch sharding, each process gets exactly DeiT's RASampler indices."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from fixtures.builders import build_trainer, make_args
from torch.utils.data import BatchSampler

from diverse_vit_hf.data.sampling import RepeatedAugmentationSampler


def deit_rasampler(length: int, repeats: int, world: int, rank: int, seed: int) -> list[int]:
    """DeiT's RASampler.__iter__ (deit/samplers.py), restated: shuffle, repeat, pad, stride by rank, truncate."""
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed)).tolist()
    repeated = []
    for index in order:
        repeated.extend([index] * repeats)
    per_rank = math.ceil(length * repeats / world)
    repeated += repeated[: per_rank * world - len(repeated)]
    selected = math.floor(length // 256 * 256 / world) if length >= 256 else length // world
    return repeated[rank::world][:selected]


def shard(sampler: RepeatedAugmentationSampler, batch_size: int, world: int, rank: int) -> list[int]:
    """What Accelerate hands process `rank` from the Trainer's single sampler."""
    batches = BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False), world, rank)
    return [index for batch in batches for index in batch]


@pytest.mark.parametrize(("length", "world", "batch"), [(1000, 1, 8), (1000, 2, 8), (600, 4, 16), (300, 3, 5)])
def test_each_process_gets_deits_indices(length, world, batch):
    sampler = RepeatedAugmentationSampler(length, num_repeats=3, num_replicas=world, batch_size=batch, seed=7)
    sampler.set_epoch(2)
    for rank in range(world):
        expected = deit_rasampler(length, 3, world, rank, seed=9)
        got = shard(sampler, batch, world, rank)
        whole = len(expected) // batch * batch  # we keep whole batches only
        assert got == expected[:whole], f"rank {rank}"
        assert len(got) == len(sampler) // world


def test_copies_of_an_image_go_to_different_processes_and_epochs_differ():
    sampler = RepeatedAugmentationSampler(512, num_repeats=3, num_replicas=3, batch_size=8, seed=0)
    first = [sampler.process_indices(rank) for rank in range(3)]
    # DeiT's layout: position k of every process holds a copy of the same image, for the repeats of one image.
    assert first[0][0] == first[1][0] == first[2][0]
    sampler.set_epoch(1)
    assert sampler.process_indices(0) != first[0]
    sampler.set_epoch(0)
    assert sampler.process_indices(0) == first[0]


def test_single_process_epoch_length_matches_deit():
    sampler = RepeatedAugmentationSampler(1000, num_repeats=3, batch_size=8)
    assert len(sampler) == 768  # floor(1000 / 256) * 256: as long as an epoch without repetition would be
    indices = list(sampler)
    assert all(indices[i] == indices[i + 1] == indices[i + 2] for i in range(0, 765, 3))


def test_too_small_a_dataset_is_refused():
    with pytest.raises(ValueError, match="--repeated_augmentations 1"):
        RepeatedAugmentationSampler(6, num_repeats=3, num_replicas=4, batch_size=8)


def test_trainer_uses_it_and_batches_hold_the_copies(tmp_path):
    trainer = build_trainer(
        make_args(tmp_path, repeated_augmentations=3, per_device_train_batch_size=4), dataset_size=16
    )
    assert isinstance(trainer._get_train_sampler(), RepeatedAugmentationSampler)
    batch = next(iter(trainer.get_train_dataloader()))
    pixels = batch["pixel_values"]
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    assert not torch.equal(pixels[2], pixels[3])
    assert len(trainer.get_train_dataloader()) == 4  # 16 images kept, batches of 4


def test_argument_is_validated(tmp_path):
    with pytest.raises(ValueError, match="repeated_augmentations"):
        make_args(tmp_path, repeated_augmentations=0)
