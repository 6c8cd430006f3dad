"""The example scripts' arguments: the model to train, the data, and the DeiT recipe's learning-rate rules. Each is a
dataclass whose fields are command-line flags through `transformers.HfArgumentParser`, next to
`DiverseTrainingArguments` (`training_args`); `docs/options.md` lists them all (generated from these fields).

Below the dataclasses, how the scripts read them: `parse_arguments` takes the command line, or one JSON/YAML file
holding every flag (`python examples/run_diverse.py args.yaml`), and names unknown flags or keys with the closest
known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..data.image_datasets import CORRUPT_IMAGE_MODES, EMBEDDED_DATASETS
from ..models.presets import DEIT_MODEL_CONFIG_NAMES

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The classifier to train: a checkpoint to fine-tune, a named DeiT from scratch, or the small demo ViT."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": "Hub id or local folder of a checkpoint to fine-tune, of a supported model_type (vit, deit, "
            "dinov2, dinov2_with_registers, beit, vit_msn, ijepa, or a timm ViT repository such as "
            "timm/deit_small_patch16_224.fb_in1k: timm_wrapper; e.g. facebook/deit-small-patch16-224). Default: "
            "train a small ViT from scratch (sizes below).",
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model_config_name"],
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
            "checkpoints of the stock class. Works with --model_name_or_path and from scratch."
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
            "help": "Allow --model_name_or_path checkpoints whose weights are pickle files (pytorch_model.bin). "
            "Pickles can run arbitrary code when loaded: by default only safetensors weights are read."
        },
    )


@dataclass
class DataArguments:
    """The images to train and evaluate on: a Hub dataset, local image folders, or an embedded offline set."""

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


# ---- Reading the arguments ------------------------------------------------------------------------------------------

# A single command-line argument with one of these endings is a file holding every flag (HfArgumentParser's
# parse_json_file / parse_yaml_file, as in transformers' examples).
ARGUMENTS_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _aliases(item: dataclasses.Field) -> list[str]:
    """The flags a field's metadata adds (`"aliases": ["--model"]`), as written."""
    aliases = item.metadata.get("aliases", [])
    return [aliases] if isinstance(aliases, str) else list(aliases)


def _field_names(dataclass_types: Iterable[type]) -> dict[str, str]:
    """Every name a field is known by -> the field's name: the field itself and its aliases (without dashes)."""
    return {
        name.lstrip("-"): item.name
        for dtype in dataclass_types
        for item in dataclasses.fields(dtype)
        if item.init
        for name in [item.name, *_aliases(item)]
    }


def _type_hints(dataclass_types: Iterable[type]) -> dict[str, Any]:
    """Field name -> its annotation, resolved (HfArgumentParser rewrites `Field.type`, not the annotations)."""
    return {name: hint for dtype in dataclass_types for name, hint in typing.get_type_hints(dtype).items()}


