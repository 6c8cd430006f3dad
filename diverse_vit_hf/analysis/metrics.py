"""Pure metric functions of the redundancy analysis. Inputs of any float dtype; every computation runs in float32
(data) or float64 (weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..losses.regularizers import unit_vectors


def _off_diagonal_mean(gram: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of a batch of square matrices `(B, M, M)` -> `(B,)`."""
    size = gram.shape[-1]
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1).sum(dim=-1)
    return (gram.sum(dim=(-2, -1)) - diagonal) / (size * (size - 1))


@dataclass
class PatchSimilarity:
    """Per-image within-layer patch similarities, each `(B,)` float32."""

    cosine: torch.Tensor
    abs_cosine: torch.Tensor
    cosine_with_diagonal: torch.Tensor


def patch_similarity(hidden_states: torch.Tensor, num_prefix_tokens: int) -> PatchSimilarity:
    """Within-layer patch-token cosine similarity of each image.

    Args:
        hidden_states: `(B, N, D)` tokens of one layer; the first `num_prefix_tokens` (CLS, distillation) are dropped.
        num_prefix_tokens: K, number of leading non-patch tokens.

    Returns:
        `PatchSimilarity` with the signed and absolute off-diagonal means over the P x (P - 1) patch pairs and the
        diagonal-inclusive mean over all P x P entries (what `patch_cosine_loss(variant="signed")` computes).
    """
    if hidden_states.ndim != 3:
        raise ValueError(f"`hidden_states` must be (batch, tokens, hidden), got shape {tuple(hidden_states.shape)}.")
    units = unit_vectors(hidden_states[:, num_prefix_tokens:].float())  # (B, P, D)
    num_patches = units.shape[1]
    if num_patches < 2:
        raise ValueError(
            f"Patch similarity needs at least 2 patch tokens, got {num_patches} (tokens {hidden_states.shape[1]}, "
            f"prefix {num_prefix_tokens}). Use larger images or smaller patches."
        )
    gram = torch.bmm(units, units.transpose(1, 2))  # (B, P, P)
    return PatchSimilarity(
        cosine=_off_diagonal_mean(gram),
        abs_cosine=_off_diagonal_mean(gram.abs()),
        cosine_with_diagonal=gram.mean(dim=(1, 2)),
    )


def input_cosine(
    hidden_states: torch.Tensor, first_hidden_states: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """Mean over patches of cos(h^l_i, h^0_i) per image.

    Args:
        hidden_states: `(B, N, D)` tokens of layer l.
        first_hidden_states: `(B, N, D)` tokens entering block 1 (`h^0`).

    Returns:
        `(B,)` float32.
    """
    if hidden_states.shape != first_hidden_states.shape:
        raise ValueError(
            f"Layer tokens {tuple(hidden_states.shape)} and input tokens {tuple(first_hidden_states.shape)} differ."
        )
    current = unit_vectors(hidden_states[:, num_prefix_tokens:].float())
    first = unit_vectors(first_hidden_states[:, num_prefix_tokens:].float())
    return (current * first).sum(dim=-1).mean(dim=-1)


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities recomputed from a block's projected queries and keys.

    Args:
        query, key: `(B, N, H * d)` outputs of `q_proj` / `k_proj`.
        num_heads: H.
        scaling: the block's softmax scale (d ** -0.5).
        attention_mask: what the block passed to its attention kernel, broadcastable to `(B, H, N, N)`: an additive
            float mask (BEiT's relative position bias) or a boolean keep-mask; None for plain ViT attention.

    Returns:
        `(B, H, N, N)` float32 probabilities, equal to the eager kernel's before dropout.
    """
    batch, tokens, width = query.shape
    if width % num_heads:
        raise ValueError(f"Projection width {width} is not divisible by the {num_heads} attention heads.")
    q = query.float().view(batch, tokens, num_heads, -1).transpose(1, 2)
    k = key.float().view(batch, key.shape[1], num_heads, -1).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    return torch.softmax(scores, dim=-1)


def flattened_head_maps(attention_probs: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Unit-norm flattened attention map of each head, optionally without the prefix tokens' rows and columns.

    Args:
        attention_probs: `(B, H, N, N)`.
        num_prefix_tokens: rows/columns to drop first (0 keeps the full map).

    Returns:
        `(B, H, M)` with M = N^2 or P^2.
    """
    if attention_probs.ndim != 4:
        raise ValueError(f"`attention_probs` must be (batch, heads, N, N), got {tuple(attention_probs.shape)}.")
    maps = attention_probs[:, :, num_prefix_tokens:, num_prefix_tokens:].float()
    return unit_vectors(maps.flatten(start_dim=2))


def head_cosine(head_maps: torch.Tensor) -> torch.Tensor:
    """Mean cosine over head pairs h != g of unit head maps `(B, H, M)` -> `(B,)`."""
    if head_maps.shape[1] < 2:
        raise ValueError(f"Cross-head similarity needs at least 2 heads, got {head_maps.shape[1]}.")
    return _off_diagonal_mean(torch.bmm(head_maps, head_maps.transpose(1, 2)))


def cross_layer_head_cosine(head_maps: torch.Tensor, previous_head_maps: torch.Tensor) -> torch.Tensor:
    """Mean over heads of cos(vec A^l_h, vec A^(l-1)_h) from unit head maps `(B, H, M)` of two blocks -> `(B,)`."""
    if head_maps.shape != previous_head_maps.shape:
        raise ValueError(
            f"Attention maps of consecutive blocks differ in shape: {tuple(head_maps.shape)} vs "
            f"{tuple(previous_head_maps.shape)}."
        )
    return (head_maps * previous_head_maps).sum(dim=-1).mean(dim=-1)


@dataclass
class WeightMatrixStats:
    """Spectral statistics of one `nn.Linear` weight `(D_out, D_in)`, computed in float64."""

    singular_values: list[float]
    condition_number: float
    stable_rank: float
    effective_rank: float
    row_abs_cosine: float
    condition_gap: float


def weight_matrix_stats(weight: torch.Tensor) -> WeightMatrixStats:
    """Singular values, condition number, stable rank, effective rank, mean |row cos| and (s_max^2 - s_min^2)^2.

    s_min is the smallest of the min(D_out, D_in) singular values; for a square Q/K/V matrix the condition gap is
    exactly the per-matrix term of `weight_condition_loss(estimator="exact")`. A zero matrix gets condition number
    inf and ranks 0.
    """
    if weight.ndim != 2 or min(weight.shape) < 1:
        raise ValueError(f"`weight` must be a non-empty (D_out, D_in) matrix, got shape {tuple(weight.shape)}.")
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    singular = torch.linalg.svdvals(w)
    s_max, s_min = singular[0].item(), singular[-1].item()
    if s_max == 0.0:
        stable_rank = effective_rank = 0.0
    else:
        stable_rank = (singular.pow(2).sum() / singular[0] ** 2).item()
        p = singular / singular.sum()
        p = p[p > 0]
        effective_rank = math.exp(-(p * p.log()).sum().item())
    if w.shape[0] >= 2:
        rows = unit_vectors(w)
        row_abs_cosine = _off_diagonal_mean((rows @ rows.T).abs().unsqueeze(0)).item()
    else:
        row_abs_cosine = float("nan")
    return WeightMatrixStats(
        singular_values=singular.tolist(),
        condition_number=s_max / s_min if s_min > 0 else float("inf"),
        stable_rank=stable_rank,
        effective_rank=effective_rank,
        row_abs_cosine=row_abs_cosine,
        condition_gap=(s_max**2 - s_min**2) ** 2,
    )
