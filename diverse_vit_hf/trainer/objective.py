"""The Diverse-ViT training objective as one library piece (`docs/method.md`, "Total objective"):

    L = L_cls_total + c_cos L_cos + c_con L_con + c_attn L_attn + c_w L_w

`DiversityObjective` turns a model and a training batch into the total loss, each term (detached, for logging) and
the model outputs. The regularizers are driven by one table, `DIVERSITY_TERMS` (logged name, coefficient field of
`DiversityConfig`, function of the forward's outputs), so the configuration, the logged names and every training loop
(`DiverseTrainer`, a plain Accelerate loop as in `examples/run_diverse_no_trainer.py`) come from the same place.

    objective = DiversityObjective(DiversityConfig(), num_labels=10, patch_size=16)
    result = objective(model, {"pixel_values": images, "labels": labels})
    accelerator.backward(result.loss)
    log({name: value.item() for name, value in result.terms.items()})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..losses.configuration import DiversityConfig
from ..losses.mixing import MixedBatch, PatchMixupCutmix, check_patch_grid, unmixed_batch
from ..losses.regularizers import (
    PowerIterationState,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    patch_mixing_loss_from_token_sum,
    patch_token_targets,
    soft_target_cross_entropy,
    weight_condition_loss,
)
from ..models.modeling import DiverseImageClassifierOutput, DiverseModelMixin
from ..utils.distributed import broadcast_start_vectors, has_dtensor_parameters


@dataclass
class TermInputs:
    """What a regularizer reads: the diversified forward's outputs (None for a term computed before the forward), the
    (unwrapped) model, the settings and the persistent power-iteration state (None: a fresh random vector every
    step)."""

    outputs: DiverseImageClassifierOutput | None
    model: DiverseModelMixin
    config: DiversityConfig
    power_state: PowerIterationState | None


@dataclass(frozen=True)
class DiversityTerm:
    """One regularizer of the objective.

    Attributes:
        name: the logged name (`loss_<...>`), as in `LOSS_TERM_NAMES`.
        coefficient: the `DiversityConfig` field holding its weight; the term is computed only when it is > 0.
        compute: `TermInputs -> ()` float32 scalar.
        reads_outputs: whether `compute` reads the forward's outputs. A term that does not (the weight term) is
            computed before the forward: autograd runs the nodes made last first, so its backward then runs after
            the model's, once the activations are freed, instead of adding its transients to the step's memory peak
            at the start of the backward.
    """

    name: str
    coefficient: str
    compute: Callable[[TermInputs], torch.Tensor]
    reads_outputs: bool = True


def _patch_cosine(x: TermInputs) -> torch.Tensor:
    hidden = x.outputs.last_block_hidden_state
    return patch_cosine_loss(hidden, x.model.num_prefix_tokens, x.config.patch_cosine_variant)


def _patch_contrastive(x: TermInputs) -> torch.Tensor:
    return patch_contrastive_loss(
        x.outputs.first_hidden_state,
        x.outputs.last_block_hidden_state,
        x.model.num_prefix_tokens,
        x.config.patch_contrastive_detach_first,
    )


def _attention_cosine(x: TermInputs) -> torch.Tensor:
    # From block 1's query and key: the (B, H, N, N) probabilities are built in chunks and never kept.
    return x.outputs.first_block_attention.cosine_loss()


def _weight_condition(x: TermInputs) -> torch.Tensor:
    weights = x.model.attention_projection_weights()  # full matrices, all-gathered under FSDP2
    start_vectors = None
    needs_start = x.power_state is None or x.power_state.max_vectors is None
    if x.config.weight_estimator == "power" and needs_start and has_dtensor_parameters(x.model):
        # Every rank must estimate from the same start, or each shard would get another estimate's gradient.
        start_vectors = broadcast_start_vectors(tuple(weights.shape[:2]), weights.device)
    return weight_condition_loss(
        weights,
        estimator=x.config.weight_estimator,
        num_iterations=x.config.power_iterations,
        state=x.power_state,
        start_vectors=start_vectors,
    )


# The three levels of the method, in the order they are added (`docs/method.md` §1a, §1b, §2, §3).
DIVERSITY_TERMS: tuple[DiversityTerm, ...] = (
    DiversityTerm("loss_patch_cosine", "patch_cosine_coef", _patch_cosine),
    DiversityTerm("loss_patch_contrastive", "patch_contrastive_coef", _patch_contrastive),
    DiversityTerm("loss_attention_cosine", "attention_cosine_coef", _attention_cosine),
    DiversityTerm("loss_weight_condition", "weight_condition_coef", _weight_condition, reads_outputs=False),
)


@dataclass
class ObjectiveOutput:
    """The result of `DiversityObjective.__call__`.

    Attributes:
        loss: `()` total loss to back-propagate (a per-micro-batch mean: divide by the accumulation steps once).
        terms: `{"loss_cls": (), "loss_<term>": (), ...}` each computed term, detached, float32 (unweighted).
        outputs: the model's `DiverseImageClassifierOutput` (`logits` `(B, C)`, per-token logits, hidden states).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    outputs: DiverseImageClassifierOutput


