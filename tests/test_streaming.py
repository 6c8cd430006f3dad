"""`--streaming` (issue 3): image folders and Hub-style datasets read as `IterableDataset`s, end to end and refusals.

The data is a small imagefolder written from the embedded sklearn digits (60 training + 20 validation PNGs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset, Value
from transformers import ViTForImageClassification

from diverse_vit_hf.data.image_datasets import (
    UnreadableImageError,
    apply_image_transform,
    class_names,
    load_embedded_dataset,
    resolve_columns,
    skipped_images,
    stream_class_label,
)
from diverse_vit_hf.data.transforms import build_image_transform

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_diverse.py"
TINY = [
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "2",
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "16",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--use_cpu",
]


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> tuple[Path, Path]:
    """train/ (60 images) and validation/ (20 images), one sub-folder per digit."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_embedded_dataset("digits")
    for split, indices in (("train", range(60)), ("validation", range(60, 80))):
        for index in indices:
            example = digits[index]
            folder = root / split / str(example["label"])
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{index}.png")
    return root / "train", root / "validation"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("run_diverse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def folder_flags(train: Path, validation: Path | None = None) -> list[str]:
    flags = ["--train_dir", str(train)]
    return flags + (["--validation_dir", str(validation)] if validation is not None else [])


@pytest.mark.slow
def test_streamed_image_folder_trains_evaluates_and_saves_a_vanilla_checkpoint(script, digit_folders, tmp_path):
    streamed, plain = tmp_path / "streamed", tmp_path / "plain"
    metrics = script.main(
        [*folder_flags(*digit_folders), "--streaming", "--max_steps", "3", "--output_dir", str(streamed), *TINY]
    )
    assert 0.0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1.0
    assert math.isfinite(metrics["eval_loss"])
    eval_results = json.loads((streamed / "eval_results.json").read_text())
    assert eval_results["eval_top1"] == pytest.approx(metrics["eval_top1"])
    history = json.loads((streamed / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss_cls" in entry] == [1, 2, 3]

    config = json.loads((streamed / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert (streamed / "model.safetensors").exists() and (streamed / "preprocessor_config.json").exists()
    model = ViTForImageClassification.from_pretrained(streamed)
    assert type(model) is ViTForImageClassification and model.config.num_labels == 10

    # The same folders without --streaming: same classes, in the same order.
    script.main([*folder_flags(*digit_folders), "--max_steps", "1", "--output_dir", str(plain), *TINY])
    plain_config = json.loads((plain / "config.json").read_text())
    assert plain_config["id2label"] == config["id2label"] == {str(d): str(d) for d in range(10)}


def test_streamed_and_map_style_splits_name_the_same_classes(script, digit_folders):
    train_dir, validation_dir = (str(path) for path in digit_folders)
    plain = script.load_splits(script.DataArguments(train_dir=train_dir, validation_dir=validation_dir), seed=0)
    streamed_args = script.DataArguments(
        train_dir=train_dir, validation_dir=validation_dir, streaming=True, max_eval_samples=7
    )
    streamed = script.load_splits(streamed_args, seed=0)
    assert all(isinstance(split, IterableDataset) for split in streamed[:2])
    assert streamed[2:] == plain[2:] == ("image", "label")
    assert class_names(streamed[0], "label") == class_names(plain[0], "label") == [str(d) for d in range(10)]
    # --max_eval_samples takes a fixed subset of the (shuffled) stream: the same 7 images at every evaluation.
    first, second = ([example["image"].filename for example in streamed[1]] for _ in range(2))
    assert len(first) == 7 and first == second
    assert len({Path(name).parent.name for name in first}) > 1  # drawn from several class folders, not the first


def test_streams_and_datasets_get_the_same_transform(digit_folders):
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


def test_streaming_without_max_steps_is_refused(script, digit_folders, tmp_path):
    with pytest.raises(ValueError, match=r"--streaming needs --max_steps > 0"):
        script.main([*folder_flags(*digit_folders), "--streaming", "--output_dir", str(tmp_path / "out"), *TINY])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--warmup_epochs", "1"], "--warmup_steps"),
        (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size"),
        (["--max_train_samples", "0"], "empty split"),
    ],
)
def test_streaming_refuses_what_needs_a_length(script, digit_folders, tmp_path, flags, fragment):
    with pytest.raises(ValueError, match=fragment):
        script.main(
            [
                *folder_flags(*digit_folders),
                "--streaming",
                "--max_steps",
                "2",
                "--output_dir",
                str(tmp_path),
                *TINY,
                *flags,
            ]
        )


def test_streaming_without_a_validation_split_is_refused(script, digit_folders, tmp_path):
    train, _ = digit_folders
    flags = ["--streaming", "--max_steps", "2", "--output_dir", str(tmp_path / "out"), *TINY]
    with pytest.raises(ValueError, match=r"needs an evaluation split.*\['train'\].*--validation_dir"):
        script.main([*folder_flags(train), *flags])
    # A dataset given by name (here a local folder, as a Hub dataset would be) with only a train split.
    with pytest.raises(ValueError, match=r"needs an evaluation split.*\['train'\].*--train_val_split"):
        script.main(["--dataset_name", str(train.parent / "train"), *flags])


def test_streaming_a_dataset_whose_labels_are_not_a_class_label_is_refused(tmp_path, script):
    digits = load_embedded_dataset("digits").select(range(4))
    names = digits.cast_column("label", Value("int64")).map(lambda row: {"label": f"digit {row['label']}"})
    folder = tmp_path / "parquet"
    folder.mkdir()
    names.to_parquet(str(folder / "train.parquet"))
    names.to_parquet(str(folder / "validation.parquet"))
    flags = ["--dataset_name", str(folder), "--streaming", "--max_steps", "2", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"label column 'label'.*ClassLabel.*drop --streaming"):
        script.main([*flags, *TINY])


def test_streaming_the_embedded_dataset_is_refused(script, tmp_path):
    with pytest.raises(ValueError, match="drop --streaming"):
        script.main(["--streaming", "--max_steps", "2", "--output_dir", str(tmp_path), *TINY])
