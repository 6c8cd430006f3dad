"""Tests of `diverse_vit_hf.losses.regularizers` against independent reference implementations of `docs/method.md`.

The references below deliberately use a different computation from the package: explicit Python loops over
patches / pairs / heads, full Gram matrices, `torch.linalg.eigvalsh` of `W W^T` in float64, and an
independently seeded generator for the released power-iteration estimate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diverse_vit_hf.losses.regularizers import (
    PowerIterationState,
    attention_cosine_loss,
    attention_cosine_loss_from_scores,
    linear_two_label_cross_entropy_sum,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    patch_token_targets,
    softmax_attention,
    two_label_cross_entropy_sum,
    weight_condition_loss,
)

RTOL = 1e-4
ATOL = 1e-7


def _close(actual, expected, rtol: float = RTOL, atol: float = ATOL) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------------
# Independent float64 references (loops, no closed forms).
# --------------------------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine with `u(x) = x / max(||x||, 1e-8)`, written as a dot over explicit norms."""
    na = torch.sqrt((a * a).sum())
    nb = torch.sqrt((b * b).sum())
    return (a * b).sum() / (torch.clamp(na, min=1e-8) * torch.clamp(nb, min=1e-8))


def ref_patch_cosine_signed(hidden: torch.Tensor, k: int) -> torch.Tensor:
    h = hidden.double()
    batch, tokens, _ = h.shape
    p = tokens - k
    per_image = []
    for b in range(batch):
        total = h.new_zeros(())
        for i in range(k, tokens):
            for j in range(k, tokens):
                total = total + _cos(h[b, i], h[b, j])
        per_image.append(total / (p * p))
    return torch.stack(per_image).mean()


def ref_patch_cosine_gong(hidden: torch.Tensor, k: int) -> torch.Tensor:
    h = hidden.double()
    batch, tokens, _ = h.shape
    p = tokens - k
    per_image = []
    for b in range(batch):
        total = h.new_zeros(())
        for i in range(k, tokens):
            for j in range(k, tokens):
                if i != j:
                    total = total + _cos(h[b, i], h[b, j]).abs()
        per_image.append(total / (p * (p - 1)))
    return torch.stack(per_image).mean()


def ref_patch_contrastive(first: torch.Tensor, last: torch.Tensor, k: int) -> torch.Tensor:
    h0, hl = first.double(), last.double()
    batch, tokens, _ = h0.shape
    p = tokens - k
    terms = []
    for b in range(batch):
        for i in range(k, tokens):
            pos = _cos(h0[b, i], hl[b, i])
            neg = h0.new_zeros(())
            for j in range(k, tokens):
                if j != i:
                    neg = neg + _cos(h0[b, i], hl[b, j])
            neg = neg / (p - 1)
            terms.append(-torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(neg))))
    return torch.stack(terms).mean()


def ref_attention_cosine(attn: torch.Tensor) -> torch.Tensor:
    a = attn.double()
    batch, heads = a.shape[:2]
    per_image = []
    for b in range(batch):
        total = a.new_zeros(())
        for h in range(heads):
            for g in range(heads):
                total = total + _cos(a[b, h].reshape(-1), a[b, g].reshape(-1))
        per_image.append(total / (heads * heads))
    return torch.stack(per_image).mean()


def ref_weight_exact(weight: torch.Tensor) -> torch.Tensor:
    w = weight.double()
    if w.ndim == 2:
        w = w.unsqueeze(0)
    total = w.new_zeros(())
    for m in range(w.shape[0]):
        eig = torch.linalg.eigvalsh(w[m] @ w[m].T)  # ascending
        total = total + (eig[-1] - eig[0]) ** 2
    return total


def ref_weight_power_released(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """Released one-step estimate: x^T M^3 x / x^T M^2 x, then the same on M - lam_max I (plus lam_max)."""
    w = weight.double()
    if w.ndim == 2:
        w = w.unsqueeze(0)
    count, d_out, _ = w.shape
    gen = torch.Generator().manual_seed(seed)
    xs = torch.rand(count, d_out, generator=gen).double()  # x for every matrix first ...
    ys = torch.rand(count, d_out, generator=gen).double()  # ... then y
    total = w.new_zeros(())
    for m in range(count):
        mat = w[m] @ w[m].T
        m2 = mat @ mat
        m3 = m2 @ mat
        x = xs[m]
        lam_max = (x @ m3 @ x) / (x @ m2 @ x)
        s = mat - lam_max * torch.eye(d_out, dtype=torch.float64)
        s2 = s @ s
        s3 = s2 @ s
        y = ys[m]
        lam_min = (y @ s3 @ y) / (y @ s2 @ y) + lam_max
        total = total + (lam_max - lam_min) ** 2
    return total


def ref_patch_mixing(logits: torch.Tensor, targets: torch.Tensor, patch_targets: torch.Tensor, k: int) -> torch.Tensor:
    z = logits.double()
    batch, tokens, classes = z.shape
    p = tokens - k

    def ce(row: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_norm = torch.log(sum(torch.exp(row[c]) for c in range(classes)))
        if target.is_floating_point():
            return -sum(target[c].double() * (row[c] - log_norm) for c in range(classes))
        return -(row[int(target)] - log_norm)

    per_image = []
    for b in range(batch):
        total = ce(z[b, 0], targets[b])
        for q in range(p):
            total = total + ce(z[b, k + q], patch_targets[b, q])
        per_image.append(total / (1 + p))
    return torch.stack(per_image).mean()


def _random_simplex(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(2 * torch.randn(*shape, generator=gen), dim=-1)


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _known_spectrum(singular_values: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = len(singular_values)
    u, v = _orthogonal(d, gen), _orthogonal(d, gen)
    return (u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T).float()


# --------------------------------------------------------------------------------------------------------------
# 1a. patch cosine
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 9, 8), (3, 17, 16)])
def test_patch_cosine_signed_matches_loop(k, shape):
    gen = torch.Generator().manual_seed(10 + k)
    b, p, d = shape
    hidden = torch.randn(b, p + k, d, generator=gen) + 0.3  # positive mean so the loss is well away from 0
    _close(patch_cosine_loss(hidden, num_prefix_tokens=k), ref_patch_cosine_signed(hidden, k))
    _close(patch_cosine_loss(hidden, num_prefix_tokens=k, variant="signed"), ref_patch_cosine_signed(hidden, k))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_patch_cosine_gong_matches_loop(k):
    gen = torch.Generator().manual_seed(20 + k)
    hidden = torch.randn(3, 7 + k, 8, generator=gen)
    expected = ref_patch_cosine_gong(hidden, k)
    _close(patch_cosine_loss(hidden, num_prefix_tokens=k, variant="gong"), expected)
    # The Gong variant is not the signed one (random vectors have both signs of cosine).
    assert not math.isclose(float(expected), float(ref_patch_cosine_signed(hidden, k)), rel_tol=1e-2)


def test_patch_cosine_prefix_tokens_are_dropped():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 10, 8, generator=gen)
    perturbed = hidden.clone()
    perturbed[:, :2] = 100 * torch.randn(2, 2, 8, generator=gen)
    for variant in ("signed", "gong"):
        _close(
            patch_cosine_loss(perturbed, num_prefix_tokens=2, variant=variant),
            patch_cosine_loss(hidden, num_prefix_tokens=2, variant=variant),
            rtol=1e-6,
        )
    # ... and the first patch token does count.
    perturbed[:, 2] = -perturbed[:, 3] * 5
    assert not math.isclose(
        float(patch_cosine_loss(perturbed, num_prefix_tokens=2)), float(patch_cosine_loss(hidden, num_prefix_tokens=2))
    )


