"""Per-image transforms built from a model's image processor: evaluation (resize, crop, normalize as the processor
does), the light training augmentation, and DeiT's (`augmentation.deit_train_transform`).

Two kinds of processor are read: transformers' ViT-style processors (`size`, `crop_size`, `resample`, mean/std), and
transformers' `TimmWrapperImageProcessor` of a timm checkpoint, which holds timm's resolved data config (`data_config`:
`input_size`, `interpolation`, `crop_pct`, `crop_mode`, mean/std from the checkpoint's `pretrained_cfg`) and
evaluates with timm's own eval transform (`TimmPreprocessing`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image as PILImage
from torchvision.transforms import v2 as T

from .augmentation import DEIT_EVAL_CROP_PCT, deit_train_transform
from .images import ToRGB

AUGMENTATIONS = ("none", "light", "deit")


# timm's interpolation names (`pretrained_cfg["interpolation"]`) -> torchvision interpolation.
_TIMM_INTERPOLATION = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
}


def timm_data_config(processor: Any) -> dict[str, Any] | None:
    """The timm data config of a `TimmWrapperImageProcessor` (`timm.data.resolve_data_config` of the checkpoint's
    `pretrained_cfg`), or None for any other processor."""
    config = getattr(processor, "data_config", None)
    if isinstance(config, dict) and "input_size" in config and "mean" in config:
        return config
    return None


# PIL resample codes (what `preprocessor_config.json` stores as `resample`) -> torchvision interpolation.
_PIL_TO_INTERPOLATION = {
    0: T.InterpolationMode.NEAREST,
    1: T.InterpolationMode.LANCZOS,
    2: T.InterpolationMode.BILINEAR,
    3: T.InterpolationMode.BICUBIC,
    4: T.InterpolationMode.BOX,
    5: T.InterpolationMode.HAMMING,
}


def _size_pair(size: Any, key: str) -> tuple[int, int] | int:
    """A processor size dict -> (height, width), or an int shorter-edge length for `{"shortest_edge": n}`."""
    if isinstance(size, int):
        return size, size
    # A plain dict in config files and older releases, a `SizeDict` object on newer processors.
    keys = ("height", "width", "shortest_edge", "longest_edge")
    fields = {k: size.get(k) for k in keys} if isinstance(size, dict) else {k: getattr(size, k, None) for k in keys}
    if fields["height"] is not None and fields["width"] is not None:
        return int(fields["height"]), int(fields["width"])
    if fields["shortest_edge"] is not None and fields["longest_edge"] is None:
        return int(fields["shortest_edge"])
    raise ValueError(
        f"Cannot read the image processor's {key} {size!r}: only {{'height', 'width'}} and {{'shortest_edge'}} sizes "
        "are supported. Save the checkpoint with a ViT-style image processor (e.g. size {'height': 224, 'width': 224})."
    )


@dataclass(frozen=True)
class ImagePreprocessing:
    """What a ViT-style image processor (that of any supported family) does to one image, as torchvision transforms.

    The transforms here reproduce the processor's own steps on the same kind of tensor (uint8 resize with antialias,
    center crop, rescale and normalise), so evaluation equals `processor(images)` and the saved processor makes a
    `pipeline` preprocess exactly as training evaluated.

    Attributes:
        input_size: (height, width) the model receives: the crop size when the processor center-crops, else its size.
        resize: (height, width) to resize to, an int shorter-edge length (`{"shortest_edge": n}`), or None (no resize).
        center_crop: whether the resized image is center-cropped to `input_size`.
        interpolation: the processor's resample filter.
        mean, std: normalisation applied to pixel values in [0, 1] (0 and 1 when the processor does not normalise).
        rescale_factor: what raw 0-255 pixel values are multiplied by before normalising (1 / 255 by default).
    """

    input_size: tuple[int, int]
    resize: tuple[int, int] | int | None
    center_crop: bool
    interpolation: T.InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1.0 / 255.0

    @classmethod
    def from_processor(cls, processor: Any) -> ImagePreprocessing:
        """Read a (legacy or current) ViT-style image processor: `size`, `do_center_crop`/`crop_size`,
        `resample`, `do_rescale`/`rescale_factor`, `do_normalize`/`image_mean`/`image_std`; or a timm checkpoint's
        `TimmWrapperImageProcessor` (a `TimmPreprocessing`)."""
        data_config = timm_data_config(processor)
        if data_config is not None:
            return TimmPreprocessing.from_data_config(data_config)
        resize = _size_pair(processor.size, "size") if getattr(processor, "do_resize", True) else None
        center_crop = bool(getattr(processor, "do_center_crop", False))
        if center_crop:
            input_size = _size_pair(processor.crop_size, "crop_size")
            if isinstance(input_size, int):
                raise ValueError(f"The image processor's crop_size {processor.crop_size!r} has no height and width.")
        elif isinstance(resize, tuple):
            input_size = resize
        elif resize is not None:
            # A shorter-edge resize alone gives images of different shapes: evaluate at the square center crop, as
            # transformers' example scripts do (`prepare_processor` makes the saved processor crop the same way).
            input_size, center_crop = (resize, resize), True
        else:
            raise ValueError(
                "The image processor neither resizes nor center-crops, so images of different shapes would reach the "
                "model at different sizes. Use a processor with do_resize and a {'height', 'width'} size."
            )
        resample = getattr(processor, "resample", None)
        if isinstance(resample, T.InterpolationMode):
            interpolation = resample
        else:
            code = int(resample) if resample is not None else 2  # transformers' default: bilinear
            if code not in _PIL_TO_INTERPOLATION:
                raise ValueError(f"Unknown resample filter {resample!r} in the image processor.")
            interpolation = _PIL_TO_INTERPOLATION[code]
        if getattr(processor, "do_normalize", True):
            # transformers' defaults (IMAGENET_STANDARD_MEAN/STD) where a processor-like object does not say.
            mean, std = getattr(processor, "image_mean", 0.5), getattr(processor, "image_std", 0.5)
            mean = (float(mean),) * 3 if isinstance(mean, (int, float)) else tuple(float(m) for m in mean)
            std = (float(std),) * 3 if isinstance(std, (int, float)) else tuple(float(s) for s in std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = (
            float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
        )
        return cls(input_size, resize, center_crop, interpolation, mean, std, rescale)

    def finish(self) -> list[Any]:
        """uint8 image tensor -> float tensor, rescaled and normalised as the processor does (one fused affine map:
        `(x * f - mean) / std == (x - mean / f) / (std / f)`)."""
        f = self.rescale_factor
        return [
            T.ToDtype(torch.float32, scale=False),
            T.Normalize(mean=[m / f for m in self.mean], std=[s / f for s in self.std]),
        ]

    def eval_transform(self) -> T.Compose:
        """PIL image (any mode) -> `(3, H, W)` float tensor equal to the processor's output for that image."""
        steps: list[Any] = [ToRGB(), T.ToImage()]
        if self.resize is not None:
            steps.append(T.Resize(self.resize, interpolation=self.interpolation, antialias=True))
        if self.center_crop:
            steps.append(T.CenterCrop(self.input_size))
        return T.Compose([*steps, *self.finish()])

    def train_transform(self, augmentation: str) -> Callable[[PILImage.Image], torch.Tensor]:
        """The training pipeline at the model's input size: `none` (the evaluation pipeline), `light` (small random
        crops, no flips: digit/text safe) or `deit` (the DeiT recipe's augmentation)."""
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}.")
        if augmentation == "none":
            return self.eval_transform()
        if augmentation == "light":
            crop = T.RandomResizedCrop(
                self.input_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=self.interpolation, antialias=True
            )
            return T.Compose([ToRGB(), T.ToImage(), crop, *self.finish()])
        return _deit_train_transform(self.input_size, self.mean, self.std, self.interpolation)


