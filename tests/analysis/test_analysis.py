"""diverse_vit_hf.analysis: every metric against an independent computation, streaming/batching, outputs, CLI,
callback and bad input."""

from __future__ import annotations

import copy
import json
import math
import stat
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from fixtures.scripts import EXAMPLES, load_script
from PIL import Image
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
    ViTImageProcessor,
)

from diverse_vit_hf import analysis
from diverse_vit_hf.analysis import (
    PLOT_FILES,
    SCHEMA_VERSION,
    WEIGHT_MATRICES,
    RedundancyCallback,
    RedundancyReport,
    analyze_model,
    load_analysis_images,
    patch_similarity,
    tensor_batches,
    weight_matrix_stats,
    write_report,
)
from diverse_vit_hf.analysis import probe as analysis_probe
from diverse_vit_hf.data.image_datasets import load_embedded_dataset, train_eval_split
from diverse_vit_hf.losses.regularizers import attention_cosine_loss, patch_cosine_loss, weight_condition_loss
from diverse_vit_hf.scripts.cli import main as cli_main
from diverse_vit_hf.scripts.study_statistics import DIVERSITY_COEFFICIENTS
from diverse_vit_hf.utils.fileio import current_umask


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine run ~100x faster on one thread (no oversubscription)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def peaky_model(config, seed: int = 0, cls=ViTForImageClassification, attn_implementation: str = "eager"):
    """A random model with non-uniform attention (large init), so attention metrics are far from 1."""
    torch.manual_seed(seed)
    config.initializer_range = 0.3
    model = cls(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0, eps=1e-8).item()


# ------------------------------------------------------------------------------------------------ pure metrics


def test_patch_similarity_matches_pair_loops_and_the_training_loss():
    torch.manual_seed(0)
    hidden = torch.randn(3, 1 + 6, 5)
    hidden[:, 1:] += 0.7 * torch.randn(3, 1, 5)  # shared direction: positive correlation
    result = patch_similarity(hidden, num_prefix_tokens=1)
    for b in range(3):
        patches = hidden[b, 1:]
        pairs = [cos(patches[i], patches[j]) for i in range(6) for j in range(6) if i != j]
        assert result.cosine[b].item() == pytest.approx(np.mean(pairs), abs=1e-6)
        assert result.abs_cosine[b].item() == pytest.approx(np.mean(np.abs(pairs)), abs=1e-6)
        assert result.cosine_with_diagonal[b].item() == pytest.approx(1 / 6 + 5 / 6 * np.mean(pairs), abs=1e-6)
    assert result.cosine_with_diagonal.mean().item() == pytest.approx(patch_cosine_loss(hidden, 1).item(), abs=1e-6)
    assert result.abs_cosine.mean().item() == pytest.approx(patch_cosine_loss(hidden, 1, "gong").item(), abs=1e-6)


def test_input_cosine_matches_a_loop():
    torch.manual_seed(1)
    first, last = torch.randn(2, 2 + 4, 8), torch.randn(2, 2 + 4, 8)
    values = analysis.input_cosine(last, first, num_prefix_tokens=2)
    for b in range(2):
        expected = np.mean([cos(last[b, 2 + i], first[b, 2 + i]) for i in range(4)])
        assert values[b].item() == pytest.approx(expected, abs=1e-6)


def test_attention_metrics_match_pair_loops():
    torch.manual_seed(2)
    probs = torch.softmax(3 * torch.randn(2, 4, 5, 5), dim=-1)
    previous = torch.softmax(3 * torch.randn(2, 4, 5, 5), dim=-1)
    maps, prev_maps = analysis.flattened_head_maps(probs), analysis.flattened_head_maps(previous)
    within = analysis.head_cosine(maps)
    patches_only = analysis.head_cosine(analysis.flattened_head_maps(probs, 1))
    across = analysis.cross_layer_head_cosine(maps, prev_maps)
    for b in range(2):
        pairs = [cos(probs[b, h], probs[b, g]) for h in range(4) for g in range(4) if h != g]
        assert within[b].item() == pytest.approx(np.mean(pairs), abs=1e-6)
        pairs = [cos(probs[b, h, 1:, 1:], probs[b, g, 1:, 1:]) for h in range(4) for g in range(4) if h != g]
        assert patches_only[b].item() == pytest.approx(np.mean(pairs), abs=1e-6)
        same_head = [cos(probs[b, h], previous[b, h]) for h in range(4)]
        assert across[b].item() == pytest.approx(np.mean(same_head), abs=1e-6)
    # The training loss includes the diagonal: 1/H + (H-1)/H x off-diagonal.
    assert attention_cosine_loss(probs).item() == pytest.approx(0.25 + 0.75 * within.mean().item(), abs=1e-6)


