"""Analysis driver: one model on batches of pixel values -> `ModelRedundancy`, and batching helpers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .metrics import WeightMatrixStats
from .probe import (
    ATTENTION_KEYS,
    EMBEDDING_KEYS,
    QKV_MATRICES,
    RedundancyProbe,
    check_supported_model,
    check_weight_matrices,
    weight_statistics,
)
from .redundancy import AttentionRedundancy, EmbeddingRedundancy, ModelRedundancy, WeightRedundancy


def analyze_model(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    name: str = "model",
    weight_matrices: Sequence[str] = QKV_MATRICES,
    progress: bool = True,
    total_batches: int | None = None,
) -> ModelRedundancy:
    """Analyze one model on batches of pixel values `(B, C, H, W)` (already preprocessed for it).

    The model is put in eval mode for the analysis and returned to its previous mode afterwards.
    """
    from tqdm.auto import tqdm

    check_supported_model(model)
    matrices = check_weight_matrices(weight_matrices)
    was_training = model.training
    model.eval()
    try:
        with RedundancyProbe(model) as probe:
            for pixel_values in tqdm(batches, total=total_batches, desc=f"analyzing {name}", disable=not progress,
                                     unit="batch"):  # fmt: skip
                probe.run(model, pixel_values)
    finally:
        model.train(was_training)
    if probe.num_images == 0:
        raise ValueError("No images were given to the analysis; pass at least one batch.")
    stats, num_layers = probe.stats, probe.num_layers
    embedding = EmbeddingRedundancy(
        layers=list(range(num_layers + 1)),
        **{key: [stats.mean(key, layer) for layer in range(num_layers + 1)] for key in EMBEDDING_KEYS},
    )
    attention = AttentionRedundancy(
        layers=list(range(1, num_layers + 1)),
        **{key: [stats.mean(key, layer) for layer in range(1, num_layers + 1)] for key in ATTENTION_KEYS},
    )
    weights = WeightRedundancy(
        layers=list(range(1, num_layers + 1)),
        matrices={n: {k: [getattr(s, k) for s in per_block] for k in WeightMatrixStats.__dataclass_fields__}
                  for n, per_block in weight_statistics(model, matrices).items()},
    )  # fmt: skip
    config = model.config
    return ModelRedundancy(
        name=name,
        model_type=config.model_type,
        num_layers=num_layers,
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        num_prefix_tokens=probe.num_prefix_tokens,
        num_patches=probe.num_patches,
        num_images=probe.num_images,
        embedding=embedding,
        attention=attention,
        weights=weights,
    )


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return value


def tensor_batches(pixel_values: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split `(n, C, H, W)` pixel values into batches of at most `batch_size` images."""
    check_positive_int(batch_size, "batch_size")
    return iter(pixel_values.split(batch_size))
