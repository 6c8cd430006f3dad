"""Shared test setup: no network, and a tiny ViT configuration."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
from helpers import tiny_config
from transformers import ViTConfig


@pytest.fixture
def tiny_vit_config() -> ViTConfig:
    """`helpers.tiny_config` with 3 blocks on 32x32 images, 8x8 patches (P = 16) and 5 labels."""
    return tiny_config(num_hidden_layers=3, image_size=32, patch_size=8, num_labels=5)
