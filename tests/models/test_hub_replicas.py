"""The Hub checkpoints users start from, replicated locally (tests/fixtures/hub_replicas.py): their legacy files
load, the evaluation transform matches their processors, and examples/run_diverse.py fine-tunes each of them end to
end into a checkpoint that vanilla transformers loads and preprocesses as the run evaluated."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from fixtures.hub_replicas import IMAGENET_1K_CLASSES, REPLICA_IDS, REPLICAS, input_size, replica_files, write_replica
from fixtures.scripts import REPO, RUN_DIVERSE, load_script
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata
from transformers import AutoConfig, AutoImageProcessor

from diverse_vit_hf.data.transforms import model_input_size, processor_transforms
from diverse_vit_hf.hub.model_card import validate_card_offline

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "2",
}
# A few optimizer steps on a few images: each run checks the whole path (load, transforms, train, evaluate, save).
SMALL = [
    "--max_steps",
    "2",
    "--max_train_samples",
    "16",
    "--max_eval_samples",
    "8",
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--redundancy_images",
    "0",
    "--use_cpu",
    "--disable_tqdm",
    "true",
]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
# Fine-tuned through `accelerate launch`; the others through `python examples/run_diverse.py`.
LAUNCHED = "facebook/deit-small-patch16-224"


def short_name(hub_id: str) -> str:
    return hub_id.split("/")[1]


def stock_class(hub_id: str) -> str:
    """The stock class of a fine-tuned checkpoint: a DeiT start point (two heads, averaged) gives a one-head
    DeiTForImageClassification (the CLS head is the one trained; an untrained distillation head must not be
    averaged in), a ViT one a ViTForImageClassification."""
    return (
        "DeiTForImageClassification"
        if REPLICAS[hub_id]["config"]["model_type"] == "deit"
        else "ViTForImageClassification"
    )


def run_script(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(RUN_DIVERSE), *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def failure(process: subprocess.CompletedProcess) -> str:
    stdout, stderr = process.stdout[-3000:], process.stderr[-5000:]
    return f"exit code {process.returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"


# ----------------------------------------------------------------------------------------------------------------
# Real images of several modes and sizes (non-square, smaller than the crop).


def real_images() -> dict[str, Image.Image]:
    astronaut = Image.fromarray(skdata.astronaut())  # 512x512 RGB
    camera = Image.fromarray(skdata.camera())  # 512x512 L
    coffee = Image.fromarray(skdata.coffee())  # 600x400 RGB
    rgba = astronaut.copy()
    gradient = np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1))
    rgba.putalpha(Image.fromarray(np.minimum(gradient, gradient.T)))  # alpha varies along both axes
    images = {"astronaut": astronaut, "camera": camera, "coffee": coffee, "rgba": rgba, "cmyk": coffee.convert("CMYK")}
    for name, image in list(images.items()):
        for width, height in ((300, 200), (97, 150), (150, 97)):
            images[f"{name}-{width}x{height}"] = image.resize((width, height))
    return images


IMAGES = real_images()


def legacy_folder(tmp_path: Path, hub_id: str) -> Path:
    """config.json and preprocessor_config.json only: all the processor needs, no weights."""
    folder = tmp_path / short_name(hub_id)
    folder.mkdir()
    for name, text in replica_files(hub_id, num_hidden_layers=1).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Fast checks: the files and the preprocessing.


@pytest.mark.parametrize("hub_id", REPLICA_IDS)
def test_replica_files_are_the_legacy_hub_files(tmp_path, hub_id):
    folder = write_replica(hub_id, tmp_path / short_name(hub_id), num_hidden_layers=1)
    for name, text in replica_files(hub_id, num_hidden_layers=1).items():
        assert (folder / name).read_bytes() == text.encode("utf-8"), name
    config_file = json.loads((folder / "config.json").read_text())
    processor_file = json.loads((folder / "preprocessor_config.json").read_text())
    assert len(config_file["id2label"]) == 1000 and config_file["id2label"]["0"] == "tench, Tinca tinca"
    assert len(config_file["label2id"]) == 999 and config_file["label2id"]["crane"] == 517  # 134 and 517 share it
    assert config_file["layer_norm_eps"] == 1e-12 and config_file["transformers_version"] < "4.7"
    assert "image_processor_type" not in processor_file and isinstance(processor_file["size"], int)
    if REPLICAS[hub_id]["config"]["model_type"] == "deit":
        assert processor_file["feature_extractor_type"] == "DeiTFeatureExtractor"
        assert isinstance(processor_file["crop_size"], int)
    # The sizes the Hub lists for these files: 160 bytes (ViT-style processor), 287 (DeiT processor), 69.6 kB.
    full_depth = replica_files(hub_id)
    assert len(full_depth["preprocessor_config.json"]) == (287 if "crop_size" in processor_file else 160)
    assert round(len(full_depth["config.json"].encode("utf-8")) / 1000, 1) == 69.6
    assert full_depth["config.json"].index('"9": ') < full_depth["config.json"].index('"10": ')  # int keys, sorted

    config = AutoConfig.from_pretrained(folder)
    assert config.num_labels == 1000 and config.num_hidden_layers == 1
    assert config.id2label[999] == "toilet tissue, toilet paper, bathroom tissue"
    processor = AutoImageProcessor.from_pretrained(folder)
    assert model_input_size(processor) == input_size(hub_id) == (config.image_size, config.image_size)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    if config.model_type == "deit":
        assert {"cls_classifier.weight", "distillation_classifier.weight", "deit.embeddings.distillation_token"} <= keys
    else:
        assert {
            "classifier.weight",
            "vit.embeddings.cls_token",
            "vit.encoder.layer.0.attention.attention.query.weight",
        } <= keys


def test_imagenet_names_agree_with_torchvision():
    """The 1,000 transcribed names against torchvision's short ImageNet names (each one of our synonyms), so a typo
    in replicas.py shows; torchvision disambiguates the two classes whose names collide."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert len(IMAGENET_1K_CLASSES) == len(_IMAGENET_CATEGORIES) == 1000
    differing = {
        i: (ours, theirs)
        for i, (ours, theirs) in enumerate(zip(IMAGENET_1K_CLASSES, _IMAGENET_CATEGORIES, strict=True))
        if theirs.lower() not in ours.lower()
    }
    assert differing == {134: ("crane", "crane bird"), 639: ("maillot, tank suit", "maillot tank suit")}


