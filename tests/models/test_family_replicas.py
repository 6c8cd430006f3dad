"""One popular Hub checkpoint per family, replicated locally with its config and processor as on the Hub
(tests/fixtures/family_replicas.py, shrunk to one narrow block): the README command form, `accelerate launch
examples/run_diverse.py --model <replica>`, trains a few steps with every term, writes the redundancy report of all
three levels, and saves a checkpoint that vanilla `pipeline("image-classification")` runs in a process that never
imports us."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fixtures.family_replicas import FAMILY_REPLICAS, replica_input_size, write_family_replica
from fixtures.scripts import REPO, RUN_DIVERSE, SCRIPT_ENV
from transformers import AutoConfig, AutoImageProcessor

from diverse_vit_hf import DIVERSE_MODEL_CLASSES
from diverse_vit_hf.data.transforms import model_input_size, processor_transforms

HUB_IDS = sorted(FAMILY_REPLICAS)
ENV = {**SCRIPT_ENV, "OMP_NUM_THREADS": "2"}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
# Every term at its released coefficient (the defaults) plus stochastic depth; a few steps on a few digits.
SMALL = ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_strategy", "no", "--redundancy_images", "8", "--drop_path_rate", "0.1",
         "--use_cpu", "--disable_tqdm", "true"]  # fmt: skip


def shrink(model_type: str) -> dict:
    """One narrow block: the real config otherwise (image and patch size, norms, heads' layout, labels)."""
    sizes = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}
    if model_type.startswith("dinov2"):
        return sizes | {"mlp_ratio": 2}
    return sizes | {"intermediate_size": 64}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-replicas")
    return {
        hub_id: write_family_replica(hub_id, root / hub_id.replace("/", "--"), **shrink(FAMILY_REPLICAS[hub_id]))
        for hub_id in HUB_IDS
    }


@pytest.mark.parametrize("hub_id", HUB_IDS)
def test_replica_is_the_family_it_claims_and_loads_into_our_class(replicas, hub_id):
    config = AutoConfig.from_pretrained(replicas[hub_id])
    assert config.model_type == FAMILY_REPLICAS[hub_id]
    assert model_input_size(AutoImageProcessor.from_pretrained(replicas[hub_id])) == replica_input_size(hub_id)
    model = DIVERSE_MODEL_CLASSES[config.model_type].from_pretrained(replicas[hub_id])
    height, width = replica_input_size(hub_id)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, height, width), return_diversity_outputs=True)
    assert out.token_logits.shape[-1] == config.num_labels and torch.isfinite(out.logits).all()


@pytest.fixture(scope="module")
def trained(replicas, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-runs")

    def train(hub_id: str) -> tuple[Path, subprocess.CompletedProcess]:
        output = root / hub_id.replace("/", "--")
        command = [*ACCELERATE, str(RUN_DIVERSE), "--model", str(replicas[hub_id]), "--output_dir", str(output), *SMALL]
        env = {**ENV, "OMP_NUM_THREADS": "1"}
        return output, subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    # Two one-thread runs at a time: each is mostly process start-up and imports, which one thread does anyway.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(HUB_IDS, pool.map(train, HUB_IDS), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", HUB_IDS)
def test_run_diverse_trains_every_term_and_reports_every_level(trained, hub_id):
    output, process = trained[hub_id]
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    height, width = replica_input_size(hub_id)
    assert f"{height}x{width} px" in process.stderr + process.stdout
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logged = {key for entry in state["log_history"] for key in entry}
    assert {"loss_patch_cosine", "loss_patch_contrastive", "loss_attention_cosine", "loss_weight_condition"} <= logged
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == FAMILY_REPLICAS[hub_id] and len(config["id2label"]) == 10
    assert config["architectures"][0] in {cls.__name__ for cls in DIVERSE_MODEL_CLASSES[config["model_type"]].__mro__}
    assert not config["architectures"][0].startswith("Diverse")
    summary = json.loads((output / "redundancy.json").read_text())["models"][0]["summary"]
    for key in ("patch_cos_last", "attn_cos_block1", "qkv_cond_mean"):  # one per level
        assert summary[key] is not None, key


VANILLA = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
results = {}
for folder in sys.argv[1:]:
    classify = pipeline("image-classification", model=folder)
    scores = classify(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)), top_k=10)
    pixels = classify.image_processor(Image.new("RGB", (40, 30), (10, 200, 30)), return_tensors="pt")["pixel_values"]
    results[folder] = {"class": type(classify.model).__name__, "total": sum(s["score"] for s in scores),
                       "labels": sorted(s["label"] for s in scores), "pixels": pixels[0].tolist()}
results["imported_ours"] = any(name.startswith("diverse_vit_hf") for name in sys.modules)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_vanilla_pipeline_runs_every_trained_family(trained, replicas):
    folders = [str(output) for output, process in trained.values() if process.returncode == 0]
    assert len(folders) == len(HUB_IDS), "a training run failed (see the test above)"
    run = subprocess.run([sys.executable, "-c", VANILLA, *folders], env=ENV, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results.pop("imported_ours") is False
    from PIL import Image

    for hub_id in HUB_IDS:
        output = trained[hub_id][0]
        result = results[str(output)]
        assert result["class"] == json.loads((output / "config.json").read_text())["architectures"][0]
        assert result["labels"] == [str(d) for d in range(10)] and result["total"] == pytest.approx(1.0, abs=1e-3)
        # The pipeline preprocesses as the run evaluated: the replica's processor, through processor_transforms.
        evaluate = processor_transforms(AutoImageProcessor.from_pretrained(replicas[hub_id]))[1]
        expected = evaluate(Image.new("RGB", (40, 30), (10, 200, 30)))
        torch.testing.assert_close(torch.tensor(result["pixels"]), expected, atol=1e-2, rtol=0, msg=hub_id)
