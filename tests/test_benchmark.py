"""benchmarks/overhead.py runs and reports every variant (structure only: timings are never asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_overhead_benchmark_reports_all_variants_and_ratios(capsys):
    spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(["--config", "tiny", "--batch_size", "4", "--warmup", "0", "--repeats", "1"])
    expected = {"a", "b", "c", "d_cosine", "d_contrastive", "d_attention", "d_weight", "d_patch_mixing"}
    assert set(report["variants"]) == expected
    for row in report["variants"].values():
        assert row["median_s"] > 0 and row["memory_mib"] > 0
    # The naive variant keeps every layer's attention maps and hidden states: it must save more activations.
    assert report["variants"]["c"]["memory_mib"] > report["variants"]["b"]["memory_mib"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("b/a: time") and lines[-1].startswith("c/b: time")