def _members(hint: Any) -> tuple[Any, ...]:
    """The types of a union (`X | None`), or the type itself."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if is_union else (hint,)


def _takes(hint: Any, kind: type) -> bool:
    return any(member is kind or typing.get_origin(member) is kind for member in _members(hint))


def known_flags(dataclass_types: Iterable[type]) -> list[str]:
    """Every flag `HfArgumentParser(dataclass_types)` accepts, from the fields themselves: `--name` and
    `--name-with-dashes`, the `aliases` of the field's metadata, `--no_name` for a boolean that defaults to True, and
    `-h`/`--help`."""
    dataclass_types = list(dataclass_types)
    hints = _type_hints(dataclass_types)
    flags = {"-h", "--help"}
    for dtype in dataclass_types:
        for item in dataclasses.fields(dtype):
            if not item.init:
                continue
            flags.update({f"--{item.name}", f"--{item.name.replace('_', '-')}", *_aliases(item)})
            if item.default is True and hints[item.name] in (bool, bool | None):
                flags.update({f"--no_{item.name}", f"--no-{item.name.replace('_', '-')}"})
    return sorted(flags)


def _closest(word: str, known: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(known), n=1)
    return close[0] if close else None


def unknown_options_message(
    parser: HfArgumentParser, unknown: Sequence[str], command: str = "python examples/run_diverse.py"
) -> str:
    """Name the unknown command-line options, with the closest known flag for each."""
    known = known_flags(parser.dataclass_types)
    parts = []
    for token in unknown:
        if not token.startswith("-"):
            parts.append(f"{token!r} (a value without a flag, or a flag's extra value)")
            continue
        close = _closest(token.split("=", 1)[0], known)
        parts.append(f"{token!r}" + (f" (did you mean {close}?)" if close else ""))
    return (
        f"Unknown command-line option(s): {', '.join(parts)}. Run `{command} --help` for every flag of the model, "
        "the data, the trainer and the Diverse-ViT objective."
    )


def _file_value(path: str, name: str, value: Any, hint: Any) -> Any:
    """A value read from an arguments file, as a parser default: scalars as the string the command line would give
    (argparse converts string defaults with the flag's type, so `5e-4` and `true` read as on the command line)."""
    if value is None:
        if type(None) not in _members(hint):
            raise ValueError(f"{path}: {name!r} cannot be null; leave the key out to keep its default.")
        return None
    if isinstance(value, dict):
        if not _takes(hint, dict):
            raise ValueError(f"{path}: {name!r} takes a single value, not a mapping: {value!r}.")
        return value
    if isinstance(value, list):
        if not _takes(hint, list):
            raise ValueError(f"{path}: {name!r} takes a single value, not a list: {value!r}.")
        return value
    return str(value)


def read_arguments_file(path: str, dataclass_types: Iterable[type], command: str) -> dict[str, Any]:
    """The flags a JSON or YAML file sets: a mapping of flag names (a field's name or one of its aliases, without the
    leading `--`) to values, returned as `{field name: parser default}`. A key no dataclass knows, a key given twice
    (under its name and an alias) or a value of the wrong shape is a ValueError naming it."""
    dataclass_types = list(dataclass_types)
    text = Path(path).read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(
            f"{path} must hold a mapping of flag names to values (e.g. learning_rate: 0.001), got "
            f"{type(values).__name__}."
        )
    names, hints = _field_names(dataclass_types), _type_hints(dataclass_types)
    unknown = [key for key in values if str(key) not in names]
    if unknown:
        parts = []
        for key in unknown:
            close = _closest(str(key), names)
            parts.append(f"{key!r}" + (f" (did you mean {close!r}?)" if close else ""))
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(parts)}. The keys are the flags' names without the leading --: run "
            f"`{command} --help` for every flag."
        )
    defaults: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        name = names[key]
        if name in given_as:
            raise ValueError(f"{path} sets {name!r} twice, as {given_as[name]!r} and as {key!r}: keep one.")
        given_as[name] = key
        defaults[name] = _file_value(path, key, value, hints[name])
    return defaults


def parse_arguments(parser: HfArgumentParser, argv: Sequence[str], command: str) -> list[Any]:
    """Parse `argv` into the parser's dataclasses. A single argument ending in .json, .yaml or .yml is a file holding
    every flag: its values replace the parser's defaults (the script's own defaults included), converted as the same
    flags would be on the command line. Unknown flags (or keys) are a ValueError naming each with the closest known
    flag; `command` is how the message tells to run `--help`."""
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith(ARGUMENTS_FILE_SUFFIXES):
        parser.set_defaults(**read_arguments_file(argv[0], parser.dataclass_types, command))
        argv = []
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ValueError(unknown_options_message(parser, unknown, command))
    return parsed


__all__ = [
    "ARGUMENTS_FILE_SUFFIXES",
    "DataArguments",
    "ModelArguments",
    "RecipeArguments",
    "known_flags",
    "parse_arguments",
    "read_arguments_file",
    "unknown_options_message",
]
