"""Shared test setup: no network, and a tiny ViT configuration."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
from transformers import ViTConfig


@pytest.fixture
def tiny_vit_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