def test_patch_cosine_edge_values():
    # Identical patches: every cosine is 1 -> both variants give 1.
    same = torch.randn(1, 1, 8).expand(2, 6, 8).clone()
    _close(patch_cosine_loss(same, num_prefix_tokens=1), 1.0)
    _close(patch_cosine_loss(same, num_prefix_tokens=1, variant="gong"), 1.0)
    # Two opposite patches: signed mean of [[1,-1],[-1,1]] is 0, Gong gives 1.
    v = torch.randn(8)
    opposite = torch.stack([torch.zeros(8), v, -3 * v]).unsqueeze(0)
    _close(patch_cosine_loss(opposite, num_prefix_tokens=1), 0.0, atol=1e-6)
    _close(patch_cosine_loss(opposite, num_prefix_tokens=1, variant="gong"), 1.0)
    # Orthonormal patches: signed = 1/P (diagonal only), Gong = 0.
    eye = torch.eye(8).unsqueeze(0)
    _close(patch_cosine_loss(eye, num_prefix_tokens=0), 1 / 8)
    _close(patch_cosine_loss(eye, num_prefix_tokens=0, variant="gong"), 0.0, atol=1e-6)
    # A single patch is allowed for the signed variant (loss 1).
    _close(patch_cosine_loss(torch.randn(2, 2, 8), num_prefix_tokens=1), 1.0)


# --------------------------------------------------------------------------------------------------------------
# 1b. patch contrastive
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_patch_contrastive_matches_loop(k):
    gen = torch.Generator().manual_seed(30 + k)
    first = torch.randn(2, 9 + k, 16, generator=gen)
    last = 0.7 * first + torch.randn(2, 9 + k, 16, generator=gen)  # correlated so pos differs from neg
    expected = ref_patch_contrastive(first, last, k)
    _close(patch_contrastive_loss(first, last, num_prefix_tokens=k), expected)
    _close(patch_contrastive_loss(first, last, num_prefix_tokens=k, detach_first=True), expected)


def test_patch_contrastive_edge_values():
    # Identical first and last layer with orthonormal patches: pos = 1, neg = 0 -> softplus(-1).
    eye = torch.eye(8).unsqueeze(0).repeat(2, 1, 1)
    _close(patch_contrastive_loss(eye, eye.clone(), num_prefix_tokens=0), math.log1p(math.exp(-1.0)))
    # Two patches, last layer swapped: pos = 0, neg = 1 -> softplus(1).
    swapped = eye[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    _close(
        patch_contrastive_loss(eye[:, :3], swapped[:, :3], num_prefix_tokens=1),
        ref_patch_contrastive(eye[:, :3], swapped[:, :3], 1),
    )
    _close(patch_contrastive_loss(eye[:, :2], swapped[:, :2], num_prefix_tokens=0), math.log1p(math.e))


def test_patch_contrastive_detach_first_gradients():
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    last = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    patch_contrastive_loss(first, last, detach_first=True).backward()
    assert first.grad is None or torch.count_nonzero(first.grad) == 0
    assert torch.count_nonzero(last.grad[:, 1:]) > 0

    first.grad = None
    last.grad = None
    patch_contrastive_loss(first, last).backward()
    assert first.grad is not None and torch.count_nonzero(first.grad[:, 1:]) > 0
    assert torch.count_nonzero(last.grad[:, 1:]) > 0
    # Prefix tokens get no gradient.
    assert torch.count_nonzero(first.grad[:, 0]) == 0 and torch.count_nonzero(last.grad[:, 0]) == 0


def _autograd_unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-8)


def _autograd_patch_terms(first, last, k):
    """The two patch terms as plain autograd expressions (the closed forms, differentiated by autograd): the signed
    patch cosine of `last`, and the patch contrastive loss of (`first`, `last`)."""
    a, c = _autograd_unit(first[:, k:].double()), _autograd_unit(last[:, k:].double())
    cosine = c.mean(dim=1).pow(2).sum(-1).mean()
    patches = a.shape[1]
    positive = (a * c).sum(-1)
    negative = ((a * c.sum(dim=1, keepdim=True)).sum(-1) - positive) / (patches - 1)
    return cosine, F.softplus(negative - positive).mean()