def test_weight_statistics_match_an_independent_computation():
    torch.manual_seed(3)
    weight = torch.randn(12, 7)
    stats = weight_matrix_stats(weight)
    singular = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(stats.singular_values, singular, rtol=1e-10)
    assert stats.condition_number == pytest.approx(singular[0] / singular[-1], rel=1e-10)
    frobenius = torch.linalg.matrix_norm(weight.double(), "fro").item()
    assert stats.stable_rank == pytest.approx(frobenius**2 / singular[0] ** 2, rel=1e-10)
    p = singular / singular.sum()
    assert stats.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    rows = [abs(cos(weight[i], weight[j])) for i in range(12) for j in range(12) if i != j]
    assert stats.row_abs_cosine == pytest.approx(np.mean(rows), rel=1e-8)
    assert stats.condition_gap == pytest.approx((singular[0] ** 2 - singular[-1] ** 2) ** 2, rel=1e-10)

    square = torch.randn(3, 6, 6)
    gaps = sum(weight_matrix_stats(w).condition_gap for w in square)
    assert gaps == pytest.approx(weight_condition_loss(square, estimator="exact").item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------ whole models


def expected_from_eager(model, pixel_values, prefix):
    """The analysis' numbers recomputed from a stock eager forward's hidden states and attention maps."""
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    hidden, attentions = out.hidden_states, out.attentions
    assert len(hidden) == len(attentions) + 1
    num_images = pixel_values.shape[0]
    patch = [np.mean([patch_similarity(h[b : b + 1], prefix).cosine.item() for b in range(num_images)]) for h in hidden]
    inputs = [analysis.input_cosine(h, hidden[0], prefix).mean().item() for h in hidden]
    heads, heads_patches, across = [], [], [None]
    for index, att in enumerate(attentions):
        per_image, per_image_patches = [], []
        for b in range(num_images):
            count = att.shape[1]
            per_image.append(np.mean([cos(att[b, h], att[b, g]) for h in range(count) for g in range(count) if h != g]))
            per_image_patches.append(np.mean([cos(att[b, h, prefix:, prefix:], att[b, g, prefix:, prefix:])
                                              for h in range(count) for g in range(count) if h != g]))  # fmt: skip
        heads.append(np.mean(per_image))
        heads_patches.append(np.mean(per_image_patches))
        if index:
            previous = attentions[index - 1]
            across.append(np.mean([np.mean([cos(att[b, h], previous[b, h]) for h in range(att.shape[1])])
                                   for b in range(num_images)]))  # fmt: skip
    return patch, inputs, heads, heads_patches, across


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_model_analysis_equals_stock_eager_outputs(tiny_vit_config, kind):
    if kind == "vit":
        eager = peaky_model(tiny_vit_config)
        prefix = 1
    else:
        config = DeiTConfig(**{k: getattr(tiny_vit_config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
            "num_labels")})  # fmt: skip
        eager = peaky_model(config, cls=DeiTForImageClassification)
        prefix = 2
    analysed = type(eager)(copy.deepcopy(eager.config)).eval()  # own config: the attention setting lives there
    analysed.load_state_dict(eager.state_dict())
    analysed.set_attn_implementation("sdpa")
    torch.manual_seed(4)
    pixels = torch.randn(5, 3, 32, 32)
    result = analyze_model(analysed, tensor_batches(pixels, 2), progress=False, weight_matrices=WEIGHT_MATRICES)
    patch, inputs, heads, heads_patches, across = expected_from_eager(eager, pixels, prefix)

    assert result.num_prefix_tokens == prefix and result.num_patches == 16 and result.num_images == 5
    assert result.embedding.layers == [0, 1, 2, 3] and result.attention.layers == [1, 2, 3]
    np.testing.assert_allclose(result.embedding.patch_cosine, patch, atol=2e-5)
    np.testing.assert_allclose(result.embedding.input_cosine, inputs, atol=2e-5)
    np.testing.assert_allclose(result.attention.head_cosine, heads, atol=2e-5)
    np.testing.assert_allclose(result.attention.head_cosine_patches_only, heads_patches, atol=2e-5)
    assert result.attention.cross_layer_head_cosine[0] is None
    np.testing.assert_allclose(result.attention.cross_layer_head_cosine[1:], across[1:], atol=2e-5)
    assert max(heads) < 0.99  # non-trivial maps, so the comparison means something
    for name in WEIGHT_MATRICES:
        parent = "attention" if name.endswith("proj") else "mlp"
        for block, layer in enumerate(eager.base_model.layers):
            weight = getattr(getattr(layer, parent), name).weight
            expected = torch.linalg.svdvals(weight.detach().double())
            np.testing.assert_allclose(result.weights.matrices[name]["singular_values"][block], expected, rtol=1e-8)
    assert not analysed.training


def test_results_do_not_depend_on_the_batch_size(tiny_vit_config):
    model = peaky_model(tiny_vit_config, attn_implementation="sdpa")
    torch.manual_seed(5)
    pixels = torch.randn(7, 3, 32, 32)
    reports = [analyze_model(model, tensor_batches(pixels, size), progress=False).summary() for size in (1, 3, 7)]
    for other in reports[1:]:
        for key, value in reports[0].items():
            assert other[key] == pytest.approx(value, abs=1e-6), key


def test_only_the_previous_blocks_attention_map_is_kept(tiny_vit_config, monkeypatch):
    """Maps are reduced at once: when block l's map is made, at most block l-1's map is still alive."""
    model = peaky_model(tiny_vit_config, attn_implementation="sdpa")
    alive: list[weakref.ref] = []
    peak = []
    original = analysis.attention_probabilities

    def recording(*args, **kwargs):
        peak.append(sum(ref() is not None for ref in alive))
        probs = original(*args, **kwargs)
        alive.append(weakref.ref(probs))
        return probs

    original_maps = analysis.flattened_head_maps
    maps_alive: list[weakref.ref] = []
    maps_peak = []

    def recording_maps(probs, num_prefix_tokens=0):
        maps = original_maps(probs, num_prefix_tokens)
        if num_prefix_tokens == 0:
            maps_peak.append(sum(ref() is not None for ref in maps_alive))
            maps_alive.append(weakref.ref(maps))
        return maps

    # RedundancyProbe (diverse_vit_hf.analysis.probe) calls them: patch them where it looks them up.
    monkeypatch.setattr(analysis_probe, "attention_probabilities", recording)
    monkeypatch.setattr(analysis_probe, "flattened_head_maps", recording_maps)
    analyze_model(model, tensor_batches(torch.randn(4, 3, 32, 32), 2), progress=False)
    assert len(peak) == 2 * 3 and max(peak) == 0  # probabilities freed right after reduction
    assert max(maps_peak) <= 1  # only the previous block's flattened maps


# ------------------------------------------------------------------------------------------------ outputs


def small_report(tiny_vit_config) -> RedundancyReport:
    first = analyze_model(peaky_model(tiny_vit_config, 0, attn_implementation="sdpa"),
                          tensor_batches(torch.randn(4, 3, 32, 32), 2), name="baseline", progress=False)  # fmt: skip
    second = analyze_model(peaky_model(tiny_vit_config, 1, attn_implementation="sdpa"),
                           tensor_batches(torch.randn(4, 3, 32, 32), 2), name="diversified",
                           progress=False)  # fmt: skip
    second.metrics["top1_accuracy"] = 0.5
    return RedundancyReport([first, second], {"dataset": "random", "split": "test"}, num_images=4)


def check_report_folder(folder, names):
    data = json.loads((folder / "redundancy.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert [m["name"] for m in data["models"]] == names
    assert data["num_images"] >= 1 and "settings" in data and "definitions" in data
    for model in data["models"]:
        layers = model["num_layers"]
        assert model["embedding"]["layers"] == list(range(layers + 1))
        for key in ("patch_cosine", "patch_abs_cosine", "patch_cosine_with_diagonal", "input_cosine"):
            assert len(model["embedding"][key]) == layers + 1
        for key in ("head_cosine", "head_cosine_patches_only", "cross_layer_head_cosine"):
            assert len(model["attention"][key]) == layers
        for matrix in ("q_proj", "k_proj", "v_proj"):
            assert len(model["weights"]["matrices"][matrix]["condition_number"]) == layers
        assert "qkv_cond_mean" in model["summary"]
    markdown = (folder / "report.md").read_text()
    for level, name in PLOT_FILES.items():
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", level
        assert f"]({name})" in markdown
    assert all(name in markdown for name in names)
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary files
    expected_mode = 0o666 & ~current_umask()  # as open(path, "w") would, not mkstemp's 0600
    for name in ("redundancy.json", "report.md", *PLOT_FILES.values()):
        assert stat.S_IMODE((folder / name).stat().st_mode) == expected_mode, name


def test_write_report_json_plots_markdown_and_round_trip(tiny_vit_config, tmp_path):
    report = small_report(tiny_vit_config)
    files = write_report(report, tmp_path / "out")
    check_report_folder(tmp_path / "out", ["baseline", "diversified"])
    loaded = RedundancyReport.load(files.json)
    assert loaded.models[1].metrics == {"top1_accuracy": 0.5}
    assert loaded.models[0].summary() == pytest.approx(report.models[0].summary())
    with pytest.raises(ValueError, match="schema_version"):
        RedundancyReport.from_dict({**report.to_dict(), "schema_version": 99})


def save_checkpoint(config, folder, seed):
    model = peaky_model(config, seed, attn_implementation="sdpa")
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


def test_cli_analyze_two_local_checkpoints(tiny_vit_config, tmp_path, capsys):
    first = save_checkpoint(tiny_vit_config, tmp_path / "first", 0)
    second = save_checkpoint(tiny_vit_config, tmp_path / "second", 1)
    out = tmp_path / "report"
    status = cli_main(["analyze", "--model", str(first), "--model", str(second), "--dataset", "lfw",
                       "--num_images", "12", "--batch_size", "5", "--output_dir", str(out), "--no_progress",
                       "--weight_matrices", "q_proj", "k_proj", "v_proj", "fc1"])  # fmt: skip
    assert status == 0
    check_report_folder(out, ["first", "second"])
    data = json.loads((out / "redundancy.json").read_text())
    assert data["num_images"] == 12 and data["settings"]["dataset"] == "lfw"
    assert str(tmp_path) not in (out / "redundancy.json").read_text()  # names only, no local paths
    assert "fc1" in data["models"][0]["weights"]["matrices"]
    assert "| embedding |" in capsys.readouterr().out


def test_held_out_images_are_the_ones_run_diverse_evaluates_on():
    images = load_analysis_images("lfw", 500, seed=42, held_out_fraction=0.25)
    assert len(images.images) == 50 and images.split == "heldout"
    _, held_out = train_eval_split(load_embedded_dataset("lfw"), "label", 0.25, seed=42)  # what run_diverse.py calls
    expected = {np.asarray(img).tobytes() for img in held_out["image"]}
    assert {np.asarray(img).tobytes() for img in images.images} == expected


def pixel_keys(images) -> set[bytes]:
    return {np.asarray(image).tobytes() for image in images}


def labelled_folder(tmp_path, labels) -> str:
    """A local dataset folder (one parquet train split) of distinct random 8x8 images whose labels are plain ints or
    strings, not a ClassLabel: only a split that encodes the labels first can stratify by them."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    dtype = "string" if isinstance(labels[0], str) else "int64"
    features = Features({"image": ImageFeature(), "label": Value(dtype)})
    folder = tmp_path / "labelled"
    folder.mkdir()
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(folder / "train.parquet"))
    return str(folder)


@pytest.mark.parametrize(
    "labels",
    [[7, 3, 7, 11, 7, 3, 7, 7] * 6, ["dog", "cat", "dog", "eel", "dog", "cat", "dog", "dog"] * 6],
    ids=["int-labels", "string-labels"],
)
def test_held_out_images_are_run_diverse_evaluation_images_for_int_and_string_labels(tmp_path, labels):
    """`diverse-vit analyze` on a single-split dataset measures exactly the images `examples/run_diverse.py`
    evaluated on (same --seed and fraction) and none it trained on, also when the labels are not a ClassLabel (the
    script encodes them and stratifies; the analysis once split such data without stratifying)."""
    folder = labelled_folder(tmp_path, labels)
    run_diverse = load_script()
    data_args = run_diverse.DataArguments(dataset_name=folder, train_val_split=0.25)
    train, evaluation, image_column, _ = run_diverse.load_splits(data_args, 42)
    assert len(train) == 36 and len(evaluation) == 12

    images = load_analysis_images(folder, 500, seed=42, held_out_fraction=0.25)
    assert images.split == "heldout" and len(images.images) == 12
    held_out = pixel_keys(images.images)
    assert held_out == pixel_keys(evaluation[image_column])
    assert not held_out & pixel_keys(train[image_column])


# ------------------------------------------------------------------------------------------------ callback


def test_callback_logs_redundancy_at_each_evaluation(tiny_vit_config, tmp_path):
    model = peaky_model(tiny_vit_config, attn_implementation="sdpa")
    torch.manual_seed(6)
    data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 32, 32).tolist(), "labels": [0, 1, 2, 3] * 2})
    data.set_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, eval_dataset=data)
    callback = RedundancyCallback(data, num_images=6, batch_size=4).attach(trainer)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    logged = [entry for entry in trainer.state.log_history if "redundancy/patch_cos_last" in entry]
    assert len(logged) == 1
    expected = callback.compute(model)
    for key in ("redundancy/patch_cos_last", "redundancy/attn_cos_block1", "redundancy/qkv_cond_mean"):
        assert logged[0][key] == pytest.approx(expected[key])
    reference = analyze_model(model, tensor_batches(data[:6]["pixel_values"], 6), progress=False).summary()
    assert logged[0]["redundancy/attn_cos_block1"] == pytest.approx(reference["attn_cos_block1"], abs=1e-6)

    unbound = RedundancyCallback(data)
    with pytest.raises(RuntimeError, match="attach"):
        unbound.on_evaluate(args, trainer.state, trainer.control, model=model)


# ------------------------------------------------------------------------------------------------ bad input


def resnet_folder(tmp_path):
    folder = tmp_path / "resnet"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(folder)
    return folder


def test_unsupported_model_types_are_rejected(tmp_path, capsys):
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(ValueError, match=r"supports model types vit, deit, vit_msn, dinov2.*'resnet'"):
        analyze_model(resnet, [torch.randn(1, 3, 32, 32)], progress=False)
    folder = resnet_folder(tmp_path)
    with pytest.raises(ValueError, match="'resnet'"):
        analysis.load_model_for_analysis(str(folder))
    status = cli_main(["analyze", "--model", str(folder), "--dataset", "lfw", "--output_dir", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err
    assert "resnet" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--num_images", "0"], "num_images"),
        (["--batch_size", "0"], "batch_size"),
        (["--dataset", "no-such-dataset-xyz"], "Unknown dataset 'no-such-dataset-xyz'"),
        (["--name", "a", "--name", "b"], "names"),
    ],
)
def test_bad_cli_input_exits_2_with_a_message(tiny_vit_config, tmp_path, capsys, argv, fragment):
    model = save_checkpoint(tiny_vit_config, tmp_path / "m", 0)
    status = cli_main(["analyze", "--model", str(model), "--output_dir", str(tmp_path / "o"), "--no_progress", *argv])
    assert status == 2
    assert fragment in capsys.readouterr().err


def test_bad_library_input(tiny_vit_config):
    with pytest.raises(ValueError, match="num_images"):
        load_analysis_images("mnist", 0)
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_analysis_images("definitely/not-a-dataset", 4)
    model = peaky_model(tiny_vit_config)
    with pytest.raises(ValueError, match="subset of"):
        analyze_model(model, [torch.randn(1, 3, 32, 32)], weight_matrices=["query"], progress=False)
    with pytest.raises(ValueError, match="No images"):
        analyze_model(model, [], progress=False)
    with pytest.raises(ValueError, match="num_images"):
        RedundancyCallback(torch.randn(2, 3, 32, 32), num_images=0)
    with pytest.raises(ValueError, match="Unknown summary keys"):
        RedundancyCallback(torch.randn(2, 3, 32, 32), keys=["nope"])
    with pytest.raises(ValueError, match="at least 2 patch tokens"):
        patch_similarity(torch.randn(1, 2, 4), num_prefix_tokens=1)


# ------------------------------------------------------------------------------------------------ slow: training


@pytest.mark.slow
def test_callback_during_diverse_training(tiny_vit_config, tmp_path):
    from diverse_vit_hf import DiverseTrainer, DiverseTrainingArguments, DiverseViTForImageClassification

    torch.manual_seed(7)
    model = DiverseViTForImageClassification(tiny_vit_config)
    data = Dataset.from_dict({"pixel_values": torch.randn(16, 3, 32, 32).tolist(), "labels": list(range(5)) * 3 + [0]})
    data.set_format("torch")
    args = DiverseTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, num_train_epochs=2,
                                    per_device_train_batch_size=8, eval_strategy="epoch", save_strategy="no",
                                    disable_tqdm=True)  # fmt: skip
    trainer = DiverseTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    RedundancyCallback(data, num_images=8).attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "redundancy/qkv_cond_mean" in entry]
    assert [entry["epoch"] for entry in logged] == [1.0, 2.0]
    assert logged[0]["redundancy/qkv_cond_mean"] != logged[1]["redundancy/qkv_cond_mean"]  # the weights moved
    model.train()
    trainer.callback_handler.callbacks[-1].compute(model)
    assert model.training  # the analysis restores the training mode it found


@pytest.mark.slow
def test_compare_redundancy_smoke_run(tmp_path):

    from huggingface_hub import ModelCard

    script = EXAMPLES / "compare_redundancy.py"
    module = load_script(script, "compare_redundancy")
    out = tmp_path / "cmp"
    results = module.main(["--output_dir", str(out), "--epochs", "1", "--max_train_samples", "256", "--num_images",
                           "32", "--hidden_size", "32", "--num_hidden_layers", "2", "--patch_size", "7",
                           "--use_cpu"])  # fmt: skip
    assert set(results) == {"mnist", "lfw"}
    for dataset, (report, verdict) in results.items():
        assert [m.name for m in report.models] == ["baseline", "diversified"]
        assert all(0.0 <= m.metrics["top1_accuracy"] <= 1.0 for m in report.models)
        assert set(verdict) == {"embedding", "attention", "weights"}
        check_report_folder(out / dataset / "report", ["baseline", "diversified"])
        for name in ("baseline", "diversified"):
            card = ModelCard.load(out / dataset / name / "README.md")
            assert card.data.pipeline_tag == "image-classification" and str(tmp_path) not in card.content
        assert "baseline" in ModelCard.load(out / dataset / "baseline" / "README.md").data.tags
        # The paper's baseline: the DeiT recipe's Mixup/CutMix stays on, only the diversity terms are off.
        baseline_args = json.loads((out / dataset / "baseline" / "training_args.json").read_text())
        assert baseline_args["mixing"] and not baseline_args["patch_mixing_loss"]
        assert all(baseline_args[name] == 0 for name in DIVERSITY_COEFFICIENTS)
        diverse_args = json.loads((out / dataset / "diversified" / "training_args.json").read_text())
        assert diverse_args["mixing"] and diverse_args["patch_mixing_loss"]
        assert all(diverse_args[name] > 0 for name in DIVERSITY_COEFFICIENTS)
    summary = (out / "summary.md").read_text()
    assert "## mnist" in summary and "## lfw" in summary and "top1_accuracy" in summary
