"""Training and evaluation splits for the example scripts: the embedded offline data, a Hub dataset, local image
folders, or streams of either (`DataArguments`), with the column detection and label encoding of `data`."""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset

from ..data.image_datasets import (
    EVAL_SPLIT_NAMES,
    ensure_class_labels,
    load_embedded_dataset,
    resolve_columns,
    stream_class_label,
    train_eval_split,
)
from .arguments import DataArguments, RecipeArguments


def load_splits(
    data_args: DataArguments, seed: int
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset, str, str]:
    """Train and evaluation splits plus the resolved image/label column names (streams with `--streaming`)."""
    if data_args.streaming:
        return load_streamed_splits(data_args, seed)
    if data_args.train_dir is not None:
        dataset = load_dataset("imagefolder", data_files=image_folder_files(data_args))
    elif data_args.validation_dir is not None:
        raise ValueError("--validation_dir needs --train_dir (both local image folders).")
    elif data_args.dataset_name is None:
        dataset = DatasetDict({"train": load_embedded_dataset(data_args.embedded_dataset)})
    else:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split (splits: {list(dataset)}).")
    image_column, label_column = resolve_columns(
        dataset["train"], data_args.image_column_name, data_args.label_column_name
    )
    dataset = ensure_class_labels(dataset, label_column)
    eval_split = next((s for s in EVAL_SPLIT_NAMES if s in dataset), None)
    if eval_split is None:
        train, evaluation = train_eval_split(dataset["train"], label_column, data_args.train_val_split, seed)
    else:
        train, evaluation = dataset["train"], dataset[eval_split]
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.shuffle(seed=seed).select(range(min(data_args.max_eval_samples, len(evaluation))))
    for name, split_data in (("training", train), ("evaluation", evaluation)):
        if len(split_data) == 0:
            raise ValueError(f"The {name} split is empty; check --max_*_samples and --train_val_split.")
    return train, evaluation, image_column, label_column


def image_folder_files(data_args: DataArguments) -> dict[str, str]:
    """`data_files` of the imagefolder loader for --train_dir (and --validation_dir)."""
    if data_args.dataset_name is not None:
        raise ValueError("Pass either --dataset_name or --train_dir (a local image folder), not both.")
    data_files = {}
    for split, folder, flag in (
        ("train", data_args.train_dir, "--train_dir"),
        ("validation", data_args.validation_dir, "--validation_dir"),
    ):
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: no such folder. Pass a folder with one sub-folder per class.")
        data_files[split] = os.path.join(folder, "**")
    return data_files


def load_streamed_splits(data_args: DataArguments, seed: int) -> tuple[IterableDataset, IterableDataset, str, str]:
    """`--streaming`: train and evaluation splits as `IterableDataset`s (read while training, never stored whole),
    plus the image/label column names.

    A stream has no length and cannot be read twice cheaply, so what the map-style path computes from the whole data
    must be declared instead: the class names (a `ClassLabel` label column) and the evaluation split (no
    `--train_val_split`). Training examples are shuffled by shard and in a buffer; the Trainer re-seeds that shuffle
    every epoch (one epoch = one pass over the stream) through `IterableDataset.set_epoch`.

    Several processes: Accelerate dispatches batches of an `IterableDataset` by default (`dispatch_batches`): process
    0 alone reads the stream (and runs the transforms, in its data-loader workers), collates one batch per process and
    sends each process its slice, so every image is used once per pass. With `--accelerator_config
    '{"dispatch_batches": false}'` each process reads the stream itself: a stream with at least as many shards as
    processes is split shard-wise (`IterableDataset.shard`), otherwise every process reads all of it and keeps its own
    slice of each global batch (`IterableDatasetShard`). The shuffle seed is the same on every process.
    """
    if data_args.shuffle_buffer_size < 1:
        raise ValueError(f"--shuffle_buffer_size must be >= 1, got {data_args.shuffle_buffer_size}.")
    for flag, value in (
        ("--max_train_samples", data_args.max_train_samples),
        ("--max_eval_samples", data_args.max_eval_samples),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} would leave an empty split: pass a positive number or leave it out.")
    if data_args.train_dir is not None:
        dataset = load_dataset("imagefolder", data_files=image_folder_files(data_args), streaming=True)
        no_eval_hint = "Pass --validation_dir with a folder of evaluation images laid out as --train_dir"
    elif data_args.validation_dir is not None:
        raise ValueError("--validation_dir needs --train_dir (both local image folders).")
    elif data_args.dataset_name is None:
        raise ValueError(
            "--streaming reads a Hub dataset (--dataset_name) or local image folders (--train_dir/--validation_dir); "
            f"the embedded dataset {data_args.embedded_dataset!r} is small and in memory: drop --streaming."
        )
    else:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming=True)
        no_eval_hint = (
            "Pick a dataset (or --dataset_config_name) that has one, or drop --streaming to hold out "
            f"--train_val_split of {data_args.dataset_name}"
        )
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split (splits: {list(dataset)}).")
    eval_split = next((s for s in EVAL_SPLIT_NAMES if s in dataset), None)
    if eval_split is None:
        raise ValueError(
            f"--streaming needs an evaluation split (validation, valid, val or test), but the dataset has only "
            f"{list(dataset)}: a stream cannot be split with --train_val_split. {no_eval_hint}."
        )
    train, evaluation = dataset["train"], dataset[eval_split]
    image_column, label_column = resolve_columns(train, data_args.image_column_name, data_args.label_column_name)
    stream_class_label({"train": train, eval_split: evaluation}, label_column)
    # Shuffle before take: --max_*_samples then draw from the whole stream (shards in random order), not only from
    # its first shard (an image folder lists its files class by class).
    train = train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    if data_args.max_eval_samples is not None:
        # Fixed seed and no set_epoch on the evaluation stream: every evaluation reads the same examples.
        evaluation = evaluation.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
        evaluation = evaluation.take(data_args.max_eval_samples)
    return train, evaluation, image_column, label_column


def check_streaming(data_args: DataArguments, recipe_args: RecipeArguments, training_args: Any) -> None:
    """Refuse, before any data is read, what a stream (no length) cannot do."""
    if not data_args.streaming or not training_args.do_train:
        return
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError(
            "--streaming needs --max_steps > 0: a stream has no length, so the number of training steps cannot be "
            "derived from --num_train_epochs. Pass e.g. --max_steps 10000 (optimizer steps)."
        )
    if recipe_args.warmup_epochs > 0:
        raise ValueError(
            "--warmup_epochs needs the training set size, which a stream does not have: with --streaming, give the "
            "warm-up in optimizer steps with --warmup_steps."
        )


__all__ = ["check_streaming", "image_folder_files", "load_splits", "load_streamed_splits"]
