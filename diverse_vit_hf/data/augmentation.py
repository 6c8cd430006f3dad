"""DeiT's image transforms, built with timm, the library DeiT's own `datasets.build_transform` calls.

`--augmentation deit` must be the augmentation the paper's numbers were trained with, so it is not re-implemented:
`deit_train_transform` calls `timm.data.create_transform` with exactly the arguments DeiT's `main.py` defaults pass
(RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25 in `pixel` mode, bicubic, color jitter 0.3, which timm
switches off when RandAugment is on), and `deit_eval_transform` is DeiT's evaluation (shorter edge to
`size / 0.875`, bicubic, center crop). Both take PIL images of any mode (converted to RGB first) and return float
`(3, H, W)` tensors; both pickle, for spawned data-loader workers.

One guard, for Pillow 13 (`posterize_pillow12`): timm's `PosterizeIncreasing` asks Pillow to keep 0 bits when the
magnitude noise reaches m = 10, which Pillow <= 12 answered with a black image and Pillow 13 refuses
(`ValueError: bits must be between or equal to 1 and 8`). The guard gives that black image itself and calls timm's
own op otherwise, so RandAugment's draws are the ones timm makes with Pillow <= 12 (DeiT's environment). Clamping the
magnitude through timm's own `mmax` option instead would change the distribution of every op: timm parses `mmax` as
an integer, so `mmax9` would clip every draw above 9 (about half of them, mstd 0.5) to 9.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image as PILImage
from torchvision.transforms import Compose

from .images import ToRGB

# DeiT `main.py` defaults (facebookresearch/deit), the values the paper's runs use.
DEIT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # --aa
DEIT_COLOR_JITTER = 0.3  # --color-jitter (timm ignores it while RandAugment is on)
DEIT_TRAIN_INTERPOLATION = "bicubic"  # --train-interpolation
DEIT_RE_PROB = 0.25  # --reprob
DEIT_RE_MODE = "pixel"  # --remode: per-pixel N(0, 1) values, in normalised units
DEIT_RE_COUNT = 1  # --recount
DEIT_EVAL_CROP_PCT = 0.875  # --eval-crop-ratio


def _timm_input_size(input_size: int | Sequence[int]) -> int | tuple[int, int]:
    """(height, width) -> what `create_transform` takes: DeiT passes an int for its square inputs (same transforms as
    `(s, s)`, and the same repr as DeiT's call), so a square size is given as an int."""
    if isinstance(input_size, int):
        return input_size
    height, width = (int(s) for s in input_size)
    return height if height == width else (height, width)


def deit_train_kwargs(input_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """The `timm.data.create_transform` arguments of DeiT's training transform (`datasets.build_transform`), sized
    and normalised for the model (DeiT: 224 px and ImageNet mean/std, the values this project's `deit-small` presets
    use)."""
    return {
        "input_size": _timm_input_size(input_size),
        "is_training": True,
        "color_jitter": DEIT_COLOR_JITTER,
        "auto_augment": DEIT_AUTO_AUGMENT,
        "interpolation": DEIT_TRAIN_INTERPOLATION,
        "re_prob": DEIT_RE_PROB,
        "re_mode": DEIT_RE_MODE,
        "re_count": DEIT_RE_COUNT,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
    }


def deit_eval_kwargs(
    input_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], crop_pct: float = DEIT_EVAL_CROP_PCT
) -> dict[str, Any]:
    """The `timm.data.create_transform` arguments of DeiT's evaluation transform: shorter edge to
    `floor(size / crop_pct)` (DeiT's `int(input_size / eval_crop_ratio)`: 256 for 224), bicubic, center crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}.")
    return {
        "input_size": _timm_input_size(input_size),
        "is_training": False,
        "interpolation": "bicubic",  # DeiT: transforms.Resize(size, interpolation=3)
        "crop_pct": float(crop_pct),
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
    }


def posterize_pillow12(img: PILImage.Image, bits_to_keep: int, **kwargs: Any) -> PILImage.Image:
    """timm's `posterize` op with Pillow <= 12's answer for `bits_to_keep <= 0`.

    Pillow <= 12 masked every channel value with `~(2 ** (8 - bits) - 1)`, which keeps no bit at 0 bits: a black
    image. Pillow 13 raises instead. timm's `PosterizeIncreasing` asks for 0 bits whenever the noisy magnitude
    reaches 10 (`4 - int(m / 10 * 4)`), about 2% of its draws with `mstd0.5`. Everything else goes to timm's op.

    Args:
        img: the PIL image RandAugment is working on (RGB here: `ToRGB` runs first).
        bits_to_keep: most significant bits kept per channel (timm's level argument).
        kwargs: timm's op keyword arguments (`fillcolor`, `resample`), unused by posterize.

    Returns:
        A PIL image of the same mode and size.
    """
    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):  # the modes Pillow <= 12's posterize accepted
        return PILImage.new(img.mode, img.size)  # every channel 0
    from timm.data.auto_augment import posterize

    return posterize(img, bits_to_keep, **kwargs)


def guard_posterize(transform: Compose) -> int:
    """Route every timm posterize op inside `transform`'s RandAugment steps through `posterize_pillow12` (in place).

    Only the op's function is swapped, on these op objects: their selection, probability and magnitude sampling stay
    timm's. Under Pillow <= 12 the output is unchanged; under Pillow 13 the 0-bit case no longer raises.

    Returns:
        How many ops were guarded (1 for DeiT's `rand-m9-mstd0.5-inc1`: `PosterizeIncreasing`).
    """
    from timm.data.auto_augment import RandAugment, posterize

    guarded = 0
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize or op.aug_fn is posterize_pillow12:
                    op.aug_fn = posterize_pillow12
                    guarded += 1
    return guarded


class TimmTransform(Compose):
    """`ToRGB()` followed by the steps of `timm.data.create_transform(**create_transform_kwargs)`, with the posterize
    guard applied. A torchvision `Compose` (its `transforms` list is timm's own objects) whose repr starts with the
    `create_transform` call it was built from, so a log shows which recipe ran.

    PIL image (any mode) -> float tensor `(3, H, W)`. Picklable (no lambdas or closures), for spawned workers.
    """

    def __init__(self, **create_transform_kwargs: Any) -> None:
        from timm.data import create_transform

        built = create_transform(**create_transform_kwargs)
        # DeiT's ImageFolder loader opens every image as RGB; datasets hand over any mode (L digits, RGBA, CMYK).
        super().__init__([ToRGB(), *built.transforms])
        self.create_transform_kwargs = dict(create_transform_kwargs)
        self.guarded_ops = guard_posterize(self)

    def __call__(self, image: PILImage.Image) -> torch.Tensor:
        return super().__call__(image)

    def __repr__(self) -> str:
        call = ", ".join(f"{key}={value!r}" for key, value in self.create_transform_kwargs.items())
        steps = "".join(f"\n    {step}" for step in self.transforms)
        return f"{type(self).__name__}(timm.data.create_transform({call}):{steps}\n)"


def deit_train_transform(
    input_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> Callable[[PILImage.Image], torch.Tensor]:
    """DeiT's training transform: PIL image (any mode) -> float tensor `(3, H, W)`, `(H, W) = input_size`.

    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic), horizontal flip 0.5, timm RandAugment
    `rand-m9-mstd0.5-inc1` (2 ops from 15, each applied with p 0.5 at a magnitude drawn from N(9, 0.5) clipped to
    [0, 10], "increasing" variants, fill = the mean colour), to tensor, normalise with `mean`/`std`, random erasing
    (p 0.25, one box, filled with N(0, 1) per pixel).

    Not reproduced: DeiT's branch for inputs of 32 px or less (CIFAR: `RandomCrop(size, padding=4)` instead of the
    random resized crop, and no resize at evaluation), which assumes images already at the input size; here every
    size gets the ImageNet pipeline, which accepts images of any size. The paper's runs are at 224 px.
    """
    return TimmTransform(**deit_train_kwargs(input_size, mean, std))


def deit_eval_transform(
    input_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = DEIT_EVAL_CROP_PCT,
) -> Callable[[PILImage.Image], torch.Tensor]:
    """DeiT's evaluation transform: PIL image (any mode) -> float tensor `(3, H, W)`, `(H, W) = input_size`.

    Shorter edge resized to `floor(size / crop_pct)` (bicubic; 224 -> 256), center crop to `input_size`, to tensor,
    normalise. A non-square `input_size` resizes each side to `floor(side / crop_pct)` (timm's rule; DeiT itself only
    uses square inputs).
    """
    return TimmTransform(**deit_eval_kwargs(input_size, mean, std, crop_pct))
