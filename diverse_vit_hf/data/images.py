"""Decoding and converting single images: one cell of an image column to a PIL image that names its file when it
cannot be decoded, and any PIL mode to RGB."""

from __future__ import annotations

import os
from typing import Any

from datasets import Image
from PIL import Image as PILImage


class ToRGB:
    """PIL image of any mode -> RGB, compositing transparency onto white as transformers' `convert_to_rgb` does (the
    image processors' `do_convert_rgb`). A class, not a lambda: transforms must pickle into spawned data-loader
    workers."""

    def __call__(self, image: PILImage.Image) -> PILImage.Image:
        if image.mode == "RGB":
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PILImage.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UnreadableImageError(ValueError):
    """An image file of the dataset cannot be decoded (corrupt, truncated, not an image, or a decompression bomb)."""


def describe_image(value: Any) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    return f"image file {os.fspath(path)!r}" if path else "an image stored as bytes in the dataset (no file path)"


def open_image(value: Any) -> PILImage.Image:
    """Decode one cell of an image column, naming the file when it cannot be decoded.

    Args:
        value: a PIL image (already decoded), a `{"bytes", "path"}` dict (an `Image(decode=False)` column), or a path.

    Returns:
        The decoded PIL image, exactly as `datasets.Image().decode_example` returns it (EXIF orientation applied).

    Raises:
        UnreadableImageError: the file is corrupt, truncated, not an image, or larger than PIL's decompression-bomb
            limit. `datasets` would raise a bare PIL error deep inside a data-loader worker, without the path.
    """
    if isinstance(value, PILImage.Image):
        return value
    try:
        # decode_example calls `image.load()`, so a truncated file fails here and not later inside a transform.
        return Image().decode_example(value)
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as error:
        raise UnreadableImageError(
            f"Cannot decode {describe_image(value)}: {type(error).__name__}: {error}. Remove or replace the file, or "
            "pass --corrupt_images skip to leave unreadable images out of training and evaluation."
        ) from error


__all__ = ["ToRGB", "UnreadableImageError", "describe_image", "open_image"]