def test_bin_replica_has_pickle_weights_only(tmp_path):
    folder = write_replica("facebook/deit-tiny-patch16-224", tmp_path / "bin", num_hidden_layers=1, weights="bin")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "vit.embeddings.patch_embeddings.projection.weight" in state and state["classifier.weight"].shape == (
        1000,
        192,
    )


@pytest.mark.parametrize("hub_id", REPLICA_IDS)
def test_eval_transform_matches_the_processor(tmp_path, hub_id):
    processor = AutoImageProcessor.from_pretrained(legacy_folder(tmp_path, hub_id))
    train_transform, eval_transform = processor_transforms(processor, augmentation="none")
    height, width = input_size(hub_id)
    for name, image in IMAGES.items():
        expected = processor(image, do_convert_rgb=True, return_tensors="pt")["pixel_values"][0]
        produced = eval_transform(image)
        assert produced.shape == (3, height, width) == expected.shape, name
        assert produced.dtype == torch.float32
        torch.testing.assert_close(produced, expected, atol=1e-2, rtol=0, msg=f"{hub_id}: {name}")
        assert train_transform(image).shape == (3, height, width), name
    for transform in (train_transform, eval_transform):
        clone = pickle.loads(pickle.dumps(transform))  # spawned data-loader workers receive them pickled
        torch.testing.assert_close(clone(IMAGES["coffee"]), eval_transform(IMAGES["coffee"]), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("hub_id", "size"),
    [("facebook/deit-small-patch16-224", (224, 224)), ("facebook/deit-base-patch16-384", (384, 384))],
)
def test_model_input_size(tmp_path, hub_id, size):
    assert model_input_size(AutoImageProcessor.from_pretrained(legacy_folder(tmp_path, hub_id))) == size


# ----------------------------------------------------------------------------------------------------------------
# End to end: examples/run_diverse.py as users run it, on every replica (1 block, real width and image size).