def _patch_term_inputs(k: int, dtype: torch.dtype):
    """(3, 6 + k, 8) first and last hidden states. In float32 with a zero patch in each and patches with norms below
    the 1e-8 clamp, so that the clamped branch of the backward is used too (its gradients are ~1e6 times the others,
    beyond what bfloat16's rounding can be compared against alongside them)."""
    gen = torch.Generator().manual_seed(40 + k)
    first = torch.randn(3, 6 + k, 8, generator=gen, dtype=torch.float64)
    last = 0.6 * first + torch.randn(3, 6 + k, 8, generator=gen, dtype=torch.float64) + 0.2
    if dtype == torch.float32:
        first[0, k] = 0.0
        last[1, k + 1] = 0.0
        last[2, k + 2] = 1e-10 * torch.randn(8, generator=gen, dtype=torch.float64)
        first[2, k + 3] = 3e-9
    return first.to(dtype), last.to(dtype)


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_terms_hand_written_gradients_equal_autograds(k, dtype):
    """The backward written by hand (one `(B, N, D)` gradient per input, zero on the prefix tokens) against autograd
    on the closed forms in float64, on every input, upstream gradients other than 1, detach_first both ways."""
    first, last = _patch_term_inputs(k, dtype)
    ref_first, ref_last = (x.double().requires_grad_(True) for x in (first, last))
    ref_cosine, ref_contrastive = _autograd_patch_terms(ref_first, ref_last, k)
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for detach_first in (False, True):
        ours_first, ours_last = (x.clone().requires_grad_(True) for x in (first, last))
        cosine = patch_cosine_loss(ours_last, num_prefix_tokens=k)
        contrastive = patch_contrastive_loss(ours_first, ours_last, num_prefix_tokens=k, detach_first=detach_first)
        _close(cosine, ref_cosine.detach(), **tolerance)
        _close(contrastive, ref_contrastive.detach(), **tolerance)
        total = 0.7 * cosine - 1.3 * contrastive
        grads = torch.autograd.grad(total, (ours_first, ours_last), allow_unused=True)
        ref_total = 0.7 * ref_cosine - 1.3 * ref_contrastive
        if detach_first:
            ref_total = 0.7 * ref_cosine - 1.3 * _autograd_patch_terms(ref_first.detach(), ref_last, k)[1]
        ref_grads = torch.autograd.grad(ref_total, (ref_first, ref_last), retain_graph=True, allow_unused=True)
        for name, grad, ref_grad in zip(("first", "last"), grads, ref_grads, strict=True):
            if ref_grad is None:
                assert grad is None, name
                continue
            assert grad.dtype == dtype and grad.shape == first.shape, name
            assert torch.count_nonzero(grad[:, :k]) == 0, name
            assert torch.isfinite(grad).all(), name
            torch.testing.assert_close(grad.double(), ref_grad, **tolerance, msg=name)
    with torch.no_grad():  # and without any graph
        _close(patch_contrastive_loss(first, last, num_prefix_tokens=k), ref_contrastive.detach(), **tolerance)


class NewLargeStorages(TorchDispatchMode):
    """Counts the distinct storages of at least `numel` elements that operations create while active (outputs
    that are views of, or written into, existing storages are not new)."""

    def __init__(self, numel: int, existing: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.numel = numel
        self.seen = {t.untyped_storage().data_ptr() for t in existing}
        self.new: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.numel:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in self.seen:
                    self.seen.add(pointer)
                    self.new.append((str(func), tuple(tensor.shape)))
        return out


def test_patch_terms_backward_builds_only_their_gradients():
    """The step's memory peak is at the start of the backward, where these terms' gradients are built: each builds
    its `(B, N, D)` gradient(s) and nothing else of that size (autograd's own backward held about five)."""
    first, last = (x.requires_grad_(True) for x in _patch_term_inputs(1, torch.float32))
    cosine = patch_cosine_loss(last)
    contrastive = patch_contrastive_loss(first, last)
    patch_size = last[:, 1:].numel()
    for loss, expected in ((cosine, 1), (contrastive, 2)):
        watcher = NewLargeStorages(patch_size, (first, last))
        with watcher:
            torch.autograd.grad(loss, (first, last), allow_unused=True)
        assert len(watcher.new) == expected, watcher.new
        assert all(shape == tuple(last.shape) for _, shape in watcher.new), watcher.new


def test_patch_contrastive_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        patch_contrastive_loss(torch.randn(2, 5, 8), torch.randn(2, 6, 8))


# --------------------------------------------------------------------------------------------------------------
# 2. attention cosine
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (3, 4, 9, 9), (2, 2, 17, 17)])
def test_attention_cosine_matches_loop(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    attn = torch.softmax(3 * torch.randn(*shape, generator=gen), dim=-1)
    _close(attention_cosine_loss(attn), ref_attention_cosine(attn))


def test_attention_cosine_edge_values():
    # Identical heads: 1. Heads with disjoint supports: 1/H.
    attn = torch.softmax(torch.randn(1, 1, 6, 6), dim=-1).expand(2, 3, 6, 6).contiguous()
    _close(attention_cosine_loss(attn), 1.0)
    disjoint = torch.zeros(1, 4, 4, 4)
    for h in range(4):
        disjoint[0, h, :, h] = 1.0
    _close(attention_cosine_loss(disjoint), 1 / 4)


# --------------------------------------------------------------------------------------------------------------
# 3. weight condition
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (16, 16), (3, 8, 8), (4, 12, 12)])
def test_weight_exact_matches_eigvalsh(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(*shape, generator=gen) / 3
    _close(weight_condition_loss(weight, estimator="exact"), ref_weight_exact(weight))


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_weight_exact_rectangular(shape):
    # Eigenvalues of the (D_out x D_out) W W^T; when D_out > D_in its smallest eigenvalue is 0.
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(*shape, generator=gen)
    _close(weight_condition_loss(weight, estimator="exact"), ref_weight_exact(weight), atol=1e-4)


def test_weight_exact_known_spectrum():
    weight = _known_spectrum([3.0, 2.0, 1.5, 1.0, 0.5], seed=0)
    _close(weight_condition_loss(weight, estimator="exact"), (9.0 - 0.25) ** 2)
    _close(weight_condition_loss(torch.eye(6) * 2, estimator="exact"), 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (2, 16, 16)])
