"""`diverse_vit_hf.scripts.evaluation`: the top-k accuracy metric shipped in the package (loaded offline through
`evaluate`) and the Trainer's `compute_metrics` built on it, against a rank counted by hand (ties broken towards the
lower class index, as a stable sort does)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import EvalPrediction

from diverse_vit_hf.scripts.evaluation import TOPK_ACCURACY_PATH, load_topk_accuracy, make_compute_metrics


def topk_by_hand(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label ranks among the first k: rank = classes scored higher, plus classes scored the
    same with a lower index."""
    hits = 0
    for row, label in zip(scores, labels, strict=True):
        rank = sum(1 for c, score in enumerate(row) if score > row[label] or (score == row[label] and c < label))
        hits += rank < k
    return hits / len(labels)


def random_predictions(rows: int = 40, classes: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integer-valued logits (many ties) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, (rows, classes)).astype(np.float32), rng.integers(0, classes, rows)


def test_the_metric_module_ships_with_the_package_and_loads_offline():
    assert (TOPK_ACCURACY_PATH / "topk_accuracy.py").is_file()
    metric = load_topk_accuracy()  # the tests run with HF_HUB_OFFLINE=1
    assert metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], k=(1,)) == {"top1": 0.5}


@pytest.mark.parametrize("k", [(1,), (1, 5), (2, 3, 7)])
def test_topk_accuracy_matches_a_rank_counted_by_hand(k):
    scores, labels = random_predictions()
    results = load_topk_accuracy().compute(predictions=scores, references=labels, k=k)
    assert set(results) == {f"top{value}" for value in k}
    for value in k:
        assert results[f"top{value}"] == pytest.approx(topk_by_hand(scores, labels, value))
    assert results.get("top7", 1.0) == 1.0  # k = number of classes: every label is among them


def test_k_larger_than_the_classes_counts_every_row():
    scores, labels = random_predictions(classes=3)
    assert load_topk_accuracy().compute(predictions=scores, references=labels, k=(5,)) == {"top5": 1.0}


def test_compute_metrics_reports_top1_top5_and_accuracy():
    scores, labels = random_predictions(seed=1)
    metrics = make_compute_metrics()(EvalPrediction(predictions=scores, label_ids=labels))
    assert set(metrics) == {"top1", "top5", "accuracy"}
    assert metrics["top1"] == metrics["accuracy"] == pytest.approx(topk_by_hand(scores, labels, 1))
    assert metrics["top5"] == pytest.approx(topk_by_hand(scores, labels, 5))
    assert 0.0 < metrics["top1"] < metrics["top5"] < 1.0  # the data is not trivial


def test_compute_metrics_reads_the_logits_from_a_tuple_of_predictions():
    """A model returning more than its logits gives the Trainer a tuple: the logits are its first element."""
    scores, labels = random_predictions(seed=2)
    extra = np.zeros((len(labels), 3, 5), dtype=np.float32)
    compute = make_compute_metrics(k=(1, 3))
    from_tuple = compute(EvalPrediction(predictions=(scores, extra), label_ids=labels))
    assert from_tuple == compute(EvalPrediction(predictions=scores, label_ids=labels))
    assert set(from_tuple) == {"top1", "top3", "accuracy"}
    assert from_tuple["top3"] == pytest.approx(topk_by_hand(scores, labels, 3))


def test_predictions_that_do_not_match_the_references_are_refused():
    scores, labels = random_predictions(rows=6)
    metric = load_topk_accuracy()
    with pytest.raises(ValueError, match=r"predictions.*\(6\).*references.*\(5\)"):
        metric.compute(predictions=scores, references=labels[:5], k=(1,))
    with pytest.raises(ValueError):  # rows of different lengths: not an (n, num_classes) array
        metric.compute(predictions=[[0.1, 0.9], [0.3]], references=[0, 0], k=(1,))
