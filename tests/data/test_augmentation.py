"""`diverse_vit_hf.data.augmentation`: DeiT's timm transforms, checked against timm's own `create_transform` called with
DeiT's arguments (the reference), and the Pillow 13 guard of timm's posterize op."""

from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image as PILImage
from PIL import ImageOps
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from torchvision import transforms as tv1
from torchvision.transforms import v2 as tv2

from diverse_vit_hf.data.augmentation import (
    DEIT_AUTO_AUGMENT,
    DEIT_EVAL_CROP_PCT,
    TimmTransform,
    deit_eval_transform,
    deit_train_kwargs,
    deit_train_transform,
    guard_posterize,
    posterize_pillow12,
)
from diverse_vit_hf.data.images import ToRGB
from diverse_vit_hf.data.transforms import build_image_transform

MEAN, STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13

# facebookresearch/deit main.py argparse defaults, as datasets.build_transform passes them to create_transform.
DEIT_MAIN_PY = {
    "is_training": True,
    "color_jitter": 0.3,  # --color-jitter
    "auto_augment": "rand-m9-mstd0.5-inc1",  # --aa
    "interpolation": "bicubic",  # --train-interpolation
    "re_prob": 0.25,  # --reprob
    "re_mode": "pixel",  # --remode
    "re_count": 1,  # --recount
}
# timm's "increasing" RandAugment op set (rand-...-inc1), written out so a change of op set fails here.
INCREASING_OPS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]


def deit_reference(input_size: int = 32):
    """DeiT's own call (datasets.build_transform): timm's create_transform, default (ImageNet) mean and std."""
    return create_transform(input_size=input_size, **DEIT_MAIN_PY)


def rand_augment(transform) -> RandAugment:
    (found,) = [step for step in transform.transforms if isinstance(step, RandAugment)]
    return found


