"""examples/run_diverse.py (diverse_vit_hf/scripts/train.py): end to end on the embedded digits, the vanilla round
trip, bad input, the flags' names and aliases, arguments files, log levels per process and exit codes."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import transformers
import yaml
from datasets import ClassLabel, Dataset, Features, Image
from fixtures.scripts import REPO, RUN_DIVERSE, SCRIPT_ENV, fast_flags, load_script
from PIL import Image as PILImage
from transformers import HfArgumentParser, ResNetConfig, ResNetForImageClassification

from diverse_vit_hf import DiverseTrainingArguments
from diverse_vit_hf.scripts import train
from diverse_vit_hf.scripts.arguments import ModelArguments, known_flags, read_arguments_file
from diverse_vit_hf.scripts.model_builder import build_classifier
from diverse_vit_hf.trainer.checkpointing import CheckpointSaveError
from diverse_vit_hf.trainer.nonfinite_guard import NonFiniteLossError
from diverse_vit_hf.trainer.output_folder import OutputFolderLockedError
from diverse_vit_hf.trainer.preemption import TrainingStoppedError

SCRIPT, ENV = RUN_DIVERSE, SCRIPT_ENV
FAST = fast_flags(max_train_samples=256, max_eval_samples=64, batch_size=None)


VANILLA_CHECK = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
folder = sys.argv[1]
model = AutoModelForImageClassification.from_pretrained(folder)
classify = pipeline("image-classification", model=folder)
digit = Image.fromarray((np.random.RandomState(0).rand(28, 28) * 255).astype("uint8"), mode="L")
scores = classify(digit, top_k=model.config.num_labels)
print(json.dumps({
    "class": type(model).__name__,
    "labels": sorted(s["label"] for s in scores),
    "total": sum(s["score"] for s in scores),
    "imported_ours": any(name.startswith("diverse_vit_hf") for name in sys.modules),
}))
"""