def write_image_folder(root: Path) -> Path:
    """train/ and val/ with one sub-folder per class, images of mixed sizes and modes: RGB and CMYK JPEG, L, RGBA
    (varying alpha) and palette PNG, some smaller than the 224 crop, some not square."""
    sources = {"astronaut": IMAGES["astronaut"], "coffee": IMAGES["coffee"]}
    for class_name, image in sources.items():
        variants = {
            "train": [
                ("rgb.jpg", image.resize((300, 200))),
                ("gray.png", image.convert("L").resize((64, 48))),
                (
                    "alpha.png",
                    IMAGES["rgba"].resize((256, 256)) if class_name == "astronaut" else image.convert("RGBA"),
                ),
                ("cmyk.jpg", image.convert("CMYK").resize((180, 320))),
                ("palette.png", image.convert("P").resize((230, 230))),
            ],
            "val": [("rgb.jpg", image.resize((250, 250))), ("cmyk.jpg", image.convert("CMYK").resize((120, 200)))],
        }
        for split, files in variants.items():
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for file_name, variant in files:
                variant.save(folder / file_name)
    return root


class Run(NamedTuple):
    output: Path
    ok: bool
    text: str  # what the run printed and logged (a subprocess), or printed and raised (in this process)
    as_user: bool  # a subprocess, as users run the script


def run_in_process(args: list[str]) -> tuple[bool, str]:
    """`main(args)` of the script in this process (no start-up: the import is paid once): (succeeded, output)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            load_script().main(args)
    except Exception:
        return False, printed.getvalue() + traceback.format_exc()
    return True, printed.getvalue()


@pytest.fixture(scope="module")
def replica_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replicas")
    return {hub_id: write_replica(hub_id, root / short_name(hub_id), num_hidden_layers=1) for hub_id in REPLICA_IDS}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def finetuned(replica_dirs, image_folder, tmp_path_factory):
    """`finetuned(hub_id, data)`: the run fine-tuning the replica on `data`, once per module. "digits" (the default
    dataset: the embedded MNIST digits) runs `python examples/run_diverse.py` (`accelerate launch` for LAUNCHED) as
    users do; "folder" (--train_dir/--validation_dir) calls the script's `main` in this process, which saves a
    start-up per replica and keeps the file's slow part within a few minutes."""
    runs: dict[tuple[str, str], Run] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(hub_id: str, data: str) -> Run:
        if (hub_id, data) not in runs:
            output = root / f"{short_name(hub_id)}-{data}"
            args = ["--model", str(replica_dirs[hub_id]), "--output_dir", str(output), *SMALL]
            if data == "folder":
                args += ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "val")]
                runs[hub_id, data] = Run(output, *run_in_process(args), as_user=False)
            else:
                process = run_script(args, ACCELERATE if hub_id == LAUNCHED else None)
                text = f"exit code {process.returncode}\n{process.stdout}\n{process.stderr}"
                runs[hub_id, data] = Run(output, process.returncode == 0, text, as_user=True)
        return runs[hub_id, data]

    return get


