"""The diversified classes of every supported family against the stock eager models and independent computations:
the regularizers' inputs, each family's per-token logits as docs/method.md defines them, drop path, plain
checkpoints, the objective with every term, the analysis, and the errors for families we do not support."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from fixtures.builders import FAMILY_OVERRIDES, NUM_LABELS, tiny_config
from fixtures.scripts import SCRIPT_ENV
from transformers import AutoConfig, AutoModelForImageClassification, Data2VecVisionConfig, SwinConfig

from diverse_vit_hf import (
    DIVERSE_MODEL_CLASSES,
    SUPPORTED_MODEL_TYPES,
    DiversityConfig,
    DiversityObjective,
    diverse_model_class_for_config,
    load_diverse_model,
    patch_mixing_loss,
)
from diverse_vit_hf.analysis.metrics import attention_probabilities
from diverse_vit_hf.analysis.probe import RedundancyProbe, weight_statistics
from diverse_vit_hf.losses.regularizers import patch_token_targets, two_label_cross_entropy_sum
from diverse_vit_hf.models.families import attention_module, backbone_layers, block_linear
from diverse_vit_hf.models.modeling import BLOCK1_CAPTURE_PREFIX, BranchDropout, eager_attention_with_probs

# timm ViTs (`timm_wrapper`) are built from timm architectures, not from transformers configs: test_timm_wrapper.py
FAMILIES = sorted(set(SUPPORTED_MODEL_TYPES) - {"timm_wrapper"})
PREFIX = {"vit": 1, "deit": 2, "vit_msn": 1, "dinov2": 1, "dinov2_with_registers": 3, "beit": 1, "ijepa": 0}


def build(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = DIVERSE_MODEL_CLASSES[model_type](tiny_config(model_type, **overrides))
    with torch.no_grad():  # stock inits leave these at 0 or constant, which would hide a wrong formula
        for name, parameter in model.named_parameters():
            if "relative_position_bias_table" in name or "lambda" in name or "register_tokens" in name:
                parameter.normal_(0.0, 0.5)
    return model.eval()


def stock_name(model: torch.nn.Module) -> str:
    return next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.")).__name__


def stock_eager(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    model.save_pretrained(tmp_path)
    return AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_registry_covers_the_families_and_the_test_table():
    assert set(FAMILIES) == set(PREFIX) == set(FAMILY_OVERRIDES)
    for model_type in FAMILIES:
        config = tiny_config(model_type)
        assert diverse_model_class_for_config(config) is DIVERSE_MODEL_CLASSES[model_type]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_diversity_outputs_equal_the_stock_eager_model(model_type, tmp_path):
    model = build(model_type)
    x = images()
    stock = stock_eager(model, tmp_path)
    assert type(stock).__name__ == stock_name(model)
    with torch.no_grad():
        reference = stock(pixel_values=x, output_attentions=True, output_hidden_states=True)
        out = model(pixel_values=x, return_diversity_outputs=True)
        plain = model(pixel_values=x)
    tokens = 16 + PREFIX[model_type]
    assert model.num_prefix_tokens == PREFIX[model_type]
    assert out.first_hidden_state.shape == out.last_block_hidden_state.shape == (3, tokens, 32)
    assert out.first_block_attention_probs.shape == (3, 4, tokens, tokens)
    assert out.token_logits.shape == (3, tokens, NUM_LABELS)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.logits, reference.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.first_hidden_state, reference.hidden_states[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.last_block_hidden_state, reference.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.first_block_attention_probs, reference.attentions[0], atol=1e-6, rtol=0)


def test_beit_block1_probabilities_include_the_relative_position_bias():
    model = build("beit")
    with torch.no_grad():
        out = model(pixel_values=images(), return_diversity_outputs=True)
        table = model.beit.layers[0].relative_position_bias.relative_position_bias_table
        table.zero_()
        unbiased = model(pixel_values=images(), return_diversity_outputs=True)
    assert (out.first_block_attention_probs - unbiased.first_block_attention_probs).abs().max() > 1e-3


def _final_tokens(model, x):
    return model.backbone(x, **model.backbone_kwargs(False)).last_hidden_state


@pytest.mark.parametrize("model_type", FAMILIES)
def test_per_token_logits_follow_the_documented_definition(model_type):
    """Token by token, with the head's own modules: docs/method.md, "Other families"."""
    model = build(model_type)
    x = images()
    with torch.no_grad():
        out = model(pixel_values=x, return_diversity_outputs=True)
        final = _final_tokens(model, x)  # (B, N, D) after the backbone's final norm
        head = model.classifier
        expected = []
        for i in range(final.shape[1]):
            token = final[:, i]
            if model_type.startswith("dinov2"):
                expected.append(head(torch.cat([final[:, 0], token], dim=1)))
            elif model_type == "beit":
                expected.append(head(model.beit.pooler.layernorm(token)))
            else:
                expected.append(head(token))
        torch.testing.assert_close(out.token_logits, torch.stack(expected, dim=1), atol=1e-5, rtol=0)
        patches = out.token_logits[:, model.num_prefix_tokens :]
        if model_type in ("dinov2", "dinov2_with_registers", "ijepa"):  # linear heads: mean of patch logits = image
            torch.testing.assert_close(patches.mean(dim=1), out.logits, atol=1e-5, rtol=0)
        elif model_type == "beit":  # LayerNorm after pooling: not the mean, documented
            assert (patches.mean(dim=1) - out.logits).abs().max() > 1e-4
        else:
            torch.testing.assert_close(out.token_logits[:, 0], out.logits)


