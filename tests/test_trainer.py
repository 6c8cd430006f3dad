"""DiverseTrainer / DiverseTrainingArguments: the loss, gradient accumulation, logging, and argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_LABELS, build_trainer, make_batch, make_dataset, tiny_config
from helpers import make_args as _make_args
from transformers import DeiTConfig, HfArgumentParser, Trainer, TrainingArguments, ViTForImageClassification

import diverse_vit_hf.trainer.objective as objective_module
from diverse_vit_hf import (
    DiverseDeiTForImageClassification,
    DiverseTrainer,
    DiverseTrainingArguments,
    DiverseViTForImageClassification,
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
)
from diverse_vit_hf.data.image_datasets import collate_image_batch
from diverse_vit_hf.losses.mixing import PatchMixupCutmix


def make_args(tmp_path, **overrides) -> DiverseTrainingArguments:
    return _make_args(tmp_path / "out", **overrides)


PLAIN = {
    "patch_cosine_coef": 0.0,
    "patch_contrastive_coef": 0.0,
    "attention_cosine_coef": 0.0,
    "weight_condition_coef": 0.0,
    "mixing": False,
    "patch_mixing_loss": False,
}


def test_loss_equals_hand_summed_terms_from_stock_model(tmp_path):
    """Every term recomputed from a *stock* eager ViT's hidden states/attentions, then summed by hand."""
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config()).train()
    args = make_args(
        tmp_path,
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


def test_plain_baseline_is_exactly_the_stock_trainer_loss(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config()).train()
    stock = ViTForImageClassification(tiny_config()).train()
    stock.load_state_dict(model.state_dict())
    batch = make_batch()
    for smoothing in (0.0, 0.1):
        ours = DiverseTrainer(model=model, args=make_args(tmp_path, label_smoothing_factor=smoothing, **PLAIN))
        theirs = Trainer(
            model=stock,
            args=TrainingArguments(
                output_dir=str(tmp_path / "stock"), report_to="none", use_cpu=True, label_smoothing_factor=smoothing
            ),
        )
        assert torch.equal(ours.compute_loss(model, dict(batch)), theirs.compute_loss(stock, dict(batch)))


def _train_once(tmp_path, name: str, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config())
    args = make_args(
        tmp_path / name,
        optim="sgd",
        learning_rate=0.5,
        max_steps=1,
        lr_scheduler_type="constant",
        weight_estimator="exact",
        mixing=False,
        **overrides,
    )
    DiverseTrainer(model=model, args=args, train_dataset=make_dataset(8), data_collator=collate_image_batch).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    """One SGD step on 8 images equals 2 accumulated micro-batches of 4 (regularizers scaled once, not twice)."""
    whole = _train_once(tmp_path, "ga1", per_device_train_batch_size=8, gradient_accumulation_steps=1)
    accumulated = _train_once(tmp_path, "ga2", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    initial = DiverseViTForImageClassification(tiny_config()).state_dict()
    moved = 0
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += int(not torch.equal(value, initial[key]))
    assert moved > 10, "the step did not update the parameters; the comparison would be vacuous"


def test_each_term_is_logged_and_averaged(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config())
    args = make_args(
        tmp_path,
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        attention_cosine_coef=0.0,
    )
    trainer = DiverseTrainer(model=model, args=args, train_dataset=make_dataset(32), data_collator=collate_image_batch)
    recorded: list[dict[str, float]] = []
    objective = trainer.objective

    def spy(model, batch, **kwargs):
        result = objective(model, batch, **kwargs)
        recorded.append({k: v.item() for k, v in result.terms.items()})
        return result

    trainer.objective = spy
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "loss_cls" in entry]
    assert len(logs) == 2
    expected_terms = {"loss_cls", "loss_patch_cosine", "loss_patch_contrastive", "loss_weight_condition"}
    for index, entry in enumerate(logs):
        assert expected_terms <= set(entry) and "loss_attention_cosine" not in entry
        window = recorded[index * 4 : (index + 1) * 4]  # 2 optimizer steps x 2 micro-batches
        for name in expected_terms:
            assert entry[name] == pytest.approx(sum(r[name] for r in window) / 4, rel=1e-4)


def test_eval_loss_is_the_unmixed_classification_loss(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config())
    args = make_args(tmp_path, label_smoothing_factor=0.0)
    trainer = DiverseTrainer(model=model, args=args, eval_dataset=make_dataset(8), data_collator=collate_image_batch)
    metrics = trainer.evaluate()
    batch = make_batch(8)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"]).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_premixed_batches_are_used_as_given(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config()).train()
    trainer = DiverseTrainer(
        model=model,
        args=make_args(
            tmp_path,
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


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("patch_cosine_coef", -0.5, "patch_cosine_coef"),
        ("weight_condition_coef", float("nan"), ">= 0"),
        ("attention_cosine_coef", float("inf"), "finite"),
        ("weight_estimator", "lanczos", "weight_estimator"),
        ("patch_cosine_variant", "absolute", "patch_cosine_variant"),
        ("power_iterations", 0, "power_iterations"),
        ("mix_prob", 1.5, "mix_prob"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_args(tmp_path, **{field: value})


def test_every_option_is_a_cli_flag(tmp_path):
    parser = HfArgumentParser(DiverseTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--patch_cosine_coef",
            "0.25",
            "--no_mixing",
            "--weight_estimator",
            "exact",
            "--power_persistent",
            "--power_iterations",
            "3",
            "--no_patch_mixing_loss",
            "--use_cpu",
        ]
    )
    assert (args.patch_cosine_coef, args.mixing, args.weight_estimator) == (0.25, False, "exact")
    assert (args.power_persistent, args.power_iterations, args.patch_mixing_loss) == (True, 3, False)
    assert args.patch_contrastive_coef == 0.5 and args.attention_cosine_coef == 1e-4
    assert args.weight_condition_coef == 5e-4 and args.label_smoothing_factor == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--weight_estimator", "nope"])


def test_stock_model_with_diversity_on_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="load_diverse_model"):
        DiverseTrainer(model=ViTForImageClassification(tiny_config()), args=make_args(tmp_path))


def test_persistent_power_state_is_carried_across_steps(tmp_path):
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config())
    args = make_args(tmp_path, max_steps=2, power_persistent=True, power_iterations=2)
    trainer = DiverseTrainer(model=model, args=args, train_dataset=make_dataset(16), data_collator=collate_image_batch)
    trainer.train()
    state = trainer.power_state
    assert state.max_vectors.shape == (6, 32) and state.min_vectors.shape == (6, 32)
    norms = torch.linalg.vector_norm(state.max_vectors, dim=-1)
    torch.testing.assert_close(norms, torch.ones(6))
    before = copy.deepcopy(state.max_vectors)
    trainer.compute_loss(model.train(), make_batch())
    assert not torch.equal(before, state.max_vectors)


# ---- No host-device syncs on the hot path (issue 5) ----------------------------------------------------------------
#
# On the "meta" device tensors have shapes but no data, so anything that reads a value on the host (`.item()`,
# `bool(t)`, `.tolist()`, data-dependent shapes such as `nonzero`) raises. A diversified step that runs there end to
# end therefore reads no device value back to the host. (Blocking host-to-device copies are not seen here; on a GPU,
# benchmarks/precision_check.py runs the same step under torch.cuda.set_sync_debug_mode("error").) Host-side
# randomness (the Mixup/CutMix draws on the CPU generator) stays on the CPU and is allowed.


def meta_step(tmp_path, model: torch.nn.Module, **overrides) -> DiverseTrainer:
    """One diversified `compute_loss` + backward with the model and the batch on the meta device."""
    trainer = DiverseTrainer(model=model, args=make_args(tmp_path, **overrides), data_collator=collate_image_batch)
    model = trainer.model.to("meta").train()
    batch = {name: value.to("meta") for name, value in make_batch(6).items()}
    loss = trainer.compute_loss(model, batch)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)
    return trainer


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # released defaults: every term, Mixup/CutMix, patch mixing loss, fresh power vectors
        {"power_persistent": True, "power_iterations": 3},
        {"weight_estimator": "exact"},
        {"mix_switch_prob": 1.0},  # CutMix on every batch: per-patch pixel fractions
        {"mix_switch_prob": 0.0, "patch_mixing_loss": False, "patch_cosine_variant": "gong"},
    ],
    ids=["released", "persistent-power", "exact-svd", "cutmix", "mixup-cls-gong"],
)
def test_diversified_step_makes_no_host_reads(tmp_path, overrides):
    torch.manual_seed(0)
    trainer = meta_step(tmp_path, DiverseViTForImageClassification(tiny_config()), **overrides)
    # The logged terms wait on the device until a logging step reads them.
    assert set(trainer.term_log.sums) >= {"loss_cls", "loss_patch_cosine", "loss_weight_condition"}
    assert all(value.device.type == "meta" for value in trainer.term_log.sums.values())


