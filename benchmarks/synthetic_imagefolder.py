#!/usr/bin/env python
"""Write a synthetic image-classification folder (datasets' `imagefolder` layout) of random JPEG images.

For throughput runs of `examples/run_diverse.py` where no real data set can be reached (a lent GPU machine has no
network): the images go through exactly the pipeline an ImageNet folder does (JPEG decoding, the DeiT
augmentation, the collator). The pixels are torchvision's `FakeData` (random noise), so accuracy means nothing.

    python benchmarks/synthetic_imagefolder.py --output /tmp/synthetic --num_train 4096 --num_val 512
    python examples/run_diverse.py --model_config_name deit-small \\
        --train_dir /tmp/synthetic/train --validation_dir /tmp/synthetic/val --augmentation deit ...

The folder is written under a temporary name next to `--output` and renamed into place once complete, so an
interrupted run never leaves a half-written data set behind; an existing `--output` is refused.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from torchvision.datasets import FakeData


def write_split(folder: Path, num_images: int, num_classes: int, image_size: int, seed: int) -> None:
    """`num_images` JPEGs of `image_size` px in `folder/class_XXX/`, image i in class i mod `num_classes` (every
    class gets images, so the train and validation splits name the same classes)."""
    pixels = FakeData(size=num_images, image_size=(3, image_size, image_size), random_offset=seed)
    for name in range(num_classes):
        (folder / f"class_{name:03d}").mkdir(parents=True)
    for index in range(num_images):
        image, _ = pixels[index]
        image.save(folder / f"class_{index % num_classes:03d}" / f"{index:06d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder to create (with train/ and val/)")
    parser.add_argument("--num_train", type=int, default=4096, help="training images")
    parser.add_argument("--num_val", type=int, default=512, help="validation images")
    parser.add_argument("--num_classes", type=int, default=100, help="classes (sub-folders per split)")
    parser.add_argument("--image_size", type=int, default=256, help="side of the square images in pixels")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "num_classes", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_classes < 2:
        parser.error("--num_classes must be >= 2 (Mixup/CutMix and top-k accuracy need two classes)")
    if min(args.num_train, args.num_val) < args.num_classes:
        parser.error(
            f"--num_train and --num_val must be >= --num_classes ({args.num_classes}) so that every class has images "
            f"in both splits, got {args.num_train} and {args.num_val}"
        )
    output = args.output.resolve()
    if output.exists():
        parser.error(f"--output {output} exists already: remove it or choose another folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        write_split(staging / "train", args.num_train, args.num_classes, args.image_size, seed=0)
        # A different offset: FakeData's image i is seeded by offset + i, so the validation images are new ones.
        write_split(staging / "val", args.num_val, args.num_classes, args.image_size, seed=args.num_train)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(
        f"Wrote {args.num_train} training and {args.num_val} validation images ({args.num_classes} classes) to {output}"
    )
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