class DiversityObjective:
    """The Diverse-ViT loss of a training batch: patch-level Mixup/CutMix, the classification loss (patch-wise with
    `patch_mixing_loss`, else CLS only) and every regularizer of `terms` whose coefficient is > 0.

    Args:
        config: the method's settings (`DiversityConfig`, or `DiverseTrainingArguments`, which carries them).
        num_labels: number of classes C.
        patch_size: the model's patch size (int or (h, w)); the patch grid is derived from each batch's images.
        label_smoothing: smoothing of the one-hot labels before mixing (DeiT: 0.1).
        power_state: persistent power-iteration vectors; default: a new `PowerIterationState` when
            `config.power_persistent`, else None (the released behaviour: a fresh random vector every step).
        terms: the regularizer table (default `DIVERSITY_TERMS`).

    Attributes:
        mixer: the `PatchMixupCutmix` applied to training batches, or None when mixing is off.
    """

    def __init__(
        self,
        config: DiversityConfig,
        num_labels: int,
        patch_size: int | Sequence[int],
        label_smoothing: float = 0.1,
        power_state: PowerIterationState | None = None,
        terms: Sequence[DiversityTerm] = DIVERSITY_TERMS,
    ) -> None:
        self.config = DiversityConfig.from_object(config)
        self.num_labels = num_labels
        self.patch_size = patch_size
        self.label_smoothing = label_smoothing
        if power_state is None and self.config.power_persistent:
            power_state = PowerIterationState()
        self.power_state = power_state
        self.terms = tuple(terms)
        self.mixer: PatchMixupCutmix | None = None
        if self.config.mixing_enabled:
            self.mixer = PatchMixupCutmix(
                num_classes=num_labels,
                patch_size=patch_size,
                mixup_alpha=self.config.mixup_alpha,
                cutmix_alpha=self.config.cutmix_alpha,
                switch_prob=self.config.mix_switch_prob,
                prob=self.config.mix_prob,
                label_smoothing=label_smoothing,
            )

    def active_terms(self) -> list[DiversityTerm]:
        """The regularizers whose coefficient is > 0, in table order."""
        return [term for term in self.terms if getattr(self.config, term.coefficient) > 0]

    def targets(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(pixel_values (B, C_in, H, W), targets (B, C), patch_targets (B, P, C))` of a training batch, the targets
        built as probabilities.

        A batch that was mixed already (`patch_labels` present, e.g. by `PatchMixCollator`) is used as it is; class
        indices are mixed here (a single image cannot be mixed: it is trained unmixed) or smoothed (`mix`).
        """
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if "patch_labels" in batch:
            return pixel_values, labels, batch["patch_labels"]
        if labels.is_floating_point():
            raise ValueError(
                "Soft `labels` need matching `patch_labels` (B, P, C); pass class indices and let the objective mix, "
                "or use PatchMixCollator."
            )
        mixed = self.mix(batch)
        return mixed.pixel_values, mixed.targets, mixed.patch_targets

    def mix(self, batch: dict[str, Any]) -> MixedBatch | None:
        """The training batch mixed here (or smoothed, unmixed), in two-label form; None for a batch that was mixed
        already (`patch_labels` present) or carries soft labels, whose targets `targets` returns as they are."""
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if "patch_labels" in batch or labels.is_floating_point():
            return None
        # The configured batch size is >= 2 where mixing is on: a batch of one is an epoch's incomplete last batch or
        # what is left after skipping unreadable images.
        if self.mixer is not None and pixel_values.shape[0] >= 2:
            return self.mixer(pixel_values, labels)
        rows, cols = check_patch_grid(*pixel_values.shape[-2:], self.patch_size)
        return unmixed_batch(pixel_values, labels, self.num_labels, rows * cols, self.label_smoothing)

    def __call__(
        self, model: nn.Module, batch: dict[str, Any], unwrapped_model: DiverseModelMixin | None = None
    ) -> ObjectiveOutput:
        """The objective of one training micro-batch.

        Args:
            model: the model to call (possibly wrapped by DDP/FSDP/`torch.compile`).
            batch: `pixel_values` `(B, C_in, H, W)` and `labels` `(B,)` class indices (or pre-mixed soft `labels`
                `(B, C)` with `patch_labels` `(B, P, C)`).
            unwrapped_model: the diversified classifier inside `model` (default: `model` itself); the weight term and
                the prefix-token count are read from it.
        """
        unwrapped = unwrapped_model if unwrapped_model is not None else model
        check_patch_grid(*batch["pixel_values"].shape[-2:], self.patch_size)
        mixed = self.mix(batch)
        if mixed is None:  # mixed already (PatchMixCollator): the targets are given as probabilities
            pixel_values, targets, patch_targets = self.targets(batch)
        else:
            pixel_values, targets = mixed.pixel_values, mixed.targets
        diversity_kwargs = {}
        if self.config.needs_diversity_outputs:
            # The patch-wise loss on two-label targets is computed inside the forward (`token_loss`, chunked, the
            # `(B, N, C)` per-token logits never built); the per-token logits are built only for pre-mixed targets.
            two_label = self.config.patch_mixing_loss and mixed is not None
            diversity_kwargs = {
                "return_diversity_outputs": True,
                "return_token_logits": self.config.patch_mixing_loss and not two_label,
            }
            if two_label:
                diversity_kwargs["token_targets"] = patch_token_targets(
                    mixed.labels,
                    mixed.partner_labels,
                    mixed.patch_weights,
                    mixed.label_smoothing,
                    unwrapped.num_prefix_tokens,
                )
        active = self.active_terms()
        values = {
            term.name: term.compute(TermInputs(None, unwrapped, self.config, self.power_state))
            for term in active
            if not term.reads_outputs
        }
        outputs = model(pixel_values=pixel_values, **diversity_kwargs)
        # The image-level term reads the model's image logits: token 0's for CLS heads, the pooled head's else.
        if self.config.patch_mixing_loss and mixed is not None:
            loss = patch_mixing_loss_from_token_sum(
                outputs.token_loss,
                outputs.logits,
                mixed.labels,
                mixed.partner_labels,
                mixed.lam,
                mixed.label_smoothing,
                mixed.patch_weights.shape[0],
            )
        elif self.config.patch_mixing_loss:
            loss = patch_mixing_loss(
                outputs.token_logits, targets, patch_targets, unwrapped.num_prefix_tokens, image_logits=outputs.logits
            )
        else:
            loss = soft_target_cross_entropy(outputs.logits, targets)
        terms = {"loss_cls": loss.detach()}
        inputs = TermInputs(outputs, unwrapped, self.config, self.power_state)
        for term in active:
            value = values[term.name] if term.name in values else term.compute(inputs)
            terms[term.name] = value.detach()
            loss = loss + getattr(self.config, term.coefficient) * value
        return ObjectiveOutput(loss=loss, terms=terms, outputs=outputs)


__all__ = ["DIVERSITY_TERMS", "DiversityObjective", "DiversityTerm", "ObjectiveOutput", "TermInputs"]
