"""Worker of tests/trainer/test_distributed_training.py, started by torchrun: trains a tiny diversified ViT for a few
steps and writes the random draws this process made (Mixup/CutMix choice and lambda, drop-path masks) to
`<out>/draws-<rank>.json`.

    torchrun --nproc_per_node 2 tests/workers/distributed_draws.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fixtures package
from fixtures.builders import build_trainer, make_args

from diverse_vit_hf.models.modeling import BranchDropout
from diverse_vit_hf.utils.distributed import end_process_group


def main(out: Path) -> None:
    # No use_cpu: on a machine without a GPU, DiverseTrainingArguments must set up DDP over gloo by itself.
    args = make_args(out, use_cpu=False, max_steps=4, per_device_train_batch_size=4, logging_steps=1)
    trainer = build_trainer(args, dataset_size=64)
    trainer.accelerator.unwrap_model(trainer.model).set_drop_path_rate(0.5)
    mixes: list[list] = []
    choose = trainer.mixer._choose

    def recording_choose() -> tuple[str, float]:
        mode, lam = choose()
        mixes.append([mode, lam])
        return mode, lam

    trainer.mixer._choose = recording_choose
    masks: list[list[bool]] = []

    def record_mask(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        if module.training:
            masks.append((output.flatten(1) == 0).all(dim=1).tolist())

    for module in trainer.model.modules():
        if isinstance(module, BranchDropout):
            module.register_forward_hook(record_mask)
    trainer.train()
    draws = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode),
        "mixes": mixes,
        "drop_path_masks": masks,
    }
    (out / f"draws-{args.process_index}.json").write_text(json.dumps(draws))
    end_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