@pytest.mark.parametrize("seed", [0, 123])
def test_weight_power_released_formula(shape, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    weight = torch.randn(*shape, generator=gen) / 2
    got = weight_condition_loss(
        weight, estimator="power", num_iterations=1, generator=torch.Generator().manual_seed(seed)
    )
    _close(got, ref_weight_power_released(weight, seed), rtol=2e-4)
    # Default estimator is the released one-step power iteration.
    got_default = weight_condition_loss(weight, generator=torch.Generator().manual_seed(seed))
    _close(got_default, got, rtol=1e-6)


def test_weight_power_generator_order_matters_for_stacks():
    # If the package drew (x_m, y_m) per matrix instead of all x then all y, this reference would disagree.
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(3, 8, 8, generator=gen)
    got = weight_condition_loss(weight, generator=torch.Generator().manual_seed(11))
    expected = ref_weight_power_released(weight, 11)
    _close(got, expected, rtol=2e-4)
    interleaved = torch.Generator().manual_seed(11)
    vectors = torch.rand(6, 8, generator=interleaved)
    w = weight.double()
    alt = 0.0
    for m in range(3):
        mat = w[m] @ w[m].T
        x, y = vectors[2 * m].double(), vectors[2 * m + 1].double()
        lam_max = (x @ mat @ mat @ mat @ x) / (x @ mat @ mat @ x)
        s = mat - lam_max * torch.eye(8, dtype=torch.float64)
        lam_min = (y @ s @ s @ s @ y) / (y @ s @ s @ y) + lam_max
        alt += float((lam_max - lam_min) ** 2)
    assert not math.isclose(alt, float(expected), rel_tol=1e-3)  # the test distinguishes the two orders


def test_weight_power_more_iterations_converges():
    weight = _known_spectrum([3.0, 1.2, 1.0, 0.9, 0.8, 0.5, 0.4, 0.2], seed=1)
    exact = (9.0 - 0.04) ** 2
    got = weight_condition_loss(weight, num_iterations=300, generator=torch.Generator().manual_seed(0))
    _close(got, exact, rtol=1e-3)


def test_weight_power_persistent_state_converges():
    singular = [3.0, 2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.3]
    weight = torch.stack([_known_spectrum(singular, seed=s) for s in range(2)])  # (2, 8, 8)
    exact = 2 * (singular[0] ** 2 - singular[-1] ** 2) ** 2
    state = PowerIterationState()
    gen = torch.Generator().manual_seed(0)
    first = weight_condition_loss(weight, state=state, generator=gen)
    assert state.max_vectors.shape == (2, 8) and state.min_vectors.shape == (2, 8)
    for _ in range(199):
        loss = weight_condition_loss(weight, state=state, generator=gen)
    _close(loss, exact, rtol=1e-3)
    assert abs(float(first) - exact) > abs(float(loss) - exact)
    # Stored vectors are unit eigenvectors of W W^T for the extreme eigenvalues.
    gram = weight.double() @ weight.double().transpose(1, 2)
    for m in range(2):
        eigvec = torch.linalg.eigh(gram[m]).eigenvectors
        top, bottom = eigvec[:, -1], eigvec[:, 0]
        assert abs(abs(float(state.max_vectors[m].double() @ top)) - 1) < 1e-4
        assert abs(abs(float(state.min_vectors[m].double() @ bottom)) - 1) < 1e-4
    # The state round-trips through state_dict.
    other = PowerIterationState()
    other.load_state_dict(state.state_dict())
    _close(weight_condition_loss(weight, state=other), exact, rtol=1e-3)


def test_weight_power_persistent_state_gradient_flows():
    weight = _known_spectrum([2.0, 1.0, 0.7, 0.5], seed=3).requires_grad_(True)
    state = PowerIterationState()
    generator = torch.Generator().manual_seed(0)  # the start, not the global RNG that earlier tests leave behind
    for _ in range(100):
        loss = weight_condition_loss(weight, state=state, num_iterations=2, generator=generator)
    weight.grad = None
    loss.backward()
    w64 = weight.detach().double().requires_grad_(True)
    ref_weight_exact(w64).backward()
    _close(weight.grad, w64.grad, rtol=1e-3, atol=1e-4)


def test_weight_power_released_is_biased_low():
    singular = [4.0] + [3.0 - 0.15 * i for i in range(14)] + [0.5]
    weight = _known_spectrum(singular, seed=2)
    exact = float(ref_weight_exact(weight))
    estimates = [
        float(weight_condition_loss(weight, num_iterations=1, generator=torch.Generator().manual_seed(s)))
        for s in range(50)
    ]
    mean = sum(estimates) / len(estimates)
    assert mean < 0.5 * exact, (mean, exact)
    assert max(estimates) <= exact * (1 + 1e-4)  # both Rayleigh quotients lie inside [lam_min, lam_max]


def test_weight_power_state_wrong_shape():
    state = PowerIterationState()
    weight_condition_loss(torch.randn(3, 8, 8), state=state)
    with pytest.raises(ValueError, match="PowerIterationState"):
        weight_condition_loss(torch.randn(2, 8, 8), state=state)
    with pytest.raises(ValueError, match="PowerIterationState"):
        weight_condition_loss(torch.randn(3, 6, 6), state=state)


# --------------------------------------------------------------------------------------------------------------
# 1c. patch mixing loss
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("soft", [True, False])
def test_patch_mixing_loss_matches_loop(k, soft):
    gen = torch.Generator().manual_seed(40 + k + 2 * soft)
    b, p, c = 3, 6, 5
    logits = 2 * torch.randn(b, k + p, c, generator=gen)
    if soft:
        targets = _random_simplex(b, c, gen=gen)
        patch_targets = _random_simplex(b, p, c, gen=gen)
    else:
        targets = torch.randint(0, c, (b,), generator=gen)
        patch_targets = torch.randint(0, c, (b, p), generator=gen)
    expected = ref_patch_mixing(logits, targets, patch_targets, k)
    _close(patch_mixing_loss(logits, targets, patch_targets, num_prefix_tokens=k), expected)
    if k == 2:
        # The distillation token (index 1) is not part of the loss.
        perturbed = logits.clone()
        perturbed[:, 1] = 50 * torch.randn(b, c, generator=gen)
        _close(patch_mixing_loss(perturbed, targets, patch_targets, num_prefix_tokens=2), expected)
        # ... but the CLS token (index 0) and the first patch (index 2) are.
        for index in (0, 2):
            perturbed = logits.clone()
            perturbed[:, index] = 50 * torch.randn(b, c, generator=gen)
            assert not math.isclose(
                float(patch_mixing_loss(perturbed, targets, patch_targets, num_prefix_tokens=2)), float(expected)
            )


def test_patch_mixing_loss_one_hot_equals_index_targets():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 4, generator=gen)
    targets = torch.tensor([1, 3])
    patch_targets = torch.randint(0, 4, (2, 4), generator=gen)
    _close(
        patch_mixing_loss(logits, F.one_hot(targets, 4).float(), F.one_hot(patch_targets, 4).float()),
        patch_mixing_loss(logits, targets, patch_targets),
        rtol=1e-6,
    )