@pytest.mark.slow
def test_accelerate_launch_trains_evaluates_and_saves_a_vanilla_checkpoint(tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        str(SCRIPT),
        "--output_dir",
        str(output),
        *FAST,
    ]
    run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for term in (
        "loss_cls",
        "loss_patch_cosine",
        "loss_patch_contrastive",
        "loss_attention_cosine",
        "loss_weight_condition",
    ):
        assert term in run.stdout, f"{term} not printed"
    assert "Validation top-1 accuracy:" in run.stdout
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert config.get("problem_type") in (None, "single_label_classification")
    assert (output / "model.safetensors").exists() and (output / "preprocessor_config.json").exists()
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pt"))
    eval_metrics = json.loads((output / "eval_results.json").read_text())
    assert 0.0 <= eval_metrics["eval_top1"] <= eval_metrics["eval_top5"] <= 1.0

    check = subprocess.run(
        [sys.executable, "-c", VANILLA_CHECK, str(output)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["class"] == "ViTForImageClassification"
    assert result["labels"] == [str(d) for d in range(10)]
    assert result["total"] == pytest.approx(1.0, abs=1e-3)  # softmax (single-label), not sigmoid
    assert result["imported_ours"] is False


@pytest.mark.slow
def test_fine_tunes_a_local_checkpoint_given_as_model(tmp_path):
    """--model_name_or_path takes any ViT folder (as it would a Hub id), re-initialising the head for the new
    labels."""
    module = load_script()
    base = tmp_path / "base"
    model, processor = build_classifier(ModelArguments(hidden_size=32, num_hidden_layers=2), ["a", "b"])
    model.save_pretrained(base)
    processor.save_pretrained(base)
    metrics = module.main(["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "ft"), *FAST])
    assert "eval_top1" in metrics
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert len(saved["id2label"]) == 10 and saved["architectures"] == ["ViTForImageClassification"]


def test_demo_defaults_train_from_scratch_on_embedded_mnist():
    module = load_script()
    parser_defaults = module.DEMO_TRAINING_DEFAULTS
    model_args, data_args = ModelArguments(), module.DataArguments()
    assert (
        model_args.model_name_or_path is None
        and data_args.dataset_name is None
        and data_args.embedded_dataset == "mnist"
    )
    assert parser_defaults["eval_strategy"] == "epoch"


def test_non_vit_model_is_rejected_with_a_clear_message(tmp_path):
    resnet = tmp_path / "resnet"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(resnet)
    module = load_script()
    with pytest.raises(ValueError, match=r"'resnet'.*Supported model types: vit, deit, vit_msn, dinov2"):
        module.main(["--model", str(resnet), "--output_dir", str(tmp_path / "out"), *FAST])
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(resnet), "--output_dir", str(tmp_path / "o")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert "resnet" in run.stderr and "Traceback" not in run.stderr


def test_dataset_without_image_and_label_columns(tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    (folder / "train.csv").write_text("a,b\n1,2\n3,4\n")
    module = load_script()
    with pytest.raises(ValueError, match="--image_column_name"):
        module.main(["--dataset_name", str(folder), "--output_dir", str(tmp_path / "out"), *FAST])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--image_size", "30", "--patch_size", "4"], "not a multiple"),
        (["--patch_cosine_coef", "-1"], "patch_cosine_coef"),
        (["--weight_condition_coef", "nan"], "weight_condition_coef"),
        (["--embedded_dataset", "cifar"], "Unknown embedded dataset"),
        (["--max_train_samples", "0"], "empty"),
    ],
)
def test_bad_flags_are_reported(tmp_path, flags, fragment):
    module = load_script()
    with pytest.raises(ValueError, match=fragment):
        module.main(["--output_dir", str(tmp_path / "out"), *FAST, *flags])


def test_single_image_batches_with_mixing_are_refused(tmp_path):
    module = load_script()
    with pytest.raises(ValueError, match="--no_mixing"):
        module.main(
            [
                "--output_dir",
                str(tmp_path / "out"),
                *FAST,
                "--per_device_train_batch_size",
                "1",
                "--max_train_samples",
                "4",
            ]
        )


SPAWN_RUN = r"""
import multiprocessing, runpy, sys
multiprocessing.set_start_method("spawn", force=True)  # as on macOS and Windows: workers unpickle the pipeline
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_spawned_data_loader_workers_train(tmp_path):
    """--dataloader_num_workers 2 under the spawn start method: the transforms and collator must pickle."""
    output = tmp_path / "spawn"
    flags = "--dataloader_num_workers 2 --max_steps 3 --eval_strategy no --save_strategy no --redundancy_images 0"
    run = subprocess.run(
        [sys.executable, "-c", SPAWN_RUN, str(SCRIPT), "--output_dir", str(output), *FAST, *flags.split()],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3


# ---- Helpers for the tests below -------------------------------------------------------------------------------------


def tiny_splits(data_args, seed):
    """A `load_data` for `main`: eight 28x28 grey images of two classes, as train and evaluation split."""
    images = [PILImage.fromarray(np.full((28, 28), 30 * i, dtype=np.uint8)) for i in range(8)]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    split = Dataset.from_dict({"image": images, "label": [i % 2 for i in range(8)]}, features=features)
    return split, split, "image", "label"


class Parsed(Exception):
    """Raised by the recording parser with what `main` parsed."""


def parse_like_main(monkeypatch, argv: list[str]) -> list:
    """The dataclasses `main` parses from `argv` (flags or an arguments file): main runs with its parser swapped for a
    subclass that stops right after parsing."""

    class RecordingParser(HfArgumentParser):
        def parse_args_into_dataclasses(self, *args, **kwargs):
            raise Parsed(super().parse_args_into_dataclasses(*args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(train, "HfArgumentParser", RecordingParser)
        with pytest.raises(Parsed) as parsed:
            train.main(argv)
    *dataclasses, unknown = parsed.value.args[0]
    assert not unknown, unknown
    return dataclasses


def built_model(tmp_path, argv: list[str]):
    """The model `main` builds from `argv` (seeded), and the arguments it built it from."""

    class Built(Exception):
        pass

    def build(model_args, labels):
        torch.manual_seed(0)
        raise Built(model_args, build_classifier(model_args, labels)[0])

    with pytest.raises(Built) as built:
        train.main(
            [*argv, "--output_dir", str(tmp_path / "out"), "--use_cpu"], load_data=tiny_splits, build_model=build
        )
    return built.value.args


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---- Flag names: --model_name_or_path (alias --model), --config_name (alias --model_config_name) -------------------


def test_model_name_or_path_and_its_alias_model_give_the_same_model(tmp_path):
    base = tmp_path / "base"
    model, processor = build_classifier(ModelArguments(hidden_size=32, num_hidden_layers=2), ["a", "b"])
    model.save_pretrained(base)
    processor.save_pretrained(base)
    args, by_name = built_model(tmp_path, ["--model_name_or_path", str(base)])
    alias_args, by_alias = built_model(tmp_path, ["--model", str(base)])
    assert args == alias_args and args.model_name_or_path == str(base)
    assert same_weights(by_name, by_alias) and same_weights(by_name, model)


def test_config_name_and_its_alias_model_config_name_give_the_same_model(tmp_path):
    args, by_name = built_model(tmp_path, ["--config_name", "deit-tiny"])
    alias_args, by_alias = built_model(tmp_path, ["--model_config_name", "deit-tiny"])
    assert args == alias_args and args.config_name == "deit-tiny"
    assert by_name.config.to_dict() == by_alias.config.to_dict() and by_name.config.hidden_size == 192
    assert same_weights(by_name, by_alias)


def test_config_name_takes_only_the_presets(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_like_main(monkeypatch, ["--config_name", "vit-huge"])
    assert "deit-small-24" in capsys.readouterr().err


def test_argument_dataclasses_document_every_field():
    for dataclass_type in (train.ModelArguments, train.DataArguments, train.RecipeArguments):
        assert all(f.metadata.get("help") for f in dataclasses.fields(dataclass_type)), dataclass_type


# ---- Unknown flags: the known ones come from the dataclass fields and their aliases --------------------------------


@pytest.mark.parametrize(
    ("token", "suggestion"),
    [
        ("--modle", "--model"),
        ("--model_confg_name", "--model_config_name"),
        ("--patch_cosine_coeff", "--patch_cosine_coef"),
        ("--no_mixng", "--no_mixing"),
    ],
)
def test_unknown_flags_name_the_closest_flag_or_alias(tmp_path, token, suggestion):
    with pytest.raises(ValueError, match=rf"'{token}' \(did you mean {suggestion}\?\).*examples/run_diverse.py --help"):
        train.main(["--output_dir", str(tmp_path), token, "1"])


def test_known_flags_are_the_parsers_flags():
    dataclass_types = (train.ModelArguments, train.DataArguments, train.RecipeArguments, DiverseTrainingArguments)
    flags = known_flags(dataclass_types)
    assert {"--model", "--model_name_or_path", "--config_name", "--model_config_name", "--no_mixing", "-h"} <= set(
        flags
    )
    assert {"--model-name-or-path", "--no-patch-mixing-loss", "--learning_rate"} <= set(flags)
    help_text = HfArgumentParser(dataclass_types).format_help()
    assert all(flag in help_text for flag in flags)  # every flag named is one argparse lists


# ---- Arguments files: python examples/run_diverse.py args.json | args.yaml -----------------------------------------

FILE_ARGUMENTS = {
    "model": "checkpoints/base",  # an alias as a key
    "learning_rate": "5e-4",  # in YAML an unquoted 5e-4 is a string: read as on the command line
    "max_train_samples": 32,
    "mixing": False,
    "scale_lr": True,
    "report_to": ["tensorboard"],
    "stop_signals": "SIGTERM",
}
SAME_FLAGS = ["--model_name_or_path", "checkpoints/base", "--learning_rate", "5e-4", "--max_train_samples", "32",
              "--no_mixing", "--scale_lr", "--report_to", "tensorboard", "--stop_signals", "SIGTERM"]  # fmt: skip


def write_arguments(path, values):
    if path.suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        text = yaml.safe_dump(values, sort_keys=False).replace("'5e-4'", "5e-4")  # unquoted, as one writes it by hand
        path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_an_arguments_file_sets_the_flags_it_names_and_the_demo_defaults_the_rest(monkeypatch, tmp_path, suffix):
    output = str(tmp_path / "out")
    path = write_arguments(tmp_path / f"args{suffix}", {**FILE_ARGUMENTS, "output_dir": output})
    if suffix != ".json":
        assert "learning_rate: 5e-4" in path.read_text()
    from_file = parse_like_main(monkeypatch, [str(path)])
    from_flags = parse_like_main(monkeypatch, [*SAME_FLAGS, "--output_dir", output])
    for read, expected in zip(from_file[:3], from_flags[:3], strict=True):
        assert read == expected
    assert from_file[3].to_dict() == from_flags[3].to_dict()
    model_args, data_args, recipe_args, training_args = from_file
    assert model_args.model_name_or_path == "checkpoints/base" and data_args.max_train_samples == 32
    assert training_args.learning_rate == 5e-4 and training_args.mixing is False and recipe_args.scale_lr is True
    assert training_args.report_to == ["tensorboard"] and training_args.output_dir == output
    # What the file leaves out keeps the demo's defaults, as on the command line.
    demo = train.DEMO_TRAINING_DEFAULTS
    assert (
        (training_args.num_train_epochs, training_args.per_device_train_batch_size)
        == (20, 64)
        == (
            demo["num_train_epochs"],
            demo["per_device_train_batch_size"],
        )
    )
    assert training_args.eval_strategy == "epoch" and training_args.do_train is True


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_an_unknown_key_in_an_arguments_file_is_refused_naming_it(tmp_path, suffix):
    path = write_arguments(tmp_path / f"args{suffix}", {"learnin_rate": 0.1, "output_dir": str(tmp_path), "colour": 1})
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) 'learnin_rate' \(did you mean 'learning_rate'\?\), 'colour'"
    ):
        train.main([str(path)])
    assert not (tmp_path / "out").exists()


def test_an_unknown_key_in_an_arguments_file_exits_2_with_one_line(tmp_path):
    path = write_arguments(tmp_path / "args.yaml", {"learnin_rate": 0.1})
    run = subprocess.run([sys.executable, str(SCRIPT), str(path)], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "'learnin_rate' (did you mean 'learning_rate'?)" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"learning_rate": None}, "'learning_rate' cannot be null"),
        ({"learning_rate": [0.1, 0.2]}, "'learning_rate' takes a single value, not a list"),
        ({"seed": {"a": 1}}, "'seed' takes a single value, not a mapping"),
        ({"model": "a", "model_name_or_path": "b"}, "sets 'model_name_or_path' twice, as 'model' and as"),
    ],
)
def test_arguments_file_values_of_the_wrong_shape_are_refused(tmp_path, values, fragment):
    path = write_arguments(tmp_path / "args.json", values)
    with pytest.raises(ValueError, match=fragment):
        read_arguments_file(str(path), (train.ModelArguments, DiverseTrainingArguments), "run")


def test_an_arguments_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("- --learning_rate\n- '0.1'\n")
    with pytest.raises(ValueError, match="must hold a mapping of flag names to values"):
        train.main([str(path)])


@pytest.mark.slow
def test_the_script_trains_from_a_json_arguments_file(tmp_path):
    output = tmp_path / "run"
    values = {"output_dir": str(output), "max_train_samples": 64, "max_eval_samples": 32, "num_train_epochs": 1,
              "hidden_size": 32, "num_hidden_layers": 2, "use_cpu": True, "disable_tqdm": True,
              "redundancy_images": 0}  # fmt: skip
    path = write_arguments(tmp_path / "args.json", values)
    run = subprocess.run([sys.executable, str(SCRIPT), str(path)], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    config = json.loads((output / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 2)
    saved = json.loads((output / "training_args.json").read_text())
    assert saved["learning_rate"] == train.DEMO_TRAINING_DEFAULTS["learning_rate"]  # a demo default


# ---- Logs print once under DDP ---------------------------------------------------------------------------------------


@pytest.fixture
def restore_log_levels():
    loggers = [train.logger, logging.getLogger("diverse_vit_hf")]
    saved = [logger.level for logger in loggers]
    verbosity = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    yield
    for logger, level in zip(loggers, saved, strict=True):
        logger.setLevel(level)
    transformers.utils.logging.set_verbosity(verbosity[0])
    datasets.utils.logging.set_verbosity(verbosity[1])


def levels() -> tuple[int, int, int, int]:
    """Effective levels of this script's logger, the package's, transformers' and datasets'."""
    return (
        train.logger.getEffectiveLevel(),
        logging.getLogger("diverse_vit_hf.scripts.model_builder").getEffectiveLevel(),
        transformers.utils.logging.get_verbosity(),
        datasets.utils.logging.get_verbosity(),
    )


@pytest.mark.usefixtures("restore_log_levels")
@pytest.mark.parametrize(
    ("main_process", "flags", "expected"),
    [
        (True, {}, (logging.INFO, logging.INFO, logging.WARNING, logging.WARNING)),  # the script's INFO lines stay
        (False, {}, (logging.WARNING,) * 4),  # another rank: warnings and errors only
        (False, {"log_level_replica": "error"}, (logging.ERROR,) * 4),
        (True, {"log_level": "debug"}, (logging.DEBUG,) * 4),
        (True, {"log_level": "error"}, (logging.ERROR,) * 4),
    ],
)
def test_log_levels_follow_the_process(monkeypatch, tmp_path, main_process, flags, expected):
    args = DiverseTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **flags)
    monkeypatch.setattr(DiverseTrainingArguments, "should_log", property(lambda self: main_process))
    assert train.configure_logging(args) == expected[2]
    assert levels() == expected


@pytest.mark.usefixtures("restore_log_levels")
def test_main_sets_the_process_log_level(monkeypatch, tmp_path):
    """main itself: on a non-main rank (should_log False) this script's INFO lines are not emitted."""
    monkeypatch.setattr(DiverseTrainingArguments, "should_log", property(lambda self: False))
    seen = {}

    def build(model_args, labels):
        seen["levels"] = levels()
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train.main(["--output_dir", str(tmp_path), "--use_cpu"], load_data=tiny_splits, build_model=build)
    assert seen["levels"] == (logging.WARNING,) * 4


# ---- Exit codes: a bug keeps its traceback ---------------------------------------------------------------------------


def broken_builder(model_args, labels):
    raise TypeError("a programming error")


def test_a_type_error_is_a_bug_not_exit_2(monkeypatch, tmp_path):
    argv = ["--output_dir", str(tmp_path / "out"), "--use_cpu"]
    with pytest.raises(TypeError, match="a programming error"):
        train.main(argv, load_data=tiny_splits, build_model=broken_builder)
    # As a command: not turned into an exit code, whatever the table says.
    assert TypeError not in dict(train.EXIT_CODES) and train.exit_code(TypeError("x")) is None
    monkeypatch.setattr(train, "main", functools.partial(train.main, load_data=tiny_splits, build_model=broken_builder))
    with pytest.raises(TypeError, match="a programming error"):
        train.main_with_exit_codes([*argv, "--overwrite_output_dir"])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValueError("bad flag"), 2),
        (OSError("unreadable"), 2),
        (OutputFolderLockedError("held"), 5),
        (NonFiniteLossError("diverged"), 3),
        (CheckpointSaveError("disk full"), 4),
        (TrainingStoppedError("SIGTERM"), 75),
    ],
)
def test_known_failures_become_their_exit_code_with_one_line(monkeypatch, caplog, error, code):
    def fail(argv=None, **kwargs):
        raise error

    monkeypatch.setattr(train, "main", fail)
    with caplog.at_level(logging.ERROR, logger="run_diverse"):
        assert train.main_with_exit_codes([]) == code
    assert caplog.records[-1].getMessage() == str(error)


