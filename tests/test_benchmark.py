"""The scripts of benchmarks/: structure and checks only, timings are never asserted."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
from fixtures.scripts import REPO, load_script

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str):
    """Import a script of benchmarks/ as a module (its folder on sys.path, as when it runs as a script)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return load_script(BENCHMARKS / f"{name}.py", name)


def test_overhead_benchmark_reports_all_variants_and_ratios(capsys):
    report = load_benchmark("overhead").main(
        ["--config", "tiny", "--batch_size", "4", "--warmup", "0", "--repeats", "1"]
    )
    expected = {"a", "t", "b", "c", "d_cosine", "d_contrastive", "d_attention", "d_weight", "d_patch_mixing"}
    assert set(report["variants"]) == expected
    for row in report["variants"].values():
        assert row["median_s"] > 0 and row["memory_mib"] > 0
        assert row["rss_peak_mib"] is None  # only measured under MALLOC_MMAP_THRESHOLD_ (next test)
    # The naive variant keeps every layer's attention maps and hidden states: it must save more activations.
    assert report["variants"]["c"]["memory_mib"] > report["variants"]["b"]["memory_mib"]
    # timm's ViT and HF's save the same activations (same sizes, no dropout).
    assert report["variants"]["t"]["memory_mib"] == pytest.approx(report["variants"]["a"]["memory_mib"], rel=0.02)
    assert "rss_peak" not in report["ratio_b_over_a"] and "time" in report["ratio_a_over_t"]
    # Ours applies the head to every token (the patch-wise loss) and recomputes block 1's maps: more arithmetic.
    assert report["ratio_b_over_a"]["flops"] > 1.0 and report["ratio_a_over_t"]["flops"] == pytest.approx(1.0)
    assert report["flops_over_a"]["d_patch_mixing"] > 1.0
    assert report["ratio_b_over_a"]["time_per_round"]["ci95"] is None  # one round: no interval
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("a/t: time") and lines[-2].startswith("b/a: time") and "peak RSS" not in lines[-2]
    assert "FLOPs" in lines[-2] and lines[-1].startswith("c/b: time")


