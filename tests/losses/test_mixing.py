"""Tests of `diverse_vit_hf.losses.mixing`: smoothed targets, exact per-patch CutMix fractions, batch mixing.

References are independent: pixel-counting loops for the patch fractions, the CutMix box recovered from the
mixed pixels themselves, and explicit per-sample loops over the partner `B - 1 - b`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diverse_vit_hf.losses.mixing import (
    MixedBatch,
    PatchMixCollator,
    PatchMixupCutmix,
    check_patch_grid,
    patch_keep_fractions,
    smoothed_one_hot,
)

# --------------------------------------------------------------------------------------------------------------
# Independent references.
# --------------------------------------------------------------------------------------------------------------


def ref_smoothed(labels: list[int], num_classes: int, eps: float) -> torch.Tensor:
    rows = []
    for label in labels:
        rows.append([(1.0 - eps) * (c == label) + eps / num_classes for c in range(num_classes)])
    return torch.tensor(rows, dtype=torch.float64)


def ref_keep_fractions(height: int, width: int, box: tuple[int, int, int, int], patch: tuple[int, int]) -> list[float]:
    """Row-major list of the fraction of each patch's pixels outside the box, by counting pixels one by one."""
    top, bottom, left, right = box
    patch_h, patch_w = patch
    fractions = []
    for r in range(height // patch_h):
        for c in range(width // patch_w):
            outside = 0
            for y in range(r * patch_h, (r + 1) * patch_h):
                for x in range(c * patch_w, (c + 1) * patch_w):
                    if not (top <= y < bottom and left <= x < right):
                        outside += 1
            fractions.append(outside / (patch_h * patch_w))
    return fractions


def recover_box(original: torch.Tensor, mixed: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The CutMix box, read off the pixels that changed; checks that the changed region is one rectangle."""
    changed = (original != mixed).any(dim=1).any(dim=0)  # (H, W), union over samples and channels
    if not changed.any():
        return None
    rows = torch.nonzero(changed.any(dim=1)).flatten()
    cols = torch.nonzero(changed.any(dim=0)).flatten()
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    rectangle = torch.zeros_like(changed)
    rectangle[top:bottom, left:right] = True
    assert torch.equal(changed, rectangle), "the changed pixels do not form one rectangle"
    return top, bottom, left, right


def _close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


# --------------------------------------------------------------------------------------------------------------
# smoothed_one_hot
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothed_one_hot_values(eps):
    labels = [0, 4, 2, 4, 6]
    out = smoothed_one_hot(torch.tensor(labels), 7, eps)
    assert out.shape == (5, 7) and out.dtype == torch.float32
    _close(out, ref_smoothed(labels, 7, eps))
    for row, label in zip(out, labels, strict=True):
        _close(row[label], 1 - eps + eps / 7)
        _close(torch.cat([row[:label], row[label + 1 :]]), torch.full((6,), eps / 7))
    _close(out.sum(dim=1), torch.ones(5))


def test_smoothed_one_hot_errors():
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        smoothed_one_hot(torch.tensor([0, 5]), 5, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        smoothed_one_hot(torch.tensor([-1, 2]), 5, 0.1)
    with pytest.raises(ValueError, match="class indices"):
        smoothed_one_hot(torch.tensor([0.0, 1.0]), 5)
    with pytest.raises(ValueError, match="class indices"):
        smoothed_one_hot(torch.tensor([[0, 1]]), 5)
    assert smoothed_one_hot(torch.tensor([], dtype=torch.long), 5).shape == (0, 5)


# --------------------------------------------------------------------------------------------------------------
# patch_keep_fractions
# --------------------------------------------------------------------------------------------------------------

BOX_CASES = [
    # (height, width, patch_size, box)
    (16, 16, 4, (3, 11, 5, 14)),
    (16, 16, 4, (0, 16, 0, 16)),  # full box: nothing kept
    (16, 16, 4, (7, 7, 2, 9)),  # empty box: everything kept
    (16, 16, 4, (0, 0, 0, 0)),
    (16, 16, 4, (4, 12, 8, 12)),  # aligned with the patch grid
    (32, 48, 8, (0, 13, 0, 29)),  # touching top-left border
    (32, 48, 8, (19, 32, 30, 48)),  # touching bottom-right border
    (32, 48, 8, (5, 27, 11, 45)),
    (32, 48, 8, (0, 32, 17, 18)),  # one-pixel-wide column spanning the height
    (16, 32, (4, 8), (1, 14, 3, 30)),  # non-square patches
    (16, 32, (4, 8), (0, 5, 25, 32)),
    (24, 16, (8, 4), (9, 24, 0, 7)),
]


@pytest.mark.parametrize(("height", "width", "patch", "box"), BOX_CASES)
def test_patch_keep_fractions_match_pixel_count(height, width, patch, box):
    patch_hw = (patch, patch) if isinstance(patch, int) else patch
    out = patch_keep_fractions(height, width, box, patch)
    expected = ref_keep_fractions(height, width, box, patch_hw)
    assert out.shape == (len(expected),) and out.dtype == torch.float32
    _close(out, expected)
    # Area bookkeeping: the mean kept fraction is 1 - box area / image area.
    top, bottom, left, right = box
    _close(out.mean(), 1 - max(bottom - top, 0) * max(right - left, 0) / (height * width))


def test_patch_keep_fractions_special_boxes():
    assert torch.equal(patch_keep_fractions(32, 48, (0, 32, 0, 48), 8), torch.zeros(24))
    assert torch.equal(patch_keep_fractions(32, 48, (10, 10, 0, 48), 8), torch.ones(24))
    # Row-major order: a box covering exactly patch (row 1, col 2) of a 4 x 6 grid zeroes entry 1 * 6 + 2.
    out = patch_keep_fractions(32, 48, (8, 16, 16, 24), 8)
    expected = torch.ones(24)
    expected[8] = 0.0
    assert torch.equal(out, expected)
    # Same for a (4, 8) patch on a 16 x 32 image (grid 4 x 4): patch (2, 3) is entry 11.
    out = patch_keep_fractions(16, 32, (8, 12, 24, 32), (4, 8))
    expected = torch.ones(16)
    expected[11] = 0.0
    assert torch.equal(out, expected)


def test_patch_keep_fractions_errors_and_grid():
    assert check_patch_grid(32, 48, 8) == (4, 6)
    assert check_patch_grid(16, 32, (4, 8)) == (4, 4)
    with pytest.raises(ValueError, match="multiple"):
        patch_keep_fractions(30, 48, (0, 1, 0, 1), 8)
    with pytest.raises(ValueError, match="smaller"):
        patch_keep_fractions(4, 48, (0, 1, 0, 1), 8)


# --------------------------------------------------------------------------------------------------------------
# PatchMixupCutmix
# --------------------------------------------------------------------------------------------------------------


def _batch(batch: int, height: int, width: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return images, labels


CUTMIX_CASES = [(2, 32, 48, 8), (3, 32, 48, 8), (5, 16, 16, 4), (3, 16, 32, (4, 8))]


@pytest.mark.parametrize(("batch", "height", "width", "patch"), CUTMIX_CASES)
def test_cutmix(batch, height, width, patch):
    num_classes, eps = 6, 0.1
    patch_hw = (patch, patch) if isinstance(patch, int) else patch
    num_patches = (height // patch_hw[0]) * (width // patch_hw[1])
    mixer = PatchMixupCutmix(num_classes, patch, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=eps)
    nonempty = 0
    for seed in range(8):
        images, labels = _batch(batch, height, width, num_classes, seed)
        original = images.clone()
        torch.manual_seed(seed)
        out = mixer(images, labels)
        assert isinstance(out, MixedBatch) and out.mode == "cutmix"
        assert torch.equal(images, original), "the input images were modified"
        assert out.pixel_values.shape == images.shape
        assert out.targets.shape == (batch, num_classes)
        assert out.patch_targets.shape == (batch, num_patches, num_classes)

        box = recover_box(original, out.pixel_values)
        if box is None:  # the box came out empty (lam close to 1): nothing is mixed
            assert out.lam == 1.0
            box = (0, 0, 0, 0)
        else:
            nonempty += 1
        top, bottom, left, right = box
        area = (bottom - top) * (right - left)
        lam = 1.0 - area / (height * width)
        assert out.lam == pytest.approx(lam, abs=1e-9)

        y = ref_smoothed(labels.tolist(), num_classes, eps)
        keep = ref_keep_fractions(height, width, box, patch_hw)
        assert sum(keep) / len(keep) == pytest.approx(lam, abs=1e-9)
        for b in range(batch):
            partner = batch - 1 - b
            inside = out.pixel_values[b, :, top:bottom, left:right]
            assert torch.equal(inside, original[partner, :, top:bottom, left:right])
            outside = torch.ones(height, width, dtype=torch.bool)
            outside[top:bottom, left:right] = False
            assert torch.equal(out.pixel_values[b][:, outside], original[b][:, outside])
            _close(out.targets[b], lam * y[b] + (1 - lam) * y[partner])
            for p in range(num_patches):
                _close(out.patch_targets[b, p], keep[p] * y[b] + (1 - keep[p]) * y[partner])
        _close(out.targets.sum(dim=-1), torch.ones(batch))
        _close(out.patch_targets.sum(dim=-1), torch.ones(batch, num_patches))
        assert out.pixel_values.device == images.device == out.targets.device == out.patch_targets.device
        assert out.targets.dtype == out.patch_targets.dtype == torch.float32
    assert nonempty >= 4  # the checks above were exercised on real boxes


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_mixup(batch):
    num_classes, eps, height, width = 5, 0.1, 16, 24
    mixer = PatchMixupCutmix(num_classes, 8, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=eps)
    lams = []
    for seed in range(4):
        images, labels = _batch(batch, height, width, num_classes, 100 + seed)
        original = images.clone()
        torch.manual_seed(seed)
        out = mixer(images, labels)
        assert out.mode == "mixup"
        assert torch.equal(images, original)
        lam = out.lam
        assert 0.0 < lam < 1.0
        lams.append(lam)
        y = ref_smoothed(labels.tolist(), num_classes, eps)
        for b in range(batch):
            partner = batch - 1 - b
            _close(out.pixel_values[b], lam * original[b] + (1 - lam) * original[partner])
            if partner != b:
                # lam read back from the pixels themselves
                ratio = (out.pixel_values[b] - original[partner]) / (original[b] - original[partner])
                assert float(ratio.median()) == pytest.approx(lam, rel=1e-3)
            _close(out.targets[b], lam * y[b] + (1 - lam) * y[partner])
            for p in range(out.patch_targets.shape[1]):
                _close(out.patch_targets[b, p], out.targets[b])
        assert out.patch_targets.shape == (batch, 6, num_classes)
        _close(out.targets.sum(dim=-1), torch.ones(batch))
        _close(out.patch_targets.sum(dim=-1), torch.ones(batch, 6))
    assert len(set(lams)) > 1


def test_no_mixing_when_prob_zero_or_both_alphas_zero():
    images, labels = _batch(3, 16, 16, 4, 0)
    for mixer in (
        PatchMixupCutmix(4, 8, prob=0.0, label_smoothing=0.2),
        PatchMixupCutmix(4, 8, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.2),
    ):
        for seed in range(3):
            torch.manual_seed(seed)
            out = mixer(images, labels)
            assert out.mode == "none" and out.lam == 1.0
            assert torch.equal(out.pixel_values, images)
            y = ref_smoothed(labels.tolist(), 4, 0.2)
            _close(out.targets, y)
            _close(out.patch_targets, y.unsqueeze(1).expand(3, 4, 4))
    # A batch of one is fine when nothing is mixed.
    out = PatchMixupCutmix(4, 8, prob=0.0)(images[:1], labels[:1])
    assert out.mode == "none" and out.patch_targets.shape == (1, 4, 4)


def test_switch_prob_selects_the_mode():
    images, labels = _batch(2, 16, 16, 4, 1)
    modes = {}
    for switch in (0.0, 1.0, 0.5):
        mixer = PatchMixupCutmix(4, 8, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch)
        seen = []
        for seed in range(40):
            torch.manual_seed(seed)
            seen.append(mixer(images, labels).mode)
        modes[switch] = seen
    assert set(modes[0.0]) == {"mixup"}
    assert set(modes[1.0]) == {"cutmix"}
    assert 5 < modes[0.5].count("cutmix") < 35 and modes[0.5].count("cutmix") + modes[0.5].count("mixup") == 40
    # prob=0.5: about half of the batches are left alone.
    mixer = PatchMixupCutmix(4, 8, prob=0.5)
    seen = []
    for seed in range(40):
        torch.manual_seed(seed)
        seen.append(mixer(images, labels).mode)
    assert 5 < seen.count("none") < 35 and set(seen) == {"none", "mixup", "cutmix"}


def test_reproducible_under_manual_seed():
    images, labels = _batch(4, 16, 32, 5, 3)
    mixer = PatchMixupCutmix(5, 8)  # DeiT defaults: both enabled, switched 50/50
    results = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        results.append([mixer(images, labels) for _ in range(3)])
    for first, second in zip(results[0], results[1], strict=True):
        assert first.mode == second.mode and first.lam == second.lam
        assert torch.equal(first.pixel_values, second.pixel_values)
        assert torch.equal(first.targets, second.targets)
        assert torch.equal(first.patch_targets, second.patch_targets)
    assert any(not torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(results[0], results[2], strict=True)), (
        "different seeds gave identical batches"
    )


def test_mixer_errors():
    mixer = PatchMixupCutmix(4, 8)
    images, labels = _batch(1, 16, 16, 4, 0)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="--no_mixing"):
        mixer(images, labels)
    images, labels = _batch(2, 16, 16, 4, 0)
    with pytest.raises(ValueError, match="multiple"):
        mixer(images[:, :, :12], labels)
    with pytest.raises(ValueError, match="multiple"):
        PatchMixupCutmix(4, (4, 8))(images[:, :, :, :12], labels)
    with pytest.raises(ValueError, match="smaller"):
        mixer(images[:, :, :4, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        mixer(images, labels.view(2, 1))
    with pytest.raises(ValueError, match="labels"):
        mixer(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pixel_values"):
        mixer(images[0], labels)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        mixer(images, torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        PatchMixupCutmix(1, 8)
    with pytest.raises(ValueError):
        PatchMixupCutmix(4, 8, mixup_alpha=-1.0)
    with pytest.raises(ValueError):
        PatchMixupCutmix(4, 8, prob=1.5)
    with pytest.raises(ValueError):
        PatchMixupCutmix(4, 8, label_smoothing=1.0)


# --------------------------------------------------------------------------------------------------------------
# PatchMixCollator
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", [True, False])
def test_collator(mixing):
    num_classes = 5
    gen = torch.Generator().manual_seed(0)
    examples = [{"pixel_values": torch.rand(3, 16, 24, generator=gen), "labels": i % num_classes} for i in range(3)]
    examples[1]["pixel_values"] = examples[1]["pixel_values"].numpy()  # array-like inputs are accepted
    examples[2]["labels"] = np.int64(4)
    mixer = PatchMixupCutmix(num_classes, 8, prob=1.0 if mixing else 0.0, label_smoothing=0.1)
    torch.manual_seed(0)
    batch = PatchMixCollator(mixer)(examples)
    assert set(batch) == {"pixel_values", "labels", "patch_labels"}
    assert batch["pixel_values"].shape == (3, 3, 16, 24)
    assert batch["labels"].shape == (3, num_classes)
    assert batch["patch_labels"].shape == (3, 6, num_classes)
    _close(batch["labels"].sum(-1), torch.ones(3))
    _close(batch["patch_labels"].sum(-1), torch.ones(3, 6))
    if not mixing:
        _close(batch["labels"], ref_smoothed([0, 1, 4], num_classes, 0.1))
        stacked = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
        assert torch.equal(batch["pixel_values"], stacked)


def test_collator_with_base_collator():
    calls = []

    def base(examples):
        calls.append(len(examples))
        return {
            "pixel_values": torch.stack([e["img"] for e in examples]),
            "labels": torch.tensor([e["y"] for e in examples]),
        }

    examples = [{"img": torch.rand(3, 8, 8), "y": y} for y in (0, 1, 1, 2)]
    torch.manual_seed(1)
    batch = PatchMixCollator(PatchMixupCutmix(3, 4), base_collator=base)(examples)
    assert calls == [4]
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["labels"].shape == (4, 3) and batch["patch_labels"].shape == (4, 4, 3)


@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha", "prob"), [(0.0, 1.0, 1.0), (0.8, 0.0, 1.0), (0.8, 1.0, 0.0)])
def test_outputs_stay_on_the_input_device_meta(mixup_alpha, cutmix_alpha, prob):
    # The 'meta' device stands in for an accelerator: nothing may be created on (or moved to) the CPU.
    mixer = PatchMixupCutmix(5, (4, 8), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob)
    images = torch.empty(3, 3, 8, 16, device="meta")
    labels = torch.empty(3, dtype=torch.long, device="meta")
    torch.manual_seed(0)
    out = mixer(images, labels)
    assert (
        out.mode
        == {(0.0, 1.0, 1.0): "cutmix", (0.8, 0.0, 1.0): "mixup", (0.8, 1.0, 0.0): "none"}[
            (mixup_alpha, cutmix_alpha, prob)
        ]
    )
    for tensor in (out.pixel_values, out.targets, out.patch_targets):
        assert tensor.device.type == "meta"
    assert out.pixel_values.shape == (3, 3, 8, 16)
    assert out.targets.shape == (3, 5) and out.patch_targets.shape == (3, 4, 5)
