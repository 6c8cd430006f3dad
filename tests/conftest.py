"""Shared test setup: no network, and the fixtures several test modules use.

Slow tests (`@pytest.mark.slow`: end-to-end runs in subprocesses) are skipped by a plain `pytest` (pyproject.toml's
`addopts`); `make test` runs them too. Support code lives in `tests/fixtures/`, subprocess workers in `tests/workers/`.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import shutil
from pathlib import Path

import pytest
from fixtures.builders import build_trainer, make_args, tiny_config
from transformers import ViTConfig

from diverse_vit_hf.data.image_datasets import apply_image_transform, load_embedded_dataset
from diverse_vit_hf.data.transforms import build_image_transform

# Normalisation of the augmented digits (`augmented_digits`).
DIGITS_MEAN, DIGITS_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def tiny_vit_config() -> ViTConfig:
    """`tiny_config()` with 3 blocks on 32x32 images, 8x8 patches (P = 16) and 5 labels."""
    return tiny_config(num_hidden_layers=3, image_size=32, patch_size=8, num_labels=5)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A real run's output folder with checkpoint-1, -2 and -3 (weights, optimizer, scheduler, RNG, manifest).
    Shared: never change it, damage a copy (`checkpointed_run`)."""
    folder = tmp_path_factory.mktemp("trained")
    args = make_args(folder, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=None)
    build_trainer(args).train()
    return folder


@pytest.fixture
def checkpointed_run(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture(scope="module")
def augmented_digits():
    """32 embedded MNIST digits, still undecoded PIL images (`raw`), and the same rows with the `light` training
    transform installed by `apply_image_transform` (`train`), with that transform (`transform`)."""
    raw = load_embedded_dataset("mnist").select(range(32))
    transform = build_image_transform(28, DIGITS_MEAN, DIGITS_STD, train=True, augmentation="light")
    train = apply_image_transform(raw, transform, "image", "label")
    return raw, train, transform
