"""timm's Hub ViTs through transformers' TimmWrapper (`DiverseTimmWrapperForImageClassification`), on local replicas
of timm repositories in their real file form (tests/fixtures/timm_replicas.py): the diversity outputs against the
stock timm model run unfused, block 1 alone off the fused kernel, every term's gradient, the Q/K/V split of the fused
qkv (also under FSDP2), timm's drop path and no-weight-decay groups, timm's eval transform, the redundancy analysis,
the model card, the refusals, and the saved folder loaded by timm and by a vanilla `pipeline` in a process that never
imports diverse_vit_hf. transformers' `ModelTesterMixin` runs on the class at the end, as tests/models/test_hf_common.py
runs it on the other families."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import unittest
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import transformers
from fixtures.fetch_hf_model_tests import fetched_version
from fixtures.scripts import REPO, RUN_DIVERSE, SCRIPT_ENV
from fixtures.timm_replicas import (
    SHRINK,
    TIMM_REPLICAS,
    build_timm_model,
    replica_input_size,
    timm_replica_config,
    write_timm_replica,
)
from PIL import Image
from skimage import data as skdata
from transformers import AutoConfig, AutoImageProcessor, TimmWrapperConfig

from diverse_vit_hf import DiverseTimmWrapperForImageClassification, DiversityConfig, DiversityObjective
from diverse_vit_hf.analysis.driver import analyze_model
from diverse_vit_hf.analysis.probe import WEIGHT_MATRICES, weight_statistics
from diverse_vit_hf.data.transforms import (
    TimmPreprocessing,
    model_input_size,
    prepare_processor,
    processor_transforms,
)
from diverse_vit_hf.hub.model_card import CardInputs, build_model_card, files_to_push, validate_card_offline
from diverse_vit_hf.losses.regularizers import (
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_token_targets,
    two_label_cross_entropy_sum,
    weight_condition_loss,
)
from diverse_vit_hf.models import timm_vit
from diverse_vit_hf.models.modeling import diverse_model_class_for_config, load_diverse_model
from diverse_vit_hf.models.timm_vit import TIMM_CONFIG_ATTRIBUTES
from diverse_vit_hf.trainer.optim import no_weight_decay_parameter_names

HUB_IDS = sorted(TIMM_REPLICAS)
DEIT = "timm/deit_small_patch16_224.fb_in1k"
REG4_GAP = "timm/vit_betwixt_patch16_reg4_gap_256.sbb_in12k_ft_in1k"
NUM_LABELS = 5
ENV = {**SCRIPT_ENV, "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("timm-replicas")
    return {hub_id: write_timm_replica(hub_id, root / hub_id.replace("/", "--"), **SHRINK) for hub_id in HUB_IDS}


def load(folder: Path) -> DiverseTimmWrapperForImageClassification:
    """Our class on a replica; the backbone-only one (num_classes 0) gets a head of NUM_LABELS classes."""
    config = json.loads((folder / "config.json").read_text())
    return load_diverse_model(str(folder), **({} if config["num_classes"] else {"num_labels": NUM_LABELS})).eval()


def stock_timm(folder: Path, ours: DiverseTimmWrapperForImageClassification) -> torch.nn.Module:
    """The replica in stock timm (`local-dir:`), every block unfused; a new head takes ours' weights."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if model.num_classes == 0:
        model.reset_classifier(ours.config.num_labels)
        model.head.load_state_dict(ours.timm_model.head.state_dict())
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def pixels(hub_id: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    height, width = replica_input_size(hub_id)
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---- The replicas ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hub_id", HUB_IDS)
def test_replica_is_a_timm_repository_that_routes_to_our_class(replicas, hub_id):
    folder = replicas[hub_id]
    config = json.loads((folder / "config.json").read_text())
    assert "model_type" not in config and set(config) == {"architecture", "num_classes", "num_features",
                                                          "global_pool", "model_args", "pretrained_cfg"}  # fmt: skip
    assert not (folder / "preprocessor_config.json").exists()
    stored = safetensors.torch.load_file(folder / "model.safetensors")
    assert set(stored) == set(build_timm_model(config).state_dict())  # timm's own names, no prefix
    loaded = AutoConfig.from_pretrained(folder)
    assert isinstance(loaded, TimmWrapperConfig) and loaded.model_type == "timm_wrapper"
    assert diverse_model_class_for_config(loaded) is DiverseTimmWrapperForImageClassification
    model = load(folder)
    assert model.num_prefix_tokens == build_timm_model(config).num_prefix_tokens
    expected = {"image_size": replica_input_size(hub_id)[0], "num_channels": 3, "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
    assert {key: getattr(model.config, key) for key in expected} == expected


# ---- The diversity forward -------------------------------------------------------------------------------------------


def stock_reference(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The regularizers' inputs computed with the stock timm model's own modules, unfused, step by step."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    block, attention = model.blocks[0], model.blocks[0].attn
    batch, tokens, _ = x.shape
    qkv = attention.qkv(block.norm1(x)).reshape(batch, tokens, 3, attention.num_heads, attention.head_dim)
    query, key = (qkv.permute(2, 0, 3, 1, 4)[i] for i in (0, 1))
    query, key = attention.q_norm(query), attention.k_norm(key)
    probs = ((query * attention.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
    last = model.blocks(x)
    features = model.norm(last)
    return {
        "first": x,
        "last": last,
        "probs": probs,
        "logits": model.forward_head(features),
        "token_logits": model.head(model.fc_norm(features)),
        "forward": model(images),
    }


@pytest.mark.parametrize("hub_id", HUB_IDS)
def test_diversity_outputs_equal_the_stock_timm_model_run_unfused(replicas, hub_id):
    ours = load(replicas[hub_id])
    stock = stock_timm(replicas[hub_id], ours)
    images = pixels(hub_id)
    with torch.no_grad():
        out = ours(pixel_values=images, return_diversity_outputs=True)
        plain = ours(pixel_values=images).logits
        reference = stock_reference(stock, images)
    tolerance = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(out.first_hidden_state, reference["first"], **tolerance)
    torch.testing.assert_close(out.last_block_hidden_state, reference["last"], **tolerance)
    torch.testing.assert_close(out.first_block_attention_probs, reference["probs"], **tolerance)
    torch.testing.assert_close(out.token_logits, reference["token_logits"], **tolerance)
    for logits in (out.logits, plain, reference["forward"]):
        torch.testing.assert_close(logits, reference["logits"], **tolerance)
    prefix = ours.num_prefix_tokens
    tokens = prefix + math.prod(ours.timm_model.patch_embed.grid_size)
    assert out.first_block_attention_probs.shape == (2, 2, tokens, tokens) and out.token_logits.shape[1] == tokens
    if TIMM_REPLICAS[hub_id]["global_pool"] == "token":
        torch.testing.assert_close(out.logits, out.token_logits[:, 0])
    elif isinstance(stock.fc_norm, torch.nn.Identity):  # norm before an average pool: linear head on the mean
        torch.testing.assert_close(out.logits, out.token_logits[:, prefix:].mean(dim=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hub_id", HUB_IDS)
def test_the_token_loss_equals_the_loss_on_the_per_token_logits(replicas, hub_id):
    """With `token_targets` the timm head's per-token cross-entropy is computed chunked, never building the
    per-token logits: equal, with the head's and the final norm's gradients, to the loss on `token_logits`."""
    ours = load(replicas[hub_id]).eval()
    images = pixels(hub_id)
    out = ours(pixel_values=images, return_diversity_outputs=True)
    batch, tokens, classes = out.token_logits.shape
    labels = torch.arange(batch) % classes
    targets = patch_token_targets(labels, labels.flip(0), torch.rand(tokens - ours.num_prefix_tokens), 0.1,
                                  ours.num_prefix_tokens)  # fmt: skip
    reference = two_label_cross_entropy_sum(
        out.token_logits, labels, labels.flip(0), targets.weights, 0.1, targets.row_scale
    )
    watched = [ours.timm_model.head.weight, ours.timm_model.head.bias, ours.timm_model.blocks[-1].mlp.fc2.weight]
    expected = torch.autograd.grad(reference, watched)
    fused = ours(pixel_values=images, return_diversity_outputs=True, token_targets=targets, return_token_logits=False)
    assert fused.token_logits is None
    assert fused.token_loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(fused.token_loss, watched), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_every_block_keeps_the_fused_kernel(replicas, monkeypatch):
    """No block leaves timm's fused kernel (which builds no probabilities): block 1's query and key, captured at its
    q_norm and k_norm, are what the kernel received there."""
    ours = load(replicas[DEIT])
    depth = len(ours.timm_model.blocks)
    fused = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counting(query, key, *args, **kwargs):
        calls.append((query, key))
        return fused(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        out = ours(pixel_values=pixels(DEIT), return_diversity_outputs=True)
    assert all(block.attn.fused_attn for block in ours.timm_model.blocks)
    assert len(calls) == depth
    assert out.first_block_attention.query is calls[0][0] and out.first_block_attention.key is calls[0][1]
    assert out.first_block_attention.scaling == ours.timm_model.blocks[0].attn.scale


def objective_inputs(model, hub_id, batch: int = 2):
    images = pixels(hub_id, batch=batch, seed=1)
    labels = torch.arange(batch) % model.config.num_labels
    return {"pixel_values": images, "labels": labels}


@pytest.mark.parametrize("hub_id", [DEIT, REG4_GAP, "timm/vit_small_patch14_reg4_dinov2.lvd142m"])
def test_every_term_has_a_finite_nonzero_gradient_where_it_should(replicas, hub_id):
    model = load(replicas[hub_id]).train()
    timm_model, prefix = model.timm_model, model.num_prefix_tokens
    qkv = timm_model.blocks[0].attn.qkv.weight
    width = qkv.shape[0] // 3
    terms = {
        "patch_cosine": lambda out: patch_cosine_loss(out.last_block_hidden_state, prefix),
        "patch_contrastive": lambda out: patch_contrastive_loss(
            out.first_hidden_state, out.last_block_hidden_state, prefix
        ),
        "attention_cosine": lambda out: attention_cosine_loss(out.first_block_attention_probs),
        "weight_condition": lambda out: weight_condition_loss(model.attention_projection_weights(), "exact"),
    }
    batch = objective_inputs(model, hub_id)
    for name, term in terms.items():
        model.zero_grad()
        out = model(pixel_values=batch["pixel_values"], return_diversity_outputs=True)
        value = term(out)
        value.backward()
        assert torch.isfinite(value) and value > 0, name
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values()), name
        if name == "attention_cosine":  # block 1's map depends on its Q and K, not on V nor on later blocks
            assert qkv.grad[: 2 * width].abs().sum() > 0 and qkv.grad[2 * width :].abs().sum() == 0
            assert timm_model.blocks[-1].attn.qkv.weight.grad is None
        elif name == "weight_condition":  # Q, K and V of every block
            for block in timm_model.blocks:
                rows = block.attn.qkv.weight.grad.view(3, width, -1)
                assert (rows.abs().sum(dim=(1, 2)) > 0).all()
        else:  # h^L's terms reach the patch projection (h^0 is not detached)
            assert timm_model.patch_embed.proj.weight.grad.abs().sum() > 0, name
    model.zero_grad()
    objective = DiversityObjective(DiversityConfig(), model.config.num_labels, model.config.patch_size)
    result = objective(model, batch)
    result.loss.backward()
    assert set(result.terms) == {"loss_cls", "loss_patch_cosine", "loss_patch_contrastive", "loss_attention_cosine",
                                 "loss_weight_condition"}  # fmt: skip
    assert timm_model.head.weight.grad.abs().sum() > 0


def test_a_few_training_steps_reduce_the_loss(replicas):
    torch.manual_seed(0)
    model = load(replicas[REG4_GAP]).train()
    config = DiversityConfig(mixing=False, weight_estimator="exact")
    objective = DiversityObjective(config, model.config.num_labels, model.config.patch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = objective_inputs(model, REG4_GAP, batch=4)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        result = objective(model, batch)
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_gradient_checkpointing_keeps_block_one_probabilities_in_the_graph(replicas, monkeypatch):
    model = load(replicas[DEIT]).train()
    images = pixels(DEIT)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.timm_model.grad_checkpointing
        model.zero_grad()
        out = model(pixel_values=images, return_diversity_outputs=True)
        (
            attention_cosine_loss(out.first_block_attention_probs) + patch_cosine_loss(out.last_block_hidden_state)
        ).backward()
        grads.append(model.timm_model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    monkeypatch.setattr("diverse_vit_hf.models.modeling.uses_reentrant_checkpointing", lambda: True)
    with pytest.raises(ValueError, match="re-entrant"):
        model(pixel_values=images, return_diversity_outputs=True)


# ---- Weights: Q/K/V, FSDP2, drop path, weight decay ------------------------------------------------------------------


def test_qkv_split_is_the_rows_of_the_fused_weight_gathered_first(replicas):
    model = load(replicas[REG4_GAP])
    stacked = model.attention_projection_weights()
    blocks = model.timm_model.blocks
    width = blocks[0].attn.attn_dim
    assert stacked.shape == (3 * len(blocks), width, model.config.hidden_size)
    for index, block in enumerate(blocks):
        for part in range(3):
            assert torch.equal(stacked[3 * index + part], block.attn.qkv.weight[part * width : (part + 1) * width])
    from diverse_vit_hf.models.families import qkv_weights

    gathered = []
    qkv_weights(blocks[0], gather=lambda weight: gathered.append(weight) or weight)
    assert len(gathered) == 1 and gathered[0] is blocks[0].attn.qkv.weight  # the fused matrix, once, before slicing


def test_real_fsdp2_sharded_timm_model_gives_the_weight_term_full_matrices(replicas, tmp_path):
    """FSDP2 (`fully_shard`) on CPU with a 1-process gloo group: `qkv` becomes a DTensor, gathered whole, then split."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = load(replicas[DEIT])
        expected = model.attention_projection_weights().detach().clone()
        for block in model.timm_model.blocks:
            fully_shard(block)
        fully_shard(model)
        assert isinstance(model.timm_model.blocks[0].attn.qkv.weight, DTensor)
        weights = model.attention_projection_weights()
        assert not isinstance(weights, DTensor) and weights.requires_grad
        torch.testing.assert_close(weights.detach(), expected)
    finally:
        dist.destroy_process_group()


FSDP2_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from diverse_vit_hf import load_diverse_model
from diverse_vit_hf.losses.regularizers import weight_condition_loss
from diverse_vit_hf.utils.distributed import end_process_group
folder, out = sys.argv[1], sys.argv[2]
sharded = "WORLD_SIZE" in os.environ
if sharded:
    dist.init_process_group("gloo")
model = load_diverse_model(folder)
if sharded:
    from torch.distributed.fsdp import fully_shard
    for block in model.timm_model.blocks:
        fully_shard(block)
    fully_shard(model)
loss = weight_condition_loss(model.attention_projection_weights(), "exact")
loss.backward()
grads = {}
for index, block in enumerate(model.timm_model.blocks):
    grad = block.attn.qkv.weight.grad
    grads[index] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).flatten().tolist()
if not sharded or dist.get_rank() == 0:
    open(out, "w").write(json.dumps({"loss": loss.item(), "grads": grads}))
end_process_group()
if sharded:
    os._exit(0)  # all written; gloo's teardown at exit sometimes aborts (tests/workers/fsdp2_weight_term.py)
"""


@pytest.mark.slow
def test_fsdp2_two_processes_give_the_unsharded_weight_term_and_gradient(replicas, tmp_path):
    """Two gloo processes shard each `qkv` by rows (Q and half of K on rank 0): slicing a shard before gathering would
    give other matrices. The term and the gradient of every `qkv` equal one unsharded process's."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP2_WORKER)
    results = {}
    for name, launcher in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                                "--nproc_per_node", "2", "--standalone"])):  # fmt: skip
        out = tmp_path / f"{name}.json"
        command = [*launcher, str(worker), str(replicas[DEIT]), str(out)]
        env = {**ENV, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        results[name] = json.loads(out.read_text())
    assert results["two"]["loss"] == pytest.approx(results["one"]["loss"], rel=1e-5)
    for index, expected in results["one"]["grads"].items():
        torch.testing.assert_close(torch.tensor(results["two"]["grads"][index]), torch.tensor(expected))


def test_drop_path_is_timms_own_modules_in_timms_schedule(replicas):
    model = load(replicas[DEIT]).train()
    config = timm_replica_config(DEIT, **SHRINK)
    reference = timm.create_model(config["architecture"], num_classes=1000, drop_path_rate=0.1, **SHRINK)
    keys = set(model.state_dict())
    rates = model.set_drop_path_rate(0.1)
    assert rates == pytest.approx([0.0, 0.1])
    for ours, theirs in zip(model.timm_model.blocks, reference.blocks, strict=True):
        for name in ("drop_path1", "drop_path2"):
            assert type(getattr(ours, name)) is type(getattr(theirs, name))
            assert getattr(getattr(ours, name), "drop_prob", None) == getattr(getattr(theirs, name), "drop_prob", None)
    assert set(model.state_dict()) == keys  # no parameters or buffers added
    last = model.timm_model.blocks[-1].drop_path1
    assert last.training and isinstance(last, timm.layers.DropPath)
    torch.manual_seed(0)
    ones = torch.ones(64, 3, 4)
    assert (last(ones) == 0).any() and not torch.equal(last(ones), ones)  # whole samples dropped in training
    assert model.set_drop_path_rate(0.0) == [0.0, 0.0]
    assert all(isinstance(b.drop_path2, torch.nn.Identity) for b in model.timm_model.blocks)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model.set_drop_path_rate(1.0)


@pytest.mark.parametrize("hub_id", [DEIT, "timm/vit_small_patch14_reg4_dinov2.lvd142m"])
def test_no_weight_decay_groups_are_timms(replicas, hub_id):
    model = load(replicas[hub_id])
    excluded = {name.removeprefix("timm_model.") for name in no_weight_decay_parameter_names(model)}
    timm_model = model.timm_model
    # timm's own rule: every 1-D parameter and bias, plus the model's no_weight_decay() names.
    expected = {name for name, p in timm_model.named_parameters()
                if p.ndim <= 1 or name.endswith(".bias") or name in timm_model.no_weight_decay()}  # fmt: skip
    assert excluded == expected
    assert {"cls_token", "pos_embed"} <= excluded
    if hub_id != DEIT:
        assert "reg_token" in excluded and "blocks.0.ls1.gamma" in excluded
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"}.isdisjoint(excluded)


# ---- Preprocessing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hub_id", [DEIT, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", REG4_GAP])
def test_evaluation_is_timms_eval_transform_and_training_crops_to_the_input_size(replicas, hub_id):
    processor = AutoImageProcessor.from_pretrained(replicas[hub_id])
    assert model_input_size(processor) == replica_input_size(hub_id)
    assert prepare_processor(processor) is processor and not hasattr(processor, "do_center_crop")
    evaluate = processor_transforms(processor)[1]
    pretrained_cfg = TIMM_REPLICAS[hub_id]["pretrained_cfg"]
    timm_eval = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg), is_training=False)
    for image in (Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee())):  # 512x512, 600x400
        expected = timm_eval(image)
        torch.testing.assert_close(evaluate(image), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            processor(image, return_tensors="pt")["pixel_values"][0], expected, atol=1e-6, rtol=0
        )
        assert evaluate(image.convert("L")).shape == expected.shape  # grayscale converted to RGB first
        for augmentation in ("none", "light", "deit"):
            crop = processor_transforms(processor, augmentation)[0](image)
            assert crop.shape == (3, *replica_input_size(hub_id)), augmentation
    preprocessing = TimmPreprocessing.from_processor(processor)
    assert preprocessing.mean == tuple(pretrained_cfg["mean"]) and preprocessing.input_size == replica_input_size(
        hub_id
    )
    assert preprocessing.resize == math.floor(replica_input_size(hub_id)[0] / pretrained_cfg["crop_pct"])


# ---- Saving and vanilla loading ----------------------------------------------------------------------------------


def test_saved_folder_is_a_timm_checkpoint_that_timm_loads(replicas, tmp_path):
    model = load(replicas[REG4_GAP])
    model.set_drop_path_rate(0.1)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == TIMM_REPLICAS[REG4_GAP]["architecture"]
    assert config["architectures"] == ["TimmWrapperForImageClassification"]
    assert config["pretrained_cfg"]["input_size"] == [3, 256, 256] and config["model_args"] == SHRINK
    assert config["num_classes"] == 1000 and len(config["label_names"]) == 1000
    assert not set(TIMM_CONFIG_ATTRIBUTES) & set(config) and "patch_size" in model.config.to_dict()
    stored = safetensors.torch.load_file(tmp_path / "saved" / "model.safetensors")
    assert set(stored) == set(model.timm_model.state_dict())  # timm's names, without the `timm_model.` prefix
    images = pixels(REG4_GAP)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
        local_dir = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True).eval()
        overlay = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                                    pretrained_cfg_overlay={"file": str(tmp_path / "saved" / "model.safetensors")},
                                    **config["model_args"]).eval()  # fmt: skip
        torch.testing.assert_close(local_dir(images), expected)
        torch.testing.assert_close(overlay(images), expected)
    reloaded = load(tmp_path / "saved")
    assert reloaded.config.patch_size == 16
    torch.testing.assert_close(reloaded(pixel_values=images).logits, expected)


def test_a_model_built_from_a_bare_config_saves_a_complete_timm_checkpoint(tmp_path):
    """No checkpoint, no pretrained_cfg: the saved folder still has timm's names and a preprocessing config."""
    model_args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2}
    config = TimmWrapperConfig(architecture="vit_small_patch16_224", model_args=model_args, num_labels=3)
    model = DiverseTimmWrapperForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pretrained_cfg"]["input_size"] == [3, 32, 32] and saved["pretrained_cfg"]["mean"] == [0.5] * 3
    assert set(safetensors.torch.load_file(tmp_path / "model.safetensors")) == set(model.timm_model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stock = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        torch.testing.assert_close(stock(images), model(pixel_values=images).logits)
    assert model_input_size(AutoImageProcessor.from_pretrained(tmp_path)) == (32, 32)


VANILLA = r"""
import json, sys
import numpy as np
import timm, torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
results = {}
for folder in sys.argv[1:]:
    classify = pipeline("image-classification", model=folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    stock = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 20), dtype=np.uint8))  # mode L
    pixels = classify.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        results[folder] = {"class": type(classify.model).__name__, "auto": type(model).__name__,
                           "scores": classify(image, top_k=3), "gray": classify(gray, top_k=1)[0]["label"],
                           "pixels": pixels[0].tolist(), "logits": model(pixel_values=pixels).logits[0].tolist(),
                           "timm": stock(pixels)[0].tolist()}
results["imported_ours"] = any(name.startswith("diverse_vit_hf") for name in sys.modules)
print(json.dumps(results))
"""


def vanilla_load(folders: list[Path]) -> dict:
    """`pipeline`, `AutoModelForImageClassification` and timm on each folder, in a process that never imports us."""
    run = subprocess.run([sys.executable, "-c", VANILLA, *map(str, folders)], env=ENV, capture_output=True, text=True,
                         timeout=600, cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results.pop("imported_ours") is False
    return results


def test_vanilla_pipeline_transformers_and_timm_load_what_we_save(replicas, tmp_path):
    saved = {}
    for hub_id in (DEIT, REG4_GAP):
        model = load(replicas[hub_id])
        saved[hub_id] = (tmp_path / hub_id.replace("/", "--"), model)
        model.save_pretrained(saved[hub_id][0])
    results = vanilla_load([folder for folder, _ in saved.values()])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))  # VANILLA's
    for hub_id, (folder, model) in saved.items():
        result = results[str(folder)]
        assert result["class"] == result["auto"] == "TimmWrapperForImageClassification"
        assert len(result["scores"]) == 3 and sum(s["score"] for s in result["scores"]) <= 1.0 + 1e-6
        pixels_ = torch.tensor(result["pixels"]).unsqueeze(0)
        with torch.no_grad():
            ours = model(pixel_values=pixels_).logits[0]
        torch.testing.assert_close(torch.tensor(result["logits"]), ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(result["timm"]), ours, atol=1e-5, rtol=1e-4)
        # The pipeline preprocessed with timm's eval transform, as our evaluation does.
        evaluate = processor_transforms(AutoImageProcessor.from_pretrained(replicas[hub_id]))[1]
        torch.testing.assert_close(pixels_[0], evaluate(image), atol=1e-6, rtol=0)


# ---- Refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "model_args", "match"),
    [
        ("resnet18", {}, "builds a timm ResNet, not a VisionTransformer"),
        ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
         "not a VisionTransformer"),
        ("deit_tiny_distilled_patch16_224", SHRINK, "distilled DeiT"),
        ("deit_small_patch16_224", {**SHRINK, "global_pool": "map"}, "global_pool is 'map'"),
        ("deit_small_patch16_224", {**SHRINK, "global_pool": "max"}, "global_pool is 'max'"),
        ("vit_small_patch16_224", {**SHRINK, "global_pool": ""}, "global_pool is ''"),
        ("deit_small_patch16_224", {**SHRINK, "patch_drop_rate": 0.25}, "drops patch tokens"),
        ("vit_base_r26_s32_224", {"embed_dim": 32, "depth": 1, "num_heads": 2}, "HybridEmbed"),
        ("vit_base_patch16_rope_reg1_gap_256", {"embed_dim": 32, "depth": 1, "num_heads": 2}, "Eva, not a Vision"),
    ],
)  # fmt: skip
def test_refuses_what_the_diversity_forward_cannot_read(architecture, model_args, match):
    config = TimmWrapperConfig(architecture=architecture, model_args=model_args, num_labels=3)
    with pytest.raises(ValueError, match=match) as error:
        DiverseTimmWrapperForImageClassification(config)
    assert "Supported timm checkpoints are plain ViTs" in str(error.value)


def test_load_diverse_model_refuses_a_timm_resnet_repository(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    config = {
        "architecture": "resnet18",
        "num_classes": 3,
        "num_features": 512,
        "global_pool": "avg",
        "pretrained_cfg": {**TIMM_REPLICAS[DEIT]["pretrained_cfg"], "first_conv": "conv1", "classifier": "fc"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))  # fmt: skip
    with pytest.raises(ValueError, match=r"'resnet18'.*ResNet, not a VisionTransformer"):
        load_diverse_model(str(tmp_path))


# ---- Analysis and model card -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hub_id", [DEIT, REG4_GAP])
def test_analysis_reports_all_three_levels(replicas, hub_id):
    model = load(replicas[hub_id])
    images = pixels(hub_id, batch=3, seed=2)
    result = analyze_model(model, [images], name="timm", progress=False)
    summary = result.summary()
    for key in ("patch_cos_last", "patch_input_cos_last", "attn_cos_block1", "attn_cross_layer_cos_mean",
                "qkv_cond_mean"):  # fmt: skip
        assert summary[key] is not None and math.isfinite(summary[key]), key
    assert result.num_prefix_tokens == model.num_prefix_tokens and result.num_layers == 2
    assert result.model_type == "timm_wrapper" and result.num_heads == 2 and result.hidden_size == 32
    # Block 1's recomputed maps are the ones the diversity forward captures.
    with torch.no_grad():
        probs = model(pixel_values=images, return_diversity_outputs=True).first_block_attention_probs
    from diverse_vit_hf.analysis.metrics import flattened_head_maps, head_cosine

    assert result.attention.head_cosine[0] == pytest.approx(head_cosine(flattened_head_maps(probs)).mean().item(),
                                                            abs=1e-5)  # fmt: skip
    expected_q = model.attention_projection_weights()[0].double()
    assert result.weights.matrices["q_proj"]["singular_values"][0] == pytest.approx(
        torch.linalg.svdvals(expected_q).tolist(), rel=1e-6
    )
    every = weight_statistics(model, WEIGHT_MATRICES)  # o_proj is timm's attn.proj, fc1/fc2 its mlp's
    assert every["o_proj"][0].singular_values == weight_statistics(model, ("o_proj",))["o_proj"][0].singular_values
    assert len(every["fc1"][0].singular_values) == min(model.timm_model.blocks[0].mlp.fc1.weight.shape)


def test_the_analyze_command_reads_a_timm_repository(replicas, tmp_path):
    from diverse_vit_hf.scripts.cli import main as cli_main

    argv = ["analyze", "--model", str(replicas[REG4_GAP]), "--dataset", "digits", "--num_images", "4",
            "--batch_size", "4", "--output_dir", str(tmp_path / "report")]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads((tmp_path / "report" / "redundancy.json").read_text())["models"][0]
    assert report["num_prefix_tokens"] == 4 and report["num_patches"] == 256
    for key in ("patch_cos_last", "attn_cos_block1", "qkv_cond_mean"):  # one per level
        assert report["summary"][key] is not None and math.isfinite(report["summary"][key]), key


def test_model_card_follows_timms_hub_convention(replicas, tmp_path):
    model = load(replicas[DEIT])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    card = build_model_card(config, CardInputs(base_model=DEIT), repo_id="user/diverse-deit-small")
    data = validate_card_offline(card).data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert {"timm", "transformers", "timm-wrapper", "diverse-vit"} <= set(data.tags)
    text = str(card)
    assert "| Blocks / heads / hidden size / MLP size | 2 / 2 / 32 / 128 |" in text
    assert "| Image size / patch size | 224 px / 16 px |" in text and "Labels (1000)" in text
    (tmp_path / "README.md").write_text(text)
    assert files_to_push(tmp_path) == ["config.json", "README.md", "model.safetensors"]  # no preprocessor config


# ---- End to end: run_diverse.py on the replicas ------------------------------------------------------------------

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
SMALL = ["--embedded_dataset", "mnist", "--max_steps", "4", "--max_train_samples", "16", "--max_eval_samples", "8",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_strategy", "no", "--redundancy_images", "8", "--drop_path_rate", "0.1",
         "--use_cpu", "--disable_tqdm", "true"]  # fmt: skip


@pytest.mark.slow
def test_run_diverse_fine_tunes_timm_repositories_that_timm_and_pipeline_then_load(replicas, tmp_path):
    outputs = {}
    for hub_id in (DEIT, REG4_GAP):
        output = tmp_path / hub_id.replace("/", "--")
        command = [*ACCELERATE, str(RUN_DIVERSE), "--model", str(replicas[hub_id]), "--output_dir", str(output), *SMALL]
        run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        height, width = replica_input_size(hub_id)
        assert f"{height}x{width} px" in run.stdout + run.stderr
        state = json.loads((output / "trainer_state.json").read_text())
        assert state["global_step"] == 4
        logged = {key for entry in state["log_history"] for key in entry}
        assert {
            "loss_patch_cosine",
            "loss_patch_contrastive",
            "loss_attention_cosine",
            "loss_weight_condition",
        } <= logged
        config = json.loads((output / "config.json").read_text())
        assert config["architecture"] == TIMM_REPLICAS[hub_id]["architecture"] and "pretrained_cfg" in config
        assert config["label_names"] == [str(d) for d in range(10)] and config["num_classes"] == 10
        summary = json.loads((output / "redundancy.json").read_text())["models"][0]["summary"]
        for key in ("patch_cos_last", "attn_cos_block1", "qkv_cond_mean"):  # one per level
            assert summary[key] is not None, key
        assert "library_name: timm" in (output / "README.md").read_text()
        outputs[hub_id] = output
    results = vanilla_load(list(outputs.values()))
    for output in outputs.values():
        result = results[str(output)]
        assert result["class"] == "TimmWrapperForImageClassification"
        digits = {str(d) for d in range(10)}
        assert {s["label"] for s in result["scores"]} <= digits and result["gray"] in digits
        torch.testing.assert_close(torch.tensor(result["timm"]), torch.tensor(result["logits"]), atol=1e-5, rtol=1e-4)


# ---- transformers' ModelTesterMixin --------------------------------------------------------------------------------

HF_MODEL_TESTS = Path(os.environ.get("DIVERSE_VIT_HF_MODEL_TESTS", REPO / ".venv" / "hf-model-tests"))
if fetched_version(HF_MODEL_TESTS) == transformers.__version__:
    sys.path.insert(0, str(HF_MODEL_TESTS))
    from hf_model_tests.test_modeling_common import ModelTesterMixin, floats_tensor
else:  # tests/models/test_hf_common.py says how to fetch the suite
    ModelTesterMixin = None


if ModelTesterMixin is not None:

    class TimmWrapperTester:
        """A two-block timm ViT on 16x16 images in 4x4 patches, built locally (HF's own timm tester reads the Hub)."""

        def __init__(self, parent: unittest.TestCase) -> None:
            self.parent = parent
            self.batch_size = 3
            self.num_labels = 3
            self.is_training = True

        def get_config(self) -> TimmWrapperConfig:
            model_args = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4,
                          "reg_tokens": 1}  # fmt: skip
            return TimmWrapperConfig(architecture="vit_small_patch16_224", model_args=model_args,
                                     num_labels=self.num_labels)  # fmt: skip

        def prepare_config_and_inputs_for_common(self):
            return self.get_config(), {"pixel_values": floats_tensor([self.batch_size, 3, 16, 16])}

    class DiverseTimmWrapperModelTest(ModelTesterMixin, unittest.TestCase):
        """As transformers' TimmWrapperModelTest, with the same skips (timm owns initialisation and attention)."""

        all_model_classes = (DiverseTimmWrapperForImageClassification,)
        test_resize_embeddings = False
        test_head_masking = False
        test_pruning = False
        has_attentions = False
        test_model_parallel = False

        def setUp(self) -> None:
            self.model_tester = TimmWrapperTester(self)

        def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
            inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
            if return_labels:
                inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
            return inputs_dict

        def test_hidden_states_output(self):
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = DiverseTimmWrapperForImageClassification(config).eval()
            with torch.no_grad():
                outputs = model(**inputs, output_hidden_states=True)
            assert [tuple(h.shape) for h in outputs.hidden_states] == [(3, 32, 4, 4)] * 2  # timm's NCHW intermediates

        @unittest.skip(reason="TimmWrapper models have no inputs_embeds")
        def test_inputs_embeds(self):
            pass

        @unittest.skip(reason="TimmWrapper models have no inputs_embeds")
        def test_model_get_set_embeddings(self):
            pass

        @unittest.skip(reason="TimmWrapper does not support output_attentions")
        def test_torchscript_output_attentions(self):
            pass

        @unittest.skip(reason="TimmWrapper does not support this")
        def test_retain_grad_hidden_states_attentions(self):
            pass

        @unittest.skip(reason="TimmWrapper initialization is managed on the timm side")
        def test_can_init_all_missing_weights(self):
            pass

        @unittest.skip(reason="TimmWrapper initialization is managed on the timm side")
        def test_initialization(self):
            pass

        @unittest.skip(reason="TimmWrapper initialization is managed on the timm side")
        def test_mismatched_shapes_have_properly_initialized_weights(self):
            pass

else:

    @pytest.mark.skip(reason=f"transformers {transformers.__version__}'s ModelTesterMixin is not in {HF_MODEL_TESTS}")
    def test_model_tester_mixin():
        pass


def test_timm_vit_module_names_what_it_supports():
    assert timm_vit.SUPPORTED_GLOBAL_POOLS == ("token", "avg")
    assert set(timm_vit.UNSUPPORTED_GLOBAL_POOLS) == {"", "map", "prr", "max", "avgmax"}
