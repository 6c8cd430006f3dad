"""`diverse_vit_hf.scripts.model_builder.build_classifier`: a named DeiT configuration built from scratch with its
drop-path schedule and DeiT's evaluation processor, and a drop-path rate applied to a loaded checkpoint without new
parameters."""

from __future__ import annotations

import pytest

from diverse_vit_hf.models.modeling import BranchDropout
from diverse_vit_hf.scripts.arguments import ModelArguments
from diverse_vit_hf.scripts.model_builder import build_classifier


def test_script_builds_a_named_config_from_scratch_with_drop_path():
    args = ModelArguments(config_name="deit-tiny", drop_path_rate=0.1)
    model, processor = build_classifier(args, ["a", "b", "c"])
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_labels) == (192, 12, 3)
    assert config.id2label == {0: "a", 1: "b", 2: "c"}
    # DeiT's evaluation (shorter edge 224 / 0.875 = 256, center crop 224) is the saved processor: pipelines match it.
    assert processor.size == {"shortest_edge": 256} and processor.crop_size == {"height": 224, "width": 224}
    assert processor.do_center_crop and processor.image_mean[0] == pytest.approx(0.485)
    rates = [layer.dropout.drop_path for layer in model.vit.layers]
    assert (
        rates[0] == 0.0
        and rates[-1] == pytest.approx(0.1)
        and all(isinstance(x.dropout, BranchDropout) for x in model.vit.layers)
    )
    with pytest.raises(ValueError, match="not both"):
        build_classifier(ModelArguments(model_name_or_path="x", config_name="deit-tiny"), ["a"])


def test_drop_path_rate_applies_to_a_loaded_checkpoint(tmp_path):
    base = tmp_path / "base"
    model, processor = build_classifier(ModelArguments(hidden_size=32, num_hidden_layers=3), ["a", "b"])
    model.save_pretrained(base)
    processor.save_pretrained(base)
    loaded, _ = build_classifier(ModelArguments(model_name_or_path=str(base), drop_path_rate=0.2), ["a", "b"])
    assert [layer.dropout.drop_path for layer in loaded.vit.layers] == pytest.approx([0.0, 0.1, 0.2])
    assert set(loaded.state_dict()) == set(model.state_dict())  # no new parameters or buffers