def sample_image() -> PILImage.Image:
    """32x32 RGB: colour gradients plus noise, not full-range, so every op has something to change."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:32]
    base = np.stack([40 + 4 * x, 60 + 3 * y, 200 - 3 * x], axis=-1) + rng.integers(-20, 21, (32, 32, 3))
    return PILImage.fromarray(base.clip(0, 255).astype(np.uint8), mode="RGB")


def pillow12_posterize(image: PILImage.Image, bits: int) -> PILImage.Image:
    """What `ImageOps.posterize` computed up to Pillow 12 (no range check): keep the `bits` high bits per channel."""
    mask = ~(2 ** (8 - bits) - 1)
    return image.point([value & mask for value in range(256)] * len(image.getbands()))


def seed_all(seed: int) -> None:
    random.seed(seed)  # op probabilities, magnitudes, crops (timm)
    np.random.seed(seed)  # op choice (timm's RandAugment uses np.random.choice)
    torch.manual_seed(seed)  # flip, random-erasing values


# --------------------------------------------------------------------------------------------------------------------
# The pipeline is DeiT's


def test_train_arguments_are_deits():
    kwargs = deit_train_kwargs((224, 224), MEAN, STD)
    assert kwargs == {**DEIT_MAIN_PY, "input_size": 224, "mean": MEAN, "std": STD}
    assert deit_train_kwargs((32, 48), (0.5,) * 3, (0.5,) * 3)["input_size"] == (32, 48)


def test_train_transform_is_timms_own_and_its_repr_names_the_recipe():
    ours = deit_train_transform((224, 224), MEAN, STD)
    reference = deit_reference(224)
    text = repr(ours)
    assert DEIT_AUTO_AUGMENT in text and "re_mode='pixel'" in text
    assert "RandAugment(n=2, ops=" in text and "RandomErasing(p=0.25, mode=pixel, count=(1, 1))" in text
    assert isinstance(ours, TimmTransform) and isinstance(ours.transforms[0], ToRGB)
    # Step for step timm's objects, configured as in DeiT's call (the repr shows every parameter timm exposes).
    assert [repr(step) for step in ours.transforms[1:]] == [repr(step) for step in reference.transforms]
    assert [type(step) for step in ours.transforms[1:]] == [type(step) for step in reference.transforms]
    assert not any(isinstance(step, tv1.ColorJitter) for step in ours.transforms)  # timm drops it under RandAugment
    ops, reference_ops = rand_augment(ours).ops, rand_augment(reference).ops
    assert [op.name for op in ops] == INCREASING_OPS and rand_augment(ours).num_layers == 2
    for op, ref in zip(ops, reference_ops, strict=True):
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (0.5, 9, 0.5, ref.magnitude_max)
        assert op.hparams == ref.hparams and op.kwargs == ref.kwargs and op.level_fn is ref.level_fn
        assert op.kwargs["resample"] == PILImage.BICUBIC and op.kwargs["fillcolor"] == (124, 116, 104)
    rotate = ops[INCREASING_OPS.index("Rotate")]
    assert abs(rotate.level_fn(9, rotate.hparams)[0]) == pytest.approx(27.0)  # m9 of 10 = 27 degrees (30 at m10)


def test_randaugment_unchanged_fraction_matches_timm():
    """The fraction of images RandAugment leaves unchanged: ours vs timm's own (DeiT's call), independent draws.
    torchvision's RandAugment(num_ops=2, magnitude=9), the former `deit` pipeline, is far off (both ops always
    applied): the tolerance separates the two."""
    image, draws = sample_image(), 4000
    pixels = np.asarray(image)

    def unchanged(transform, seed: int) -> float:
        seed_all(seed)
        count = 0
        for _ in range(draws):
            try:
                count += np.array_equal(np.asarray(transform(image)), pixels)
            except ValueError:  # the unguarded reference under Pillow 13 (about 1 in 700 draws): changed
                pass
        return count / draws

    ours = unchanged(rand_augment(deit_train_transform(32, MEAN, STD)), seed=1)
    timm = unchanged(rand_augment(deit_reference(32)), seed=2)
    torchvision = unchanged(tv2.RandAugment(num_ops=2, magnitude=9), seed=3)
    tolerance = 4.5 * (2 * timm * (1 - timm) / draws) ** 0.5  # 4.5 standard deviations of a difference of two rates
    assert 0.2 < timm < 0.35, timm  # each op is applied with p 0.5: a quarter of the images get no op at all
    assert abs(ours - timm) < tolerance, (ours, timm, tolerance)
    assert abs(torchvision - timm) > 3 * tolerance, (torchvision, timm)


def test_randaugment_draws_equal_timms_under_pillow12_posterize(monkeypatch):
    """Draw by draw (same seeds), our RandAugment equals timm's own with Pillow <= 12's posterize: the guard changes
    nothing but the 0-bit case, and gives there what Pillow <= 12 gave."""
    image, draws = sample_image(), 2000
    ours_op, reference_op = rand_augment(deit_train_transform(32, MEAN, STD)), rand_augment(deit_reference(32))
    ours = []
    for seed in range(draws):
        seed_all(seed)
        ours.append(np.asarray(ours_op(image)))
    zero_bits = []

    def old_posterize(img, bits):
        zero_bits.append(bits == 0)
        return pillow12_posterize(img, bits)

    monkeypatch.setattr(ImageOps, "posterize", old_posterize)  # timm calls ImageOps.posterize at run time
    for seed in range(draws):
        seed_all(seed)
        np.testing.assert_array_equal(ours[seed], np.asarray(reference_op(image)), err_msg=f"draw {seed}")
    assert sum(zero_bits) >= 1, "no draw reached the 0-bit case: the guard was not exercised"


# --------------------------------------------------------------------------------------------------------------------
# The Pillow guard


def test_posterize_guard_gives_pillow12_results():
    image = sample_image()
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(posterize_pillow12(image, bits)), np.asarray(timm_posterize(image, bits)))
    black = posterize_pillow12(image, 0)
    assert (black.mode, black.size) == (image.mode, image.size)
    np.testing.assert_array_equal(np.asarray(black), np.asarray(pillow12_posterize(image, 0)))
    assert not np.asarray(black).any()
    gray = image.convert("L")
    np.testing.assert_array_equal(np.asarray(posterize_pillow12(gray, 0)), np.asarray(pillow12_posterize(gray, 0)))


def test_posterize_op_at_magnitude_10_no_longer_raises():
    (op,) = [op for op in rand_augment(deit_train_transform(32, MEAN, STD)).ops if op.name == "PosterizeIncreasing"]
    assert op.aug_fn is posterize_pillow12
    forced = copy.copy(op)
    forced.prob, forced.magnitude, forced.magnitude_std = 1.0, 10, 0.0  # m = 10: keep 4 - int(10 / 10 * 4) = 0 bits
    assert not np.asarray(forced(sample_image())).any()
    (unguarded,) = [op for op in rand_augment(deit_reference(32)).ops if op.name == "PosterizeIncreasing"]
    unguarded = copy.copy(unguarded)
    unguarded.prob, unguarded.magnitude, unguarded.magnitude_std = 1.0, 10, 0.0
    if PILLOW_13:
        with pytest.raises(ValueError, match="bits must be between"):
            unguarded(sample_image())
    else:
        np.testing.assert_array_equal(np.asarray(unguarded(sample_image())), np.asarray(forced(sample_image())))
    assert guard_posterize(deit_reference(32)) == 1  # exactly the one posterize op of the inc1 set


def test_thousands_of_full_pipeline_draws_without_error():
    transform = deit_train_transform((32, 32), MEAN, STD)
    (op,) = [op for op in rand_augment(transform).ops if op.name == "PosterizeIncreasing"]
    installed, zero_bits = op.aug_fn, []

    def counting(img, bits, **kwargs):  # counts the 0-bit draws, runs what the transform installed
        zero_bits.append(bits <= 0)
        return installed(img, bits, **kwargs)

    op.aug_fn = counting
    seed_all(0)
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8), mode="RGB") for _ in range(8)]
    draws = 3000
    for i in range(draws):
        out = transform(images[i % len(images)])
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert sum(zero_bits) >= 1, "the 0-bit posterize case never came up: draw more"


# --------------------------------------------------------------------------------------------------------------------
# Evaluation, modes, pickling, data.py


def test_eval_transform_equals_deits():
    """DeiT's evaluation, written out as in its datasets.build_transform (torchvision, PIL), at 48 px."""
    size = 48
    reference = tv1.Compose(
        [
            tv1.Resize(int(size / 0.875), interpolation=tv1.InterpolationMode.BICUBIC),
            tv1.CenterCrop(size),
            tv1.ToTensor(),
            tv1.Normalize(MEAN, STD),
        ]
    )
    ours = deit_eval_transform((size, size), MEAN, STD)
    rng = np.random.default_rng(1)
    for shape in ((60, 80, 3), (90, 50, 3), (48, 48, 3)):
        image = PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode="RGB")
        assert torch.equal(ours(image), reference(image)), shape