def test_an_image_column_without_images_is_a_clear_error_not_a_type_error(tmp_path):
    """--image_column_name naming the label column: the transform would raise TypeError on the first batch; the run
    is refused before training instead, naming the image column (exit 2)."""
    argv = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--image_column_name", "label"]

    def label_as_image(data_args, seed):
        train_split, evaluation, _, label_column = tiny_splits(data_args, seed)
        return train_split, evaluation, data_args.image_column_name, label_column

    with pytest.raises(ValueError, match=r"Column 'label' holds ClassLabel.*not images.*image column \(image\)"):
        train.main(argv, load_data=label_as_image)


TYPE_ERROR_RUN = r"""
import functools, runpy, sys
from diverse_vit_hf.scripts import train

def broken_builder(model_args, labels):
    raise TypeError("a programming error")

train.main = functools.partial(train.main, build_model=broken_builder)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_the_script_shows_the_traceback_of_a_type_error(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", TYPE_ERROR_RUN, str(SCRIPT), "--output_dir", str(tmp_path / "out"), *FAST],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" in run.stderr and "TypeError: a programming error" in run.stderr


def test_the_example_module_offers_what_its_importers_read():
    module = load_script()
    for name in ("main", "EXIT_CODES", "DEMO_TRAINING_DEFAULTS", "ModelArguments", "DataArguments", "RecipeArguments",
                 "DiverseTrainingArguments", "load_splits", "unknown_options_message"):  # fmt: skip
        assert hasattr(module, name), name
    assert module.main is train.main and module.EXIT_CODES is train.EXIT_CODES