def test_patch_mixing_loss_bad_shapes():
    logits = torch.randn(2, 5, 4)
    soft_t, soft_p = torch.full((2, 4), 0.25), torch.full((2, 4, 4), 0.25)
    with pytest.raises(ValueError, match="patch_targets"):
        patch_mixing_loss(logits, soft_t, torch.full((2, 5, 4), 0.25))  # P counted with the CLS token
    with pytest.raises(ValueError, match="patch_targets"):
        patch_mixing_loss(logits, soft_t, soft_p, num_prefix_tokens=2)  # DeiT: only 3 patches
    with pytest.raises(ValueError, match="targets"):
        patch_mixing_loss(logits, torch.full((3, 4), 0.25), soft_p)
    with pytest.raises(ValueError, match="targets"):
        patch_mixing_loss(logits, torch.full((2, 5), 0.2), soft_p)
    with pytest.raises(ValueError):
        patch_mixing_loss(logits, torch.tensor([0, 1]), soft_p)  # index targets with soft patch targets
    with pytest.raises(ValueError):
        patch_mixing_loss(logits, soft_t, torch.zeros(2, 4, dtype=torch.long))  # soft targets, index patches
    with pytest.raises(ValueError, match="token_logits"):
        patch_mixing_loss(torch.randn(2, 4), soft_t, soft_p)


# --------------------------------------------------------------------------------------------------------------
# Cross-cutting: dtypes, autocast, zero vectors, gradients, input validation.
# --------------------------------------------------------------------------------------------------------------


def _make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "hidden": torch.randn(2, 7, 8, generator=gen) + 0.2,
        "first": torch.randn(2, 7, 8, generator=gen),
        "attn": torch.softmax(2 * torch.randn(2, 3, 5, 5, generator=gen), dim=-1),
        "weight": torch.randn(3, 8, 8, generator=gen) / 2,
        "logits": torch.randn(2, 7, 4, generator=gen),
    }


_TARGETS = torch.softmax(torch.arange(8.0).view(2, 4), dim=-1)
_PATCH_TARGETS = torch.softmax(torch.arange(48.0).view(2, 6, 4).cos(), dim=-1)

