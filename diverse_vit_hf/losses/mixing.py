"""Patch-level Mixup / CutMix (method 1c: `docs/method.md`, §1c).

Batch-mode mixing as in the DeiT recipe (one lambda and one box per batch; sample b is mixed with sample
B-1-b, so odd batch sizes work), producing both the image-level soft targets and one soft target per patch:
with CutMix a patch's label is mixed by the exact fraction of its pixels that come from each image; with
Mixup every patch gets the image-level label. Works for any image size, patch size and device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MixedBatch:
    """Output of `PatchMixupCutmix`: the mixed images and their targets in two-label form.

    Every target is a mix of two smoothed one-hot labels, that of the original image (`labels`) and that of its
    partner (`partner_labels`), with the weight of the original's label per patch in `patch_weights`. The `(B, P, C)`
    per-patch probabilities are only built when asked for (`patch_targets`): `patch_mixing_loss_two_label` computes
    the same loss from the two labels without them.

    Attributes:
        pixel_values: `(B, C, H, W)` mixed images.
        targets: `(B, num_classes)` image-level soft targets (label smoothing applied before mixing).
        lam: weight of the original image in the mix (box-area corrected for CutMix; 1.0 when not mixed).
        mode: `"mixup"`, `"cutmix"` or `"none"`.
        labels: `(B,)` class indices of the original images.
        partner_labels: `(B,)` class indices of the images mixed in (the batch reversed; `labels` when not mixed).
        patch_weights: `(P,)` float32 weight of `labels` in each patch's target, patches in row-major order as ViT
            flattens them (CutMix: the patch's pixel fraction outside the box; Mixup: `lam`; not mixed: 1).
        label_smoothing: the smoothing applied to each one-hot label before mixing.
    """

    pixel_values: torch.Tensor
    targets: torch.Tensor
    lam: float
    mode: str
    labels: torch.Tensor
    partner_labels: torch.Tensor
    patch_weights: torch.Tensor
    label_smoothing: float

    @property
    def patch_targets(self) -> torch.Tensor:
        """`(B, P, num_classes)` per-patch soft targets (built on each access)."""
        if self.mode != "cutmix":  # not mixed, or Mixup: every patch carries the image-level target
            return self.targets.unsqueeze(1).expand(-1, self.patch_weights.shape[0], -1).contiguous()
        num_classes = self.targets.shape[-1]
        own = smoothed_one_hot(self.labels, num_classes, self.label_smoothing).unsqueeze(1)
        partner = smoothed_one_hot(self.partner_labels, num_classes, self.label_smoothing).unsqueeze(1)
        weights = self.patch_weights.view(1, -1, 1)
        return weights * own + (1.0 - weights) * partner


def unmixed_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, num_classes: int, num_patches: int, label_smoothing: float
) -> MixedBatch:
    """A batch that is not mixed, in `MixedBatch` form (smoothed targets, every patch with the image's label)."""
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    weights = torch.ones(num_patches, device=labels.device, dtype=torch.float32)
    return MixedBatch(pixel_values, targets, 1.0, "none", labels, labels, weights, label_smoothing)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """`(B,)` class indices -> `(B, num_classes)` float32 targets: `1 - smoothing + smoothing/C` on the label."""
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"`labels` must be a 1-d tensor of class indices, got dtype {labels.dtype} shape {tuple(labels.shape)}."
        )
    # The range check reads the values on the host: free for CPU tensors, a sync on accelerators, where an
    # out-of-range label is instead caught once per dataset (DiverseTrainer checks the label feature).
    if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Labels must lie in [0, {num_classes - 1}] for a model with {num_classes} classes; got values in "
            f"[{int(labels.min())}, {int(labels.max())}]. Check the dataset's label column and the model's num_labels."
        )
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """Random box covering about `1 - lam` of an image (timm's `rand_bbox`), clipped to the image.

    Returns:
        `(top, bottom, left, right)` pixel bounds, bottom/right exclusive.
    """
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    center_y = int(torch.randint(0, height, (1,), generator=generator))
    center_x = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
    left, right = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
    return top, bottom, left, right


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def check_patch_grid(height: int, width: int, patch_size: int | Sequence[int]) -> tuple[int, int]:
    """Validate that an image tiles exactly into patches; returns the `(rows, cols)` patch grid."""
    patch_h, patch_w = _pair(patch_size)
    if height < patch_h or width < patch_w:
        raise ValueError(
            f"Images of {height}x{width} pixels are smaller than one {patch_h}x{patch_w} patch. "
            "Resize the images (e.g. with the model's image processor) or use a model with smaller patches."
        )
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}. Resize or crop "
            f"the images to a multiple, e.g. {height - height % patch_h}x{width - width % patch_w}."
        )
    return height // patch_h, width // patch_w