@pytest.mark.parametrize("input_size", [(32, 32), (32, 48)], ids=["square", "rect"])
def test_transforms_pickle_and_give_float_tensors_for_any_mode(input_size):
    rng = np.random.default_rng(2)
    for build in (deit_train_transform, deit_eval_transform):
        transform = pickle.loads(pickle.dumps(build(input_size, MEAN, STD)))
        assert repr(transform) == repr(build(input_size, MEAN, STD))
        for mode, channels in (("L", 1), ("RGB", 3), ("RGBA", 4)):
            for height, width in ((25, 37), (8, 8), (64, 50)):
                array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
                image = PILImage.fromarray(array[..., 0] if channels == 1 else array, mode=mode)
                out = transform(image)
                assert out.dtype == torch.float32 and tuple(out.shape) == (3, *input_size), (mode, height, width)
    unpickled = pickle.loads(pickle.dumps(deit_train_transform(input_size, MEAN, STD)))
    assert [op.aug_fn for op in rand_augment(unpickled).ops if op.name == "PosterizeIncreasing"] == [posterize_pillow12]


def test_data_deit_augmentation_is_this_pipeline():
    transform = build_image_transform(32, MEAN, STD, train=True, augmentation="deit")
    assert repr(transform) == repr(deit_train_transform((32, 32), MEAN, STD))


def test_the_eval_crop_fraction_is_timms_default():
    """DeiT's `--eval-crop-ratio`, the one constant behind the eval transforms and the DeiT image processor, is timm's
    `DEFAULT_CROP_PCT`."""
    assert DEIT_EVAL_CROP_PCT == DEFAULT_CROP_PCT
