"""The Diverse-ViT regularizers as pure tensor functions.

Every function:
- computes in float32 with autocast disabled, whatever the input dtype (bf16/fp16 forwards included),
  and returns a float32 scalar;
- is differentiable and never produces NaN for all-zero vectors (`u(x) = x / max(||x||, 1e-8)`);
- uses the O(P*D) closed forms (`docs/method.md`, §1a, §1b, §2) where they exist, never a P x P Gram matrix.

Notation: B batch, N = K + P tokens (K prefix tokens: CLS, plus the distillation token for DeiT), D hidden
size, H heads, C classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .configuration import PATCH_COSINE_VARIANTS, WEIGHT_ESTIMATORS

NORM_EPS = 1e-8


def _norm(x: torch.Tensor) -> torch.Tensor:
    """`max(||x||_2, 1e-8)` along the last axis (finite gradient for zero vectors): `(..., D) -> (...)`."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(NORM_EPS)


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """`u(x) = x / max(||x||_2, 1e-8)` along the last axis, safe (and with finite gradient) for zero vectors."""
    return x / _norm(x).unsqueeze(-1)


def _no_autocast(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Leave autocast for the float32 math; a device type without autocast (e.g. "meta") has nothing to leave."""
    if not torch.amp.is_autocast_available(tensor.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _matmul_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matrix product on `tensor`'s device runs in: autocast's when autocast is on there (as `nn.Linear`
    and the attention's own products would run), else `dtype`."""
    device_type = tensor.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _needs_grad(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    """For each tensor (or None), whether a gradient must be taken for it here."""
    grad_on = torch.is_grad_enabled()
    return tuple(grad_on and tensor is not None and tensor.requires_grad for tensor in tensors)


def _check_patch_tokens(hidden_states: torch.Tensor, num_prefix_tokens: int, name: str, min_patches: int) -> None:
    if hidden_states.ndim != 3:
        raise ValueError(
            f"`{name}` must have shape (batch, tokens, hidden), got a {hidden_states.ndim}-d tensor of shape "
            f"{tuple(hidden_states.shape)}."
        )
    if num_prefix_tokens < 0:
        raise ValueError(f"`num_prefix_tokens` must be >= 0, got {num_prefix_tokens}.")
    num_patches = hidden_states.shape[1] - num_prefix_tokens
    if num_patches < min_patches:
        raise ValueError(
            f"`{name}` has {hidden_states.shape[1]} tokens of which {num_prefix_tokens} are prefix tokens, leaving "
            f"{num_patches} patch tokens; this loss needs at least {min_patches}. Use a larger image or smaller "
            "patches."
        )


def _rowwise_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`(x * y).sum(-1)` for `(B, P, D)` inputs as a batched product, without a `(B, P, D)` temporary: `(B, P)`."""
    return torch.matmul(x.unsqueeze(-2), y.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _weighted_token_sum(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`sum_i weights[b, i] * tokens[b, i]`: `(B, P)`, `(B, P, D) -> (B, 1, D)`."""
    return torch.bmm(weights.unsqueeze(1), tokens)


def _token_dots(tokens: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """`tokens[b, i] . vector[b]` for one vector per image: `(B, P, D)`, `(B, 1, D) -> (B, P)`."""
    return torch.bmm(tokens, vector.transpose(1, 2)).squeeze(-1)


def _float32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Saved statistics in float32 for a hand-written backward, whatever autocast made of them in the forward (the
    public functions leave autocast; a caller of the `Function` itself may not have)."""
    return [tensor.float() for tensor in tensors]


def _unit_vector_vjp_into(
    out: torch.Tensor, tokens: torch.Tensor, norm: torch.Tensor, clamped: torch.Tensor, token_dot_v: torch.Tensor
) -> None:
    """The backward of `u(h) = h / max(||h||, 1e-8)`, in place. On entry `out` holds `v / max(||h||, 1e-8)` for an
    incoming gradient `v`; this subtracts `h (h . v) / (||h|| max(||h||, 1e-8)^2)` where the norm is not clamped (as
    autograd's `clamp_min` backward passes the norm's gradient only there). `tokens`, `out`: `(B, P, D)`; `norm`,
    `clamped` (`max(norm, 1e-8)`), `token_dot_v` (`h . v`): `(B, P)`."""
    scale = torch.where(norm >= NORM_EPS, token_dot_v / (clamped * clamped * clamped), 0.0)  # clamped = norm there
    out.addcmul_(tokens, scale.unsqueeze(-1), value=-1.0)


class _SignedPatchCosine(torch.autograd.Function):
    """`||mean_i u(h_i)||^2` averaged over images, with a hand-written backward that writes the gradient into one
    `(B, N, D)` tensor (zero on the prefix tokens): autograd's own backward of the same expression holds about four
    `(B, P, D)` temporaries and the slice's zero-padded copy at the start of the backward, the step's memory peak."""

    @staticmethod
    def forward(ctx, hidden_states, num_prefix_tokens):
        tokens = hidden_states[:, num_prefix_tokens:].float()
        norm = torch.linalg.vector_norm(tokens, dim=-1)  # (B, P)
        clamped = norm.clamp_min(NORM_EPS)
        mean_direction = _weighted_token_sum(clamped.reciprocal(), tokens).squeeze(1) / tokens.shape[1]  # (B, D)
        ctx.save_for_backward(hidden_states, norm, clamped, mean_direction)
        ctx.num_prefix_tokens = num_prefix_tokens
        return mean_direction.pow(2).sum(dim=-1).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden_states, *saved = ctx.saved_tensors
        norm, clamped, mean_direction = _float32(saved)
        tokens = hidden_states[:, ctx.num_prefix_tokens :].float()
        batch, patches = norm.shape
        # d/du_i = 2 m / (B P), the same vector for every patch of an image.
        direction_grad = mean_direction * (2.0 * grad_output.float() / (batch * patches))  # (B, D)
        grad = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        out = grad[:, ctx.num_prefix_tokens :]
        torch.mul(direction_grad.unsqueeze(1), clamped.reciprocal().unsqueeze(-1), out=out)
        _unit_vector_vjp_into(out, tokens, norm, clamped, _token_dots(tokens, direction_grad.unsqueeze(1)))
        return grad.to(hidden_states.dtype), None


class _PatchContrastive(torch.autograd.Function):
    """The patch contrastive loss (method 1b) with a hand-written backward that writes each input's gradient into one
    `(B, N, D)` tensor (zero on the prefix tokens): every gradient is a per-token combination of the token itself,
    its partner in the other layer and one per-image sum, built in place. Autograd's own backward of the closed form
    holds several `(B, P, D)` temporaries and two zero-padded slice copies at the start of the backward, the step's
    memory peak."""

    @staticmethod
    def forward(ctx, first_hidden, last_hidden, num_prefix_tokens, detach_first):
        first = first_hidden[:, num_prefix_tokens:].float()  # (B, P, D)
        last = last_hidden[:, num_prefix_tokens:].float()
        first_norm, last_norm = torch.linalg.vector_norm(first, dim=-1), torch.linalg.vector_norm(last, dim=-1)
        first_clamped, last_clamped = first_norm.clamp_min(NORM_EPS), last_norm.clamp_min(NORM_EPS)
        patches = first.shape[1]
        dot = _rowwise_dot(first, last)  # (B, P): h0_i . hL_i
        direction_sum = _weighted_token_sum(last_clamped.reciprocal(), last)  # (B, 1, D): sum_j c_j
        first_dot_sum = _token_dots(first, direction_sum)  # (B, P): h0_i . sum_j c_j
        positive = dot / (first_clamped * last_clamped)
        negative = (first_dot_sum / first_clamped - positive) / (patches - 1)
        margin = negative - positive
        ctx.save_for_backward(
            first_hidden, last_hidden, first_norm, first_clamped, last_norm, last_clamped, dot, first_dot_sum,
            direction_sum, margin,
        )  # fmt: skip
        ctx.num_prefix_tokens, ctx.detach_first = num_prefix_tokens, detach_first
        return F.softplus(margin).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        first_hidden, last_hidden, *saved = ctx.saved_tensors
        first_norm, first_clamped, last_norm, last_clamped, dot, first_dot_sum, direction_sum, margin = _float32(saved)
        k = ctx.num_prefix_tokens
        first, last = first_hidden[:, k:].float(), last_hidden[:, k:].float()
        batch, patches = margin.shape
        # w_i = dL/d(neg_i - pos_i); pos_i enters with -P/(P-1) (itself and its share of neg_i), each row sum with
        # 1/(P-1).
        w = torch.sigmoid(margin) * (grad_output.float() / (batch * patches))
        on_positive, on_sum = -patches / (patches - 1), 1.0 / (patches - 1)
        grad_first = grad_last = None
        if ctx.needs_input_grad[0] and not ctx.detach_first:
            # dL/da_i = on_positive w_i c_i + on_sum w_i sum_j c_j, with c_i = hL_i / |hL_i|.
            grad_first = torch.zeros(first_hidden.shape, dtype=torch.float32, device=first_hidden.device)
            out = grad_first[:, k:]
            torch.mul(last, (on_positive * w / (last_clamped * first_clamped)).unsqueeze(-1), out=out)
            out.addcmul_(direction_sum, (on_sum * w / first_clamped).unsqueeze(-1))
            token_dot_v = on_positive * w * dot / last_clamped + on_sum * w * first_dot_sum
            _unit_vector_vjp_into(out, first, first_norm, first_clamped, token_dot_v)
            grad_first = grad_first.to(first_hidden.dtype)
        if ctx.needs_input_grad[1]:
            # dL/dc_j = on_positive w_j a_j + on_sum sum_i w_i a_i, with a_i = h0_i / |h0_i|.
            weighted_first = _weighted_token_sum(w / first_clamped, first)  # (B, 1, D)
            grad_last = torch.zeros(last_hidden.shape, dtype=torch.float32, device=last_hidden.device)
            out = grad_last[:, k:]
            torch.mul(first, (on_positive * w / (first_clamped * last_clamped)).unsqueeze(-1), out=out)
            out.addcmul_(weighted_first, (on_sum / last_clamped).unsqueeze(-1))
            last_dot_weighted = _token_dots(last, weighted_first)
            token_dot_v = on_positive * w * dot / first_clamped + on_sum * last_dot_weighted
            _unit_vector_vjp_into(out, last, last_norm, last_clamped, token_dot_v)
            grad_last = grad_last.to(last_hidden.dtype)
        return grad_first, grad_last, None, None


def patch_cosine_loss(hidden_states: torch.Tensor, num_prefix_tokens: int = 1, variant: str = "signed") -> torch.Tensor:
    """Within-layer patch cosine similarity (method 1a), applied to the last block's output.

    `variant="signed"` (released code): mean of the full P x P signed cosine Gram matrix, diagonal included,
    computed as `||mean_i u(h_i)||^2` in O(P*D). `variant="gong"` (Gong et al. 2021): mean absolute cosine over
    the P*(P-1) off-diagonal pairs (needs the Gram matrix, O(P^2*D)).

    Args:
        hidden_states: `(B, N, D)` token embeddings (pre-LayerNorm output of the last block, `h^L`).
        num_prefix_tokens: K, the number of leading non-patch tokens to drop (1 for ViT, 2 for DeiT).
        variant: `"signed"` or `"gong"`.

    Returns:
        Float32 scalar, averaged over the batch.
    """
    if variant not in PATCH_COSINE_VARIANTS:
        raise ValueError(f"`variant` must be one of {PATCH_COSINE_VARIANTS}, got {variant!r}.")
    with _no_autocast(hidden_states):
        min_patches = 2 if variant == "gong" else 1
        _check_patch_tokens(hidden_states, num_prefix_tokens, "hidden_states", min_patches)
        if variant == "signed":
            return _SignedPatchCosine.apply(hidden_states, num_prefix_tokens)
        u = unit_vectors(hidden_states[:, num_prefix_tokens:].float())
        num_patches = u.shape[1]
        gram = torch.bmm(u, u.transpose(1, 2)).abs()  # (B, P, P)
        off_diagonal = gram.sum(dim=(1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(dim=-1)
        return (off_diagonal / (num_patches * (num_patches - 1))).mean()


def patch_contrastive_loss(
    first_hidden: torch.Tensor,
    last_hidden: torch.Tensor,
    num_prefix_tokens: int = 1,
    detach_first: bool = False,
) -> torch.Tensor:
    """Cross-layer patch contrastive loss (method 1b).

    With `a_i = u(h^0_i)`, `c_j = u(h^L_j)` and `s_ij = a_i . c_j` over patch tokens of one image:
    `pos_i = s_ii`, `neg_i = sum_{j != i} s_ij / (P - 1)` and the loss is
    `mean_{b,i} softplus(neg_i - pos_i)` (= `-log(e^pos / (e^pos + e^neg))`, temperature 1). The row sums use
    `sum_j s_ij = a_i . sum_j c_j`, so the cost is O(P*D).

    Args:
        first_hidden: `(B, N, D)` tokens entering block 1 (`h^0`: patch + position embeddings, after dropout).
        last_hidden: `(B, N, D)` pre-LayerNorm output of the last block (`h^L`).
        num_prefix_tokens: K, leading non-patch tokens to drop.
        detach_first: stop the gradient through `h^0` (Gong et al.); the released code does not.

    Returns:
        Float32 scalar.
    """
    if first_hidden.shape != last_hidden.shape:
        raise ValueError(
            f"`first_hidden` {tuple(first_hidden.shape)} and `last_hidden` {tuple(last_hidden.shape)} must have the "
            "same (batch, tokens, hidden) shape."
        )
    with _no_autocast(last_hidden):
        _check_patch_tokens(first_hidden, num_prefix_tokens, "first_hidden", 2)
        _check_patch_tokens(last_hidden, num_prefix_tokens, "last_hidden", 2)
        return _PatchContrastive.apply(first_hidden, last_hidden, num_prefix_tokens, detach_first)


def attention_cosine_loss(attention_probs: torch.Tensor) -> torch.Tensor:
    """Cross-head attention cosine similarity (method 2), on block 1's attention maps.

    Each head's map is flattened to a vector of N^2 numbers; the loss is the mean cosine over all H x H
    head pairs (diagonal included), `||mean_h u(vec A_h)||^2`, averaged over the batch.

    Args:
        attention_probs: `(B, H, N, N)` softmax attention probabilities (before attention dropout).

    Returns:
        Float32 scalar.
    """
    if attention_probs.ndim != 4:
        raise ValueError(
            "`attention_probs` must have shape (batch, heads, tokens, tokens), got shape "
            f"{tuple(attention_probs.shape)}."
        )
    with _no_autocast(attention_probs):
        maps = attention_probs.float().flatten(start_dim=2)  # (B, H, N*N)
        # Same value as ||mean_h u(A_h)||^2, from the H x H head Gram: autograd keeps only the maps themselves
        # (already saved by the attention), not a normalised (B, H, N*N) copy.
        gram = torch.bmm(maps, maps.transpose(1, 2))  # (B, H, H)
        norms = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(NORM_EPS**2).sqrt()  # (B, H) = max(||A_h||, eps)
        cosine = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
        return cosine.mean(dim=(1, 2)).mean()


def softmax_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention probabilities `softmax(q k^T * scaling + bias)` as an eager attention kernel computes them (the
    softmax in float32, or float64 for float64 inputs; the result in the query's dtype).

    Args:
        query, key: `(B, H, N, d)`.
        scaling: the factor on the dot products (usually `d ** -0.5`).
        bias: an additive bias broadcastable to `(B, H, N, N)` (e.g. BEiT's relative position bias), or None.

    Returns:
        `(B, H, N, N)`.
    """
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # scaling the (B, H, N, d) query, not the map
    if bias is not None:
        scores = scores + bias
    return F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)


# Attention-map entries one chunk of `attention_cosine_loss_from_scores` builds at once: 2**20 (4 MiB in float32),
# e.g. 9 images of DeiT-Tiny's 3 heads x 197 x 197.
ATTENTION_CHUNK_ELEMENTS = 2**20


class _AttentionCosineFromScores(torch.autograd.Function):
    """`attention_cosine_loss(softmax_attention(query, key, scaling, bias))` in chunks of images, the gradients for
    the query, key and bias taken in the forward while each chunk's maps exist, so the backward only scales them:
    the maps are built once, never kept, never recomputed.

    The gradient in closed form, per image, with `n_h = max(||A_h||, eps)`, `cos = G / (n n^T)` for the head Gram
    `G = A A^T` and `c_h = sum_g cos_hg`: `dL/dA = M A` with
    `M_hg = 2 / H^2 * (1 / (n_h n_g) - [h = g] [||A_h|| >= eps] c_h / n_h^2)`, then the softmax's backward
    `dS = P * (dA - rowsum(dA * P))` and the two products with the key and the query."""

    @staticmethod
    def forward(ctx, query, key, bias, options):
        scaling, images_per_chunk, per_image_bias, matmul_dtype, compute_grad = options
        batch, heads = query.shape[:2]
        total = torch.zeros((), device=query.device, dtype=torch.float32)
        grad_query = torch.empty_like(query) if compute_grad[0] else None
        grad_key = torch.empty_like(key) if compute_grad[1] else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if compute_grad[2] else None
        # d(mean over images of the mean over H x H head pairs) / d(each cosine), before the Gram's chain rule.
        pair_weight = 2.0 / (heads * heads * batch)
        for start in range(0, batch, images_per_chunk):
            stop = min(start + images_per_chunk, batch)
            scaled_query = (query[start:stop] * scaling).to(matmul_dtype)  # scaling the query, as softmax_attention
            chunk_key = key[start:stop].to(matmul_dtype)
            scores = torch.matmul(scaled_query, chunk_key.transpose(-1, -2))  # (b, H, N, N)
            if bias is not None:
                scores = scores + (bias[start:stop] if per_image_bias else bias)
            probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
            del scores
            maps = probs.to(query.dtype).float().flatten(start_dim=2)  # (b, H, N*N), probs itself in float32
            gram = torch.bmm(maps, maps.transpose(1, 2))  # (b, H, H)
            squared_norms = torch.diagonal(gram, dim1=1, dim2=2)
            norms = squared_norms.clamp_min(NORM_EPS**2).sqrt()  # (b, H)
            pair_norms = norms.unsqueeze(-1) * norms.unsqueeze(-2)
            cosine = gram / pair_norms
            total = total + cosine.mean(dim=(1, 2)).sum()
            if not any(compute_grad):
                continue
            mix = pair_weight / pair_norms  # (b, H, H): dL/dA = mix @ A, the projection on the diagonal below
            unclamped = (squared_norms >= NORM_EPS**2).to(mix.dtype)
            torch.diagonal(mix, dim1=1, dim2=2).sub_(pair_weight * cosine.sum(dim=-1) * unclamped / norms.square())
            grad_scores = torch.bmm(mix, maps).view_as(probs)  # dL/dP, (b, H, N, N)
            del maps
            grad_scores.sub_((grad_scores * probs).sum(dim=-1, keepdim=True)).mul_(probs)  # the softmax's backward
            del probs
            if grad_bias is not None:
                if per_image_bias:
                    grad_bias[start:stop] = grad_scores.sum_to_size(grad_bias[start:stop].shape)
                else:
                    grad_bias += grad_scores.sum_to_size(bias.shape)
            grad_scores = grad_scores.to(matmul_dtype)
            if grad_query is not None:
                grad_query[start:stop] = (torch.matmul(grad_scores, chunk_key) * scaling).to(query.dtype)
            if grad_key is not None:
                grad_key[start:stop] = torch.matmul(grad_scores.transpose(-1, -2), scaled_query).to(key.dtype)
        ctx.save_for_backward(grad_query, grad_key, None if grad_bias is None else grad_bias.to(bias.dtype))
        return total / batch

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple(None if grad is None else grad * grad_output.to(grad.dtype) for grad in ctx.saved_tensors)
        return (*grads, None)


def attention_cosine_loss_from_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    chunk_elements: int = ATTENTION_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """`attention_cosine_loss(softmax_attention(query, key, scaling, bias))` without keeping the `(B, H, N, N)`
    probabilities: the loss is a mean over images, so it runs in chunks of images, and each chunk's gradients for
    the query, key and bias are taken in the forward while its maps exist (the backward only scales them). With a
    fused kernel (SDPA) that never builds the probabilities, the term holds one chunk's maps at a time and builds
    them once; what it keeps through the step is the query's and key's gradient, `(B, H, N, d)` each.

    The dot products run in the autocast dtype when autocast is on (as the attention's own product would), the
    softmax, the Gram and the gradients' element-wise work in float32.

    Args:
        query, key: `(B, H, N, d)` the block's attention query and key (after any query/key norm).
        scaling, bias: as in `softmax_attention` (a bias with a batch dimension of B is chunked with the images).
        chunk_elements: map entries per chunk (rounded to whole images; at least one image).

    Returns:
        Float32 scalar.
    """
    if query.ndim != 4 or query.shape != key.shape:
        raise ValueError(
            f"`query` and `key` must have the same shape (batch, heads, tokens, head_dim), got {tuple(query.shape)} "
            f"and {tuple(key.shape)}."
        )
    batch, heads, tokens, _ = query.shape
    images_per_chunk = max(1, chunk_elements // max(1, heads * tokens * tokens))
    per_image_bias = bias is not None and bias.ndim == 4 and bias.shape[0] == batch and batch > 1
    matmul_dtype = _matmul_dtype(query, torch.promote_types(query.dtype, key.dtype))
    options = (scaling, images_per_chunk, per_image_bias, matmul_dtype, _needs_grad(query, key, bias))
    with _no_autocast(query):
        return _AttentionCosineFromScores.apply(query, key, bias, options)


@dataclass
class PowerIterationState:
    """Normalised power-iteration vectors carried across training steps, one pair per matrix.

    Used by `weight_condition_loss(..., state=...)` the way `torch.nn.utils.spectral_norm` keeps its `u`:
    a few mat-vecs per step refine the previous estimate instead of restarting from noise.

    Attributes:
        max_vectors: `(M, D_out)` estimates of the top eigenvector of `W W^T` per matrix, or None before the
            first call.
        min_vectors: `(M, D_out)` estimates of the bottom eigenvector, or None before the first call.
    """

    max_vectors: torch.Tensor | None = None
    min_vectors: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"max_vectors": self.max_vectors, "min_vectors": self.min_vectors}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.max_vectors = state["max_vectors"]
        self.min_vectors = state["min_vectors"]


class _ShiftedGram:
    """`v -> (W W^T - shift I) v` for a stack of matrices without forming `W W^T`: O(D^2), not O(D^3)."""

    def __init__(self, weight: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        self.weight = weight  # (M, d_out, d_in)
        self.shift = shift  # (M,) or None

    # Mat-vecs are written as row vector times matrix, `(M, 1, D) @ (M, D, D)`: on CPU this runs ~7x faster
    # than the column form `(M, D, D) @ (M, D, 1)` for the same numbers (measured on 36 x 192 x 192).
    def project(self, vector: torch.Tensor) -> torch.Tensor:
        """`W^T v`: `(M, d_out) -> (M, d_in)`."""
        return torch.bmm(vector.unsqueeze(1), self.weight).squeeze(1)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        projected = self.project(vector)
        product = torch.bmm(projected.unsqueeze(1), self.weight.transpose(1, 2)).squeeze(1)  # W (W^T v)
        return product if self.shift is None else product - self.shift[:, None] * vector

    def rayleigh(self, vector: torch.Tensor) -> torch.Tensor:
        """`v^T A v / v^T v` per matrix, with `v^T W W^T v = ||W^T v||^2`: `(M, d_out) -> (M,)`."""
        projected = self.project(vector)
        squared_norm = (vector * vector).sum(-1)
        numerator = projected.pow(2).sum(-1)
        if self.shift is not None:
            numerator = numerator - self.shift * squared_norm
        return numerator / squared_norm.clamp_min(NORM_EPS)

    def power_steps(self, vector: torch.Tensor, steps: int) -> torch.Tensor:
        """`steps` normalised power-iteration steps (normalising leaves the Rayleigh quotient unchanged)."""
        for _ in range(steps):
            vector = unit_vectors(self(vector))
        return vector


def _restart_vanished(vectors: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Replace iteration vectors that collapsed to zero (e.g. after an all-zero matrix, where `M v = 0`) by fresh
    random unit vectors, so the estimate recovers instead of staying at 0 forever. No host sync."""
    fresh = unit_vectors(torch.rand(vectors.shape, device=vectors.device, generator=generator))
    vanished = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True) < 0.5  # live vectors have norm 1
    return torch.where(vanished, fresh, vectors)


def weight_condition_loss(
    weight: torch.Tensor,
    estimator: str = "power",
    num_iterations: int = 1,
    state: PowerIterationState | None = None,
    generator: torch.Generator | None = None,
    start_vectors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Condition-number orthogonality loss (method 3): `sum_W (lambda_max(W W^T) - lambda_min(W W^T))^2`.

    Pass one matrix or a stack of them (e.g. the Q, K and V weights of all blocks at once); the result is the
    sum over the stack.

    Estimators:
    - `"power"` without `state` (released code): from a fresh `x ~ U[0,1)^D`, `num_iterations` power steps
      then a Rayleigh quotient (for 1 step this is `x^T M^3 x / x^T M^2 x`, `M = W W^T`); `lambda_min` by the
      same estimate on `M - lambda_max I`, plus `lambda_max`. Gradients flow through the whole estimate.
    - `"power"` with a `PowerIterationState`: the iteration starts from the stored vectors and runs without
      gradient (as `spectral_norm`), the state is updated in place, and the eigenvalues are Rayleigh
      quotients of `M` at the refined vectors, differentiable in `W`.
    - `"exact"`: squared extreme singular values from `torch.linalg.svdvals`.

    Args:
        weight: `(D_out, D_in)` or `(M, D_out, D_in)` weight matrices (`nn.Linear.weight` layout).
        estimator: `"power"` or `"exact"`.
        num_iterations: power-iteration steps per call (>= 1).
        state: persistent vectors for `estimator="power"`; None reproduces the released behaviour.
        generator: random generator for the starting vectors (on `weight.device`); None uses the global one.
        start_vectors: `(x, y)`, each `(M, D_out)`, the starting vectors to use instead of drawing them (for the
            top and the bottom eigenvector; with `state`, only where the state is still empty). Sharded training
            passes vectors broadcast from rank 0, so every rank computes the same estimate.

    Returns:
        Float32 scalar.
    """
    if estimator not in WEIGHT_ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {WEIGHT_ESTIMATORS}, got {estimator!r}.")
    if num_iterations < 1:
        raise ValueError(f"`num_iterations` must be >= 1, got {num_iterations}.")
    if weight.ndim not in (2, 3):
        raise ValueError(
            f"`weight` must be one matrix (D_out, D_in) or a stack (M, D_out, D_in), got shape {tuple(weight.shape)}."
        )
    with _no_autocast(weight):
        w = weight.float()
        if w.ndim == 2:
            w = w.unsqueeze(0)
        num_matrices, d_out, d_in = w.shape
        if estimator == "exact":
            singular = torch.linalg.svdvals(w)  # (M, min(d_out, d_in)), descending
            lam_max = singular[:, 0].pow(2)
            # W W^T is d_out x d_out with rank <= d_in: its smallest eigenvalue is 0 when d_out > d_in.
            lam_min = singular[:, -1].pow(2) if d_out <= d_in else torch.zeros_like(lam_max)
            return (lam_max - lam_min).pow(2).sum()

        gram = _ShiftedGram(w)  # M = W W^T, applied matrix-free
        expected = (num_matrices, d_out)
        if start_vectors is not None and any(tuple(v.shape) != expected for v in start_vectors):
            raise ValueError(
                f"`start_vectors` must be two {expected} tensors, got {[tuple(v.shape) for v in start_vectors]}."
            )

        def start(index: int) -> torch.Tensor:
            if start_vectors is not None:
                return start_vectors[index].to(device=w.device, dtype=w.dtype)
            return torch.rand(expected, device=w.device, generator=generator)

        if state is None:
            x = start(0)
            lam_max = gram.rayleigh(gram.power_steps(x, num_iterations))
            shifted = _ShiftedGram(w, shift=lam_max)
            y = start(1)
            lam_min = shifted.rayleigh(shifted.power_steps(y, num_iterations)) + lam_max
            return (lam_max - lam_min).pow(2).sum()

        for index, name in enumerate(("max_vectors", "min_vectors")):
            stored = getattr(state, name)
            if stored is None:
                setattr(state, name, unit_vectors(start(index)))
            elif tuple(stored.shape) != expected:
                raise ValueError(
                    f"The PowerIterationState holds {name} of shape {tuple(stored.shape)} but the weights need "
                    f"{expected}: one state serves one fixed stack of matrices. Create a new PowerIterationState."
                )
        with torch.no_grad():
            detached = _ShiftedGram(w.detach())
            state.max_vectors = _restart_vanished(
                detached.power_steps(state.max_vectors.to(w.device), num_iterations), generator
            )
            shifted = _ShiftedGram(w.detach(), shift=detached.rayleigh(state.max_vectors))
            state.min_vectors = _restart_vanished(
                shifted.power_steps(state.min_vectors.to(w.device), num_iterations), generator
            )
        # v^T (M - s I) v / v^T v + s = v^T M v / v^T v: both eigenvalues are Rayleigh quotients of M itself.
        lam_max = gram.rayleigh(state.max_vectors)
        lam_min = gram.rayleigh(state.min_vectors)
        return (lam_max - lam_min).pow(2).sum()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `(R, C)` logits against `(R, C)` probability targets or `(R,)` class indices."""
    with _no_autocast(logits):
        return F.cross_entropy(logits.float(), targets.float() if targets.is_floating_point() else targets)


def patch_mixing_loss(
    token_logits: torch.Tensor,
    targets: torch.Tensor,
    patch_targets: torch.Tensor,
    num_prefix_tokens: int = 1,
    image_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch-wise mixing loss (method 1c): `(CE(z_CLS, y) + sum_p CE(z_p, y_p)) / (1 + P)`, mean over the batch.

    One fused cross-entropy over the `B * (1 + P)` rows. Prefix tokens other than CLS (DeiT's distillation
    token, DINOv2's registers) are not part of the loss. For heads that do not read a CLS token (mean-pooled, or
    DINOv2's CLS + mean), `image_logits` takes the place of `z_CLS`: the image-level term is then the model's own
    image prediction.

    Args:
        token_logits: `(B, N, C)` classifier logits of every token; token 0 is CLS, tokens `K:` are patches.
        targets: `(B, C)` image-level (mixed, smoothed) probabilities, or `(B,)` class indices.
        patch_targets: `(B, P, C)` per-patch probabilities, or `(B, P)` class indices.
        num_prefix_tokens: K (may be 0 when `image_logits` is given, e.g. I-JEPA).
        image_logits: `(B, C)` the image logits to use instead of token 0's, or None.

    Returns:
        Float32 scalar.
    """
    if token_logits.ndim != 3:
        raise ValueError(f"`token_logits` must have shape (batch, tokens, classes), got {tuple(token_logits.shape)}.")
    if num_prefix_tokens < (0 if image_logits is not None else 1):
        raise ValueError(
            f"patch_mixing_loss needs the CLS token at position 0 (num_prefix_tokens >= 1) or `image_logits`, got "
            f"num_prefix_tokens={num_prefix_tokens}."
        )
    batch, tokens, classes = token_logits.shape
    if image_logits is not None and tuple(image_logits.shape) != (batch, classes):
        raise ValueError(f"`image_logits` must have shape {(batch, classes)}, got {tuple(image_logits.shape)}.")
    num_patches = tokens - num_prefix_tokens
    soft = targets.is_floating_point()
    expected_targets = (batch, classes) if soft else (batch,)
    expected_patch = (batch, num_patches, classes) if soft else (batch, num_patches)
    if tuple(targets.shape) != expected_targets or tuple(patch_targets.shape) != expected_patch:
        raise ValueError(
            f"With token_logits of shape {tuple(token_logits.shape)} and {num_prefix_tokens} prefix token(s), "
            f"`targets` must have shape {expected_targets} and `patch_targets` {expected_patch}; got "
            f"{tuple(targets.shape)} and {tuple(patch_targets.shape)}."
        )
    if patch_targets.is_floating_point() != soft:
        raise ValueError("`targets` and `patch_targets` must both be probabilities or both be class indices.")
    if image_logits is not None:
        logits = torch.cat([image_logits.unsqueeze(1), token_logits[:, num_prefix_tokens:]], dim=1)
    elif num_prefix_tokens == 1:
        logits = token_logits
    else:
        logits = torch.cat([token_logits[:, :1], token_logits[:, num_prefix_tokens:]], dim=1)
    all_targets = torch.cat([targets.unsqueeze(1), patch_targets], dim=1)  # (B, 1 + P[, C])
    flat_targets = all_targets.reshape(-1, classes) if soft else all_targets.reshape(-1)
    return soft_target_cross_entropy(logits.reshape(-1, classes), flat_targets)


def _two_label_rows(
    logits: torch.Tensor,
    own_index: torch.Tensor,
    partner_index: torch.Tensor,
    weights: torch.Tensor,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(per-row cross-entropy, logsumexp)` of float32 `(..., C)` logits against the two-label targets
    (`two_label_cross_entropy_sum`); `own_index`/`partner_index` are `(..., 1)` class indices."""
    lse = torch.logsumexp(logits, dim=-1)
    own = logits.gather(-1, own_index).squeeze(-1)
    partner = logits.gather(-1, partner_index).squeeze(-1)
    per_row = lse - (1.0 - label_smoothing) * (weights * own + (1.0 - weights) * partner)
    if label_smoothing > 0:
        per_row = per_row - (label_smoothing / logits.shape[-1]) * logits.sum(dim=-1)
    return per_row, lse


def _two_label_gradient_(
    softmax: torch.Tensor,
    own_index: torch.Tensor,
    partner_index: torch.Tensor,
    weights: torch.Tensor,
    row_factor: torch.Tensor,
    label_smoothing: float,
) -> torch.Tensor:
    """Turn `(..., C)` softmax probabilities, in place, into the gradient `row_factor * (softmax - target)` of the
    two-label cross-entropy; `weights` and `row_factor` broadcast to `softmax.shape[:-1]`."""
    if label_smoothing > 0:
        softmax.sub_(label_smoothing / softmax.shape[-1])
    rows = softmax.shape[:-1]
    weights = weights.expand(rows)
    softmax.scatter_add_(-1, own_index, (-(1.0 - label_smoothing) * weights).unsqueeze(-1))
    softmax.scatter_add_(-1, partner_index, (-(1.0 - label_smoothing) * (1.0 - weights)).unsqueeze(-1))
    return softmax.mul_(row_factor.expand(rows).unsqueeze(-1))


class _TwoLabelCrossEntropySum(torch.autograd.Function):
    """Forward: the summed two-label cross-entropy of `two_label_cross_entropy_sum`. Backward: its gradient
    `row_scale * (softmax(z) - target)` written into one new `(..., C)` tensor, with no target tensor and none of
    the full-size zero tensors that autograd's gather and slice backwards would allocate."""

    @staticmethod
    def forward(ctx, logits, own_index, partner_index, weights, row_scale, label_smoothing):
        per_row, lse = _two_label_rows(logits, own_index, partner_index, weights, label_smoothing)
        ctx.save_for_backward(logits, lse, own_index, partner_index, weights, row_scale)
        ctx.label_smoothing = label_smoothing
        return (per_row * row_scale).sum()

    @staticmethod
    def backward(ctx, grad_output):
        logits, lse, own_index, partner_index, weights, row_scale = ctx.saved_tensors
        softmax = torch.sub(logits, lse.unsqueeze(-1)).exp_()  # the only (..., C) allocation
        grad = _two_label_gradient_(
            softmax, own_index, partner_index, weights, row_scale * grad_output, ctx.label_smoothing
        )
        return grad, None, None, None, None, None


def two_label_cross_entropy_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    weights: torch.Tensor,
    label_smoothing: float,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy against targets that mix two smoothed one-hot labels, without building the targets.

    Row r's target is `w_r * s(a_r) + (1 - w_r) * s(b_r)` with `s(y) = (1 - eps) * onehot(y) + eps / C`, so its
    cross-entropy is `logsumexp(z_r) - (1 - eps) * (w_r * z_r[a_r] + (1 - w_r) * z_r[b_r]) - eps / C * sum_c z_r[c]`.
    The same value as `soft_target_cross_entropy` on the built targets (times the row count), with no `(..., C)`
    target, log-probability or product tensor; the backward allocates one `(..., C)` tensor, the gradient.

    Args:
        logits: `(B, ..., C)` logits (any float dtype; computed in float32).
        labels, partner_labels: `(B,)` class indices `a` and `b`, shared by every row of a sample.
        weights: the weight `w` of `labels`, broadcastable to `logits.shape[:-1]` (e.g. `(P,)` per patch, or a
            0-d tensor).
        label_smoothing: `eps` in [0, 1).
        row_scale: a factor per row, broadcastable to `logits.shape[:-1]` (e.g. 0 for rows to leave out); None: 1.

    Returns:
        Float32 scalar: the sum over all rows of `row_scale * cross-entropy`.
    """
    with _no_autocast(logits):
        logits = logits.float()
        index_shape = (labels.shape[0],) + (1,) * (logits.ndim - 1)
        expanded = (*logits.shape[:-1], 1)
        own_index = labels.view(index_shape).expand(expanded)
        partner_index = partner_labels.view(index_shape).expand(expanded)
        weights = torch.as_tensor(weights, device=logits.device, dtype=torch.float32)
        if row_scale is None:
            row_scale = torch.ones((), device=logits.device, dtype=torch.float32)
        return _TwoLabelCrossEntropySum.apply(
            logits, own_index, partner_index, weights, row_scale.float(), float(label_smoothing)
        )


@dataclass(frozen=True)
class TwoLabelTargets:
    """Per-token targets in two-label form, for `(B, N, C)` token logits (or the features that give them).

    Token t of sample b has the target `w_t * s(a_b) + (1 - w_t) * s(c_b)` with `s(y)` the smoothed one-hot label,
    and its cross-entropy counts `row_scale_t` times (0 leaves prefix tokens out). A frozen dataclass: FSDP2's input
    casting (a pytree map) leaves it whole, so the float weights keep float32 under a bf16 parameter dtype.

    Attributes:
        labels, partner_labels: `(B,)` class indices `a` and `c`.
        weights: `(N,)` float32 weight of `labels` per token.
        row_scale: `(N,)` float32 factor of each token's cross-entropy.
        label_smoothing: `eps` of `s`.
    """

    labels: torch.Tensor
    partner_labels: torch.Tensor
    weights: torch.Tensor
    row_scale: torch.Tensor
    label_smoothing: float


def patch_token_targets(
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    patch_weights: torch.Tensor,
    label_smoothing: float,
    num_prefix_tokens: int = 1,
) -> TwoLabelTargets:
    """The patch-wise loss's targets for every token: the patches' own weights, the prefix tokens scaled by 0.

    Prefix tokens get a row scale of 0 rather than being sliced off: the backward of a slice of the logits would
    allocate a zero-filled `(B, N, C)` gradient.

    Args:
        labels, partner_labels: `(B,)` the two labels of each sample.
        patch_weights: `(P,)` the weight of `labels` in each patch's target.
        label_smoothing: the smoothing of each one-hot label before mixing.
        num_prefix_tokens: K; the targets cover N = K + P tokens.
    """
    device = patch_weights.device
    prefix = torch.ones(num_prefix_tokens, device=device, dtype=torch.float32)
    patches = torch.ones(patch_weights.shape[0], device=device, dtype=torch.float32)
    weights = torch.cat([prefix, patch_weights.to(dtype=torch.float32)])
    row_scale = torch.cat([torch.zeros_like(prefix), patches])
    return TwoLabelTargets(labels, partner_labels, weights, row_scale, float(label_smoothing))


def patch_mixing_loss_from_token_sum(
    token_sum: torch.Tensor,
    image_logits: torch.Tensor,
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    lam: float | torch.Tensor,
    label_smoothing: float,
    num_patches: int,
) -> torch.Tensor:
    """The patch-wise mixing loss from its patch part, already summed over every patch row
    (`two_label_cross_entropy_sum` or `linear_two_label_cross_entropy_sum` with `patch_token_targets`), and the
    image logits: `(CE(image) + sum_p CE(patch p)) / (1 + P)`, mean over the batch.

    Args:
        token_sum: `()` float32, the summed patch cross-entropies of the batch.
        image_logits: `(B, C)` the image logits (token 0's for CLS heads, the pooled head's else).
        labels, partner_labels: `(B,)` the two labels of each sample.
        lam: the image-level weight of `labels` (a float, or a 0-d tensor on the logits' device).
        label_smoothing: the smoothing of each one-hot label before mixing.
        num_patches: P.
    """
    device = image_logits.device
    # torch.full fills on the device; torch.tensor(lam, device=...) would copy from host memory (a synchronising copy).
    if isinstance(lam, torch.Tensor):
        lam_tensor = lam.to(device=device, dtype=torch.float32)
    else:
        lam_tensor = torch.full((), float(lam), device=device, dtype=torch.float32)
    image = two_label_cross_entropy_sum(image_logits, labels, partner_labels, lam_tensor, label_smoothing)
    return (image + token_sum) / (image_logits.shape[0] * (1 + num_patches))


def patch_mixing_loss_two_label(
    token_logits: torch.Tensor,
    image_logits: torch.Tensor,
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    lam: float,
    patch_weights: torch.Tensor,
    label_smoothing: float,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """`patch_mixing_loss` for targets in the two-label form of `mixing.MixedBatch`, equal to it (to float32
    rounding) on the built targets, without building the `(B, P, C)` targets or concatenating the logits.

    Args:
        token_logits: `(B, N, C)` classifier logits of every token; tokens `K:` are the patches.
        image_logits: `(B, C)` the image logits (token 0's for CLS heads, the pooled head's else).
        labels, partner_labels: `(B,)` the two labels of each sample.
        lam: the image-level weight of `labels`.
        patch_weights: `(P,)` the weight of `labels` in each patch's target.
        label_smoothing: the smoothing of each one-hot label before mixing.
        num_prefix_tokens: K.

    Returns:
        Float32 scalar: `(CE(image) + sum_p CE(patch p)) / (1 + P)`, mean over the batch.
    """
    batch, tokens, classes = token_logits.shape
    num_patches = tokens - num_prefix_tokens
    if tuple(image_logits.shape) != (batch, classes) or tuple(patch_weights.shape) != (num_patches,):
        raise ValueError(
            f"With token_logits of shape {tuple(token_logits.shape)} and {num_prefix_tokens} prefix token(s), "
            f"`image_logits` must have shape {(batch, classes)} and `patch_weights` {(num_patches,)}; got "
            f"{tuple(image_logits.shape)} and {tuple(patch_weights.shape)}."
        )
    targets = patch_token_targets(
        labels, partner_labels, patch_weights.to(token_logits.device), label_smoothing, num_prefix_tokens
    )
    patches = two_label_cross_entropy_sum(
        token_logits, labels, partner_labels, targets.weights, label_smoothing, targets.row_scale
    )
    return patch_mixing_loss_from_token_sum(
        patches, image_logits, labels, partner_labels, lam, label_smoothing, num_patches
    )


# Logits one chunk of `linear_two_label_cross_entropy_sum` builds at once: 2**20 float32 values (4 MiB), e.g. 5 DeiT
# images of 197 tokens at 1,000 classes.
LINEAR_CE_CHUNK_ELEMENTS = 2**20


class _LinearTwoLabelCrossEntropySum(torch.autograd.Function):
    """`two_label_cross_entropy_sum(features @ weight.T + bias, ...)` in batch chunks, its gradients computed in the
    forward (one chunk of logits alive at a time) and only scaled in the backward: neither the `(B, N, C)` logits nor
    their gradient ever exist whole, and nothing is recomputed."""

    @staticmethod
    def forward(ctx, features, weight, bias, labels, partner_labels, weights, row_scale, options):
        label_smoothing, matmul_dtype, samples_per_chunk, compute_grad = options
        batch, tokens, _ = features.shape
        matmul_weight = weight.to(matmul_dtype)
        weights = weights.expand(tokens)
        row_scale = row_scale.expand(tokens)
        total = torch.zeros((), device=features.device, dtype=torch.float32)
        grad_features = torch.empty_like(features) if compute_grad[0] else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if compute_grad[1] else None
        grad_bias = None
        if bias is not None and compute_grad[2]:
            grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)
        for start in range(0, batch, samples_per_chunk):
            stop = min(start + samples_per_chunk, batch)
            rows = features[start:stop].to(matmul_dtype)
            logits = torch.matmul(rows, matmul_weight.t()).float()  # (b, N, C)
            if bias is not None:
                logits += bias[start:stop].unsqueeze(1).float() if bias.ndim == 2 else bias.float()
            own_index = labels[start:stop].view(-1, 1, 1).expand(stop - start, tokens, 1)
            partner_index = partner_labels[start:stop].view(-1, 1, 1).expand(stop - start, tokens, 1)
            per_row, lse = _two_label_rows(logits, own_index, partner_index, weights, label_smoothing)
            total = total + (per_row * row_scale).sum()
            if not any(compute_grad):
                continue
            softmax = logits.sub_(lse.unsqueeze(-1)).exp_()  # in the logits' storage
            grad = _two_label_gradient_(softmax, own_index, partner_index, weights, row_scale, label_smoothing)
            if grad_bias is not None:
                if bias.ndim == 2:
                    grad_bias[start:stop] = grad.sum(dim=1)
                else:
                    grad_bias += grad.sum(dim=(0, 1))
            grad_matmul = grad.to(matmul_dtype)
            if grad_features is not None:
                grad_features[start:stop] = torch.matmul(grad_matmul, matmul_weight).to(features.dtype)
            if grad_weight is not None:
                grad_weight += torch.matmul(grad_matmul.flatten(0, 1).t(), rows.flatten(0, 1)).float()
        ctx.save_for_backward(
            grad_features,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple(None if grad is None else grad * grad_output.to(grad.dtype) for grad in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


def linear_two_label_cross_entropy_sum(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: TwoLabelTargets,
    chunk_elements: int = LINEAR_CE_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """`two_label_cross_entropy_sum` of a linear head's per-token logits `features @ weight.T + bias`, without
    materialising them: the head and the loss run in batch chunks of about `chunk_elements` logits, and each chunk's
    gradients (`softmax(z) - target` times the head) are taken in the forward, so the backward only scales them.

    Peak memory is one chunk's logits, where the unfused head plus loss keeps the `(B, N, C)` logits for the
    backward and then allocates their gradient beside them; the FLOPs are the same (one forward and two gradient
    products of the head), nothing is recomputed. The matrix products run in the autocast dtype when autocast is on
    (as `nn.Linear` would), everything else in float32.

    Args:
        features: `(B, N, D)` the head's input for every token.
        weight: `(C, D)` the head's weight.
        bias: `(C,)` the head's bias, `(B, C)` a bias per sample (e.g. DINOv2's CLS half of the head), or None.
        targets: the per-token targets (`TwoLabelTargets`, e.g. from `patch_token_targets`).
        chunk_elements: logits per chunk (rounded to whole samples; at least one sample).

    Returns:
        Float32 scalar: the sum over all B * N rows of `row_scale * cross-entropy`.
    """
    if features.ndim != 3 or weight.ndim != 2 or features.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"`features` must have shape (batch, tokens, D) and `weight` (classes, D); got {tuple(features.shape)} "
            f"and {tuple(weight.shape)}."
        )
    batch, tokens, _ = features.shape
    classes = weight.shape[0]
    if bias is not None and tuple(bias.shape) not in ((classes,), (batch, classes)):
        raise ValueError(f"`bias` must have shape {(classes,)} or {(batch, classes)}, got {tuple(bias.shape)}.")
    if tuple(targets.labels.shape) != (batch,) or tuple(targets.partner_labels.shape) != (batch,):
        raise ValueError(
            f"`targets.labels` and `targets.partner_labels` must have shape {(batch,)}, got "
            f"{tuple(targets.labels.shape)} and {tuple(targets.partner_labels.shape)}."
        )
    if tuple(targets.weights.shape) != (tokens,) or tuple(targets.row_scale.shape) != (tokens,):
        raise ValueError(
            f"`targets.weights` and `targets.row_scale` must have shape {(tokens,)} (one per token), got "
            f"{tuple(targets.weights.shape)} and {tuple(targets.row_scale.shape)}."
        )
    samples_per_chunk = max(1, chunk_elements // max(1, tokens * classes))
    compute_grad = _needs_grad(features, weight, bias)
    options = (float(targets.label_smoothing), _matmul_dtype(features, features.dtype), samples_per_chunk, compute_grad)
    with _no_autocast(features):
        return _LinearTwoLabelCrossEntropySum.apply(
            features,
            weight,
            bias,
            targets.labels,
            targets.partner_labels,
            targets.weights.float(),
            targets.row_scale.float(),
            options,
        )


__all__ = [
    "ATTENTION_CHUNK_ELEMENTS",
    "LINEAR_CE_CHUNK_ELEMENTS",
    "PowerIterationState",
    "TwoLabelTargets",
    "attention_cosine_loss",
    "attention_cosine_loss_from_scores",
    "linear_two_label_cross_entropy_sum",
    "patch_contrastive_loss",
    "patch_cosine_loss",
    "patch_mixing_loss",
    "patch_mixing_loss_from_token_sum",
    "patch_mixing_loss_two_label",
    "patch_token_targets",
    "soft_target_cross_entropy",
    "softmax_attention",
    "two_label_cross_entropy_sum",
    "weight_condition_loss",
]
