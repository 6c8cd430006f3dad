"""`diverse_vit_hf.models.presets`: the named DeiT configurations (DeiT-Ti/S/B and the 24-block DeiT-S of the
paper), their published sizes and parameter count, overrides, and unknown names."""

from __future__ import annotations

import pytest

from diverse_vit_hf import DEIT_MODEL_CONFIG_NAMES, DiverseViTForImageClassification, deit_config


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("deit-tiny", (192, 3, 12)),
        ("deit-small", (384, 6, 12)),
        ("deit-small-24", (384, 6, 24)),
        ("deit-base", (768, 12, 12)),
    ],
)
def test_deit_config_table(name, sizes):
    config = deit_config(name, num_labels=7)
    assert config.model_type == "vit"
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == sizes
    assert config.intermediate_size == 4 * config.hidden_size
    assert (config.patch_size, config.image_size, config.qkv_bias, config.layer_norm_eps) == (16, 224, True, 1e-6)
    assert config.num_labels == 7


def test_deit_tiny_has_the_published_parameter_count_and_overrides_apply():
    model = DiverseViTForImageClassification(deit_config("deit-tiny", num_labels=1000))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.72e6, rel=1e-3)  # DeiT-Ti: 5.7M
    assert deit_config("deit-small", image_size=32).image_size == 32


def test_unknown_config_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"deit-smal'.*deit-tiny, deit-small, deit-small-24, deit-base"):
        deit_config("deit-smal")
    assert DEIT_MODEL_CONFIG_NAMES == ("deit-tiny", "deit-small", "deit-small-24", "deit-base")
