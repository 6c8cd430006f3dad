"""diverse-vit-hf: Diverse-ViT (Chen et al., CVPR 2022) for Hugging Face transformers.

Train ViT-family models (ViT, DeiT, DINOv2, DINOv2 with registers, BEiT, ViT-MSN, I-JEPA, timm's ViTs) with diversity
regularizers at the patch-embedding, attention and weight levels, using `transformers.Trainer`, `accelerate` and
`datasets`, and save plain checkpoints of the stock classes that load anywhere.
"""

from .losses.configuration import LOSS_TERM_NAMES, DiversityConfig
from .losses.mixing import MixedBatch, PatchMixCollator, PatchMixupCutmix
from .losses.regularizers import (
    PowerIterationState,
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    soft_target_cross_entropy,
    weight_condition_loss,
)
from .models.modeling import (
    DIVERSE_MODEL_CLASSES,
    SUPPORTED_MODEL_TYPES,
    DiverseBeitForImageClassification,
    DiverseDeiTForImageClassification,
    DiverseDinov2ForImageClassification,
    DiverseDinov2WithRegistersForImageClassification,
    DiverseIJepaForImageClassification,
    DiverseImageClassifierOutput,
    DiverseTimmWrapperForImageClassification,
    DiverseViTForImageClassification,
    DiverseViTMSNForImageClassification,
    diverse_model_class_for_config,
    load_diverse_model,
)
from .trainer.objective import DIVERSITY_TERMS, DiversityObjective, DiversityTerm, ObjectiveOutput
from .trainer.trainer import DiverseTrainer, DiverseTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "DIVERSE_MODEL_CLASSES",
    "DIVERSITY_TERMS",
    "LOSS_TERM_NAMES",
    "SUPPORTED_MODEL_TYPES",
    "DiverseBeitForImageClassification",
    "DiverseDeiTForImageClassification",
    "DiverseDinov2ForImageClassification",
    "DiverseDinov2WithRegistersForImageClassification",
    "DiverseIJepaForImageClassification",
    "DiverseImageClassifierOutput",
    "DiverseTimmWrapperForImageClassification",
    "DiverseTrainer",
    "DiverseTrainingArguments",
    "DiverseViTForImageClassification",
    "DiverseViTMSNForImageClassification",
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

# The DeiT recipe's helpers: model EMA, the named DeiT configurations and repeated-augmentation sampling.
from .data.sampling import RepeatedAugmentationSampler
from .models.presets import DEIT_MODEL_CONFIG_NAMES, deit_config
from .trainer.ema import ModelEMA

__all__ += ["DEIT_MODEL_CONFIG_NAMES", "ModelEMA", "RepeatedAugmentationSampler", "deit_config"]
