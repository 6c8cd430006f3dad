"""The example scripts' arguments: the model to train, the data, and the DeiT recipe's learning-rate rules. Each is a
dataclass whose fields are command-line flags through `transformers.HfArgumentParser`, next to
`DiverseTrainingArguments` (`training_args`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..data.image_datasets import CORRUPT_IMAGE_MODES, EMBEDDED_DATASETS
from ..models.presets import DEIT_MODEL_CONFIG_NAMES

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a checkpoint to fine-tune, of a supported model_type (vit, deit, "
            "dinov2, dinov2_with_registers, beit, vit_msn, ijepa; e.g. facebook/deit-small-patch16-224). Default: "
            "train a small ViT from scratch (sizes below)."
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
            "help": "Training augmentation: none, light (small crops, digit-safe), deit (DeiT's own timm transform: "
            "RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25 in pixel mode; "
            "see docs/recipe.md) or auto (light for embedded data, deit otherwise)."
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


__all__ = ["DataArguments", "ModelArguments", "RecipeArguments"]
