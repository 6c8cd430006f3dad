"""Local replicas of one popular Hub checkpoint per ViT family beyond ViT/DeiT (tests/replicas.py has those), for
tests/test_family_replicas.py: `config.json` and `preprocessor_config.json` in the form the Hub serves, plus seeded
random weights saved by the stock class.

What was confirmed, and from what:

* Processors: the conversion scripts in huggingface/transformers that produced these repos.
  - DINOv2 (`convert_dinov2_to_hf.py`, 2023): `BitImageProcessor(image_mean=IMAGENET_DEFAULT_MEAN,
    image_std=IMAGENET_DEFAULT_STD, size={"shortest_edge": 256})`, i.e. the class defaults for the rest: bicubic
    (resample 3), center crop 224, RGB conversion. Saved by 2023's `save_pretrained`, which writes every attribute
    and `image_processor_type`. The with-registers repo (2024, `convert_dinov2_with_registers_to_hf.py`) is assumed
    to use the same processor: inferred, its script follows the DINOv2 one.
  - BEiT (`convert_beit_unilm_to_pytorch.py`, 2021): `BeitImageProcessor(size=config.image_size,
    resample=BILINEAR, do_center_crop=False)` with the class's mean/std 0.5, saved then as a `BeitFeatureExtractor`
    with integer `size`/`crop_size` and `reduce_labels` (the legacy form, as tests/replicas.py's 2021 files).
  - ViT-MSN (`convert_msn_to_pytorch.py`, 2022): `ViTImageProcessor(size=config.image_size)`: resize to 224,
    bilinear, mean/std 0.5; written in the ViT-style legacy form of tests/replicas.py (integer `size`, no type key):
    inferred from the conversion date, like the facebook/deit-* files of the same form.
  - I-JEPA (`convert_ijepa_to_hf.py`, 2024): `ViTImageProcessor(size={"height": 224, "width": 224})`, class defaults
    otherwise (bilinear, mean/std 0.5), saved with today's keys.
* Configs: the hyperparameters the same scripts set (DINOv2-S/14: 384 wide, 12 blocks, 6 heads, `mlp_ratio` 4,
  `image_size` 518 with the 224 crop, layer scale 1.0, eps 1e-6; BEiT-B/16: relative position bias, mean pooling,
  layer scale 0.1; ViT-MSN-S/16; I-JEPA ViT-H/14: 1280 wide, 32 blocks, 16 heads, MLP 5120, eps 1e-6), written with
  today's key set (`to_dict` of the installed config class): the exact historical key sets were not available here.
  The ImageNet heads (DINOv2 1-layer, BEiT) have the 1,000 ImageNet names; ViT-MSN and I-JEPA repos are backbones
  (`architectures` `ViTMSNModel` / `IJepaModel`, no labels), so fine-tuning gives them a new head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from replicas import IMAGENET_ID2LABEL, IMAGENET_LABEL2ID, legacy_json

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

FAMILY_REPLICAS: dict[str, str] = {
    "facebook/dinov2-small-imagenet1k-1-layer": "dinov2",
    "facebook/dinov2-with-registers-small-imagenet1k-1-layer": "dinov2_with_registers",
    "microsoft/beit-base-patch16-224": "beit",
    "facebook/vit-msn-small": "vit_msn",
    "facebook/ijepa_vith14_1k": "ijepa",
}

_BIT_PROCESSOR = {  # BitImageProcessor as 2023's save_pretrained wrote it
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": IMAGENET_MEAN,
    "image_processor_type": "BitImageProcessor",
    "image_std": IMAGENET_STD,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}
_IMAGENET_HEAD = {"id2label": dict(IMAGENET_ID2LABEL), "label2id": dict(IMAGENET_LABEL2ID)}
_DINOV2_S14 = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
               "image_size": 518, "patch_size": 14, "layerscale_value": 1.0, "layer_norm_eps": 1e-6}  # fmt: skip

_TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "facebook/dinov2-small-imagenet1k-1-layer": {
        "config": {"architectures": ["Dinov2ForImageClassification"], **_DINOV2_S14, **_IMAGENET_HEAD},
        "preprocessor": _BIT_PROCESSOR,
    },
    "facebook/dinov2-with-registers-small-imagenet1k-1-layer": {
        "config": {
            "architectures": ["Dinov2WithRegistersForImageClassification"],
            **_DINOV2_S14,
            "num_register_tokens": 4,
            **_IMAGENET_HEAD,
        },
        "preprocessor": _BIT_PROCESSOR,
    },
    "microsoft/beit-base-patch16-224": {
        "config": {
            "architectures": ["BeitForImageClassification"],
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "use_relative_position_bias": True,
            "use_absolute_position_embeddings": False,
            "use_shared_relative_position_bias": False,
            "use_mean_pooling": True,
            "layer_scale_init_value": 0.1,
            **_IMAGENET_HEAD,
        },
        "preprocessor": {
            "crop_size": 224,
            "do_center_crop": False,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "BeitFeatureExtractor",
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "reduce_labels": False,
            "resample": 2,
            "size": 224,
        },
    },
    "facebook/vit-msn-small": {
        "config": {
            "architectures": ["ViTMSNModel"],
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "image_size": 224,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
        "preprocessor": {
            "do_normalize": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "size": 224,
        },
    },
    "facebook/ijepa_vith14_1k": {
        "config": {
            "architectures": ["IJepaModel"],
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "intermediate_size": 5120,
            "image_size": 224,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
        },
        "preprocessor": {
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "ViTImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
            "rescale_factor": 0.00392156862745098,
            "size": {"height": 224, "width": 224},
        },
    },
}
# The classification class each model_type fine-tunes into (the weights' names come from it).
_CLASSIFIER = {"dinov2": "Dinov2ForImageClassification",
               "dinov2_with_registers": "Dinov2WithRegistersForImageClassification",
               "beit": "BeitForImageClassification", "vit_msn": "ViTMSNForImageClassification",
               "ijepa": "IJepaForImageClassification"}  # fmt: skip


def _config_dict(hub_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
    model_type = FAMILY_REPLICAS[hub_id]
    values = _TABLE[hub_id]["config"] | overrides
    config = transformers.AutoConfig.for_model(model_type, **values)
    data = config.to_dict()
    data.pop("transformers_version", None)
    data["architectures"] = values["architectures"]
    return data


def family_replica_files(hub_id: str, **config_overrides: Any) -> dict[str, str]:
    """`{"config.json": text, "preprocessor_config.json": text}` of the replica, `config_overrides` applied to the
    config (e.g. `num_hidden_layers=1, hidden_size=32` to keep tests fast)."""
    return {
        "config.json": legacy_json(_config_dict(hub_id, config_overrides)),
        "preprocessor_config.json": legacy_json(_TABLE[hub_id]["preprocessor"]),
    }


def write_family_replica(hub_id: str, folder: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write the replica into `folder`: seeded random weights from `save_pretrained` of the stock classification
    class of its `model_type`, then config.json and preprocessor_config.json as `family_replica_files` gives them.
    Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = family_replica_files(hub_id, **config_overrides)
    data = json.loads(files["config.json"])
    config = transformers.AutoConfig.for_model(
        data["model_type"], **{k: v for k, v in data.items() if k != "model_type"}
    )
    torch.manual_seed(seed)
    getattr(transformers, _CLASSIFIER[data["model_type"]])(config).save_pretrained(folder)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def replica_input_size(hub_id: str) -> tuple[int, int]:
    """(height, width) the replica's processor produces: its crop when it crops, else its resize target."""
    processor = _TABLE[hub_id]["preprocessor"]
    side = processor["crop_size"] if processor.get("do_center_crop") else processor["size"]
    if isinstance(side, dict):
        return side["height"], side["width"]
    return side, side


__all__ = ["FAMILY_REPLICAS", "family_replica_files", "replica_input_size", "write_family_replica"]
