"""Training: `DiverseTrainer` (a `transformers.Trainer` whose `compute_loss` adds the diversity terms through
`objective.DiversityObjective`), its arguments (`training_args`), checkpoints and their integrity (`checkpointing`,
`checkpoint_integrity`), the output-folder lock (`output_folder`), preemption by signal (`preemption`), the model EMA
(`ema`), optimizer parameter groups (`optim`) and the non-finite-loss guard (`nonfinite_guard`)."""

from .objective import DIVERSITY_TERMS, DiversityObjective, DiversityTerm, ObjectiveOutput
from .trainer import DiverseTrainer
from .training_args import DiverseTrainingArguments

__all__ = [
    "DIVERSITY_TERMS",
    "DiverseTrainer",
    "DiverseTrainingArguments",
    "DiversityObjective",
    "DiversityTerm",
    "ObjectiveOutput",
]