def check_finetuned(hub_id: str, run: Run, num_labels: int) -> None:
    assert run.ok, run.text[-8000:]
    height, width = input_size(hub_id)
    if run.as_user:
        assert f"{height}x{width} px" in run.text
    assert "Validation top-1 accuracy:" in run.text
    config = json.loads((run.output / "config.json").read_text())
    assert config["architectures"] == [stock_class(hub_id)]
    assert config["image_size"] == height and config["num_hidden_layers"] == 1 and len(config["id2label"]) == num_labels
    assert (run.output / "model.safetensors").exists() and (run.output / "preprocessor_config.json").exists()
    assert not list(run.output.glob("*.bin")) and not list(run.output.glob("*.pt"))
    with safe_open(run.output / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert weights.get_slice("classifier.weight").get_shape()[0] == num_labels
    assert not any("distillation_classifier" in key or "cls_classifier" in key for key in keys)


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", REPLICA_IDS)
def test_finetunes_on_the_embedded_digits(finetuned, hub_id):
    check_finetuned(hub_id, finetuned(hub_id, "digits"), num_labels=10)


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", REPLICA_IDS)
def test_finetunes_on_an_image_folder(finetuned, hub_id):
    run = finetuned(hub_id, "folder")
    check_finetuned(hub_id, run, num_labels=2)
    assert json.loads((run.output / "config.json").read_text())["id2label"] == {"0": "astronaut", "1": "coffee"}


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", REPLICA_IDS)
def test_evaluates_the_fine_tuned_checkpoint_only(finetuned, image_folder, tmp_path, capsys, hub_id):
    """--do_train false --do_eval on the saved folder reproduces the run's final evaluation: same weights, and the
    saved preprocessor_config.json preprocesses as the run evaluated. (In this process, to save a start-up: the
    training runs above are the subprocesses.)"""
    trained = finetuned(hub_id, "folder")
    assert trained.ok, "the fine-tuning run failed (see test_finetunes_on_an_image_folder)"
    other = tmp_path / "eval"
    args = ["--model", str(trained.output), "--do_train", "false", "--do_eval", "--output_dir", str(other)]
    args += ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "val")]
    args += ["--per_device_eval_batch_size", "4", "--use_cpu", "--disable_tqdm", "true"]
    metrics = load_script().main(args)
    assert f"Validation top-1 accuracy of {trained.output}" in capsys.readouterr().out
    during_training = json.loads((trained.output / "eval_results.json").read_text())
    assert json.loads((other / "eval_results.json").read_text())["eval_top1"] == metrics["eval_top1"]
    assert metrics["eval_top1"] == during_training["eval_top1"]
    assert metrics["eval_loss"] == pytest.approx(during_training["eval_loss"], rel=1e-4, abs=1e-5)
    assert not (other / "model.safetensors").exists()


VANILLA_CHECK = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
out, images, folders = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
results = {}
for i, folder in enumerate(folders):
    model = AutoModelForImageClassification.from_pretrained(folder)
    classify = pipeline("image-classification", model=folder)
    scores = classify(Image.open(images[0]), top_k=model.config.num_labels)
    pixels = [classify.image_processor(Image.open(path), return_tensors="pt")["pixel_values"][0] for path in images]
    torch.save(pixels, f"{out}/pixels-{i}.pt")
    results[folder] = {
        "class": type(model).__name__,
        "pipeline_model_class": type(classify.model).__name__,
        "labels": sorted(s["label"] for s in scores),
        "total": sum(s["score"] for s in scores),
        "pixels": f"{out}/pixels-{i}.pt",
    }
