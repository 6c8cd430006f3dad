"""`DiverseTrainer`: the Diverse-ViT objective (`DiversityObjective`) on top of HF `Trainer`.

`compute_loss` returns the objective's per-micro-batch mean and the class sets `loss_is_scaled_for_ga = False`, so the
Trainer divides it by the gradient-accumulation steps exactly once: updates match across accumulation settings. Each
term is accumulated on the device (no host sync per step) and averaged over the logging window in `log`, next to
`loss`, so it reaches `log_history`, TensorBoard and every `report_to` target. With all coefficients 0, mixing off and
the patch mixing loss off, `compute_loss` *is* the stock `Trainer.compute_loss` (plain DeiT/ViT baseline).

What the stock `Trainer` does not do lives in small modules, mostly on public callback events:

- the **non-finite guard** (`guard.NonFiniteGuard`, on `on_pre_optimizer_step`; `--max_consecutive_nonfinite`);
- **atomic checkpoints, full-weight resume, used output folders** (`checkpointing`);
- the **model EMA** (`callbacks.ModelEMACallback`, on `on_optimizer_step`; `--model_ema`): with `--model_ema_eval`
  (default when the EMA is on) `evaluate` and the final `save_model` use the EMA weights; checkpoints keep the raw
  weights for resuming plus the EMA, restored on resume;
- **DeiT's weight decay groups** (`optim`): biases, every norm weight, the position embeddings and the CLS /
  distillation / mask tokens are not decayed;
- **throughput**: each training log carries `images_per_second`, the training images (all processes) of the logging
  window over its wall time, evaluation and checkpoint saving left out;
- **no pickles, no tokens**: model folders get `training_args.json` (tokens redacted) instead of `training_args.bin`.

Private `Trainer` methods overridden, each guarded by a contract test in `tests/trainer/test_trainer_contracts.py`:
`_get_train_sampler` here (DeiT's repeated-augmentation sampler); in `checkpointing.AtomicCheckpointsMixin`,
`_get_output_dir` and `_save_checkpoint` (stage a checkpoint, then publish it with one rename), `_save`
(`training_args.json`; final files moved in complete), `_load_from_checkpoint` and `_load_best_model` (weights
through `from_pretrained`, which the stock load of a ViT checkpoint does not restore).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerState, set_seed
from transformers.trainer_utils import TrainOutput, has_length

from ..data.sample_seeding import preserved_global_rng
from ..data.sampling import RepeatedAugmentationSampler
from ..losses.configuration import DiversityConfig
from ..losses.mixing import PatchMixupCutmix
from ..losses.regularizers import PowerIterationState
from ..models.modeling import DiverseModelMixin
from ..utils.distributed import check_weight_regularizer_supported
from .checkpointing import (
    TRAINER_STATE_NAME,
    AtomicCheckpointsMixin,
    resolve_resume_checkpoint,
)
from .ema import ModelEMA, ModelEMACallback
from .nonfinite_guard import NonFiniteGuard, TermLog
from .objective import DiversityObjective
from .optim import no_weight_decay_parameter_names
from .output_folder import prepare_output_folder
from .preemption import SignalCheckpointCallback, parse_stop_signals
from .training_args import DiverseTrainingArguments

logger = logging.getLogger(__name__)


def check_label_space(dataset: Any, num_labels: int) -> None:
    """Refuse a dataset whose `ClassLabel` has more classes than the model has outputs (checked once, up front,
    instead of per batch on the device)."""
    features = getattr(dataset, "features", None) or {}
    if not features:
        return
    # Only a `datasets` object has features: imported here, the trainer also runs without `datasets` installed
    # (plain torch datasets, the benchmarks on a machine without it).
    from datasets import ClassLabel

    for name, feature in features.items():
        if isinstance(feature, ClassLabel) and feature.num_classes > num_labels:
            raise ValueError(
                f"The dataset's label column {name!r} has {feature.num_classes} classes but the model has "
                f"num_labels={num_labels}. Build the model with num_labels={feature.num_classes} (and id2label)."
            )


class DiverseTrainer(AtomicCheckpointsMixin, Trainer):
    """`Trainer` whose loss adds the three levels of diversity regularizers and patch-level mixing.

    Training batches are dicts with `pixel_values` `(B, C, H, W)` and `labels` `(B,)`; when mixing is on they
    are mixed here, on the device. Batches that were already mixed (e.g. by `PatchMixCollator`) carry soft
    `labels` `(B, C)` and `patch_labels` `(B, P, C)` and are used as they are. Evaluation batches are never
    mixed and their loss is the stock classification loss.

    Attributes:
        objective: the `DiversityObjective` of training batches.
        guard: the `NonFiniteGuard` (None with `--max_consecutive_nonfinite 0` or under DeepSpeed).
        ema: the `ModelEMA` of the weights with `--model_ema`, else None.
        card_inputs: a `hub.CardInputs` for the model card written with the final model (`create_model_card`).
    """

    # compute_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: DiverseTrainingArguments | None = None, **kwargs: Any):
        if args is None:
            args = DiverseTrainingArguments(output_dir="diverse_vit_output")
        self.diversity = DiversityConfig.from_object(args)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size != launched:
            raise RuntimeError(
                f"{launched} processes were launched, but the training arguments set up {args.world_size}: each "
                "process would train its own model on all the data and write the same output folder. On a machine "
                "without a GPU pass --use_cpu (DDP over gloo); otherwise check the launcher's settings."
            )
        super().__init__(model=model, args=args, **kwargs)
        # The stock Trainer seeds every process with the same seed, so under DDP all ranks would draw the same
        # Mixup/CutMix choice, lambda and box, drop-path masks and augmentations. DeiT seeds each process with
        # seed + rank; the data order stays shared through `data_seed` (set by DiverseTrainingArguments).
        set_seed(args.seed + args.process_index)
        self.card_inputs: Any = None
        # FSDP / ZeRO-3 shard Q, K, V outside the forward: refuse the weight-level regularizer there (distributed.py).
        check_weight_regularizer_supported(self.model, self.diversity.weight_condition_coef, self.accelerator)
        # The model's own loss kwargs (num_items_in_batch) would scale the loss for accumulation a second time.
        self.model_accepts_loss_kwargs = False
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not self.diversity.is_plain_baseline and not isinstance(unwrapped, DiverseModelMixin):
            raise TypeError(
                f"DiverseTrainer needs a DiverseViTForImageClassification or DiverseDeiTForImageClassification, got "
                f"{type(unwrapped).__name__}. Load the checkpoint with diverse_vit_hf.load_diverse_model(...), or set "
                "every coefficient to 0 with --no_mixing --no_patch_mixing_loss to train a plain model."
            )
        if self.diversity.needs_diversity_outputs:
            # Route attention through the capturing function now rather than in the first diversified forward: under
            # --torch_compile that forward is traced, and set_attn_implementation (it reads source code) would break
            # the graph there.
            unwrapped.install_block1_attention_capture()
        self.objective = DiversityObjective(
            self.diversity, unwrapped.config.num_labels, unwrapped.config.patch_size, args.label_smoothing_factor
        )
        if self.objective.mixer is not None and args.per_device_train_batch_size < 2:
            raise ValueError(
                "Mixup/CutMix needs at least 2 images per batch (each image is mixed with another one), but "
                f"--per_device_train_batch_size is {args.per_device_train_batch_size}. Increase the per-device "
                "batch size, or pass --no_mixing."
            )
        for dataset in (self.train_dataset, self.eval_dataset):
            check_label_space(dataset, unwrapped.config.num_labels)
        self.term_log = TermLog()
        self.guard: NonFiniteGuard | None = None
        max_nonfinite = getattr(args, "max_consecutive_nonfinite", 5)
        if max_nonfinite > 0 and self.is_deepspeed_enabled:
            logger.warning(
                "The non-finite guard cannot skip DeepSpeed optimizer steps (the engine keeps its own gradients); it "
                "is off. DeepSpeed's fp16 loss scaler still skips overflowing steps."
            )
        elif max_nonfinite > 0:
            self.guard = NonFiniteGuard(self.accelerator, self.term_log, max_nonfinite, args.output_dir)
            self.add_callback(self.guard)
        self._in_training_step = False
        self._checkpoint_staging_root: str | None = None
        # Throughput of the logging window: training images seen and wall time outside evaluation/saving.
        self._window_images, self._window_start, self._window_excluded = 0, time.perf_counter(), 0.0
        if getattr(args, "enable_jit_checkpoint", False):
            raise ValueError(
                "--enable_jit_checkpoint is not supported by DiverseTrainer: it handles SIGTERM itself (see "
                "--stop_signals), finishing the step under way, writing a complete checkpoint and stopping without "
                "evaluating or writing a final model. Drop --enable_jit_checkpoint."
            )
        stop_signals = parse_stop_signals(getattr(args, "stop_signals", ""))
        self.signal_callback = SignalCheckpointCallback(stop_signals, self.accelerator) if stop_signals else None
        if self.signal_callback is not None:
            self.add_callback(self.signal_callback)
        self.ema_callback: ModelEMACallback | None = None
        if getattr(args, "model_ema", False):
            if self.shards_parameters:
                raise ValueError(
                    "--model_ema needs the full weights on every process; it does not support DeepSpeed or FSDP "
                    "(sharded parameters). Use DDP (plain `accelerate launch` / `torchrun`) or drop --model_ema."
                )
            self.ema_callback = ModelEMACallback(unwrapped, args.model_ema_decay, self._optimizer_step_was_skipped)
            self.add_callback(self.ema_callback)
        self._install_sample_seeding()  # per-sample augmentation seeds of the training images (section at the end)

    @property
    def ema(self) -> ModelEMA | None:
        return self.ema_callback.ema if self.ema_callback is not None else None

    @property
    def mixer(self) -> PatchMixupCutmix | None:
        """The objective's batch Mixup/CutMix (None when mixing is off)."""
        return self.objective.mixer

    @property
    def power_state(self) -> PowerIterationState | None:
        """The objective's persistent power-iteration vectors (checkpointed with the training state)."""
        return self.objective.power_state

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps the non-finite guard skipped since this trainer was created."""
        return self.guard.nonfinite_steps if self.guard is not None else 0

    @property
    def nonfinite_terms(self) -> dict[str, int]:
        """How often each value was non-finite in a skipped step (see `NonFiniteGuard`)."""
        return self.guard.nonfinite_terms if self.guard is not None else {}

    def _optimizer_step_was_skipped(self) -> bool:
        skipped_by_guard = self.guard is not None and self.guard.last_step_skipped
        return skipped_by_guard or self.accelerator.optimizer_step_was_skipped

    @property
    def _ema_eval(self) -> bool:
        return self.ema is not None and getattr(self.args, "model_ema_eval", True)

    # ---- Loss -----------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """`DiversityObjective` on training batches; the stock loss for evaluation and for the plain baseline."""
        if self.diversity.is_plain_baseline or not model.training:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
            if model.training:
                self._record(result[0] if return_outputs else result)
            return result
        result = self.objective(model, inputs, unwrapped_model=self.accelerator.unwrap_model(model))
        self._record(result.loss, result.terms)
        return (result.loss, result.outputs) if return_outputs else result.loss

    def _record(self, total: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        # Under the guard, a training step's values wait in its window until the window is known to be finite.
        if self.guard is not None and self._in_training_step:
            self.guard.record(total, terms)
        elif terms is not None:
            self.term_log.add(terms)

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Stock forward + backward, counting the images for the throughput log."""
        pixel_values = inputs.get("pixel_values") if isinstance(inputs, dict) else None
        if pixel_values is not None:
            self._window_images += int(pixel_values.shape[0])  # shape metadata: no device sync
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The stock rule (no biases, no LayerNorm weights) minus DeiT's other exclusions (`optim`)."""
        excluded = no_weight_decay_parameter_names(model)
        return [name for name in super().get_decay_parameter_names(model) if name not in excluded]

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """The stock sampler, or DeiT's repeated-augmentation sampler with `--repeated_augmentations > 1`."""
        if self.args.repeated_augmentations <= 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not has_length(dataset):
            raise ValueError(
                "--repeated_augmentations needs a training dataset with a length; a streamed dataset has none. "
                "Drop --streaming or use --repeated_augmentations 1."
            )
        return RepeatedAugmentationSampler(
            len(dataset),
            num_repeats=self.args.repeated_augmentations,
            num_replicas=self.args.world_size,
            batch_size=self.args.per_device_train_batch_size,
            seed=self.args.seed,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """Stock `train`, made safe to run, kill, requeue and resume:

        - `resume_from_checkpoint` may also be `"last"` (= True: the newest intact checkpoint in `output_dir`) or
          `"auto"` (the same, or a fresh start when there is none); a checkpoint is verified before use
          (`checkpoint_integrity`), and a damaged or weights-only one gives a clear error before anything starts;
        - the output folder is locked for the run and checked to be writable (`output_folder`);
        - a checkpoint at or past this run's last step is not trained further: its weights are loaded and training
          is reported as finished (the stock Trainer would take one more step on each resume);
        - the signals of `--stop_signals` end training after the step under way with a checkpoint
          (`stopped_by_signal`).
        """
        resume_from_checkpoint = resolve_resume_checkpoint(
            resume_from_checkpoint, self.args.output_dir, allow_weights_only=self.args.resume_weights_only
        )
        lock = prepare_output_folder(self.args.output_dir, is_main_process=self.args.process_index == 0)
        try:
            if resume_from_checkpoint is not None and self._reached_last_step(resume_from_checkpoint):
                return self._restore_finished_training(resume_from_checkpoint)
            self._window_images, self._window_start, self._window_excluded = 0, time.perf_counter(), 0.0
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    @property
    def stopped_by_signal(self) -> str | None:
        """The name of the signal on which the last `train` call stopped after writing a checkpoint, else None."""
        callback = self.signal_callback
        if callback is None or callback.stopped_at is None or callback.received is None:
            return None
        return callback.received.name

    def _reached_last_step(self, checkpoint: str) -> bool:
        saved = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        if not (saved.max_steps > 0 and saved.global_step >= saved.max_steps):
            return False
        # The checkpoint ended its own run; it ends this one too unless this run's budget is larger.
        max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        return saved.global_step >= max_steps

    def _restore_finished_training(self, checkpoint: str) -> TrainOutput:
        logger.warning(
            "%s is at the last training step; training is finished and is not continued. Loading its weights.",
            checkpoint,
        )
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        losses = [entry["train_loss"] for entry in self.state.log_history if "train_loss" in entry]
        return TrainOutput(self.state.global_step, losses[-1] if losses else float("nan"), {})

    # ---- Evaluation, final model, card ----------------------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix="eval"):
        """Stock `evaluate`, on the EMA weights with `--model_ema` (and `--model_ema_eval`). It leaves the global
        random streams as it found them (its data loader draws a seed from them), so the training's augmentation,
        mixing and drop-path draws do not depend on when evaluations happen, e.g. one skipped when a run stops on a
        signal and is resumed."""
        started = time.perf_counter()
        try:
            with preserved_global_rng():
                if not self._ema_eval:
                    return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
                with self.ema.swapped_into(self.accelerator.unwrap_model(self.model)):
                    return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._window_excluded += time.perf_counter() - started

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Stock `save_model`; with `--model_ema` (and `--model_ema_eval`) the final model is saved with the EMA
        weights. Checkpoints (`_internal_call`) keep the raw weights, which resuming needs, and the EMA beside them."""
        if not self._ema_eval or _internal_call:
            return super().save_model(output_dir, _internal_call)
        with self.ema.swapped_into(self.accelerator.unwrap_model(self.model)):
            return super().save_model(output_dir, _internal_call)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the project's model card (`README.md`: coefficients, recipe, evaluation results as model-index,
        base model, dataset, redundancy summary and plots when `redundancy.json` is there) into `output_dir`, from
        what the saved model folder holds and `self.card_inputs`. Replaces the stock Trainer card, so `push_to_hub`
        publishes this one. `license`, `model_name`, `finetuned_from`, `tags` and `dataset` override the card inputs;
        the other stock arguments describe text tasks and are not used."""
        if not self.is_world_process_zero():
            return
        from dataclasses import replace

        from ..hub.model_card import CardInputs, card_from_folder, save_model_card

        inputs = self.card_inputs if self.card_inputs is not None else CardInputs()
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        overrides = {
            "license": license,
            "model_name": model_name,
            "base_model": finetuned_from,
            "dataset_name": dataset if isinstance(dataset, str) else None,
            "tags": [*inputs.tags, *extra_tags] if extra_tags else None,
        }
        inputs = replace(inputs, **{key: value for key, value in overrides.items() if value is not None})
        repo_id = self.args.hub_model_id if self.args.hub_model_id and "/" in self.args.hub_model_id else None
        card = card_from_folder(self.args.output_dir, repo_id=repo_id, inputs=inputs)
        save_model_card(card, self.args.output_dir, token=self.args.hub_token)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any) -> Any:
        """Save the final model, write the project's card (`create_model_card`) and upload the model folder in one
        commit with `hub.push_model_folder` (weights, configs, card, redundancy files; no checkpoints, optimizer
        states or pickles) to `--hub_model_id` (`namespace/name`). Returns the `CommitInfo` (None on other
        processes)."""
        from ..hub.model_card import push_model_folder

        if self.hub_model_id is None:  # called with --push_to_hub off: create the repository as the stock one does
            self.init_hf_repo(token=kwargs.get("token"), private=kwargs.get("private"))
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        card_keys = ("license", "tags", "model_name", "finetuned_from", "dataset")
        self.create_model_card(**{key: kwargs[key] for key in card_keys if key in kwargs})
        return push_model_folder(
            self.args.output_dir,
            repo_id=self.hub_model_id,
            token=kwargs.get("token") or self.args.hub_token,
            commit_message=commit_message or "Upload Diverse-ViT model",
            revision=kwargs.get("revision") or getattr(self.args, "hub_revision", None),
            create_repo=False,
        )

    # ---- Logging --------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss term, averaged over the micro-batches since the last training log, the non-finite guard's
        counters (since this trainer was created) and the window's training throughput, then log."""
        if "loss" in logs:
            self._log_throughput(logs)
            logs.update(self.term_log.pop_means(self.accelerator))
            if self.guard is not None:
                logs.update(self.guard.counters())
        super().log(logs, start_time)

    def _log_throughput(self, logs: dict[str, float]) -> None:
        """`images_per_second`: training images of all processes since the last training log over the window's wall
        time, evaluation and checkpoint saving left out. One host read per log, none per step."""
        elapsed = time.perf_counter() - self._window_start - self._window_excluded
        images = self._window_images
        if self.accelerator.num_processes > 1:
            count = torch.tensor(float(images), device=self.args.device)
            images = int(self.accelerator.reduce(count, reduction="sum").item())
        if images and elapsed > 0:
            logs["images_per_second"] = round(images / elapsed, 3)
        self._window_images, self._window_start, self._window_excluded = 0, time.perf_counter(), 0.0

    # ---- Training data: per-sample augmentation seeds (exact resume) ----------------------------------------------
    # Everything of this feature in this file is in this section, plus the one call at the end of `__init__`. The
    # seeds and the wrapper are in `sample_seeding.py` and `data.py` (`SeededImageDataset`).

    def _install_sample_seeding(self) -> None:
        """Add `SampleEpochCallback`, which gives the seeded training dataset its epoch at each epoch start."""
        from ..data.sample_seeding import SampleEpochCallback

        self.sample_epoch_callback = SampleEpochCallback()
        self.add_callback(self.sample_epoch_callback)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Stock `get_train_dataloader`, except that a map-style `datasets.Dataset` carrying the `ImageBatchTransform`
        of `data.apply_image_transform` is loaded through `data.SeededImageDataset`: each image's random augmentation
        draws from its own seed (`--seed`, process index, epoch, index), not from the global generators, so a run
        resumed from a checkpoint augments, mixes and drops paths exactly as the uninterrupted run did, with or
        without data-loader workers. `train_dataset` itself is not changed. Streams, other datasets and evaluation
        are loaded as before."""
        seeded = None
        if "datasets" in sys.modules:  # only then can the training data be a `datasets.Dataset`
            from ..data.image_datasets import seeded_training_dataset

            seeded = seeded_training_dataset(self.train_dataset, self.args.seed, self.args.process_index)
        if seeded is None:
            return super().get_train_dataloader()
        self.sample_epoch_callback.dataset = seeded
        original, self.train_dataset = self.train_dataset, seeded
        try:
            dataloader = super().get_train_dataloader()
        finally:
            self.train_dataset = original
        # Each new data iterator draws its workers' base seed, from the global generator unless the loader has its
        # own. Persistent workers start once per run, so a resumed run would draw once more than the uninterrupted one
        # when its first full epoch starts, shifting Mixup/CutMix and drop path. The seeded augmentations do not use
        # these seeds: they come from a generator of their own. (Accelerate's loader wraps a `base_dataloader`, and
        # `skip_first_batches` copies its generator.)
        loader = getattr(dataloader, "base_dataloader", dataloader)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(self.args.seed + self.args.process_index)
        return dataloader

    # ---- End of the per-sample augmentation seeds -----------------------------------------------------------------


__all__ = ["DiverseTrainer"]