@dataclass(frozen=True)
class TimmPreprocessing(ImagePreprocessing):
    """A timm checkpoint's preprocessing (its `TimmWrapperImageProcessor`'s `data_config`).

    Evaluation is timm's own eval transform, `timm.data.create_transform(**data_config, is_training=False)` (for
    `crop_mode: center`: resize the shorter edge to `floor(size / crop_pct)`, center crop, normalise), after an RGB
    conversion, so it equals what `TimmWrapperImageProcessor` (and a `pipeline`, which converts to RGB) feeds the
    model. Training crops to the model's input size like every family (`ImagePreprocessing.train_transform`, with
    the checkpoint's interpolation, mean and std). The other fields describe the center-crop evaluation.

    Attributes:
        data_config: the timm data config (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`).
    """

    data_config: dict[str, Any] | None = None

    @classmethod
    def from_data_config(cls, data_config: dict[str, Any]) -> TimmPreprocessing:
        """Read `input_size`, `interpolation`, `crop_pct`, `mean` and `std` of a timm data config."""
        _, height, width = (int(v) for v in data_config["input_size"])
        name = str(data_config.get("interpolation", "bicubic"))
        if name not in _TIMM_INTERPOLATION:
            raise ValueError(
                f"Unknown interpolation {name!r} in the timm checkpoint's pretrained_cfg; expected one of "
                f"{sorted(_TIMM_INTERPOLATION)}."
            )
        crop_pct = float(data_config.get("crop_pct") or 1.0)
        return cls(
            input_size=(height, width),
            resize=math.floor(min(height, width) / crop_pct),
            center_crop=True,
            interpolation=_TIMM_INTERPOLATION[name],
            mean=tuple(float(m) for m in data_config["mean"]),
            std=tuple(float(s) for s in data_config["std"]),
            data_config=dict(data_config),
        )

    def eval_transform(self) -> T.Compose:
        """PIL image (any mode) -> `(3, H, W)` float tensor: RGB, then timm's eval transform of the data config."""
        from timm.data import create_transform

        return T.Compose([ToRGB(), create_transform(**self.data_config, is_training=False)])


