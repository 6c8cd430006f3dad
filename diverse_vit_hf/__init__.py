"""diverse-vit-hf: Diverse-ViT (Chen et al., CVPR 2022) for Hugging Face transformers.

Train ViT/DeiT models with diversity regularizers at the patch-embedding, attention and weight levels, using
`transformers.Trainer`, `accelerate` and `datasets`, and save plain ViT/DeiT checkpoints that load anywhere.
"""

from .configuration import LOSS_TERM_NAMES, DiversityConfig
from .mixing import MixedBatch, PatchMixCollator, PatchMixupCutmix
from .modeling import (
    DiverseDeiTForImageClassification,
    DiverseImageClassifierOutput,
    DiverseViTForImageClassification,
    diverse_model_class_for_config,
    load_diverse_model,
)
from .objective import DIVERSITY_TERMS, DiversityObjective, DiversityTerm, ObjectiveOutput
from .regularizers import (
    PowerIterationState,
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    soft_target_cross_entropy,
    weight_condition_loss,
)
from .trainer import DiverseTrainer, DiverseTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "DIVERSITY_TERMS",
    "LOSS_TERM_NAMES",
    "DiverseDeiTForImageClassification",
    "DiverseImageClassifierOutput",
    "DiverseTrainer",
    "DiverseTrainingArguments",
    "DiverseViTForImageClassification",
    "DiversityConfig",
    "DiversityObjective",
    "DiversityTerm",
    "MixedBatch",
    "ObjectiveOutput",
    "PatchMixCollator",
    "PatchMixupCutmix",
    "PowerIterationState",
    "attention_cosine_loss",
    "diverse_model_class_for_config",
    "load_diverse_model",
    "patch_contrastive_loss",
    "patch_cosine_loss",
    "patch_mixing_loss",
    "soft_target_cross_entropy",
    "weight_condition_loss",
]

# Paper-recipe helpers (issue 3): model EMA and the named DeiT configurations.
from .ema import ModelEMA
from .presets import DEIT_MODEL_CONFIG_NAMES, deit_config
from .sampling import RepeatedAugmentationSampler

__all__ += ["DEIT_MODEL_CONFIG_NAMES", "ModelEMA", "RepeatedAugmentationSampler", "deit_config"]
