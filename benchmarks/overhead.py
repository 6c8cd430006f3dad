#!/usr/bin/env python
"""Side-by-side cost of a Diverse-ViT training step against a plain one.

One process, one model initialisation, one batch; after warm-up the variants run alternately (one step each
per round) and each reports the median over the rounds of a full training step (forward, loss, backward,
optimizer step) and its memory:

  (a) plain   stock `ViTForImageClassification` (SDPA): the DeiT baseline step (Mixup/CutMix, soft CE on CLS)
  (b) ours    `DiverseViTForImageClassification` + `DiverseTrainer.compute_loss`: all regularizers + patch mixing
  (c) naive   the way a user would get the same tensors from stock HF: eager attention in every block,
              `output_attentions=True, output_hidden_states=True`, then the same loss terms
  (d) one term at a time on top of (a)'s objective: cosine, contrastive, attention, weight, patch mixing

Memory: on CUDA the peak allocated bytes of the step; on CPU the bytes of tensors saved for backward (the
activation memory that dominates training, deduplicated by storage), since the CPU allocator has no peak
counter.

Arithmetic: each variant's FLOPs of one step (forward + backward) as `torch.utils.flop_counter` counts them (matrix
products, convolutions and attention, the CPU's fused SDPA included; element-wise work is not counted). Unlike the
times, this is exact and the same on every machine: a variant whose FLOPs are 1.046x plain HF's cannot take less
than about 1.046x its time without using the hardware better.

Time ratios: the ratio of the medians, and the median of the per-round ratios (both variants' steps of one round see
the same machine) with a distribution-free 95% confidence interval (binomial order statistics), which says whether a
target such as 1.05 is resolved by the run.

    python benchmarks/overhead.py                           # DeiT-Tiny 224px, fp32, CPU, batch 8
    python benchmarks/overhead.py --config deit-small --batch_size 128 --dtype bf16 --device cuda
    python benchmarks/overhead.py --config tiny --json      # seconds, for a smoke test

The last lines printed are the ratios a/t (plain HF over plain timm), b/a and c/b. The peak RSS rise of a step (the
CPU's peak memory, transient tensors included) is measured only under `MALLOC_MMAP_THRESHOLD_=65536`, which slows the
steps down: take times from a run without it and peak memory from a run with it:

    python benchmarks/overhead.py --config deit-tiny --batch_size 32 --only t,a,b --repeats 9 --threads 2
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/overhead.py --config deit-tiny --batch_size 32 --only t,a,b \
        --repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import ViTConfig, ViTForImageClassification

from diverse_vit_hf import DiverseTrainer, DiverseTrainingArguments, DiverseViTForImageClassification
from diverse_vit_hf.losses.mixing import PatchMixupCutmix
from diverse_vit_hf.losses.regularizers import (
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    weight_condition_loss,
)

CONFIGS = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=4,
        num_labels=10,
    ),
    "deit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "deit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
}
ALL_TERMS = {
    "patch_cosine_coef": 0.5,
    "patch_contrastive_coef": 0.5,
    "attention_cosine_coef": 1e-4,
    "weight_condition_coef": 5e-4,
}
NO_TERMS = dict.fromkeys(ALL_TERMS, 0.0)


@dataclass
class Result:
    name: str
    description: str
    seconds: list[float] = field(default_factory=list)
    memory_bytes: int = 0
    flops: int = 0
    rss_peak_bytes: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class RssPeakMeter:
    """Peak rise of the process's resident memory during a step, sampled every ~0.2 ms by a thread reading
    /proc/self/statm (Linux). Run with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc returns freed tensors to the
    system and the rise is the step's own peak, transient tensors included (the saved-activation count misses
    them). Without that variable (or off Linux) it is not measured. The variable slows every step down (each large
    tensor is its own mmap), so take the times from a run without it."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        # Without the variable glibc keeps freed blocks in its heap: the rise would miss every reused block.
        self.available = os.path.exists("/proc/self/statm") and "MALLOC_MMAP_THRESHOLD_" in os.environ
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * self.page

    @contextlib.contextmanager
    def measure(self):
        if not self.available:
            self.peak = 0
            yield
            return
        base = self._rss()
        highest = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                highest[0] = max(highest[0], self._rss())
                time.sleep(0.0002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.peak = max(highest[0], self._rss()) - base


class SavedTensorMeter:
    """Bytes of distinct storages saved for backward while active (CPU stand-in for peak memory)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.excluded: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def measure(self, model: torch.nn.Module):
        """Count activations only: the parameters (saved by every linear layer) are the same in all variants."""
        self.storages.clear()
        self.excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def median_with_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """The median of `values` and a distribution-free confidence interval for it: the order statistics
    `x_(k) <= median <= x_(n+1-k)` for the largest k with `P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2`. With
    fewer than 6 values no interval reaches 95%: (median, None, None)."""
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return statistics.median(ordered), None, None
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU's fused attention kernel (which it leaves out: every block of a
    ViT on SDPA would count zero attention FLOPs on CPU) with the formulas it uses for the CUDA kernels."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_attention_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def vit_config(name: str, image_size: int | None = None) -> ViTConfig:
    values = {"image_size": 224, "patch_size": 16, "num_labels": 1000, **CONFIGS[name]}
    if image_size is not None:
        values["image_size"] = image_size
    return ViTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **values)


def random_batch(config: ViTConfig, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    """The benchmark's batch, the same in every run: `pixel_values` `(B, 3, H, W)` and `labels` `(B,)`."""
    generator = torch.Generator().manual_seed(0)
    size = config.image_size
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device),
        "labels": torch.randint(0, config.num_labels, (batch_size,), generator=generator).to(device),
    }


