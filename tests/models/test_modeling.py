"""Tests of `diverse_vit_hf.models.modeling` against independent computations through the stock transformers classes:
the diversity outputs, the attention dispatch, gradients, plain checkpoints, loading (safetensors only, never a
checkpoint's own code), input validation, gradient checkpointing and stochastic depth (drop path)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures.builders import same_weights, snapshot, tiny_config
from fixtures.scripts import fast_flags, load_script
from PIL import Image
from transformers import (
    AutoImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import diverse_vit_hf.models.modeling as modeling
from diverse_vit_hf.models.modeling import (
    BranchDropout,
    DiverseDeiTForImageClassification,
    DiverseImageClassifierOutput,
    DiverseViTForImageClassification,
    load_diverse_model,
)

NUM_LABELS = 5
ID2LABEL = {0: "apple", 1: "banana", 2: "cherry", 3: "date", 4: "elderberry"}
# The models compared here: `tiny_config` with 3 blocks on 32x32 images in 8x8 patches (P = 16) and 5 labels.
SIZES = dict(num_hidden_layers=3, image_size=32, patch_size=8, num_labels=NUM_LABELS)
# kind -> (config class, diverse class, stock class, backbone attribute, prefix tokens K)
KINDS = {
    "vit": (ViTConfig, DiverseViTForImageClassification, ViTForImageClassification, "vit", 1),
    "deit": (DeiTConfig, DiverseDeiTForImageClassification, DeiTForImageClassification, "deit", 2),
}
NUM_PATCHES = (32 // 8) ** 2


def kind_config(kind: str, **overrides):
    """`tiny_config(kind)` at this file's `SIZES`; `overrides` win."""
    return tiny_config(kind, **(SIZES | overrides))


def build_pair(kind: str, seed: int = 0, **overrides):
    """A fresh diverse model and a stock model with the same weights (stock on the eager kernel), both in eval mode."""
    _, diverse_class, stock_class, _, _ = KINDS[kind]
    torch.manual_seed(seed)
    model = diverse_class(kind_config(kind, **overrides)).eval()
    stock = stock_class(kind_config(kind, **overrides))
    stock.load_state_dict(model.state_dict())
    stock.set_attn_implementation("eager")
    return model, stock.eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------------
# Diversity outputs vs stock models


