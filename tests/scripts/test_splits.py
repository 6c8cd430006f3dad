"""`diverse_vit_hf.scripts.splits`: the training and evaluation splits of the example scripts (the embedded data, a
dataset by name, local image folders, streams of either), their column names and truncation, and the refusals of
what a split cannot be built from; the streamed (`--streaming`) splits end to end through examples/run_diverse.py.

The image folders are written from the embedded sklearn digits (60 training + 20 validation PNGs).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import ClassLabel, Dataset, IterableDataset, Value
from fixtures.scripts import RUN_DIVERSE, fast_flags, load_script
from transformers import ViTForImageClassification

from diverse_vit_hf.data.image_datasets import class_names, load_embedded_dataset
from diverse_vit_hf.scripts.arguments import DataArguments, RecipeArguments
from diverse_vit_hf.scripts.splits import check_streaming, image_folder_files, load_splits

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
    return load_script(RUN_DIVERSE, "run_diverse")


def folder_flags(train: Path, validation: Path | None = None) -> list[str]:
    flags = ["--train_dir", str(train)]
    return flags + (["--validation_dir", str(validation)] if validation is not None else [])


# ---- Map-style splits ------------------------------------------------------------------------------------------------


def image_bytes(split) -> list[bytes]:
    return [example["image"].tobytes() for example in split]


def test_the_embedded_data_is_split_into_a_stratified_held_out_part():
    args = DataArguments(embedded_dataset="digits", train_val_split=0.2)
    train, evaluation, image_column, label_column = load_splits(args, seed=0)
    assert (image_column, label_column) == ("image", "label")
    assert isinstance(train.features["label"], ClassLabel) and train.features == evaluation.features
    everything = Counter(load_embedded_dataset("digits")["label"])
    assert len(train) + len(evaluation) == sum(everything.values()) == 1797
    held_out = Counter(evaluation["label"])
    assert all(abs(held_out[label] - 0.2 * count) <= 1 for label, count in everything.items()), held_out
    assert load_splits(args, seed=0)[1]["label"] == evaluation["label"]  # the seed fixes the split
    assert load_splits(args, seed=1)[1]["label"] != evaluation["label"]


def test_max_samples_take_a_seeded_subset_of_each_split():
    args = DataArguments(embedded_dataset="digits", max_train_samples=50, max_eval_samples=20)
    train, evaluation, _, _ = load_splits(args, seed=0)
    assert (len(train), len(evaluation)) == (50, 20)
    full_train, full_evaluation, _, _ = load_splits(DataArguments(embedded_dataset="digits"), seed=0)
    assert set(image_bytes(train)) <= set(image_bytes(full_train))
    assert set(image_bytes(evaluation)) <= set(image_bytes(full_evaluation))
    assert image_bytes(load_splits(args, seed=0)[0]) == image_bytes(train)
    assert image_bytes(load_splits(args, seed=1)[0]) != image_bytes(train)


@pytest.mark.parametrize(("flag", "name"), [("max_train_samples", "training"), ("max_eval_samples", "evaluation")])
def test_an_empty_split_is_refused(flag, name):
    with pytest.raises(ValueError, match=rf"The {name} split is empty.*--max_\*_samples"):
        load_splits(DataArguments(embedded_dataset="digits", **{flag: 0}), seed=0)


def test_a_validation_folder_is_the_evaluation_split_as_it_is(digit_folders):
    train_dir, validation_dir = digit_folders
    args = DataArguments(train_dir=str(train_dir), validation_dir=str(validation_dir))
    train, evaluation, image_column, label_column = load_splits(args, seed=0)
    assert (image_column, label_column) == ("image", "label")
    assert (len(train), len(evaluation)) == (60, 20)  # nothing held out of the training folder
    names = sorted(Path(example["image"].filename).name for example in evaluation)
    assert names == sorted(path.name for path in validation_dir.rglob("*.png"))
    assert class_names(train, "label") == class_names(evaluation, "label") == [str(d) for d in range(10)]


def test_a_training_folder_alone_is_split(digit_folders):
    train_dir, _ = digit_folders
    train, evaluation, _, _ = load_splits(DataArguments(train_dir=str(train_dir), train_val_split=0.25), seed=0)
    assert (len(train), len(evaluation)) == (45, 15)


def write_parquet_dataset(folder: Path, splits: dict[str, range]) -> Dataset:
    """A dataset folder with one parquet file per split, cut from the embedded digits; returns the digits."""
    digits = load_embedded_dataset("digits")
    folder.mkdir()
    for split, rows in splits.items():
        digits.select(rows).to_parquet(str(folder / f"{split}.parquet"))
    return digits


def test_a_named_dataset_with_a_test_split_is_evaluated_on_it(tmp_path):
    digits = write_parquet_dataset(tmp_path / "data", {"train": range(20), "test": range(20, 30)})
    train, evaluation, image_column, label_column = load_splits(DataArguments(dataset_name=str(tmp_path / "data")), 0)
    assert (image_column, label_column) == ("image", "label")
    assert (len(train), len(evaluation)) == (20, 10)
    assert evaluation["label"] == digits.select(range(20, 30))["label"]


def test_a_named_dataset_without_a_train_split_is_refused(tmp_path):
    write_parquet_dataset(tmp_path / "data", {"validation": range(10)})
    with pytest.raises(ValueError, match=r"no 'train' split \(splits: \['validation'\]\)"):
        load_splits(DataArguments(dataset_name=str(tmp_path / "data")), seed=0)


def test_image_folder_files_name_each_folder_and_refuse_what_cannot_be_read(digit_folders, tmp_path):
    train_dir, validation_dir = digit_folders
    assert image_folder_files(DataArguments(train_dir=str(train_dir))) == {"train": str(train_dir / "**")}
    both = image_folder_files(DataArguments(train_dir=str(train_dir), validation_dir=str(validation_dir)))
    assert both == {"train": str(train_dir / "**"), "validation": str(validation_dir / "**")}
    with pytest.raises(ValueError, match="either --dataset_name or --train_dir"):
        image_folder_files(DataArguments(dataset_name="beans", train_dir=str(train_dir)))
    with pytest.raises(ValueError, match=r"--validation_dir .*nope: no such folder"):
        image_folder_files(DataArguments(train_dir=str(train_dir), validation_dir=str(tmp_path / "nope")))
    for streaming in (False, True):
        with pytest.raises(ValueError, match="--validation_dir needs --train_dir"):
            load_splits(DataArguments(validation_dir=str(validation_dir), streaming=streaming), seed=0)


def test_missing_image_folder_is_reported(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match=r"--train_dir .*no such folder"):
        module.main(["--train_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), *fast_flags()])


# ---- Streamed splits -------------------------------------------------------------------------------------------------


def test_check_streaming_refuses_only_what_a_stream_cannot_do():
    streaming, training = DataArguments(streaming=True), SimpleNamespace(do_train=True, max_steps=10)
    check_streaming(streaming, RecipeArguments(), training)
    check_streaming(DataArguments(), RecipeArguments(warmup_epochs=1), SimpleNamespace(do_train=True, max_steps=-1))
    check_streaming(streaming, RecipeArguments(warmup_epochs=1), SimpleNamespace(do_train=False, max_steps=-1))
    with pytest.raises(ValueError, match=r"--streaming needs --max_steps > 0"):
        check_streaming(streaming, RecipeArguments(), SimpleNamespace(do_train=True, max_steps=-1))
    with pytest.raises(ValueError, match=r"--warmup_epochs needs the training set size.*--warmup_steps"):
        check_streaming(streaming, RecipeArguments(warmup_epochs=1), training)


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