def processor_transforms(
    processor: Any, augmentation: str = "none"
) -> tuple[Callable[[PILImage.Image], torch.Tensor], T.Compose]:
    """(training transform, evaluation transform) for a model's image processor, both at its input size.

    Evaluation resizes and center-crops as the processor does, with its resample filter, mean and std, so its output
    equals `processor(image, do_convert_rgb=True)`; training crops to the same input size. Both pickle (no lambdas),
    so they work in spawned data-loader workers.
    """
    preprocessing = ImagePreprocessing.from_processor(processor)
    return preprocessing.train_transform(augmentation), preprocessing.eval_transform()


def prepare_processor(processor: Any) -> Any:
    """Make the image processor saved with a model preprocess exactly as training evaluated (in place; returned).

    `do_convert_rgb` is switched on, so `processor(images)` accepts grayscale, RGBA and CMYK images as training did; a
    processor that resizes the shorter edge without cropping gets the square center crop that evaluation uses. A
    timm checkpoint's `TimmWrapperImageProcessor` is left as it is: it is the checkpoint's `pretrained_cfg`, saved in
    the model's config.json (a `pipeline` converts images to RGB before it).
    """
    preprocessing = ImagePreprocessing.from_processor(processor)
    if isinstance(preprocessing, TimmPreprocessing):
        return processor
    processor.do_convert_rgb = True
    if preprocessing.center_crop and not getattr(processor, "do_center_crop", False):
        height, width = preprocessing.input_size
        processor.do_center_crop = True
        processor.crop_size = {"height": height, "width": width}
    return processor


def model_input_size(processor: Any) -> tuple[int, int]:
    """(height, width) of the images the model receives: the processor's crop size when it center-crops, else its
    resize size (a DeiT checkpoint's processor resizes to 256 and crops to 224: the model sees 224)."""
    return ImagePreprocessing.from_processor(processor).input_size


def _deit_train_transform(
    input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], interpolation: T.InterpolationMode
) -> Callable[[PILImage.Image], torch.Tensor]:
    """The `deit` training pipeline (the one place it is built): DeiT's own timm transform, RandAugment
    `rand-m9-mstd0.5-inc1` and pixel-mode random erasing (`diverse_vit_hf.data.augmentation.deit_train_transform`).
    `interpolation` is not used: DeiT trains with bicubic (`--train-interpolation bicubic`) whatever the checkpoint's
    processor resamples with."""
    return deit_train_transform(input_size, mean, std)


def build_image_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augmentation: str = "none",
    crop_pct: float = DEIT_EVAL_CROP_PCT,
) -> T.Compose:
    """A transform from explicit sizes (no image processor): PIL image (any mode) -> normalised `(3, H, W)` tensor.

    Prefer `processor_transforms`, which follows a checkpoint's image processor. Here evaluation resizes straight to
    `image_size` (bicubic), except `augmentation="deit"`, whose evaluation resizes the shorter edge to
    `image_size / crop_pct` and center-crops (DeiT's evaluation).

    Args:
        image_size: model input size, int or (height, width).
        mean, std: normalisation of the model's image processor.
        train: training (random) or evaluation (deterministic) pipeline.
        augmentation: `"none"`, `"light"` or `"deit"` (see `ImagePreprocessing.train_transform`).
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    deit_eval = augmentation == "deit" and not train
    preprocessing = ImagePreprocessing(
        input_size=size,
        resize=round(size[0] / crop_pct) if deit_eval else size,
        center_crop=deit_eval,
        interpolation=T.InterpolationMode.BICUBIC,
        mean=tuple(mean),
        std=tuple(std),
    )
    return preprocessing.train_transform(augmentation) if train else preprocessing.eval_transform()


def image_size_from_processor(processor: Any) -> tuple[int, int]:
    """(height, width) of the model's input under this processor (alias of `model_input_size`)."""
    return model_input_size(processor)


__all__ = [
    "AUGMENTATIONS",
    "ImagePreprocessing",
    "TimmPreprocessing",
    "build_image_transform",
    "image_size_from_processor",
    "model_input_size",
    "prepare_processor",
    "processor_transforms",
    "timm_data_config",
]