def test_fresh_model_is_stock_layout_on_sdpa(tiny_vit_config):
    model = DiverseViTForImageClassification(tiny_vit_config)
    stock = ViTForImageClassification(copy.deepcopy(tiny_vit_config))
    assert model.config._attn_implementation == "sdpa"
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert DiverseViTForImageClassification.num_prefix_tokens == 1
    assert DiverseDeiTForImageClassification.num_prefix_tokens == 2


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_diversity_outputs_match_stock_eager_model(kind):
    _, _, _, prefix, num_prefix = KINDS[kind]
    model, stock = build_pair(kind)
    x = images()
    with torch.no_grad():
        out = model(x, return_diversity_outputs=True)
        ref = stock(x, output_hidden_states=True, output_attentions=True)
        backbone_last = getattr(stock, prefix)(x).last_hidden_state
        stock_backbone = getattr(stock, prefix)
        by_hand = stock.classifier(stock_backbone.layernorm(ref.hidden_states[-1]))

    n_tokens = NUM_PATCHES + num_prefix
    assert isinstance(out, DiverseImageClassifierOutput)
    assert out.first_hidden_state.shape == (2, n_tokens, 32)
    assert out.last_block_hidden_state.shape == (2, n_tokens, 32)
    assert out.first_block_attention_probs.shape == (2, 4, n_tokens, n_tokens)
    assert out.token_logits.shape == (2, n_tokens, NUM_LABELS)
    assert len(ref.hidden_states) == 3 + 1 and len(ref.attentions) == 3

    torch.testing.assert_close(out.first_hidden_state, ref.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(out.last_block_hidden_state, ref.hidden_states[-1], rtol=1e-5, atol=1e-6)
    # h^L is the pre-LayerNorm output, not the backbone's (normalised) last_hidden_state.
    assert not torch.allclose(out.last_block_hidden_state, backbone_last, atol=1e-2)
    torch.testing.assert_close(out.first_block_attention_probs, ref.attentions[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_logits[:, 0], out.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.token_logits, by_hand, rtol=1e-5, atol=1e-6)
    # Per-token logits differ between tokens (the head really is applied to each token).
    assert not torch.allclose(out.token_logits[:, 0], out.token_logits[:, -1], atol=1e-4)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_plain_forward_is_exactly_the_stock_forward(kind):
    _, diverse_class, stock_class, _, _ = KINDS[kind]
    torch.manual_seed(0)
    model = diverse_class(kind_config(kind)).eval()
    stock = stock_class(kind_config(kind)).eval()  # stock default kernel (SDPA), like the fresh diverse model
    stock.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        out = model(x)
        ref = stock(x)
    assert type(out) is ImageClassifierOutput
    assert torch.equal(out.logits, ref.logits)
    assert out.loss is None


def test_plain_forward_after_diversified_forward_still_matches_stock(tiny_vit_config):
    model, stock = build_pair("vit")
    x = images()
    with torch.no_grad():
        model(x, return_diversity_outputs=True)
        out = model(x)
        ref = stock(x)
    assert type(out) is ImageClassifierOutput
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)


def test_soft_labels_give_soft_target_cross_entropy_and_stay_single_label(tmp_path):
    model, _ = build_pair("vit")
    x = images(batch=4)
    targets = torch.softmax(torch.randn(4, NUM_LABELS, generator=torch.Generator().manual_seed(3)), dim=-1)
    problem_type_before = model.config.problem_type
    assert problem_type_before in (None, "single_label_classification")

    out = model(x, labels=targets)
    expected = -(targets * F.log_softmax(out.logits, dim=-1)).sum(-1).mean()
    assert type(out) is ImageClassifierOutput
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert model.config.problem_type in (None, "single_label_classification")

    out_div = model(x, labels=targets, return_diversity_outputs=True)
    expected_div = -(targets * F.log_softmax(out_div.logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out_div.loss, expected_div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_div.loss, out.loss, rtol=1e-5, atol=1e-6)
    assert model.config.problem_type in (None, "single_label_classification")

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("problem_type") in (None, "single_label_classification")


def test_int_labels_loss_equals_stock_loss():
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(kind_config("vit")).eval()
    stock = ViTForImageClassification(kind_config("vit")).eval()
    stock.load_state_dict(model.state_dict())
    x = images(batch=4)
    labels = torch.tensor([0, 3, 1, 4])
    with torch.no_grad():
        out = model(x, labels=labels)
        ref = stock(x, labels=labels)
        out_div = model(x, labels=labels, return_diversity_outputs=True)
    assert torch.equal(out.loss, ref.loss)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref.logits, labels))
    torch.testing.assert_close(out_div.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert model.config.problem_type in (None, "single_label_classification")


# --------------------------------------------------------------------------------------------------------------------
# Attention dispatch


def test_every_block_keeps_sdpa_and_block1_query_and_key_are_captured(monkeypatch, tiny_vit_config):
    """The diversified forward runs no eager kernel: every block's attention goes to SDPA (which builds no
    probabilities), and block 1's query and key are what SDPA received there."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    eager_calls = []
    original_eager = modeling.eager_attention_with_probs
    original_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting_sdpa(module, query, key, *args, **kwargs):
        calls.append((query, key))
        return original_sdpa(module, query, key, *args, **kwargs)

    monkeypatch.setattr(
        modeling, "eager_attention_with_probs", lambda *a, **k: eager_calls.append(1) or original_eager(*a, **k)
    )
    had_local_override = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    ALL_ATTENTION_FUNCTIONS["sdpa"] = counting_sdpa
    try:
        model = DiverseViTForImageClassification(tiny_vit_config).eval()
        assert model.config._attn_implementation == "sdpa"
        x = images()
        with torch.no_grad():
            model(x)  # fresh model, plain forward: every block on SDPA
            assert len(calls) == 3
            calls.clear()
            out = model(x, return_diversity_outputs=True)
        assert len(calls) == 3 and not eager_calls
        assert out.first_block_attention.query is calls[0][0] and out.first_block_attention.key is calls[0][1]
        assert out.first_block_attention_probs.shape == (2, 4, 17, 17)
    finally:
        if had_local_override:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original_sdpa
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original_sdpa


def test_saved_config_has_no_custom_attention_implementation(tmp_path, tiny_vit_config):
    model = DiverseViTForImageClassification(tiny_vit_config).eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(images(), return_diversity_outputs=True)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert modeling.BLOCK1_CAPTURE_PREFIX not in text
    assert "diverse" not in text.lower()
    saved = json.loads(text)
    assert saved.get("attn_implementation") in (None, "sdpa", "eager")
    assert saved.get("_attn_implementation") in (None, "sdpa", "eager")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_gradients_reach_regularizer_parameters(kind):
    _, _, _, prefix, _ = KINDS[kind]
    model, stock = build_pair(kind)
    x = images()
    weights = torch.rand(2, 4, NUM_PATCHES + KINDS[kind][4], NUM_PATCHES + KINDS[kind][4])

    def backbone(m):
        return getattr(m, prefix)

    # Attention probabilities -> q/k projections of block 1. (probs.sum() alone is the constant B*H*N, so use a
    # non-trivial function of the probabilities.)
    out = model(x, return_diversity_outputs=True)
    (out.first_block_attention_probs * weights).sum().backward()
    ref = stock(x, output_attentions=True)
    (ref.attentions[0] * weights).sum().backward()
    for name in ("q_proj", "k_proj"):
        grad = getattr(backbone(model).layers[0].attention, name).weight.grad
        ref_grad = getattr(backbone(stock).layers[0].attention, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    # Blocks after block 1 do not influence A^1.
    assert backbone(model).layers[1].attention.q_proj.weight.grad is None

    model.zero_grad(set_to_none=True)
    stock.zero_grad(set_to_none=True)
    out = model(x, return_diversity_outputs=True)
    out.first_hidden_state.pow(2).sum().backward()
    ref = stock(x, output_hidden_states=True)
    ref.hidden_states[0].pow(2).sum().backward()
    projection = backbone(model).embeddings.patch_embeddings.projection.weight
    assert projection.grad is not None and projection.grad.abs().sum() > 0
    torch.testing.assert_close(
        projection.grad, backbone(stock).embeddings.patch_embeddings.projection.weight.grad, rtol=1e-5, atol=1e-6
    )
    assert backbone(model).embeddings.position_embeddings.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    out = model(x, return_diversity_outputs=True)
    out.last_block_hidden_state.pow(2).sum().backward()
    for layer in backbone(model).layers:
        assert layer.attention.v_proj.weight.grad.abs().sum() > 0


def test_block1_probs_are_pre_dropout_in_training_mode():
    model, stock = build_pair("vit", attention_probs_dropout_prob=0.5)
    model.train()
    x = images()
    torch.manual_seed(10)
    first = model(x, return_diversity_outputs=True)
    second = model(x, return_diversity_outputs=True)
    probs = first.first_block_attention_probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17), rtol=0, atol=1e-5)
    # The probabilities are deterministic (pre-dropout) and equal the eval-mode eager attention ...
    torch.testing.assert_close(probs, second.first_block_attention_probs, rtol=0, atol=0)
    with torch.no_grad():
        ref = stock(x, output_attentions=True)
    torch.testing.assert_close(probs.detach(), ref.attentions[0], rtol=1e-5, atol=1e-6)
    # ... while attention dropout does act on the forward.
    assert not torch.allclose(first.logits, second.logits)
    assert not torch.allclose(first.logits, ref.logits)


def test_attention_projection_weights(tiny_vit_config):
    model = DiverseViTForImageClassification(tiny_vit_config)
    weights = model.attention_projection_weights()
    assert weights.shape == (9, 32, 32)
    expected = []
    for layer in model.vit.layers:
        expected += [layer.attention.q_proj.weight, layer.attention.k_proj.weight, layer.attention.v_proj.weight]
    for index, weight in enumerate(expected):
        assert torch.equal(weights[index], weight)
    # The order is [Q1, K1, V1, Q2, ...]: each entry matches only its own matrix.
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[3])

    scale = torch.arange(9, dtype=torch.float32).view(9, 1, 1)
    (weights * scale).sum().backward()
    for index, weight in enumerate(expected):
        torch.testing.assert_close(weight.grad, torch.full_like(weight, float(index)))


# --------------------------------------------------------------------------------------------------------------------
# Plain checkpoints

VANILLA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    out_path, pixels_path, image_path, *dirs = sys.argv[1:]
    pixel_values = torch.load(pixels_path)
    image = Image.open(image_path)
    result = {}
    for directory in dirs:
        model = AutoModelForImageClassification.from_pretrained(directory).eval()
        with torch.no_grad():
            logits = model(pixel_values).logits
        classifier = pipeline("image-classification", model=directory)
        predictions = classifier(image, top_k=model.config.num_labels)
        result[directory] = {
            "class": type(model).__name__,
            "logits": logits.tolist(),
            "predictions": predictions,
        }
    result["imported_diverse"] = "diverse_vit_hf" in sys.modules
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    """
)


