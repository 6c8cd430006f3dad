"""`diverse_vit_hf.data.transforms`: the training and evaluation transforms (output shape for any input mode,
determinism, normalisation, unknown augmentations) and the image size read from an image processor."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fixtures.builders import pil_images
from PIL import Image as PILImage
from transformers import AutoImageProcessor, ViTImageProcessor

from diverse_vit_hf.data.transforms import AUGMENTATIONS, build_image_transform, image_size_from_processor

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.2)


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", [32, (32, 48)], ids=["square", "rect"])
def test_transform_output_shape_for_any_input_mode(augmentation, train, target):
    transform = build_image_transform(target, MEAN, STD, train=train, augmentation=augmentation)
    height, width = (target, target) if isinstance(target, int) else target
    for mode in ("L", "RGB", "RGBA"):
        for size in ((25, 37), (37, 25), (8, 8)):
            out = transform(pil_images(1, size=size, mode=mode)[0])
            assert isinstance(out, torch.Tensor)
            assert out.dtype == torch.float32
            assert tuple(out.shape) == (3, height, width), (mode, size)


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_eval_transform_is_deterministic(augmentation):
    transform = build_image_transform((32, 48), MEAN, STD, train=False, augmentation=augmentation)
    image = pil_images(1, size=(25, 37))[0]
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))


def test_train_deit_transform_is_random():
    transform = build_image_transform(32, MEAN, STD, train=True, augmentation="deit")
    image = pil_images(1, size=(40, 40))[0]
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_normalisation_uses_given_mean_and_std(train):
    transform = build_image_transform((32, 48), MEAN, STD, train=train, augmentation="none")
    colour = (51, 102, 204)
    out = transform(PILImage.new("RGB", (25, 37), colour))
    for channel in range(3):
        expected = (colour[channel] / 255.0 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(out[channel], torch.full((32, 48), expected), rtol=0, atol=1e-5)
    gray = transform(PILImage.new("L", (25, 37), 128))
    for channel in range(3):
        expected = (128 / 255.0 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(gray[channel], torch.full((32, 48), expected), rtol=0, atol=1e-5)


def test_unknown_augmentation_raises():
    with pytest.raises(ValueError) as excinfo:
        build_image_transform(32, MEAN, STD, train=True, augmentation="heavy")
    message = str(excinfo.value)
    assert "heavy" in message
    for choice in AUGMENTATIONS:
        assert choice in message


def test_image_size_from_processor(tmp_path):
    assert image_size_from_processor(ViTImageProcessor(size={"height": 32, "width": 48})) == (32, 48)
    assert image_size_from_processor(ViTImageProcessor(size={"shortest_edge": 40})) == (40, 40)
    ViTImageProcessor(size={"height": 24, "width": 40}).save_pretrained(tmp_path)
    assert image_size_from_processor(AutoImageProcessor.from_pretrained(tmp_path)) == (24, 40)
    assert image_size_from_processor(SimpleNamespace(size={"height": 16, "width": 8})) == (16, 8)
    with pytest.raises(ValueError):
        image_size_from_processor(SimpleNamespace(size={"longest_edge": 40}))
