"""examples/run_diverse.py: end to end on the embedded digits, the vanilla round trip, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, RUN_DIVERSE, SCRIPT_ENV, fast_flags, load_script
from transformers import ResNetConfig, ResNetForImageClassification

from diverse_vit_hf.scripts.arguments import ModelArguments
from diverse_vit_hf.scripts.model_builder import build_classifier

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
    """--model takes any ViT folder (as it would a Hub id), re-initialising the head for the new labels."""
    module = load_script()
    base = tmp_path / "base"
    model, processor = build_classifier(ModelArguments(hidden_size=32, num_hidden_layers=2), ["a", "b"])
    model.save_pretrained(base)
    processor.save_pretrained(base)
    metrics = module.main(["--model", str(base), "--output_dir", str(tmp_path / "ft"), *FAST])
    assert "eval_top1" in metrics
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert len(saved["id2label"]) == 10 and saved["architectures"] == ["ViTForImageClassification"]


def test_demo_defaults_train_from_scratch_on_embedded_mnist():
    module = load_script()
    parser_defaults = module.DEMO_TRAINING_DEFAULTS
    model_args, data_args = ModelArguments(), module.DataArguments()
    assert model_args.model is None and data_args.dataset_name is None and data_args.embedded_dataset == "mnist"
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