def patch_keep_fractions(
    height: int,
    width: int,
    box: tuple[int, int, int, int],
    patch_size: int | Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Exact fraction of each patch's pixels that lie outside a CutMix box (i.e. come from the original image).

    Returns:
        `(P,)` float32 fractions in row-major patch order.
    """
    rows, cols = check_patch_grid(height, width, patch_size)
    patch_h, patch_w = _pair(patch_size)
    top, bottom, left, right = box
    inside = torch.zeros(height, width, device=device, dtype=torch.float32)
    inside[top:bottom, left:right] = 1.0
    inside_fraction = inside.view(rows, patch_h, cols, patch_w).mean(dim=(1, 3))
    return (1.0 - inside_fraction).flatten()


class PatchMixupCutmix:
    """Batch Mixup/CutMix with per-patch targets (DeiT recipe: mixup 0.8, cutmix 1.0, switch 0.5, prob 1.0).

    Randomness comes from torch's global CPU generator, so `torch.manual_seed` and the Trainer's checkpointed
    RNG state make it reproducible.

    Args:
        num_classes: number of classes C.
        patch_size: the model's patch size (int or (h, w)).
        mixup_alpha: Beta parameter of Mixup; 0 disables it.
        cutmix_alpha: Beta parameter of CutMix; 0 disables it.
        switch_prob: probability of CutMix when both are enabled.
        prob: probability that a batch is mixed at all.
        label_smoothing: smoothing applied to each one-hot label before mixing.
    """

    def __init__(
        self,
        num_classes: int,
        patch_size: int | Sequence[int],
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        label_smoothing: float = 0.1,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"Mixing needs at least 2 classes, got num_classes={num_classes}.")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"Mixup/CutMix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}.")
        if not (0 <= switch_prob <= 1 and 0 <= prob <= 1):
            raise ValueError(f"`switch_prob` and `prob` must lie in [0, 1], got {switch_prob} and {prob}.")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"`label_smoothing` must lie in [0, 1), got {label_smoothing}.")
        self.num_classes = num_classes
        self.patch_size = _pair(patch_size)
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.prob = prob
        self.label_smoothing = label_smoothing

    @staticmethod
    def _uniform() -> float:
        return float(torch.rand(()))

    @staticmethod
    def _beta(alpha: float) -> float:
        return float(torch.distributions.Beta(float(alpha), float(alpha)).sample())

    def _choose(self) -> tuple[str, float]:
        if self._uniform() >= self.prob:
            return "none", 1.0
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self._uniform() < self.switch_prob)
        if use_cutmix:
            return "cutmix", self._beta(self.cutmix_alpha)
        if self.mixup_alpha > 0:
            return "mixup", self._beta(self.mixup_alpha)
        return "none", 1.0

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> MixedBatch:
        """Mix a batch.

        Args:
            pixel_values: `(B, C, H, W)` images, H and W multiples of the patch size.
            labels: `(B,)` class indices.

        Returns:
            A `MixedBatch`; the input tensors are not modified.
        """
        if pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        batch, _, height, width = pixel_values.shape
        if labels.shape != (batch,):
            raise ValueError(f"`labels` must have shape ({batch},) to match the images, got {tuple(labels.shape)}.")
        rows, cols = check_patch_grid(height, width, self.patch_size)
        num_patches = rows * cols
        mode, lam = self._choose()
        if mode != "none" and batch < 2:
            raise ValueError(
                "Mixup/CutMix needs at least 2 images per batch (each image is mixed with another one), got a batch "
                "of 1. Increase the per-device batch size, or pass --no_mixing."
            )
        if mode == "none":
            return unmixed_batch(pixel_values, labels, self.num_classes, num_patches, self.label_smoothing)
        targets = smoothed_one_hot(labels, self.num_classes, self.label_smoothing)
        partner_images, partner_labels = pixel_values.flip(0), labels.flip(0)
        partner_targets = targets.flip(0)
        if mode == "mixup":
            mixed = pixel_values * lam + partner_images * (1.0 - lam)
            image_targets = targets * lam + partner_targets * (1.0 - lam)
            weights = torch.full((num_patches,), lam, device=labels.device, dtype=torch.float32)
        else:
            top, bottom, left, right = cutmix_box(height, width, lam)
            mixed = pixel_values.clone()
            mixed[:, :, top:bottom, left:right] = partner_images[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
            image_targets = targets * lam + partner_targets * (1.0 - lam)
            weights = patch_keep_fractions(height, width, (top, bottom, left, right), self.patch_size, labels.device)
        return MixedBatch(mixed, image_targets, lam, mode, labels, partner_labels, weights, self.label_smoothing)


class PatchMixCollator:
    """A `data_collator` that stacks examples and mixes them with a `PatchMixupCutmix`.

    Examples are dicts with `pixel_values` `(C, H, W)` and an integer `labels`. The batch it returns has
    `pixel_values`, `labels` (`(B, C)` soft targets) and `patch_labels` (`(B, P, C)`), which `DiverseTrainer`
    uses as they are. Use it for custom loops or CPU-side mixing in data-loader workers; `DiverseTrainer`
    otherwise mixes training batches itself, on the device, and leaves evaluation batches alone.
    """

    def __init__(self, mixer: PatchMixupCutmix, base_collator: Callable[[list[Any]], dict[str, Any]] | None = None):
        self.mixer = mixer
        self.base_collator = base_collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.base_collator is not None:
            batch = self.base_collator(examples)
        else:
            batch = {
                "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
                "labels": torch.tensor([int(e["labels"]) for e in examples]),
            }
        mixed = self.mixer(batch["pixel_values"], batch["labels"])
        return {"pixel_values": mixed.pixel_values, "labels": mixed.targets, "patch_labels": mixed.patch_targets}


__all__ = [
    "MixedBatch",
    "PatchMixCollator",
    "PatchMixupCutmix",
    "check_patch_grid",
    "cutmix_box",
    "patch_keep_fractions",
    "smoothed_one_hot",
    "unmixed_batch",
]