def plain_timm_vit(config: ViTConfig) -> torch.nn.Module:
    """timm's own `VisionTransformer` with the sizes of `config` (what `timm.create_model("deit_tiny_patch16_224")`
    builds for DeiT-Tiny), no dropout: the reference implementation the HF step is compared with."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        num_classes=config.num_labels,
    )


def make_trainer(model, device: str, **overrides) -> DiverseTrainer:
    args = DiverseTrainingArguments(
        output_dir="/tmp/diverse_vit_benchmark",
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        **overrides,
    )
    return DiverseTrainer(model=model, args=args)


def build_variants(
    config: ViTConfig, device: str, batch: dict[str, torch.Tensor], mixer: PatchMixupCutmix, only: set[str] | None
) -> dict[str, tuple[Result, Callable[[], torch.Tensor], torch.nn.Module]]:
    torch.manual_seed(0)
    reference = DiverseViTForImageClassification(config)
    state = reference.state_dict()

    # Each model gets its own config: set_attn_implementation changes the config object it is given.
    def stock(attn: str) -> ViTForImageClassification:
        model = ViTForImageClassification(copy.deepcopy(config))
        model.load_state_dict(state)
        model.set_attn_implementation(attn)
        return model.to(device).train()

    def ours() -> DiverseViTForImageClassification:
        model = DiverseViTForImageClassification(copy.deepcopy(config))
        model.load_state_dict(state)
        return model.to(device).train()

    variants = {}

    def add(key: str, description: str, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> None:
        if only is None or key in only:
            variants[key] = (Result(key, description), loss_fn, model)

    plain = stock("sdpa")

    def plain_loss() -> torch.Tensor:
        mixed = mixer(batch["pixel_values"], batch["labels"])
        return F.cross_entropy(plain(pixel_values=mixed.pixel_values).logits.float(), mixed.targets)

    add("a", "plain HF ViT (SDPA), Mixup/CutMix + CE", plain, plain_loss)

    if only is None or "t" in only:
        timm_model = plain_timm_vit(config).to(device).train()

        def timm_loss() -> torch.Tensor:
            mixed = mixer(batch["pixel_values"], batch["labels"])
            return F.cross_entropy(timm_model(mixed.pixel_values).float(), mixed.targets)

        add("t", "plain timm VisionTransformer (fused attention), Mixup/CutMix + CE", timm_model, timm_loss)

    diverse = ours()
    trainer = make_trainer(diverse, device, **ALL_TERMS)
    add("b", "ours: all regularizers + patch mixing", diverse, lambda: trainer.compute_loss(diverse, dict(batch)))

    naive = stock("eager")

    def naive_loss() -> torch.Tensor:
        mixed = mixer(batch["pixel_values"], batch["labels"])
        out = naive(pixel_values=mixed.pixel_values, output_attentions=True, output_hidden_states=True)
        token_logits = naive.classifier(naive.vit.layernorm(out.hidden_states[-1]))
        weights = torch.stack(
            [
                w
                for layer in naive.vit.layers
                for w in (layer.attention.q_proj.weight, layer.attention.k_proj.weight, layer.attention.v_proj.weight)
            ]
        )
        return (
            patch_mixing_loss(token_logits, mixed.targets, mixed.patch_targets)
            + 0.5 * patch_cosine_loss(out.hidden_states[-1])
            + 0.5 * patch_contrastive_loss(out.hidden_states[0], out.hidden_states[-1])
            + 1e-4 * attention_cosine_loss(out.attentions[0])
            + 5e-4 * weight_condition_loss(weights)
        )

    add("c", "naive HF: eager everywhere, all attentions + hidden states", naive, naive_loss)

    single = {
        "d_cosine": {"patch_cosine_coef": 0.5},
        "d_contrastive": {"patch_contrastive_coef": 0.5},
        "d_attention": {"attention_cosine_coef": 1e-4},
        "d_weight": {"weight_condition_coef": 5e-4},
    }
    for key, coefficients in single.items():
        model = ours()
        term_trainer = make_trainer(model, device, **{**NO_TERMS, **coefficients}, patch_mixing_loss=False)
        add(key, f"(a) + {key[2:]} term only", model, lambda m=model, t=term_trainer: t.compute_loss(m, dict(batch)))
    mixing_model = ours()
    mixing_trainer = make_trainer(mixing_model, device, **NO_TERMS, patch_mixing_loss=True)
    add(
        "d_patch_mixing",
        "(a) + patch mixing loss only",
        mixing_model,
        lambda: mixing_trainer.compute_loss(mixing_model, dict(batch)),
    )
    return variants


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads) if args.threads else None
    device = args.device
    config = vit_config(args.config, args.image_size)
    size = config.image_size
    batch = random_batch(config, args.batch_size, device)
    mixer = PatchMixupCutmix(config.num_labels, config.patch_size)
    only = set(args.only.split(",")) if args.only else None
    variants = build_variants(config, device, batch, mixer, only)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = (
        (lambda: torch.autocast(device_type=device.split(":")[0], dtype=dtype)) if dtype else contextlib.nullcontext
    )
    if args.compile:
        # Compile each model's forward in place (the loss code stays eager): torch.compile on the whole step.
        for _, _, model in variants.values():
            model.compile()
    optimizers = {key: torch.optim.AdamW(model.parameters(), lr=1e-4) for key, (_, _, model) in variants.items()}
    meter = SavedTensorMeter()
    cuda = device.startswith("cuda")
    rss = RssPeakMeter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(key: str, measure_memory: bool = False, measure_rss: bool = False, count_flops: bool = False) -> float:
        result, loss_fn, model = variants[key]
        optimizer = optimizers[key]
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        optimizer.zero_grad(set_to_none=True)
        counter = flop_counter() if count_flops else contextlib.nullcontext()
        with rss.measure() if measure_rss else contextlib.nullcontext(), counter:
            start = time.perf_counter()
            with autocast(), meter.measure(model) if measure_memory else contextlib.nullcontext():
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            sync()
            elapsed = time.perf_counter() - start
        if measure_memory:
            result.memory_bytes = torch.cuda.max_memory_allocated() - base if cuda else meter.total
        if count_flops:
            result.flops = counter.get_total_flops()
        if measure_rss:
            result.rss_peak_bytes.append(rss.peak)
        return elapsed

    for key in variants:
        for _ in range(args.warmup):
            step(key)
        step(key, measure_memory=True)
        step(key, count_flops=True)  # untimed: the counter intercepts every operator
    for _ in range(args.repeats):
        for key in variants:  # alternate so that machine noise hits every variant alike
            variants[key][0].seconds.append(step(key))
    # The RSS rise is the CPU's peak memory (on CUDA the allocator's peak is measured above). Its sampling thread
    # takes CPU time, so these steps are separate from the timed ones.
    if not cuda and rss.available:
        for _ in range(3):
            for key in variants:
                step(key, measure_rss=True)

    results = {key: variants[key][0] for key in variants}
    report = {
        "config": args.config,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": device,
        "image_size": size,
        "patch_size": config.patch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "compiled": args.compile,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "memory_kind": "peak allocated (CUDA)" if cuda else "saved-for-backward activations",
        "variants": {
            key: {
                "description": r.description,
                "median_s": r.median,
                "images_per_s": args.batch_size / r.median,
                "memory_mib": r.memory_bytes / 2**20,
                "rss_peak_mib": statistics.median(r.rss_peak_bytes) / 2**20 if r.rss_peak_bytes else None,
                "gflops": r.flops / 1e9,
                "seconds": r.seconds,
            }
            for key, r in results.items()
        },
    }

    def per_round(numerator: Result, denominator: Result) -> dict[str, Any]:
        ratios = [n / d for n, d in zip(numerator.seconds, denominator.seconds, strict=True)]
        median, low, high = median_with_ci(ratios)
        return {"median": median, "ci95": None if low is None else [low, high]}

    if "a" in results and "b" in results:
        report["ratio_b_over_a"] = {
            "time": results["b"].median / results["a"].median,
            "time_per_round": per_round(results["b"], results["a"]),
            "memory": results["b"].memory_bytes / max(results["a"].memory_bytes, 1),
            "flops": results["b"].flops / max(results["a"].flops, 1),
        }
        report["flops_over_a"] = {key: r.flops / max(results["a"].flops, 1) for key, r in results.items()}
        if results["a"].rss_peak_bytes and results["b"].rss_peak_bytes:
            report["ratio_b_over_a"]["rss_peak"] = statistics.median(results["b"].rss_peak_bytes) / max(
                statistics.median(results["a"].rss_peak_bytes), 1
            )
    if "a" in results and "t" in results:
        report["ratio_a_over_t"] = {
            "time": results["a"].median / results["t"].median,
            "time_per_round": per_round(results["a"], results["t"]),
            "flops": results["a"].flops / max(results["t"].flops, 1),
        }
        if results["a"].rss_peak_bytes and results["t"].rss_peak_bytes:
            report["ratio_a_over_t"]["rss_peak"] = statistics.median(results["a"].rss_peak_bytes) / max(
                statistics.median(results["t"].rss_peak_bytes), 1
            )
    if "b" in results and "c" in results:
        report["ratio_c_over_b"] = {
            "time": results["c"].median / results["b"].median,
            "memory": results["c"].memory_bytes / max(results["b"].memory_bytes, 1),
        }
    return report


def print_table(report: dict) -> None:
    print(
        f"# {report['config']} {report['image_size']}px patch {report['patch_size']}, batch {report['batch_size']}, "
        f"{report['dtype']} on {report['device']} ({report['machine']}, {report['threads']} threads"
        f"{', torch.compile' if report['compiled'] else ''}), "
        f"torch {report['torch']}, transformers {report['transformers']}; median of {report['repeats']} "
        f"alternating steps; memory = {report['memory_kind']}"
    )
    print(f"{'variant':<16} {'step ms':>9} {'img/s':>8} {'mem MiB':>9} {'RSS MiB':>9} {'GFLOP':>9}  description")
    for key, row in report["variants"].items():
        peak = f"{row['rss_peak_mib']:>9.1f}" if row.get("rss_peak_mib") is not None else f"{'-':>9}"
        print(
            f"{key:<16} {row['median_s'] * 1e3:>9.1f} {row['images_per_s']:>8.1f} {row['memory_mib']:>9.1f} {peak} "
            f"{row['gflops']:>9.2f}  {row['description']}"
        )

    def per_round(r: dict) -> str:
        ci = r["time_per_round"]["ci95"]
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        return f"(per round {r['time_per_round']['median']:.3f}{interval})"

    if "ratio_a_over_t" in report:
        r = report["ratio_a_over_t"]
        extra = f"  peak RSS {r['rss_peak']:.3f}" if "rss_peak" in r else ""
        print(f"a/t: time {r['time']:.3f} {per_round(r)}  FLOPs {r['flops']:.3f}{extra}")
    if "ratio_b_over_a" in report:
        r = report["ratio_b_over_a"]
        extra = f"  peak RSS {r['rss_peak']:.3f}" if "rss_peak" in r else ""
        print(f"b/a: time {r['time']:.3f} {per_round(r)}  memory {r['memory']:.3f}{extra}  FLOPs {r['flops']:.3f}")
    if "ratio_c_over_b" in report:
        r = report["ratio_c_over_b"]
        print(f"c/b: time {r['time']:.3f}  memory {r['memory']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="deit-tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=None, help="override the config's image size (e.g. 384)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--only", default="", help="comma-separated variant keys, e.g. a,b,c")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every variant's model (nn.Module.compile)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch_size must be >= 2 (Mixup/CutMix mixes pairs of images)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA device is available")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
