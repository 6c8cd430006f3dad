"""Top-k accuracy as an `evaluate` metric module, shipped with diverse-vit-hf so it loads offline."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Fraction of examples whose reference class is among the k highest-scoring predictions.
Takes `predictions` of shape (n, num_classes) (logits or probabilities) and integer `references` of shape (n,),
and returns `top1` and `top{k}` for every k in `k` (default (1, 5), k clipped to num_classes)."""

_CITATION = ""

_KWARGS_DESCRIPTION = """
Args:
    predictions: (n, num_classes) scores.
    references: (n,) class indices.
    k: tuple of k values, default (1, 5).
Returns:
    dict with one float per k, named `top{k}`.
Examples:
    >>> metric = evaluate.load("path/to/topk_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], k=(1,))
    {'top1': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must be (n, num_classes) matching {labels.shape[0]} references, got {scores.shape}."
            )
        order = np.argsort(-scores, axis=1, kind="stable")
        results = {}
        for value in k:
            top = min(int(value), scores.shape[1])
            hits = (order[:, :top] == labels[:, None]).any(axis=1)
            results[f"top{value}"] = float(hits.mean()) if len(hits) else 0.0
        return results
