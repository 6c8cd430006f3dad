"""Repeated augmentation (DeiT's `RASampler`, Hoffer et al. 2020) for `Trainer` + Accelerate.

DeiT repeats every image `num_repeats` times per epoch, each copy augmented differently, and spreads the copies
over the processes: with the repeated index list `[i0, i0, i0, i1, i1, i1, ...]`, process r takes every W-th
element from r, and keeps only `len(dataset) // 256 * 256 / W` of them, so an epoch is no longer than without
repetition.

HF `Trainer` uses one sampler for all processes and Accelerate shards its *batches*: process r gets global batches
r, r + W, r + 2W, ... This sampler therefore emits DeiT's per-process sequences interleaved batch by batch, so
that after Accelerate's sharding every process sees exactly the indices DeiT's sampler would have given it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class RepeatedAugmentationSampler(Sampler[int]):
    """DeiT repeated augmentation laid out for Accelerate's batch sharding.

    Args:
        dataset_length: number of training images.
        num_repeats: copies of each image per epoch (DeiT: 3); each copy is augmented independently.
        num_replicas: number of processes W.
        batch_size: per-process batch size B (Accelerate shards the global order in chunks of B).
        seed: base seed; the order of epoch e comes from `seed + e`.
        shuffle: shuffle the images before repeating them (False: dataset order, for debugging).
    """

    def __init__(
        self,
        dataset_length: int,
        num_repeats: int = 3,
        num_replicas: int = 1,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_repeats < 1 or num_replicas < 1 or batch_size < 1:
            raise ValueError(
                f"num_repeats, num_replicas and batch_size must be >= 1, got {num_repeats}, {num_replicas}, "
                f"{batch_size}."
            )
        self.dataset_length = dataset_length
        self.num_repeats = num_repeats
        self.num_replicas = num_replicas
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        # DeiT keeps floor(len / 256) * 256 images per epoch over all processes; below 256 images keep them all.
        kept = dataset_length // 256 * 256 if dataset_length >= 256 else dataset_length
        per_process = kept // num_replicas
        # Whole batches only: a partial batch would shift Accelerate's batch-wise sharding of the global order.
        self.num_per_process = per_process // batch_size * batch_size
        if self.num_per_process == 0:
            raise ValueError(
                f"Repeated augmentation keeps {per_process} images per process from {dataset_length} images over "
                f"{num_replicas} process(es): fewer than one batch of {batch_size}. Use a larger dataset, a smaller "
                "per-device batch size, or --repeated_augmentations 1."
            )

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer/Accelerate at the start of every epoch: a new order each epoch."""
        self.epoch = epoch

    def process_indices(self, rank: int) -> list[int]:
        """The indices process `rank` trains on this epoch (DeiT's `RASampler` for that rank)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_length, generator=generator).tolist()
        else:
            order = list(range(self.dataset_length))
        repeated = [index for index in order for _ in range(self.num_repeats)]
        total = -(-len(repeated) // self.num_replicas) * self.num_replicas  # pad to a multiple of W, as DeiT does
        repeated += repeated[: total - len(repeated)]
        return repeated[rank : total : self.num_replicas][: self.num_per_process]

    def __iter__(self) -> Iterator[int]:
        per_process = [self.process_indices(rank) for rank in range(self.num_replicas)]
        for start in range(0, self.num_per_process, self.batch_size):
            for indices in per_process:
                yield from indices[start : start + self.batch_size]

    def __len__(self) -> int:
        return self.num_per_process * self.num_replicas


__all__ = ["RepeatedAugmentationSampler"]
