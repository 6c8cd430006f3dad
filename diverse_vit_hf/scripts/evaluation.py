"""Top-1/top-5 accuracy through `evaluate`, from the metric module shipped in this package (works offline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import evaluate
import numpy as np
from transformers import EvalPrediction

TOPK_ACCURACY_PATH = Path(__file__).parent / "evaluate_modules" / "topk_accuracy"


def load_topk_accuracy() -> evaluate.EvaluationModule:
    """`evaluate.load` of the bundled top-k accuracy metric (no Hub access needed)."""
    return evaluate.load(str(TOPK_ACCURACY_PATH))


def make_compute_metrics(k: Sequence[int] = (1, 5)) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `Trainer` `compute_metrics` returning `top1`, `top5`, ... and `accuracy` (= top-1)."""
    metric = load_topk_accuracy()

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        labels = np.asarray(prediction.label_ids)
        results = metric.compute(predictions=np.asarray(logits), references=labels, k=tuple(k))
        results["accuracy"] = results["top1"]
        return results

    return compute_metrics


__all__ = ["TOPK_ACCURACY_PATH", "load_topk_accuracy", "make_compute_metrics"]
