"""`diverse_vit_hf.trainer.trainer.DiverseTrainer`: the plain baseline is the stock Trainer's loss, gradient
accumulation, the logged terms, the evaluation loss, the label range, determinism, the persistent power state, no
host-device syncs on the hot path, `torch.compile` without graph breaks, and memory and disk over many epochs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from fixtures.builders import (
    build_trainer,
    make_batch,
    make_dataset,
    same_weights,
    snapshot,
    tiny_config,
    training_logs,
)
from fixtures.builders import make_args as _make_args
from fixtures.scripts import fast_flags, load_script
from transformers import DeiTConfig, Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

import diverse_vit_hf.trainer.objective as objective_module
from diverse_vit_hf import (
    DiverseDeiTForImageClassification,
    DiverseTrainer,
    DiverseTrainingArguments,
    DiverseViTForImageClassification,
    patch_cosine_loss,
)
from diverse_vit_hf.data.image_datasets import collate_image_batch


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


def test_labels_out_of_the_model_range_are_refused_before_training(tmp_path):
    features = Features({"pixel_values": Sequence(Value("float32")), "labels": ClassLabel(num_classes=7)})
    dataset = Dataset.from_dict({"pixel_values": [[0.0]] * 7, "labels": list(range(7))}, features=features)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"7 classes but the model has num_labels=4.*num_labels=7"):
        DiverseTrainer(
            model=DiverseViTForImageClassification(tiny_config()),
            args=make_args(tmp_path, logging_steps=1, learning_rate=1e-2),
            train_dataset=dataset,
        )


def test_same_seed_gives_identical_losses(tmp_path):
    # The Trainer seeds every RNG when it is created (not in train()): create each one right before training it.
    runs = []
    for name in ("first", "second"):
        args = _make_args(tmp_path / name, logging_steps=1, learning_rate=1e-2, max_steps=4)
        runs.append(build_trainer(args))
        runs[-1].train()
    first, second = ({e["step"]: e["loss"] for e in training_logs(trainer)} for trainer in runs)
    assert len(first) == 4 and first == second
    assert same_weights(snapshot(runs[0].model), snapshot(runs[1].model))


# ---- No host-device syncs on the hot path -------------------------------------------------------------------------
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


# ---- Load: many short epochs with evaluation and checkpoint rotation -------------------------------------------------


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# Measured on CPU: +0.0 to +1.5 MiB between epoch 5 and the last epoch; the bound leaves room for allocator noise.
RSS_GROWTH_BOUND_MIB = 32.0


@pytest.mark.slow
def test_soak_many_short_epochs_keep_memory_flat_and_disk_bounded(tmp_path):
    if not Path("/proc/self/status").is_file():
        pytest.skip("RSS is read from /proc/self/status (Linux)")
    module = load_script()
    samples: list[tuple[int, float, int]] = []
    begin: list[float] = []
    output = tmp_path / "soak"

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begin.append(rss_mib())

        def on_epoch_end(self, args, state, control, **kwargs):
            samples.append((round(state.epoch), rss_mib(), len(list(output.glob("checkpoint-*")))))

    epochs = 30
    module.main(
        [
            "--output_dir",
            str(output),
            *fast_flags(),
            "--num_train_epochs",
            str(epochs),
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "16",
            "--save_total_limit",
            "2",
            "--logging_steps",
            "1",
        ],
        callbacks=[Probe()],
    )
    assert len(samples) == epochs
    # Checkpoints are saved after the epoch-end callbacks: at most save_total_limit + the one being written.
    assert max(count for _, _, count in samples) <= 2
    assert len(list(output.glob("checkpoint-*"))) == 2 and not list(output.glob(".*"))
    warm = samples[4][1]  # after a few epochs: allocator pools, lazy imports and caches are warm
    end = samples[-1][1]
    print(
        f"\nsoak RSS: train begin {begin[0]:.1f} MiB, epoch 1 {samples[0][1]:.1f} MiB, epoch 5 {warm:.1f} MiB, "
        f"end (epoch {epochs}) {end:.1f} MiB, peak {max(rss for _, rss, _ in samples):.1f} MiB"
    )
    assert end - warm < RSS_GROWTH_BOUND_MIB, samples