# name -> (loss function of the inputs, independent float64 reference)
CASES = {
    "cosine_signed": (lambda x: patch_cosine_loss(x["hidden"]), lambda x: ref_patch_cosine_signed(x["hidden"], 1)),
    "cosine_gong": (
        lambda x: patch_cosine_loss(x["hidden"], variant="gong"),
        lambda x: ref_patch_cosine_gong(x["hidden"], 1),
    ),
    "contrastive": (
        lambda x: patch_contrastive_loss(x["first"], x["hidden"]),
        lambda x: ref_patch_contrastive(x["first"], x["hidden"], 1),
    ),
    "attention": (lambda x: attention_cosine_loss(x["attn"]), lambda x: ref_attention_cosine(x["attn"])),
    "weight_exact": (
        lambda x: weight_condition_loss(x["weight"], estimator="exact"),
        lambda x: ref_weight_exact(x["weight"]),
    ),
    "weight_power": (
        lambda x: weight_condition_loss(x["weight"], generator=torch.Generator().manual_seed(5)),
        lambda x: ref_weight_power_released(x["weight"], 5),
    ),
    "mixing": (
        lambda x: patch_mixing_loss(x["logits"], _TARGETS, _PATCH_TARGETS),
        lambda x: ref_patch_mixing(x["logits"], _TARGETS, _PATCH_TARGETS, 1),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_returns_float32_scalar_for_any_input_dtype(name, dtype):
    fn, ref = CASES[name]
    inputs = {key: value.to(dtype) for key, value in _make_inputs(torch.Generator().manual_seed(6)).items()}
    out = fn(inputs)
    assert out.dtype == torch.float32 and out.ndim == 0
    # Computed in float32 from the (rounded) inputs: matches the float64 reference of the same rounded values.
    _close(out, ref(inputs), rtol=3e-4)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_is_disabled_inside(name, dtype):
    fn, ref = CASES[name]
    inputs = {key: value.to(dtype) for key, value in _make_inputs(torch.Generator().manual_seed(8)).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(inputs)
    assert out.dtype == torch.float32 and out.ndim == 0
    _close(out, ref(inputs), rtol=3e-4)


def test_weight_power_fp16_large_weights_do_not_overflow():
    # s_max ~ 20: x^T M^3 x ~ 20^6 * D overflows fp16's 65504; the package must compute in float32.
    weight = _known_spectrum([20.0, 10.0, 5.0, 1.0], seed=9).half()
    out = weight_condition_loss(weight, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out)
    _close(out, ref_weight_power_released(weight, 1), rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.float16):
        out = weight_condition_loss(weight.float(), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out)


def test_zero_inputs_finite_loss_and_gradients():
    hidden = torch.zeros(2, 6, 8, requires_grad=True)
    first = torch.zeros(2, 6, 8, requires_grad=True)
    attn = torch.zeros(2, 3, 5, 5, requires_grad=True)
    weight = torch.zeros(3, 8, 8, requires_grad=True)
    losses = {
        "signed": patch_cosine_loss(hidden),
        "gong": patch_cosine_loss(hidden, variant="gong"),
        "contrastive": patch_contrastive_loss(first, hidden),
        "attention": attention_cosine_loss(attn),
        "exact": weight_condition_loss(weight, estimator="exact"),
        "power": weight_condition_loss(weight, generator=torch.Generator().manual_seed(0)),
        "power_state": weight_condition_loss(weight, state=PowerIterationState()),
    }
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
    _close(losses["signed"], 0.0)
    _close(losses["gong"], 0.0)
    _close(losses["contrastive"], math.log(2.0))
    _close(losses["attention"], 0.0)
    _close(losses["exact"], 0.0)
    _close(losses["power"], 0.0)
    for name, loss in losses.items():
        tensors = [t for t in (hidden, first, attn, weight) if t.requires_grad]
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for grad in grads:
            assert grad is None or bool(torch.isfinite(grad).all()), name
    # Some zero patches mixed with non-zero ones: finite everywhere.
    mixed = torch.randn(2, 6, 8)
    mixed[:, 2:4] = 0
    mixed.requires_grad_(True)
    for variant in ("signed", "gong"):
        (grad,) = torch.autograd.grad(patch_cosine_loss(mixed, variant=variant), mixed)
        assert torch.isfinite(grad).all()
    (grad,) = torch.autograd.grad(patch_contrastive_loss(mixed, mixed.flip(1)), mixed)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_float64_reference(name):
    fn, ref = CASES[name]
    base = _make_inputs(torch.Generator().manual_seed(12))
    inputs = {key: value.clone().requires_grad_(True) for key, value in base.items()}
    ref_inputs = {key: value.double().requires_grad_(True) for key, value in base.items()}
    keys = list(base)
    grads = torch.autograd.grad(fn(inputs), [inputs[k] for k in keys], allow_unused=True)
    ref_grads = torch.autograd.grad(ref(ref_inputs), [ref_inputs[k] for k in keys], allow_unused=True)
    used = 0
    for key, grad, ref_grad in zip(keys, grads, ref_grads, strict=True):
        if ref_grad is None:
            assert grad is None or torch.count_nonzero(grad) == 0, key
            continue
        used += 1
        assert grad is not None, key
        assert torch.count_nonzero(ref_grad) > 0, key
        scale = float(ref_grad.abs().max())
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4 * scale, msg=f"gradient of {key}")
    assert used >= 1


def test_bad_inputs_raise_helpful_errors():
    with pytest.raises(ValueError, match=r"\(batch, tokens, hidden\)"):
        patch_cosine_loss(torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"\(batch, tokens, hidden\)"):
        patch_contrastive_loss(torch.randn(6, 8), torch.randn(6, 8))
    with pytest.raises(ValueError, match="patch tokens"):
        patch_cosine_loss(torch.randn(2, 1, 8), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="patch tokens"):
        patch_cosine_loss(torch.randn(2, 3, 8), num_prefix_tokens=2, variant="gong")
    with pytest.raises(ValueError, match="patch tokens"):
        patch_contrastive_loss(torch.randn(2, 2, 8), torch.randn(2, 2, 8), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        patch_cosine_loss(torch.randn(2, 4, 8), num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="variant"):
        patch_cosine_loss(torch.randn(2, 4, 8), variant="abs")
    with pytest.raises(ValueError, match="attention_probs"):
        attention_cosine_loss(torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="estimator"):
        weight_condition_loss(torch.randn(4, 4), estimator="svd")
    with pytest.raises(ValueError, match="num_iterations"):
        weight_condition_loss(torch.randn(4, 4), num_iterations=0)
    with pytest.raises(ValueError, match="weight"):
        weight_condition_loss(torch.randn(4))
    with pytest.raises(ValueError, match="weight"):
        weight_condition_loss(torch.randn(2, 2, 4, 4))


# --------------------------------------------------------------------------------------------------------------
# O(P * D): the signed cosine and the contrastive loss never build a P x P matrix.
# --------------------------------------------------------------------------------------------------------------


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


def _quadratic_tensors(shapes, p: int) -> list[tuple[str, tuple[int, ...]]]:
    bad = []
    for op, shape in shapes:
        numel = math.prod(shape)
        if (len(shape) >= 2 and shape[-1] == p and shape[-2] == p) or numel >= p * p:
            bad.append((op, shape))
    return bad


def _record(fn, *inputs: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    recorder = _ShapeRecorder()
    with recorder:
        loss = fn(*inputs)
        torch.autograd.grad(loss, inputs)
    return recorder.shapes


def test_linear_memory_no_p_by_p_matrix():
    p, d, k, b = 64, 8, 1, 2
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(b, k + p, d, generator=gen)
    last = torch.randn(b, k + p, d, generator=gen)

    # The detector works: the Gong variant needs the Gram matrix and is flagged.
    gong_shapes = _record(lambda h: patch_cosine_loss(h, variant="gong"), last)
    assert _quadratic_tensors(gong_shapes, p), "shape recorder failed to see the Gong variant's P x P Gram matrix"

    signed_shapes = _record(lambda h: patch_cosine_loss(h, variant="signed"), last)
    assert len(signed_shapes) >= 3  # the mode did record the ops
    assert not _quadratic_tensors(signed_shapes, p), _quadratic_tensors(signed_shapes, p)

    contrastive_shapes = _record(lambda h0, hl: patch_contrastive_loss(h0, hl), first, last)
    assert len(contrastive_shapes) >= 5
    assert not _quadratic_tensors(contrastive_shapes, p), _quadratic_tensors(contrastive_shapes, p)

    attention = torch.softmax(torch.randn(b, 3, 9, 9, generator=gen), dim=-1)
    # Attention maps: never an (H*N^2) x (H*N^2) or N^2 x N^2 matrix either; only H x H would be natural.
    attention_shapes = _record(attention_cosine_loss, attention)
    assert not [shape for _, shape in attention_shapes if math.prod(shape) > attention.numel()]


def test_patch_mixing_loss_requires_a_cls_token():
    logits = torch.randn(2, 5, 3)
    targets = torch.softmax(torch.randn(2, 3), -1)
    with pytest.raises(ValueError, match="num_prefix_tokens >= 1"):
        patch_mixing_loss(logits, targets, torch.softmax(torch.randn(2, 5, 3), -1), 0)


def test_persistent_state_recovers_after_an_all_zero_matrix():
    """An all-zero stack collapses M v to 0; the state must restart instead of reporting 0 forever."""
    state = PowerIterationState()
    weight_condition_loss(torch.zeros(2, 4, 4), state=state)
    weight = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(100):
        estimate = weight_condition_loss(weight, state=state, num_iterations=3)
    exact = weight_condition_loss(weight, estimator="exact")
    torch.testing.assert_close(estimate, exact, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# The patch-wise loss in two-label form (no (B, P, C) targets)


@pytest.mark.parametrize("mode", ["cutmix", "mixup", "none"])
@pytest.mark.parametrize("num_prefix_tokens", [1, 2])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_two_label_patch_loss_equals_the_loss_on_built_targets(mode, num_prefix_tokens, smoothing):
    from diverse_vit_hf.losses.mixing import PatchMixupCutmix
    from diverse_vit_hf.losses.regularizers import patch_mixing_loss_two_label

    torch.manual_seed(0)
    batch, classes, patch = 5, 7, 4
    mixer = PatchMixupCutmix(
        classes,
        patch,
        mixup_alpha=0.0 if mode == "cutmix" else 0.8,
        cutmix_alpha=1.0 if mode == "cutmix" else 0.0,
        prob=0.0 if mode == "none" else 1.0,
        label_smoothing=smoothing,
    )
    mixed = mixer(torch.randn(batch, 3, 16, 12), torch.randint(0, classes, (batch,)))
    assert mixed.mode == mode
    num_patches = mixed.patch_weights.shape[0]
    token_logits = torch.randn(batch, num_prefix_tokens + num_patches, classes, dtype=torch.float64) * 3
    image_logits = torch.randn(batch, classes, dtype=torch.float64) * 3
    reference_inputs = [token_logits.clone().requires_grad_(), image_logits.clone().requires_grad_()]
    inputs = [token_logits.float().requires_grad_(), image_logits.float().requires_grad_()]
    # Reference: the built targets, in float64, through the loss that takes probabilities.
    reference = patch_mixing_loss(
        reference_inputs[0], mixed.targets.double(), mixed.patch_targets.double(), num_prefix_tokens,
        image_logits=reference_inputs[1],
    )  # fmt: skip
    got = patch_mixing_loss_two_label(
        inputs[0], inputs[1], mixed.labels, mixed.partner_labels, mixed.lam, mixed.patch_weights, smoothing,
        num_prefix_tokens,
    )  # fmt: skip
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    reference.backward()
    got.backward()
    for ours, theirs in zip(inputs, reference_inputs, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-7)


def test_two_label_cross_entropy_sum_against_a_loop():
    from diverse_vit_hf.losses.regularizers import two_label_cross_entropy_sum

    torch.manual_seed(1)
    logits, eps = torch.randn(3, 4, 6), 0.2
    labels, partners = torch.tensor([0, 5, 2]), torch.tensor([1, 5, 3])
    weights = torch.rand(4)
    expected = 0.0
    for b in range(3):
        for p in range(4):
            target = torch.full((6,), eps / 6)
            target[labels[b]] += (1 - eps) * weights[p]
            target[partners[b]] += (1 - eps) * (1 - weights[p])
            expected += -(target * torch.log_softmax(logits[b, p], dim=-1)).sum().item()
    got = two_label_cross_entropy_sum(logits, labels, partners, weights, eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_two_label_patch_loss_under_bf16_autocast_is_computed_in_float32():
    from diverse_vit_hf.losses.regularizers import patch_mixing_loss_two_label

    token_logits = torch.randn(2, 5, 3).bfloat16()
    image_logits = torch.randn(2, 3).bfloat16()
    labels, weights = torch.tensor([0, 2]), torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = patch_mixing_loss_two_label(token_logits, image_logits, labels, labels.flip(0), 0.7, weights, 0.1)
    in_float32 = patch_mixing_loss_two_label(
        token_logits.float(), image_logits.float(), labels, labels.flip(0), 0.7, weights, 0.1
    )
    assert got.dtype == torch.float32 and torch.equal(got, in_float32)
    with pytest.raises(ValueError, match="`patch_weights` \\(4,\\)"):
        patch_mixing_loss_two_label(token_logits, image_logits, labels, labels, 0.7, torch.rand(3), 0.1)


# --------------------------------------------------------------------------------------------------------------------
# The patch-wise loss from a linear head's features, in chunks (no (B, N, C) logits)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation creates while active (`largest`)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def _linear_ce_case(bias_kind: str, dtype: torch.dtype = torch.float64):
    """`(features (5, 7, 6), weight (11, 6), bias, targets)`: 2 prefix tokens, smoothing 0.1, random patch weights."""

    generator = torch.Generator().manual_seed(0)
    batch, tokens, hidden, classes, prefix = 5, 7, 6, 11, 2
    features = torch.randn(batch, tokens, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(classes, hidden, generator=generator, dtype=torch.float64)
    bias = {"none": None, "shared": (classes,), "per_sample": (batch, classes)}[bias_kind]
    if bias is not None:
        bias = torch.randn(*bias, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    patch_weights = torch.rand(tokens - prefix, generator=generator)
    targets = patch_token_targets(labels, labels.roll(1), patch_weights, 0.1, prefix)
    return features.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), targets


@pytest.mark.parametrize("bias_kind", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("chunk_elements", [1, 40, 2**30])
def test_linear_two_label_cross_entropy_equals_the_loss_on_built_logits(bias_kind, chunk_elements):
    """Value and every gradient against the unfused head + loss in float64, for one-sample, several-sample and
    whole-batch chunks."""
    features, weight, bias, targets = _linear_ce_case(bias_kind)
    reference_inputs = [t.clone().requires_grad_() for t in (features, weight, bias) if t is not None]
    logits = reference_inputs[0] @ reference_inputs[1].T
    if bias is not None:
        logits = logits + (reference_inputs[2].unsqueeze(1) if bias.ndim == 2 else reference_inputs[2])
    reference = two_label_cross_entropy_sum(
        logits, targets.labels, targets.partner_labels, targets.weights.double(), 0.1, targets.row_scale.double()
    )
    inputs = [t.float().requires_grad_() for t in (features, weight, bias) if t is not None]
    got = linear_two_label_cross_entropy_sum(
        inputs[0], inputs[1], inputs[2] if bias is not None else None, targets, chunk_elements=chunk_elements
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    (2.5 * reference).backward()
    (2.5 * got).backward()  # the backward scales the gradients the forward took
    for ours, theirs in zip(inputs, reference_inputs, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)


def test_linear_two_label_cross_entropy_against_a_loop():
    features, weight, bias, targets = _linear_ce_case("shared", torch.float32)
    eps, classes = targets.label_smoothing, weight.shape[0]
    expected = 0.0
    for b in range(features.shape[0]):
        for t in range(features.shape[1]):
            target = torch.full((classes,), eps / classes)
            target[targets.labels[b]] += (1 - eps) * targets.weights[t]
            target[targets.partner_labels[b]] += (1 - eps) * (1 - targets.weights[t])
            logits = weight @ features[b, t] + bias
            expected += targets.row_scale[t].item() * -(target * torch.log_softmax(logits, dim=-1)).sum().item()
    got = linear_two_label_cross_entropy_sum(features, weight, bias, targets, chunk_elements=1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_linear_two_label_cross_entropy_never_builds_the_whole_logits():
    """Every tensor the forward and the backward create is watched: none has the B * N * C elements of the whole
    per-token logits (the unfused head + loss creates several), and at most one chunk's worth."""

    batch, tokens, hidden, classes = 8, 10, 4, 50
    features = torch.randn(batch, tokens, hidden, requires_grad=True)
    head = torch.nn.Linear(hidden, classes)
    labels = torch.randint(0, classes, (batch,))
    targets = patch_token_targets(labels, labels.flip(0), torch.rand(tokens - 1), 0.1, 1)
    chunk = 2 * tokens * classes  # two samples per chunk

    def largest(loss_fn) -> int:
        with LargestTensor() as watcher:
            loss_fn().backward()
        return watcher.largest

    fused = largest(lambda: linear_two_label_cross_entropy_sum(features, head.weight, head.bias, targets, chunk))
    unfused = largest(
        lambda: two_label_cross_entropy_sum(
            head(features), labels, labels.flip(0), targets.weights, 0.1, targets.row_scale
        )
    )
    assert unfused == batch * tokens * classes  # the watcher sees the whole logits where they exist
    assert fused == chunk


def test_linear_two_label_cross_entropy_without_grad_and_under_autocast():
    features, weight, _, targets = _linear_ce_case("none", torch.float32)
    with torch.no_grad():
        value = linear_two_label_cross_entropy_sum(features.requires_grad_(), weight, None, targets)
    assert not value.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = linear_two_label_cross_entropy_sum(features, weight, None, targets)
    # The head's products in bf16, as `nn.Linear` under autocast; the loss itself in float32.
    built = two_label_cross_entropy_sum(
        (features.bfloat16() @ weight.bfloat16().T).float(), targets.labels, targets.partner_labels,
        targets.weights, targets.label_smoothing, targets.row_scale,
    )  # fmt: skip
    assert in_bf16.dtype == torch.float32
    assert in_bf16.item() == pytest.approx(built.item(), rel=1e-5)
    assert in_bf16.item() != pytest.approx(value.item(), rel=1e-5)


def test_linear_two_label_cross_entropy_refuses_mismatched_shapes():
    features, weight, bias, targets = _linear_ce_case("shared", torch.float32)
    with pytest.raises(ValueError, match=r"`features` must have shape \(batch, tokens, D\)"):
        linear_two_label_cross_entropy_sum(features, weight[:, :-1], bias, targets)
    with pytest.raises(ValueError, match=r"`bias` must have shape \(11,\) or \(5, 11\)"):
        linear_two_label_cross_entropy_sum(features, weight, bias[:-1], targets)
    short = patch_token_targets(targets.labels, targets.partner_labels, torch.rand(3), 0.1, 2)
    with pytest.raises(ValueError, match=r"one per token\), got \(5,\)"):
        linear_two_label_cross_entropy_sum(features, weight, bias, short)
    with pytest.raises(ValueError, match=r"`targets.labels` and `targets.partner_labels` must have shape \(4,\)"):
        linear_two_label_cross_entropy_sum(features[:4], weight, None, targets)


# --------------------------------------------------------------------------------------------------------------------
# The attention term from block 1's query and key (probabilities recomputed in the backward)


@pytest.mark.parametrize("bias_shape", [None, (1, 3, 5, 5), (3, 5, 5), (3, 3, 5, 5), (3, 1, 5, 5)])
@pytest.mark.parametrize("chunk_elements", [1, 2 * 3 * 5 * 5, 2**20])
def test_attention_cosine_from_scores_equals_the_loss_on_the_probabilities(bias_shape, chunk_elements):
    """Value and gradients against the loss on the written-out probabilities in float64, with one image, two images
    (an uneven split of 3) and the whole batch per chunk, with no bias, a shared bias (4-d and 3-d), a bias per image
    and one per image shared by the heads."""
    generator = torch.Generator().manual_seed(3)
    query, key = (torch.randn(3, 3, 5, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=generator, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (query, key, bias) if t is not None]
    scores = query @ key.transpose(-1, -2) * 0.5 + (0.0 if bias is None else bias)
    reference = attention_cosine_loss(torch.softmax(scores, dim=-1))
    expected = torch.autograd.grad(reference, leaves)
    got = attention_cosine_loss_from_scores(query, key, 0.5, bias, chunk_elements=chunk_elements)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    for ours, theirs in zip(torch.autograd.grad(got, leaves), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(softmax_attention(query, key, 0.5, bias), torch.softmax(scores, dim=-1))
    with torch.no_grad():
        assert attention_cosine_loss_from_scores(query, key, 0.5, bias, chunk_elements).item() == pytest.approx(
            reference.item(), rel=1e-6
        )


def test_attention_cosine_from_scores_keeps_no_probabilities_and_builds_one_chunk_at_a_time():
    """Every tensor autograd saves, and every tensor created in the forward and the backward, is watched: the loss
    on the probabilities keeps a (B, H, N, N) map; the loss from the query and key keeps none, never builds more
    than one chunk's maps (here two of the four images), and builds no map at all in the backward (the gradient was
    taken in the forward: nothing is recomputed)."""
    query, key = (torch.randn(4, 3, 9, 4, requires_grad=True) for _ in range(2))
    maps, chunk = 4 * 3 * 9 * 9, 2 * 3 * 9 * 9

    def largest(loss_fn) -> tuple[int, int, int]:
        saved = [0]
        with (
            LargestTensor() as watcher,
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t),
        ):
            loss = loss_fn()
        with LargestTensor() as backward_watcher:
            loss.backward()
        return max(saved), watcher.largest, backward_watcher.largest

    assert largest(lambda: attention_cosine_loss(softmax_attention(query, key, 0.5))) == (maps, maps, maps)
    saved, forward, backward = largest(lambda: attention_cosine_loss_from_scores(query, key, 0.5, chunk_elements=chunk))
    assert saved <= query.numel() < chunk and forward == chunk and backward <= query.numel()
    with pytest.raises(ValueError, match="same shape"):
        attention_cosine_loss_from_scores(query, key[:, :, :5], 0.5)


def test_patch_terms_backward_runs_whatever_autocast_made_of_the_forward():
    """The public functions leave autocast; their `Function`s called under bf16 autocast directly (statistics saved in
    bf16) still run their backward in float32, close to the float32 gradients."""
    from diverse_vit_hf.losses.regularizers import _PatchContrastive, _SignedPatchCosine

    first, last = (x.float().requires_grad_(True) for x in _patch_term_inputs(1, torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = _SignedPatchCosine.apply(last, 1) + _PatchContrastive.apply(first, last, 1, False)
    grads = torch.autograd.grad(total, (first, last))
    reference = torch.autograd.grad(patch_cosine_loss(last) + patch_contrastive_loss(first, last), (first, last))
    for grad, ref in zip(grads, reference, strict=True):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        torch.testing.assert_close(grad, ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))
