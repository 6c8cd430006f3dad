"""`diverse_vit_hf.trainer.objective.DiversityObjective`: the Diverse-ViT loss of a training batch.

The term table `DIVERSITY_TERMS` decides which regularizers are computed (only those whose coefficient is > 0, in
table order), and the total is the classification loss plus each coefficient times its term, checked against an
independent computation with the pure functions of `diverse_vit_hf.losses.regularizers` on the model's outputs and
against a stock eager ViT's hidden states and attentions. Pre-mixed batches are used as given; a batch of one image is
trained unmixed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from fixtures.builders import NUM_LABELS, build_trainer, make_args, make_batch, tiny_config
from transformers import ViTForImageClassification

from diverse_vit_hf import (
    DiverseDeiTForImageClassification,
    DiverseTrainer,
    DiverseViTForImageClassification,
    DiversityConfig,
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
)
from diverse_vit_hf.losses.configuration import DIVERSITY_COEFFICIENTS, LOSS_TERM_NAMES
from diverse_vit_hf.losses.mixing import PatchMixupCutmix
from diverse_vit_hf.losses.regularizers import weight_condition_loss
from diverse_vit_hf.trainer.objective import DIVERSITY_TERMS, DiversityObjective, DiversityTerm

# The training arguments of the trainer-level tests below: a log every step, learning rate 1e-2.
LOGGED = {"logging_steps": 1, "learning_rate": 1e-2}
COEFFICIENTS = {
    "patch_cosine_coef": 0.3,
    "patch_contrastive_coef": 0.7,
    "attention_cosine_coef": 0.2,
    "weight_condition_coef": 1e-3,
}
MODEL_CLASSES = {"vit": DiverseViTForImageClassification, "deit": DiverseDeiTForImageClassification}


def tiny_model(kind: str = "vit", seed: int = 0) -> torch.nn.Module:
    """A freshly seeded diversified `tiny_config(kind)` model in training mode (no dropout: deterministic)."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[kind](tiny_config(kind)).train()


def recording(term: DiversityTerm, calls: list[str], value: float | None = None) -> DiversityTerm:
    """`term` whose computation is recorded in `calls`; with `value`, it returns that constant instead."""

    def compute(inputs):
        calls.append(term.name)
        return term.compute(inputs) if value is None else torch.tensor(value)

    return dataclasses.replace(term, compute=compute)


# --------------------------------------------------------------------------------------------------------------------
# The term table


def test_the_table_lists_the_four_regularizers_with_their_logged_names_and_coefficients():
    assert [term.name for term in DIVERSITY_TERMS] == list(LOSS_TERM_NAMES[1:])
    assert [term.coefficient for term in DIVERSITY_TERMS] == list(DIVERSITY_COEFFICIENTS)
    objective = DiversityObjective(DiversityConfig(), num_labels=NUM_LABELS, patch_size=4)
    assert objective.terms == DIVERSITY_TERMS  # the default table