def _token_targets(batch: int, tokens: int, prefix: int):
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=generator)
    return patch_token_targets(labels, labels.roll(1), torch.rand(tokens - prefix, generator=generator), 0.1, prefix)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_token_loss_equals_the_loss_on_the_per_token_logits(model_type):
    """`token_targets` make the forward return the patch-wise loss's per-token sum without building the per-token
    logits (chunked, gradients taken in the forward): equal, with its parameter gradients, to the same loss on the
    `token_logits` the forward otherwise returns."""
    model = build(model_type)  # eval mode: the two forwards draw no dropout
    x = images()
    out = model(pixel_values=x, return_diversity_outputs=True)
    targets = _token_targets(x.shape[0], out.token_logits.shape[1], model.num_prefix_tokens)
    reference = two_label_cross_entropy_sum(
        out.token_logits, targets.labels, targets.partner_labels, targets.weights, 0.1, targets.row_scale
    )
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    fused = model(pixel_values=x, return_diversity_outputs=True, token_targets=targets, return_token_logits=False)
    assert fused.token_logits is None and out.token_loss is None
    torch.testing.assert_close(fused.logits, out.logits)
    assert fused.token_loss.item() == pytest.approx(reference.item(), rel=1e-5)
    fused_grads = torch.autograd.grad(fused.token_loss, list(model.parameters()), allow_unused=True)
    compared = 0
    for (name, _), ours, theirs in zip(model.named_parameters(), fused_grads, reference_grads, strict=True):
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)
            compared += 1
    assert compared > 4  # the head and the backbone below it


def test_beit_with_cls_pooling_reads_the_cls_token(tmp_path):
    model = build("beit", use_mean_pooling=False)
    x = images()
    with torch.no_grad():
        out = model(pixel_values=x, return_diversity_outputs=True)
        reference = stock_eager(model, tmp_path)(pixel_values=x)
        final = _final_tokens(model, x)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_logits, model.classifier(final), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, out.token_logits[:, 0])


