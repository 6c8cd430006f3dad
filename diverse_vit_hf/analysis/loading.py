"""Loading models, images and preprocessing (used by the CLI and the example), and `analyze_checkpoints`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..losses.regularizers import NORM_EPS
from .driver import analyze_model, check_positive_int
from .probe import QKV_MATRICES, SUPPORTED_MODEL_TYPES, check_weight_matrices
from .redundancy import RedundancyReport

logger = logging.getLogger(__name__)


def _batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r} ({error}); use auto, cpu, cuda or cuda:N.") from error


def load_model_for_analysis(name_or_path: str, device: str | torch.device | None = None) -> nn.Module:
    """Load a classifier of a supported family (Hub id or local folder) for analysis; refuse anything else clearly."""
    from transformers import AutoConfig

    from ..models.modeling import load_diverse_model

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a model config from {name_or_path!r}: pass a local folder holding config.json or a Hub "
            f"model id (needs network). ({type(error).__name__}: {error})"
        ) from error
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path!r} has model_type {config.model_type!r}; the redundancy analysis supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}, e.g. facebook/deit-small-patch16-224."
        )
    model = load_diverse_model(name_or_path)
    return model.to(resolve_device(device)).eval()


def load_image_processor(name_or_path: str, model: nn.Module) -> Any:
    """The checkpoint's image processor; without one, a ViT processor at the model's image size (mean/std 0.5)."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        size = model.config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        logger.warning(
            "%s has no image processor config; resizing to %dx%d and normalising with mean=std=0.5. Save the "
            "training image processor next to the weights for exact preprocessing.",
            name_or_path, height, width,
        )  # fmt: skip
        return ViTImageProcessor(size={"height": height, "width": width}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def pixel_batches(
    images: Sequence[Any], processor: Any, batch_size: int, num_channels: int = 3
) -> Iterator[torch.Tensor]:
    """Preprocess PIL images in batches with `processor`, converted to RGB (3 channels) or L (1 channel) first."""
    check_positive_int(batch_size, "batch_size")
    mode = "RGB" if num_channels == 3 else "L"
    for chunk in _batched(images, batch_size):
        converted = [image.convert(mode) if image.mode != mode else image for image in chunk]
        yield processor(images=converted, return_tensors="pt")["pixel_values"]


@dataclass
class AnalysisImages:
    """Images to analyze (PIL, a fixed order shared by every model) and where they came from."""

    images: list[Any]
    dataset: str
    split: str


def held_out_split(
    dataset: Any,
    held_out_fraction: float,
    seed: int,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Any:
    """The held-out part of a single-split dataset, exactly the evaluation split of `examples/run_diverse.py`
    (`diverse_vit_hf.data.image_datasets.train_eval_split` with the columns `resolve_columns` finds: labels encoded as a
    ClassLabel, stratified), so the same seed and fraction give the images the model did not train on."""
    from ..data.image_datasets import resolve_columns, train_eval_split

    _, label = resolve_columns(dataset, image_column, label_column)
    return train_eval_split(dataset, label, held_out_fraction, seed)[1]


def load_analysis_images(
    dataset: str,
    num_images: int,
    seed: int = 42,
    held_out_fraction: float = 0.1,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> AnalysisImages:
    """Up to `num_images` held-out images, in a fixed order.

    `dataset` is an embedded offline set (`mnist`, `digits`, `lfw`), split like `examples/run_diverse.py` does
    (`held_out_fraction`, `seed`), or a Hub/local dataset for `datasets.load_dataset` (its validation/test split, or
    `split`, else a held-out part of train). Fewer images than asked are used (with a warning) if the split is smaller.
    The image and label columns are found as the training script finds them
    (`diverse_vit_hf.data.image_datasets.resolve_columns`; `image_column` / `label_column` name them explicitly).
    """
    from datasets import DatasetDict, load_dataset

    from ..data.image_datasets import EMBEDDED_DATASETS, EVAL_SPLIT_NAMES, load_embedded_dataset, resolve_columns

    check_positive_int(num_images, "num_images")
    if dataset in EMBEDDED_DATASETS:
        if split not in (None, "heldout"):
            raise ValueError(f"The embedded dataset {dataset!r} has one split, held out as 'heldout'; got {split!r}.")
        chosen = held_out_split(load_embedded_dataset(dataset), held_out_fraction, seed, image_column, label_column)
        split_name = "heldout"
    else:
        try:
            loaded = load_dataset(dataset, dataset_config)
        except Exception as error:  # datasets raises many types (FileNotFound, DatasetNotFound, ConnectionError, ...)
            raise ValueError(
                f"Unknown dataset {dataset!r}: it is not one of the embedded data sets {sorted(EMBEDDED_DATASETS)} and "
                f"datasets.load_dataset could not load it ({type(error).__name__}: {error}). Pass mnist, digits, lfw, "
                "a local dataset folder, or a Hub dataset id (needs network)."
            ) from error
        if not isinstance(loaded, DatasetDict):
            loaded = DatasetDict({"train": loaded})
        if split is not None and split != "heldout":
            if split not in loaded:
                raise ValueError(f"The dataset {dataset!r} has no split {split!r} (splits: {list(loaded)}).")
            chosen, split_name = loaded[split], split
        else:
            split_name = next((s for s in EVAL_SPLIT_NAMES if s in loaded), None)
            if split_name is not None:
                chosen = loaded[split_name]
            elif "train" in loaded:
                chosen = held_out_split(loaded["train"], held_out_fraction, seed, image_column, label_column)
                split_name = "heldout"
            else:
                raise ValueError(
                    f"The dataset {dataset!r} has no train/validation/test split (splits: {list(loaded)})."
                )
    column, _ = resolve_columns(chosen, image_column, label_column)
    if len(chosen) < num_images:
        logger.warning("Only %d images in %s/%s; analyzing all of them (asked for %d).", len(chosen), dataset,
                       split_name, num_images)  # fmt: skip
    chosen = chosen.shuffle(seed=seed).select(range(min(num_images, len(chosen))))
    if len(chosen) == 0:
        raise ValueError(f"The {split_name} split of {dataset!r} is empty.")
    return AnalysisImages(images=list(chosen[column]), dataset=dataset, split=split_name)


def model_label(name_or_path: str) -> str:
    """A display name with no local directory in it: the folder name of a local path, the Hub id otherwise."""
    path = Path(name_or_path)
    if path.exists():
        resolved = path.resolve()
        return resolved.name or str(name_or_path)
    return name_or_path


def analyze_checkpoints(
    models: Sequence[str],
    images: AnalysisImages,
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    weight_matrices: Sequence[str] = QKV_MATRICES,
    progress: bool = True,
    seed: int = 42,
) -> RedundancyReport:
    """Load and analyze each checkpoint (Hub id or local folder) on the same images, one model in memory at a time."""
    if not models:
        raise ValueError("Pass at least one model to analyze.")
    check_positive_int(batch_size, "batch_size")
    matrices = check_weight_matrices(weight_matrices)
    if names is None:
        names = [model_label(m) for m in models]
    names = list(names)
    if len(names) != len(models):
        raise ValueError(f"Got {len(names)} names for {len(models)} models; give one --name per --model or none.")
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique, got {names}; pass distinct --name values.")
    target = resolve_device(device)
    results = []
    for source, name in zip(models, names, strict=True):
        model = load_model_for_analysis(source, target)
        processor = load_image_processor(source, model)
        batches = pixel_batches(images.images, processor, batch_size, model.config.num_channels)
        total = math.ceil(len(images.images) / batch_size)
        results.append(analyze_model(model, batches, name, matrices, progress, total))
        del model
    settings = {
        "dataset": images.dataset,
        "split": images.split,
        "batch_size": batch_size,
        "seed": seed,
        "device": target.type,
        "weight_matrices": list(matrices),
        "norm_eps": NORM_EPS,
    }
    return RedundancyReport(models=results, settings=settings, num_images=len(images.images))