def test_the_term_table_drives_which_terms_are_computed_and_added():
    """A table of two made-up terms on two of the coefficients: exactly those are computed, in table order, logged
    under their names and added with their coefficients; the other two coefficients (> 0) add nothing."""
    calls: list[str] = []
    table = (
        recording(DiversityTerm("loss_second", "attention_cosine_coef", DIVERSITY_TERMS[0].compute), calls, 3.0),
        recording(DiversityTerm("loss_first", "patch_cosine_coef", DIVERSITY_TERMS[0].compute), calls, 2.0),
    )
    config = DiversityConfig(mixing=False, patch_mixing_loss=False, patch_cosine_coef=0.5, attention_cosine_coef=0.25)
    objective = DiversityObjective(config, num_labels=NUM_LABELS, patch_size=4, terms=table)
    result = objective(tiny_model(), make_batch())
    assert calls == ["loss_second", "loss_first"]
    assert set(result.terms) == {"loss_cls", "loss_first", "loss_second"}
    assert result.terms["loss_first"].item() == 2.0 and result.terms["loss_second"].item() == 3.0
    expected = result.terms["loss_cls"] + 0.5 * 2.0 + 0.25 * 3.0
    torch.testing.assert_close(result.loss.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("off", DIVERSITY_COEFFICIENTS)
def test_a_coefficient_of_zero_skips_its_term(off):
    """The term whose coefficient is 0 is never computed (not computed and multiplied by 0: a NaN there would still
    poison the loss), nor logged; the other three are."""
    calls: list[str] = []
    nan_if_computed = tuple(
        recording(term, calls, float("nan") if term.coefficient == off else None) for term in DIVERSITY_TERMS
    )
    config = DiversityConfig(mixing=False, weight_estimator="exact", **(COEFFICIENTS | {off: 0.0}))
    objective = DiversityObjective(config, num_labels=NUM_LABELS, patch_size=4, terms=nan_if_computed)
    kept = [term.name for term in DIVERSITY_TERMS if term.coefficient != off]
    assert [term.name for term in objective.active_terms()] == kept
    result = objective(tiny_model(), make_batch())
    assert sorted(calls) == sorted(kept)
    assert list(result.terms) == ["loss_cls", *kept]  # logged in table order, whenever computed
    assert torch.isfinite(result.loss)


def test_the_weight_term_is_computed_before_the_forward_and_back_propagated_after_the_model():
    """The weight term reads no activation: computed before the forward, its backward (with its `(M, D, D)`
    gradient transients) runs after the model's, once the activations are freed, not on top of them at the start of
    the backward (the step's memory peak)."""
    events: list[str] = []
    model = tiny_model()
    real_projection_weights = model.attention_projection_weights

    def recorded_projection_weights():
        weights = real_projection_weights()
        events.append("weight term")
        weights.register_hook(lambda grad: events.append("weight term backward"))
        return weights

    model.attention_projection_weights = recorded_projection_weights
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    first_block = model.backbone.layers[0]
    first_block.register_full_backward_hook(lambda module, grad_in, grad_out: events.append("block 1 backward"))
    config = DiversityConfig(mixing=False, weight_estimator="exact", **COEFFICIENTS)
    objective = DiversityObjective(config, num_labels=NUM_LABELS, patch_size=4)
    result = objective(model, make_batch())
    result.loss.backward()
    assert events == ["weight term", "forward", "block 1 backward", "weight term backward"]
    expected = weight_condition_loss(real_projection_weights(), "exact")
    torch.testing.assert_close(result.terms["loss_weight_condition"], expected.detach())


def test_all_coefficients_zero_leave_the_classification_loss_alone():
    calls: list[str] = []
    table = tuple(recording(term, calls) for term in DIVERSITY_TERMS)
    config = DiversityConfig(mixing=False, **dict.fromkeys(DIVERSITY_COEFFICIENTS, 0.0))
    result = DiversityObjective(config, num_labels=NUM_LABELS, patch_size=4, terms=table)(tiny_model(), make_batch())
    assert calls == [] and list(result.terms) == ["loss_cls"]
    torch.testing.assert_close(result.loss.detach(), result.terms["loss_cls"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# The total against independent computations


@pytest.mark.parametrize("kind", ["vit", "deit"])
@pytest.mark.parametrize("patch_wise", [True, False], ids=["patch-mixing-loss", "cls-loss"])
def test_the_total_is_the_classification_loss_plus_each_coefficient_times_its_term(kind, patch_wise):
    """No mixing (the targets are the label-smoothed one-hots): the classification loss is recomputed from the
    model's own outputs (cross-entropy of the image logits, or averaged with every patch's), every term with the pure
    functions of `losses.regularizers`, and summed with the coefficients here."""
    config = DiversityConfig(mixing=False, patch_mixing_loss=patch_wise, weight_estimator="exact", **COEFFICIENTS)
    objective = DiversityObjective(config, num_labels=NUM_LABELS, patch_size=4, label_smoothing=0.1)
    model, batch = tiny_model(kind), make_batch()
    result = objective(model, batch)

    prefix = model.num_prefix_tokens
    out = model(batch["pixel_values"], return_diversity_outputs=True)
    if patch_wise:
        smoothed = F.one_hot(batch["labels"], NUM_LABELS).float() * 0.9 + 0.1 / NUM_LABELS
        patches = out.token_logits.shape[1] - prefix
        patch_targets = smoothed[:, None].expand(-1, patches, -1)
        classification = patch_mixing_loss(out.token_logits, smoothed, patch_targets, prefix, image_logits=out.logits)
    else:
        classification = F.cross_entropy(out.logits, batch["labels"], label_smoothing=0.1)
    terms = {
        "loss_patch_cosine": patch_cosine_loss(out.last_block_hidden_state, prefix),
        "loss_patch_contrastive": patch_contrastive_loss(out.first_hidden_state, out.last_block_hidden_state, prefix),
        "loss_attention_cosine": attention_cosine_loss(out.first_block_attention_probs),
        "loss_weight_condition": weight_condition_loss(model.attention_projection_weights(), estimator="exact"),
    }
    coefficient = {term.name: COEFFICIENTS[term.coefficient] for term in DIVERSITY_TERMS}
    expected = classification + sum(coefficient[name] * value for name, value in terms.items())

    assert set(result.terms) == {"loss_cls", *terms}
    torch.testing.assert_close(result.terms["loss_cls"], classification.detach(), rtol=1e-5, atol=1e-6)
    for name, value in terms.items():
        torch.testing.assert_close(result.terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(result.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert all(not value.requires_grad for value in result.terms.values())  # logged values are detached
    assert result.loss.requires_grad


def test_loss_equals_hand_summed_terms_from_stock_model(tmp_path):
    """Every term recomputed from a *stock* eager ViT's hidden states/attentions, then summed by hand."""
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config()).train()
    args = make_args(
        tmp_path / "out",
        weight_estimator="exact",
        patch_cosine_coef=0.3,
        patch_contrastive_coef=0.7,
        attention_cosine_coef=0.2,
        weight_condition_coef=1e-3,
    )
    trainer = DiverseTrainer(model=model, args=args)
    batch = make_batch()

    torch.manual_seed(123)
    loss = trainer.compute_loss(model, dict(batch))

    torch.manual_seed(123)
    mixer = PatchMixupCutmix(NUM_LABELS, 4, label_smoothing=0.1)
    mixed = mixer(batch["pixel_values"], batch["labels"])
    stock = ViTForImageClassification(tiny_config()).train()
    stock.load_state_dict(model.state_dict())
    stock.set_attn_implementation("eager")
    out = stock(mixed.pixel_values, output_hidden_states=True, output_attentions=True)
    token_logits = stock.classifier(stock.vit.layernorm(out.hidden_states[-1]))
    # (CE(cls) + sum_p CE(patch p)) / (1 + P), written as an explicit average over the 1 + P tokens.
    log_probs = F.log_softmax(token_logits, dim=-1)
    all_targets = torch.cat([mixed.targets[:, None], mixed.patch_targets], dim=1)
    loss_cls = -(all_targets * log_probs).sum(-1).mean()
    weights = torch.stack(
        [
            w
            for layer in stock.vit.layers
            for w in (layer.attention.q_proj.weight, layer.attention.k_proj.weight, layer.attention.v_proj.weight)
        ]
    )
    eigen = torch.linalg.eigvalsh(weights.double() @ weights.double().transpose(1, 2))
    expected = (
        loss_cls
        + 0.3 * patch_cosine_loss(out.hidden_states[-1], 1)
        + 0.7 * patch_contrastive_loss(out.hidden_states[0], out.hidden_states[-1], 1)
        + 0.2 * attention_cosine_loss(out.attentions[0])
        + 1e-3 * (eigen[:, -1] - eigen[:, 0]).pow(2).sum()
    )
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
    assert loss_cls.item() == pytest.approx(
        patch_mixing_loss(token_logits, mixed.targets, mixed.patch_targets, 1).item(), rel=1e-5
    )


# --------------------------------------------------------------------------------------------------------------------
# Batches: pre-mixed, a single image


def test_premixed_batches_are_used_as_given(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config()).train()
    trainer = DiverseTrainer(
        model=model,
        args=make_args(
            tmp_path / "out",
            weight_estimator="exact",
            patch_cosine_coef=0,
            patch_contrastive_coef=0,
            attention_cosine_coef=0,
            weight_condition_coef=0,
        ),
    )
    batch = make_batch()
    targets = torch.softmax(torch.randn(6, NUM_LABELS), -1)
    patch_targets = torch.softmax(torch.randn(6, 16, NUM_LABELS), -1)
    loss = trainer.compute_loss(
        model, {"pixel_values": batch["pixel_values"], "labels": targets, "patch_labels": patch_targets}
    )
    out = model(batch["pixel_values"], return_diversity_outputs=True)
    assert loss.item() == pytest.approx(patch_mixing_loss(out.token_logits, targets, patch_targets).item(), rel=1e-6)


def test_single_image_batch_left_by_skipping_is_trained_unmixed(tmp_path):
    """A configured batch of 1 is refused up front (tests/scripts/test_train.py); a batch of 1 at run time (an epoch's
    incomplete last batch, or what --corrupt_images skip left) is trained without mixing instead of crashing the run."""
    trainer = build_trainer(make_args(tmp_path, **LOGGED, mixing=True, weight_estimator="exact"))
    model = trainer.model.train()
    single = {"pixel_values": torch.randn(1, 3, 16, 16), "labels": torch.tensor([2])}
    loss = trainer.compute_loss(model, single)
    trainer.objective.mixer = None  # the same batch, explicitly unmixed
    assert torch.isfinite(loss) and loss.item() == pytest.approx(trainer.compute_loss(model, single).item(), rel=1e-6)
    with pytest.raises(ValueError, match="--no_mixing"):
        build_trainer(make_args(tmp_path, **LOGGED, per_device_train_batch_size=1))