def test_plain_checkpoint_round_trip_in_vanilla_transformers(tmp_path):
    pixel_values = images(batch=3, seed=7)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(40, 44, 3), dtype=np.uint8), mode="RGB")
    image_path = tmp_path / "image.png"
    image.save(image_path)
    pixels_path = tmp_path / "pixels.pt"
    torch.save(pixel_values, pixels_path)

    expected = {}
    for kind in ("vit", "deit"):
        _, diverse_class, stock_class, _, _ = KINDS[kind]
        torch.manual_seed(0)
        config = kind_config(kind, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
        model = diverse_class(config).eval()
        with torch.no_grad():
            model(pixel_values, return_diversity_outputs=True)  # switches the model to the block-1 capture kernel
            logits = model(pixel_values).logits
        directory = tmp_path / kind
        model.save_pretrained(directory)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)

        files = sorted(p.name for p in directory.iterdir())
        assert "model.safetensors" in files, files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))], files
        config_json = json.loads((directory / "config.json").read_text())
        assert config_json["architectures"] == [stock_class.__name__]
        assert config_json["model_type"] == kind

        processor = AutoImageProcessor.from_pretrained(directory)
        with torch.no_grad():
            processed = processor(images=image, return_tensors="pt")["pixel_values"]
            probabilities = torch.softmax(model(processed).logits[0], dim=-1)
        expected[str(directory)] = (stock_class.__name__, logits, probabilities)

    out_path = tmp_path / "vanilla.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, "-c", VANILLA_SCRIPT, str(out_path), str(pixels_path), str(image_path), *expected],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out_path.read_text())
    assert result["imported_diverse"] is False

    for directory, (class_name, logits, probabilities) in expected.items():
        got = result[directory]
        assert got["class"] == class_name
        torch.testing.assert_close(torch.tensor(got["logits"]), logits, rtol=0, atol=1e-5)
        predictions = got["predictions"]
        assert len(predictions) == NUM_LABELS
        assert {p["label"] for p in predictions} == set(ID2LABEL.values())
        assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)  # softmax, not sigmoid
        by_label = {p["label"]: p["score"] for p in predictions}
        for index, name in ID2LABEL.items():
            assert by_label[name] == pytest.approx(probabilities[index].item(), abs=1e-4)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_diverse_model_loads_stock_checkpoint(kind, tmp_path):
    _, diverse_class, stock_class, _, _ = KINDS[kind]
    torch.manual_seed(0)
    stock = stock_class(kind_config(kind)).eval()
    stock.save_pretrained(tmp_path)
    model, info = diverse_class.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] in (set(), [])
    assert info["unexpected_keys"] in (set(), [])
    assert not info.get("mismatched_keys")
    model.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x).logits, stock(x).logits)
        torch.testing.assert_close(
            model(x, return_diversity_outputs=True).logits, stock(x).logits, rtol=1e-5, atol=1e-6
        )