def test_distilled_deit_step_makes_no_host_reads(tmp_path):
    values = {key: value for key, value in tiny_config().to_diff_dict().items() if key != "model_type"}
    model = DiverseDeiTForImageClassification(DeiTConfig(**values))
    assert model.config.model_type == "deit" and model.num_prefix_tokens == 2  # CLS + distillation token
    meta_step(tmp_path, model)


def test_meta_step_detects_a_host_read(tmp_path, monkeypatch):
    """The check above can fail: one `.item()` inside a loss term is caught."""

    def reading_cosine(*args, **kwargs):
        loss = patch_cosine_loss(*args, **kwargs)
        if loss.item() > 1.0:  # a host read, as a logging or clamping shortcut would do
            raise AssertionError("unreachable on meta")
        return loss

    monkeypatch.setattr(objective_module, "patch_cosine_loss", reading_cosine)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        meta_step(tmp_path, DiverseViTForImageClassification(tiny_config()))


def test_torch_compile_traces_the_diversified_forward_without_graph_breaks(tmp_path):
    """`--torch_compile` (dynamo's "eager" backend: the tracing without code generation) gives the same losses, and
    the diversified forward is one graph: the block-1 kernel switch happens in __init__, outside the traced forward."""
    import torch._dynamo

    def logged(**overrides):
        args = make_args(tmp_path, max_steps=2, logging_steps=1, report_to="none", **overrides)
        trainer = build_trainer(args)
        trainer.train()
        return [e[name] for e in trainer.state.log_history if "loss_cls" in e for name in ("loss", "loss_cls")]

    eager = logged()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = logged(torch_compile=True, torch_compile_backend="eager")
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert breaks == {}, list(breaks)
    assert graphs == 1  # the forward of both steps: one graph, no recompilation
    assert compiled == pytest.approx(eager, rel=1e-5)