def test_median_confidence_interval_is_the_binomial_order_statistics():
    """Against scipy's binomial distribution: the interval is [x_(k), x_(n+1-k)] for the largest k with
    P(Binomial(n, 1/2) <= k - 1) <= 2.5%, and its coverage for the median is at least 95%."""
    binom = pytest.importorskip("scipy.stats").binom
    median_with_ci = load_benchmark("overhead").median_with_ci
    assert median_with_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, None, None)  # n = 5: no order statistics reach 95%
    for n in (6, 9, 21, 41, 100):
        values = [float(v) for v in range(1, n + 1)]
        median, low, high = median_with_ci(values[::-1])
        k = max(j for j in range(1, n // 2 + 1) if binom.cdf(j - 1, n, 0.5) <= 0.025)
        assert (low, high) == (values[k - 1], values[n - k]) and median == pytest.approx((n + 1) / 2)
        assert 1 - 2 * binom.cdf(k - 1, n, 0.5) >= 0.95
    assert median_with_ci([1.0] * 21) == (1.0, 1.0, 1.0)


def test_flop_counter_counts_the_cpu_fused_attention_as_the_eager_products():
    """torch's counter leaves out the CPU's SDPA kernel; ours counts it as Q·Kᵀ and P·V, which is what eager
    attention's two batched products count (forward only: the fused backward also recomputes Q·Kᵀ)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    overhead = load_benchmark("overhead")
    config = ViTConfig(**overhead.CONFIGS["tiny"])
    pixels = torch.randn(2, 3, 32, 32)
    counts = {}
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = ViTForImageClassification(config).eval()
        model.set_attn_implementation(attention)
        with torch.no_grad(), overhead.flop_counter() as counter:
            model(pixel_values=pixels)
        counts[attention] = counter.get_total_flops()
        attention_ops = {str(op) for op in counter.get_flop_counts()["Global"]}
        assert any("attention" in op or "bmm" in op for op in attention_ops), attention_ops
    assert counts["sdpa"] == counts["eager"] > 0


def test_memory_peak_profile_accounts_for_the_peak_and_names_what_holds_it(capsys):
    """The replayed peak is the sum of its groups, at least the activations saved for the backward (alive at the end
    of the forward, inside the step) as overhead.py measures them, and ours names the loss code that holds memory."""
    argv = ["--config", "tiny", "--batch_size", "8", "--only", "a,b", "--top", "40"]
    results = load_benchmark("memory_peak").main(argv)
    saved = load_benchmark("overhead").main([*argv[:4], "--only", "a,b", "--warmup", "0", "--repeats", "1", "--json"])
    for key in ("a", "b"):
        peak, reached, groups = results[key]
        assert peak == sum(groups.values()) > 0 and reached != "-"
        assert peak >= saved["variants"][key]["memory_mib"] * 2**20
    assert any("regularizers.py" in name for name in results["b"][2])
    assert not any("regularizers.py" in name for name in results["a"][2])
    assert "ours / plain HF peak: " in capsys.readouterr().out


def test_overhead_benchmark_measures_the_peak_rss_rise_when_freed_memory_is_returned():
    command = [sys.executable, str(BENCHMARKS / "overhead.py"), "--config", "tiny", "--batch_size", "64", "--warmup",
               "0", "--repeats", "1", "--only", "a,b", "--json"]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    peaks = {key: row["rss_peak_mib"] for key, row in report["variants"].items()}
    assert all(peak is not None and peak > 0 for peak in peaks.values()), peaks
    assert report["ratio_b_over_a"]["rss_peak"] == pytest.approx(peaks["b"] / peaks["a"])


def test_precision_check_passes_on_cpu_autocast():
    report = load_benchmark("precision_check").main(["--config", "tiny", "--batch_size", "4", "--json"])
    checks = {(row["dtype"], row["check"]): row["ok"] for row in report["checks"]}
    assert {("bf16", "float32"), ("fp16", "float32"), ("bf16", "weight"), ("fp32", "no sync")} <= set(checks)
    assert report["failed"] == 0, [row for row in report["checks"] if not row["ok"]]


def test_precision_check_catches_regularizers_left_in_autocast(monkeypatch):
    """With the float32 guard of the regularizers removed, the bf16 terms and the weight term are flagged."""
    import diverse_vit_hf.losses.regularizers as regularizers

    monkeypatch.setattr(regularizers, "_no_autocast", lambda tensor: contextlib.nullcontext())
    report = load_benchmark("precision_check").main(["--config", "tiny", "--batch_size", "4", "--dtypes", "bf16"])
    failed = {row["check"] for row in report["checks"] if not row["ok"]}
    assert {"float32", "weight"} <= failed


def test_gpu_report_names_missing_outputs(tmp_path):
    (tmp_path / "overhead.json").write_text("{not json")
    (tmp_path / "precision.json").write_text("")
    text = load_benchmark("gpu_report").build_report(tmp_path)
    assert "`overhead.json` is not valid JSON" in text
    assert "`precision.json` is empty: its stage failed" in text
    assert "`compile.json` was not written (the stage failed or did not run; see stderr.log)" in text
    assert "`train_state.json` was not written (the stage failed or did not run; see train.log and stderr.log)" in text


def test_synthetic_imagefolder_layout_and_refusals(tmp_path, capsys):
    module = load_benchmark("synthetic_imagefolder")
    output = module.main(
        [
            "--output",
            str(tmp_path / "data"),
            "--num_train",
            "6",
            "--num_val",
            "3",
            "--num_classes",
            "3",
            "--image_size",
            "20",
        ]
    )
    for split, count in (("train", 6), ("val", 3)):
        files = sorted((output / split).glob("class_*/*.jpg"))
        assert len(files) == count and {f.parent.name for f in files} == {"class_000", "class_001", "class_002"}
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left behind
    with pytest.raises(SystemExit):
        module.main(["--output", str(output)])
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--output", str(tmp_path / "other"), "--num_val", "2", "--num_classes", "3"])
    assert "every class has images" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_run_script_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_run.sh end to end with GPU_RUN_SMOKE=1: every stage runs and the report has every section."""
    env = {**os.environ, "GPU_RUN_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_run.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for heading in ("### Step time and memory", "### Mixed precision and host syncs", "### bf16 training run"):
        assert heading in report
    assert "| GFLOP |" in report and ", FLOPs 1.0" in report  # ours does more arithmetic than plain HF, by a little
    assert json.loads((tmp_path / "train_state.json").read_text())["global_step"] == 2
    assert json.loads((tmp_path / "precision.json").read_text())["failed"] == 0


HIDE_PACKAGES = """
import importlib.machinery, sys
class Hidden(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "evaluate", "mlxtend"):
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [f for f in sys.meta_path if f is not importlib.machinery.PathFinder] + [Hidden]
"""


def test_benchmarks_run_without_datasets_installed(tmp_path):
    """The overhead and precision stages run on a machine without `datasets`/`evaluate` (and `mlxtend`)."""
    code = HIDE_PACKAGES + (
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import precision_check, importlib.util\n"
        "assert importlib.util.find_spec('datasets') is None and 'datasets' not in sys.modules\n"
        "report = precision_check.main(['--config', 'tiny', '--batch_size', '2', '--dtypes', 'bf16', '--json'])\n"
        "assert report['failed'] == 0 and 'datasets' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