def test_load_diverse_model_picks_the_class(tmp_path):
    for kind in ("vit", "deit"):
        _, diverse_class, stock_class, _, _ = KINDS[kind]
        torch.manual_seed(0)
        stock = stock_class(kind_config(kind)).eval()
        stock.save_pretrained(tmp_path / kind)
        model = load_diverse_model(str(tmp_path / kind)).eval()
        assert type(model) is diverse_class
        x = images()
        with torch.no_grad():
            assert torch.equal(model(x).logits, stock(x).logits)


def test_load_diverse_model_rejects_other_architectures(tmp_path):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ResNetForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        load_diverse_model(str(tmp_path))
    message = str(excinfo.value)
    assert "vit" in message and "deit" in message
    assert "resnet" in message


# --------------------------------------------------------------------------------------------------------------------
# Loading: safetensors only, and never a checkpoint's own code


def test_pickle_only_checkpoints_are_refused_unless_allowed(tmp_path):
    torch.manual_seed(0)
    stock = ViTForImageClassification(tiny_config())
    stock.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"pickle files .*allow_pickle=True \(--allow_pickle"):
        load_diverse_model(str(tmp_path))
    model = load_diverse_model(str(tmp_path), allow_pickle=True)
    assert same_weights(snapshot(stock), snapshot(model))
    module = load_script()
    with pytest.raises(OSError, match="--allow_pickle"):
        module.main(["--model", str(tmp_path), "--output_dir", str(tmp_path / "out"), *fast_flags()])


