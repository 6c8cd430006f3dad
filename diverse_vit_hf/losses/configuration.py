"""Settings of the Diverse-ViT objective (coefficients, estimator options, batch mixing).

`DiversityConfig` is the single definition of every option of the method. `DiverseTrainingArguments`
inherits it, so the same fields (with the same help strings) become `HfArgumentParser` CLI flags, and
model cards read their values from here.

Defaults are the authors' released settings ("faithful" mode), see `docs/method.md`, §4 and §5:

    L = L_cls_total + 0.5 L_cos + 0.5 L_con + 1e-4 L_attn + 5e-4 L_w
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

PATCH_COSINE_VARIANTS = ("signed", "gong")
# The four coefficients of the objective, one per diversity term (fields of `DiversityConfig`).
DIVERSITY_COEFFICIENTS = (
    "patch_cosine_coef",
    "patch_contrastive_coef",
    "attention_cosine_coef",
    "weight_condition_coef",
)
WEIGHT_ESTIMATORS = ("power", "exact")

# Names of the loss terms as they appear in logs (`train/<name>` style keys without the prefix).
LOSS_TERM_NAMES = (
    "loss_cls",
    "loss_patch_cosine",
    "loss_patch_contrastive",
    "loss_attention_cosine",
    "loss_weight_condition",
)


@dataclass
class DiversityConfig:
    """All options of the Diverse-ViT objective. Every coefficient must be finite and >= 0."""

    patch_cosine_coef: float = field(
        default=0.5,
        metadata={"help": "Weight of the within-layer patch cosine loss on the last block (method 1a). 0 disables it."},
    )
    patch_cosine_variant: str = field(
        default="signed",
        metadata={
            "help": "Patch cosine form: 'signed' (released code: signed cosine, diagonal included, O(P*D)) or "
            "'gong' (Gong et al. 2021: absolute cosine over off-diagonal pairs, O(P^2*D)).",
            "choices": PATCH_COSINE_VARIANTS,
        },
    )
    patch_contrastive_coef: float = field(
        default=0.5,
        metadata={"help": "Weight of the cross-layer patch contrastive loss between h^0 and h^L (method 1b)."},
    )
    patch_contrastive_detach_first: bool = field(
        default=False,
        metadata={
            "help": "Stop the gradient through the first-layer embeddings h^0 in the contrastive loss (as Gong et "
            "al.). The released code does not detach."
        },
    )
    attention_cosine_coef: float = field(
        default=1e-4,
        metadata={"help": "Weight of the cross-head attention cosine loss on block 1's attention maps (method 2)."},
    )
    weight_condition_coef: float = field(
        default=5e-4,
        metadata={
            "help": "Weight of the condition-number loss summed over the Q, K and V matrices of every block (method 3)."
        },
    )
    weight_estimator: str = field(
        default="power",
        metadata={
            "help": "Eigenvalue estimator of the weight loss: 'power' (power iteration, released behaviour) or "
            "'exact' (torch.linalg.svdvals).",
            "choices": WEIGHT_ESTIMATORS,
        },
    )
    power_iterations: int = field(
        default=1,
        metadata={"help": "Power-iteration steps per training step for estimator='power' (1 = released code)."},
    )
    power_persistent: bool = field(
        default=False,
        metadata={
            "help": "Carry normalised power-iteration vectors across training steps (as spectral_norm does) so the "
            "eigenvalue estimates converge. False = a fresh random vector every step (released code)."
        },
    )
    mixing: bool = field(
        default=True,
        metadata={"help": "Apply batch Mixup/CutMix to training batches (DeiT recipe). --no_mixing turns it off."},
    )
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup Beta(alpha, alpha) parameter; 0 disables Mixup."})
    cutmix_alpha: float = field(
        default=1.0, metadata={"help": "CutMix Beta(alpha, alpha) parameter; 0 disables CutMix."}
    )
    mix_switch_prob: float = field(
        default=0.5,
        metadata={"help": "Probability of CutMix rather than Mixup for a batch when both are enabled."},
    )
    mix_prob: float = field(
        default=1.0, metadata={"help": "Probability that a training batch is mixed at all (DeiT: 1.0)."}
    )
    patch_mixing_loss: bool = field(
        default=True,
        metadata={
            "help": "Apply the classifier to every patch token and train each patch on its own mixed label, "
            "averaging the CLS and P patch cross-entropies (method 1c). --no_patch_mixing_loss uses the CLS token only."
        },
    )

    def __post_init__(self) -> None:
        self.validate_diversity()

    def validate_diversity(self) -> None:
        """Raise `ValueError` with an actionable message for any invalid option."""
        for name in DIVERSITY_COEFFICIENTS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"`{name}` must be a finite number >= 0 (0 switches the term off), got {value!r}. "
                    f"The released setting is {DiversityConfig.__dataclass_fields__[name].default}."
                )
        if self.patch_cosine_variant not in PATCH_COSINE_VARIANTS:
            raise ValueError(
                f"`patch_cosine_variant` must be one of {PATCH_COSINE_VARIANTS}, got {self.patch_cosine_variant!r}."
            )
        if self.weight_estimator not in WEIGHT_ESTIMATORS:
            raise ValueError(f"`weight_estimator` must be one of {WEIGHT_ESTIMATORS}, got {self.weight_estimator!r}.")
        if not isinstance(self.power_iterations, int) or self.power_iterations < 1:
            raise ValueError(f"`power_iterations` must be an integer >= 1, got {self.power_iterations!r}.")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0 (0 disables it), got {value!r}.")
        for name in ("mix_switch_prob", "mix_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` is a probability and must lie in [0, 1], got {value!r}.")

    @property
    def mixing_enabled(self) -> bool:
        """Whether training batches are mixed at all."""
        return self.mixing and self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @property
    def regularizers_enabled(self) -> bool:
        """Whether any of the four diversity regularizers has a non-zero coefficient."""
        return any(
            c > 0
            for c in (
                self.patch_cosine_coef,
                self.patch_contrastive_coef,
                self.attention_cosine_coef,
                self.weight_condition_coef,
            )
        )

    @property
    def needs_diversity_outputs(self) -> bool:
        """Whether a training forward must return the regularizers' inputs (block-1 attention, h^0, h^L and
        per-token logits): some regularizer is on, or the patch mixing loss is (mixing alone needs none)."""
        return self.regularizers_enabled or self.patch_mixing_loss

    @property
    def is_plain_baseline(self) -> bool:
        """True when the objective reduces exactly to the stock classifier loss."""
        return not (self.regularizers_enabled or self.mixing_enabled or self.patch_mixing_loss)

    @property
    def is_paper_baseline(self) -> bool:
        """True for the paper's baseline: the DeiT recipe (Mixup/CutMix may be on) with no diversity term and the
        CLS-token loss, i.e. Diverse-ViT with only its own additions removed."""
        return not (self.regularizers_enabled or self.patch_mixing_loss)

    def diversity_dict(self) -> dict[str, Any]:
        """The method's options only (no training arguments), e.g. for a model card."""
        return {f.name: getattr(self, f.name) for f in fields(DiversityConfig)}

    @classmethod
    def from_object(cls, obj: Any) -> DiversityConfig:
        """Copy the diversity fields out of any object that carries them (e.g. training arguments)."""
        if isinstance(obj, dict):
            return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)})


__all__ = ["DiversityConfig", "LOSS_TERM_NAMES", "PATCH_COSINE_VARIANTS", "WEIGHT_ESTIMATORS"]