def test_patch_mixing_loss_with_image_logits_is_the_mean_cross_entropy():
    torch.manual_seed(0)
    token_logits, image_logits = torch.randn(2, 5, 3), torch.randn(2, 3)
    targets = torch.softmax(torch.randn(2, 3), -1)
    patch_targets = torch.softmax(torch.randn(2, 4, 3), -1)

    def ce(logits, target):
        return -(target * F.log_softmax(logits, -1)).sum(-1)

    rows = [ce(image_logits, targets)] + [ce(token_logits[:, 1 + p], patch_targets[:, p]) for p in range(4)]
    expected = torch.stack(rows, 1).mean()
    loss = patch_mixing_loss(token_logits, targets, patch_targets, 1, image_logits=image_logits)
    torch.testing.assert_close(loss, expected)
    # No CLS token (I-JEPA): every token is a patch.
    rows = [ce(image_logits, targets)] + [ce(token_logits[:, p], patch_targets[:, p]) for p in range(4)]
    loss = patch_mixing_loss(token_logits[:, :4], targets, patch_targets, 0, image_logits=image_logits)
    torch.testing.assert_close(loss, torch.stack(rows, 1).mean())
    with pytest.raises(ValueError, match="num_prefix_tokens >= 1\\) or `image_logits`"):
        patch_mixing_loss(token_logits[:, :4], targets, patch_targets, 0)
    with pytest.raises(ValueError, match="`image_logits` must have shape"):
        patch_mixing_loss(token_logits, targets, patch_targets, 1, image_logits=image_logits[:1])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_term_trains_and_only_block_1_runs_eager(model_type):
    model = build(model_type).train()
    config = DiversityConfig(mixing=True, patch_mixing_loss=True)
    objective = DiversityObjective(config, num_labels=NUM_LABELS, patch_size=4)
    batch = {"pixel_values": images(4), "labels": torch.tensor([0, 1, 2, 3])}
    result = objective(model, batch)
    assert set(result.terms) >= {"loss_cls", "loss_patch_cosine", "loss_patch_contrastive", "loss_attention_cosine",
                                 "loss_weight_condition"}  # fmt: skip
    assert all(torch.isfinite(v) for v in result.terms.values())
    result.loss.backward()
    q_weight = block_linear(backbone_layers(model.backbone)[-1], "q_proj").weight
    assert q_weight.grad is not None and q_weight.grad.abs().sum() > 0
    assert model.config._attn_implementation.startswith(BLOCK1_CAPTURE_PREFIX)
    flags = [getattr(attention_module(layer), "_diverse_capture_attention", False) for layer in model.diversity_layers]
    assert flags == [True] + [False] * (len(flags) - 1)
    weights = model.attention_projection_weights()
    assert weights.shape == (3 * model.config.num_hidden_layers, 32, 32)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_drop_path_changes_no_parameter_and_follows_the_schedule(model_type):
    model = build(model_type, num_hidden_layers=3)
    before = set(model.state_dict())
    assert model.set_drop_path_rate(0.2) == pytest.approx([0.0, 0.1, 0.2])
    assert set(model.state_dict()) == before
    for layer, rate in zip(model.diversity_layers, (0.0, 0.1, 0.2), strict=True):
        slot = layer.drop_path if hasattr(layer, "drop_path") else layer.dropout
        assert isinstance(slot, BranchDropout) and slot.drop_path == pytest.approx(rate)
        assert slot.dropout == (0.0 if hasattr(layer, "drop_path") else model.config.hidden_dropout_prob)
    model.train()
    x = images(8)
    torch.manual_seed(0)
    first = model(pixel_values=x).logits
    torch.manual_seed(1)
    assert not torch.allclose(first, model(pixel_values=x).logits)  # branches dropped per sample


@pytest.mark.parametrize("model_type", FAMILIES)
def test_checkpoints_are_plain_and_load_back(model_type, tmp_path):
    model = build(model_type)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [stock_name(model)]
    assert config["model_type"] == AutoConfig.for_model(model_type).model_type
    again = load_diverse_model(str(tmp_path))
    assert type(again) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