CUSTOM_CODE = """from pathlib import Path
Path({marker!r}).write_text("the checkpoint's code ran")
raise RuntimeError("the checkpoint's code ran")
"""


def write_checkpoint_with_custom_code(folder, model_type: str):
    """A saved tiny ViT whose config.json maps AutoConfig and AutoModelForImageClassification to `custom_code.py` of
    the folder (as a Hub repo with `trust_remote_code` code does), under `model_type`. Importing that code writes the
    returned marker file. Returns (stock model, marker)."""
    torch.manual_seed(0)
    stock = ViTForImageClassification(tiny_config())
    stock.save_pretrained(folder)
    marker = folder / "custom_code_ran"
    (folder / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "custom_code.CustomConfig",
        "AutoModelForImageClassification": "custom_code.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return stock, marker


def test_custom_code_of_a_supported_family_checkpoint_is_ignored(tmp_path, monkeypatch):
    """A checkpoint of a supported `model_type` that also ships code loads with the package's own class: its code
    is never imported, and no prompt asks whether to run it."""

    def no_prompt(*args, **kwargs):
        raise AssertionError("asked whether to run the checkpoint's code")

    monkeypatch.setattr("builtins.input", no_prompt)
    stock, marker = write_checkpoint_with_custom_code(tmp_path, "vit")
    model = load_diverse_model(str(tmp_path))
    assert type(model) is DiverseViTForImageClassification
    assert same_weights(snapshot(stock), snapshot(model))
    assert not marker.exists(), "the checkpoint's code ran"


def test_a_checkpoint_that_needs_its_own_code_is_refused_without_running_it(tmp_path, monkeypatch):
    """A checkpoint whose `model_type` only its own code defines is refused, and that code does not run: without a
    terminal to answer transformers' prompt (input() fails), nothing opts in to `trust_remote_code`."""

    def no_terminal(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_terminal)
    _, marker = write_checkpoint_with_custom_code(tmp_path, "custom_vit")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_diverse_model(str(tmp_path))
    assert not marker.exists(), "the checkpoint's code ran"


# --------------------------------------------------------------------------------------------------------------------
# Input validation


BAD_INPUTS = {
    "not_multiple_of_patch": ((2, 3, 30, 30), "multiple of the patch size"),
    "smaller_than_patch": ((2, 3, 4, 4), "smaller than one"),
    "wrong_channels": ((2, 1, 32, 32), "3-channel"),
    "wrong_size": ((2, 3, 40, 40), "interpolate_pos_encoding"),
    "three_dims": ((3, 32, 32), "(batch, channels, height, width)"),
}


@pytest.mark.parametrize("diversity", [False, True], ids=["plain", "diversity"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_actionable_errors(case, diversity, tiny_vit_config):
    shape, fragment = BAD_INPUTS[case]
    model = DiverseViTForImageClassification(tiny_vit_config).eval()
    with pytest.raises(ValueError) as excinfo, torch.no_grad():
        model(torch.zeros(shape), return_diversity_outputs=diversity)
    assert fragment in str(excinfo.value)


def test_output_attentions_with_diversity_outputs_raises(tiny_vit_config):
    model = DiverseViTForImageClassification(tiny_vit_config).eval()
    for flag in ("output_attentions", "output_hidden_states"):
        with pytest.raises(ValueError, match=flag), torch.no_grad():
            model(images(), return_diversity_outputs=True, **{flag: True})


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_interpolate_pos_encoding_in_diversity_path(kind):
    num_prefix = KINDS[kind][4]
    model, stock = build_pair(kind)
    x = images(size=48)
    with torch.no_grad():
        out = model(x, return_diversity_outputs=True, interpolate_pos_encoding=True)
        ref = stock(x, interpolate_pos_encoding=True, output_hidden_states=True, output_attentions=True)
    n_tokens = 36 + num_prefix
    assert out.first_hidden_state.shape == (2, n_tokens, 32)
    assert out.last_block_hidden_state.shape == (2, n_tokens, 32)
    assert out.first_block_attention_probs.shape == (2, 4, n_tokens, n_tokens)
    assert out.token_logits.shape == (2, n_tokens, NUM_LABELS)
    torch.testing.assert_close(out.first_hidden_state, ref.hidden_states[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.first_block_attention_probs, ref.attentions[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def _checkpointed_grads(state_dict, x, gradient_checkpointing_kwargs):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(kind_config("vit"))
    model.load_state_dict(state_dict)
    model.train()
    if gradient_checkpointing_kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        assert all(layer.gradient_checkpointing for layer in model.vit.layers)
    out = model(x, return_diversity_outputs=True)
    # Under checkpointing the probabilities must still be part of the autograd graph, or the attention regularizer
    # silently contributes no gradient.
    assert out.first_block_attention_probs.requires_grad, "first_block_attention_probs is detached from the graph"
    loss = out.logits.sum() + out.first_block_attention_probs.pow(2).sum() + out.last_block_hidden_state.sum()
    loss.backward()
    return param_grads(model)


def _assert_same_grads(got, expected):
    for name, grad in expected.items():
        assert grad is not None, name
        assert got[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    torch.manual_seed(0)
    state_dict = DiverseViTForImageClassification(kind_config("vit")).state_dict()
    x = images()
    expected = _checkpointed_grads(state_dict, x, None)
    try:
        got = _checkpointed_grads(state_dict, x, {"use_reentrant": use_reentrant})
    except ValueError as error:  # an explicit refusal of a kernel that cannot work is acceptable too
        assert use_reentrant and "reentrant" in str(error)
        return
    _assert_same_grads(got, expected)


# --------------------------------------------------------------------------------------------------------------------
# Drop path (stochastic depth) without changing the parameter layout


def drop_path_config(kind: str = "vit"):
    """`tiny_config(kind)` with 3 blocks and 3 labels (16x16 images, 4x4 patches)."""
    return tiny_config(kind, num_hidden_layers=3, num_labels=3)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_drop_path_leaves_the_layout_and_the_eval_outputs_unchanged(kind):
    torch.manual_seed(0)
    model = KINDS[kind][1](drop_path_config(kind)).eval()
    images = torch.randn(2, 3, 16, 16)
    keys, before = list(model.state_dict()), model(images).logits
    rates = model.set_drop_path_rate(0.2)
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert list(model.state_dict()) == keys
    assert [layer.dropout.drop_path for layer in model.backbone.layers] == pytest.approx(rates)
    torch.testing.assert_close(model(images).logits, before, rtol=0, atol=0)


def _manual_forward(model, images, keep_branches):
    """Explicit ViT forward where each layer's two branches are kept (1) or dropped (0) per sample."""
    backbone = model.backbone
    hidden = backbone.embeddings(images)
    for layer, keep in zip(backbone.layers, keep_branches, strict=True):
        attention = layer.attention(layer.layernorm_before(hidden))[0]
        hidden = hidden + attention * keep[0]
        hidden = hidden + layer.mlp(layer.layernorm_after(hidden)) * keep[1]
    return model.classifier(backbone.layernorm(hidden)[:, 0])


def test_training_forward_drops_whole_branches_per_sample():
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(drop_path_config())
    model.set_drop_path_rate(0.5)
    model.train()
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(7)
    got = model(images).logits
    # Replay the same Bernoulli draws (one (B,1,1) mask per branch call, in call order) by hand.
    torch.manual_seed(7)
    keeps = []
    for rate in (0.0, 0.25, 0.5):
        pair = []
        for _ in range(2):
            if rate == 0.0:
                pair.append(torch.ones(4, 1, 1))
            else:
                pair.append(torch.empty(4, 1, 1).bernoulli_(1 - rate) / (1 - rate))
        keeps.append(pair)
    expected = _manual_forward(model.eval(), images, keeps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert any((k == 0).any() for pair in keeps for k in pair), "no branch was dropped: the check is vacuous"


def test_bad_drop_path_rates_raise():
    model = DiverseViTForImageClassification(drop_path_config())
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop_path_rate"):
            model.set_drop_path_rate(rate)
    with pytest.raises(ValueError, match="drop path rate"):
        BranchDropout(0.0, 1.5)


def test_drop_path_checkpoint_loads_in_vanilla_transformers(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(drop_path_config())
    model.set_drop_path_rate(0.1)
    model.save_pretrained(tmp_path)
    images = torch.randn(2, 3, 16, 16)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = model.eval()(images).logits.tolist()
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForImageClassification\n"
        "m = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()\n"
        "x = torch.load(sys.argv[1] + '/images.pt')\n"
        "print(json.dumps(m(x).logits.tolist()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), torch.tensor(expected))