results["imported_ours"] = any(name.startswith("diverse_vit_hf") for name in sys.modules)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def vanilla(finetuned, tmp_path_factory):
    """One subprocess that never imports diverse_vit_hf loads every fine-tuned (digits) checkpoint with
    AutoModelForImageClassification and pipeline("image-classification"), and saves what the pipeline's processor
    makes of two images."""
    out = tmp_path_factory.mktemp("vanilla")
    images = [out / "rgb-300x200.jpg", out / "gray-97x150.png"]
    IMAGES["coffee-300x200"].save(images[0])
    IMAGES["camera-97x150"].save(images[1])
    folders = [str(finetuned(hub_id, "digits").output) for hub_id in REPLICA_IDS]
    folders = [folder for folder in folders if (Path(folder) / "model.safetensors").exists()]
    check = subprocess.run(
        [sys.executable, "-c", VANILLA_CHECK, str(out), ",".join(map(str, images)), *folders],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert check.returncode == 0, failure(check)
    return json.loads(check.stdout.strip().splitlines()[-1]), images


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", REPLICA_IDS)
def test_vanilla_transformers_loads_and_preprocesses_as_the_run(finetuned, vanilla, replica_dirs, hub_id):
    run = finetuned(hub_id, "digits")
    assert run.ok, "the fine-tuning run failed (see test_finetunes_on_the_embedded_digits)"
    results, image_paths = vanilla
    assert results["imported_ours"] is False
    result = results[str(run.output)]
    assert result["class"] == result["pipeline_model_class"] == stock_class(hub_id)
    assert result["labels"] == [str(d) for d in range(10)]
    assert result["total"] == pytest.approx(1.0, abs=1e-3)  # softmax (single-label), not sigmoid

    saved = AutoImageProcessor.from_pretrained(run.output)
    assert model_input_size(saved) == input_size(hub_id)
    if getattr(saved, "do_center_crop", False):
        assert (saved.crop_size["height"], saved.crop_size["width"]) == input_size(hub_id)
    else:
        assert (saved.size["height"], saved.size["width"]) == input_size(hub_id)
    # The run evaluated with processor_transforms of the replica's processor: the pipeline must see the same tensors.
    run_eval = processor_transforms(AutoImageProcessor.from_pretrained(replica_dirs[hub_id]))[1]
    saved_eval = processor_transforms(saved)[1]
    pipeline_pixels = torch.load(result["pixels"], weights_only=True)
    for path, pixels in zip(image_paths, pipeline_pixels, strict=True):
        image = Image.open(path)
        torch.testing.assert_close(pixels, run_eval(image), atol=1e-2, rtol=0, msg=f"{hub_id}: {path.name}")
        torch.testing.assert_close(pixels, saved_eval(image), atol=1e-2, rtol=0, msg=f"{hub_id}: {path.name}")


@pytest.mark.slow
def test_the_model_card_names_the_base_model(finetuned):
    run = finetuned(LAUNCHED, "digits")
    assert run.ok, "the fine-tuning run failed (see test_finetunes_on_the_embedded_digits)"
    card = run.output / "README.md"
    assert card.is_file()
    validate_card_offline(card)
    assert short_name(LAUNCHED) in card.read_text()


# ----------------------------------------------------------------------------------------------------------------
# Pickle weights, the full-size DeiT-Small, and an output folder that already holds checkpoints.


@pytest.mark.slow
def test_pickle_only_checkpoint_needs_allow_pickle(tmp_path):
    replica = write_replica(
        "facebook/deit-small-patch16-224", tmp_path / "deit-small-bin", num_hidden_layers=1, weights="bin"
    )
    refused = run_script(["--model", str(replica), "--output_dir", str(tmp_path / "refused"), *SMALL])
    assert refused.returncode == 2, failure(refused)
    assert "--allow_pickle" in refused.stderr and "Traceback" not in refused.stderr
    output = tmp_path / "allowed"
    ok, text = run_in_process(["--model", str(replica), "--output_dir", str(output), "--allow_pickle", *SMALL])
    assert ok, text
    assert (output / "model.safetensors").exists()
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pt")) and not list(output.glob("*.pth"))


@pytest.mark.slow
def test_full_size_deit_small_with_the_readme_command(tmp_path):
    """`accelerate launch examples/run_diverse.py --model <DeiT-Small> --max_steps 12 --per_device_train_batch_size
    8` on the 12-block replica (few images, CPU)."""
    replica = write_replica("facebook/deit-small-patch16-224", tmp_path / "deit-small-patch16-224")
    assert json.loads((replica / "config.json").read_text())["num_hidden_layers"] == 12
    output = tmp_path / "out"
    args = ["--model", str(replica), "--max_steps", "12", "--per_device_train_batch_size", "8"]
    args += ["--output_dir", str(output), "--use_cpu", "--max_train_samples", "96", "--max_eval_samples", "8"]
    args += ["--eval_strategy", "no", "--save_strategy", "no", "--redundancy_images", "0", "--disable_tqdm", "true"]
    process = run_script(args, launcher=ACCELERATE, timeout=600)
    assert process.returncode == 0, failure(process)
    assert "224x224 px" in process.stderr + process.stdout
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 12
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 12


@pytest.mark.slow
def test_output_dir_holding_checkpoints_is_not_overwritten_silently(tmp_path):
    output = tmp_path / "out"
    tiny = ["--hidden_size", "32", "--num_hidden_layers", "2", "--max_train_samples", "64", "--max_eval_samples", "16"]
    tiny += ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--use_cpu", "--disable_tqdm", "true"]
    tiny += ["--redundancy_images", "0", "--output_dir", str(output)]
    ok, text = run_in_process(tiny)
    assert ok, text
    assert list(output.glob("checkpoint-*"))
    again = run_script(tiny)  # as users run it: the exit code and the message
    assert again.returncode == 2, failure(again)
    assert "--resume_from_checkpoint auto" in again.stderr and "Traceback" not in again.stderr
    ok, text = run_in_process([*tiny, "--overwrite_output_dir"])
    assert ok, text