VANILLA = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import AutoModelForImageClassification, ViTImageProcessor, pipeline
results = {}
for folder in sys.argv[1:]:
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    classify = pipeline("image-classification", model=folder)
    scores = classify(Image.fromarray(np.full((20, 24, 3), 128, np.uint8)), top_k=4)
    results[folder] = [type(classify.model).__name__, round(sum(s["score"] for s in scores), 4)]
results["imported_ours"] = any(name.startswith("diverse_vit_hf") for name in sys.modules)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_vanilla_pipeline_runs_every_family_without_us(tmp_path):
    folders = {}
    for model_type in FAMILIES:
        folders[model_type] = tmp_path / model_type
        build(model_type).save_pretrained(folders[model_type])
    run = subprocess.run([sys.executable, "-c", VANILLA, *map(str, folders.values())], env=SCRIPT_ENV,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results.pop("imported_ours") is False
    for folder in folders.values():
        name, total = results[str(folder)]
        assert name == json.loads((folder / "config.json").read_text())["architectures"][0]
        assert total == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_analysis_reads_every_family_and_recomputes_the_kernels_maps(model_type, tmp_path):
    model = build(model_type)
    stock = stock_eager(model, tmp_path)
    x = images(2)
    captured = []
    layers = backbone_layers(model.backbone)
    hooks = [attention_module(layer).register_forward_pre_hook(
        lambda m, a, k: captured.append(k.get("attention_mask")), with_kwargs=True) for layer in layers]  # fmt: skip
    with torch.no_grad():
        reference = stock(pixel_values=x, output_attentions=True)
        queries, keys = [], []
        more = [
            block_linear(layer, "q_proj").register_forward_hook(lambda m, a, o: queries.append(o)) for layer in layers
        ]
        more += [
            block_linear(layer, "k_proj").register_forward_hook(lambda m, a, o: keys.append(o)) for layer in layers
        ]
        model(pixel_values=x)
    for handle in hooks + more:
        handle.remove()
    for index, (q, k, mask) in enumerate(zip(queries, keys, captured, strict=True)):
        probs = attention_probabilities(q, k, 4, 8**-0.5, mask)
        torch.testing.assert_close(probs, reference.attentions[index], atol=1e-6, rtol=0)
    with RedundancyProbe(model) as probe:
        probe.run(model, x)
    assert probe.num_prefix_tokens == PREFIX[model_type] and probe.num_patches == 16
    assert probe.stats.mean("head_cosine", 1) is not None and probe.stats.mean("patch_cosine", 2) is not None
    stats = weight_statistics(model)
    assert set(stats) == {"q_proj", "k_proj", "v_proj"} and all(len(v) == 2 for v in stats.values())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_analyze_command_reports_every_level_for_every_family(model_type, tmp_path):
    from transformers import ViTImageProcessor

    from diverse_vit_hf.scripts.cli import main as cli_main

    folder = tmp_path / "model"
    build(model_type).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    argv = ["analyze", "--model", str(folder), "--dataset", "digits", "--num_images", "8", "--output_dir",
            str(tmp_path / "report")]  # fmt: skip
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "report" / "redundancy.json").read_text())["models"][0]["summary"]
    for key in ("patch_cos_last", "attn_cos_block1", "qkv_cond_mean"):
        assert summary[key] is not None and summary[key] == summary[key], key  # present and not NaN


def test_eager_kernel_adds_an_additive_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    bias = torch.randn(1, 2, 5, 5)
    _, probs = eager_attention_with_probs(torch.nn.Identity(), q, k, v, bias, 0.0, 0.5)
    torch.testing.assert_close(probs, torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, -1))


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (Data2VecVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2), "ALL_ATTENTION_FUNCTIONS"),
        (SwinConfig(embed_dim=16, depths=[1], num_heads=[2]), "shifted local windows"),
    ],
)
def test_unsupported_families_say_why_and_list_the_supported_ones(config, reason):
    with pytest.raises(ValueError, match=reason) as error:
        diverse_model_class_for_config(config)
    assert "Supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES) in str(error.value)
