"""Stochastic depth added to HF ViT/DeiT without changing the parameter layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import DeiTConfig, ViTConfig

from diverse_vit_hf import DiverseDeiTForImageClassification, DiverseViTForImageClassification
from diverse_vit_hf.models.modeling import BranchDropout

CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@pytest.mark.parametrize(
    ("model_class", "config_class"),
    [(DiverseViTForImageClassification, ViTConfig), (DiverseDeiTForImageClassification, DeiTConfig)],
)
def test_layout_and_eval_outputs_are_unchanged(model_class, config_class):
    torch.manual_seed(0)
    model = model_class(config_class(**CONFIG)).eval()
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
    model = DiverseViTForImageClassification(ViTConfig(**CONFIG))
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


def test_bad_rates_raise():
    model = DiverseViTForImageClassification(ViTConfig(**CONFIG))
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop_path_rate"):
            model.set_drop_path_rate(rate)
    with pytest.raises(ValueError, match="drop path rate"):
        BranchDropout(0.0, 1.5)


def test_drop_path_checkpoint_loads_in_vanilla_transformers(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(ViTConfig(**CONFIG))
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
