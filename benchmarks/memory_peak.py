#!/usr/bin/env python
"""What is alive at a training step's memory peak, next to a plain step: the profile behind the peak ratios of
`benchmarks/overhead.py`.

One step of each variant (after warm-up) runs under the PyTorch profiler with `profile_memory=True`. Its allocation
and free events are replayed in time order; at the moment the step's live bytes are highest, the live allocations
are grouped by what made them: the operator, the autograd node that ran it (in the backward) and the nearest Python
frame of model or loss code (in the forward). Printed per variant: the peak rise (bytes allocated during the step and
alive at its peak, tensors alive before the step excluded), where it was reached, the largest groups, and then the
groups where ours holds more than plain HF: the extra cost at the peak, item by item.

    python benchmarks/memory_peak.py --config deit-small --batch_size 16
    python benchmarks/memory_peak.py --config deit-tiny --batch_size 16 --image_size 384 --top 25

The allocation events are read through `torch.profiler._memory_profiler.OpTree`, a private module of PyTorch (what
`profile.export_memory_timeline` uses); a PyTorch that moved it stops this script with a message, nothing else.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the variants and their steps, as overhead.py measures them

# Python frames that name the code responsible for an allocation (the rest is torch's and the profiler's plumbing).
CODE_FRAMES = ("diverse_vit_hf", "transformers", "timm", "overhead.py", "torch/nn/functional", "torch/optim")


def allocation_tree(prof: profile):
    """The profiler's events as a tree whose allocation events know their parents."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler._memory_profiler import OpTree
    except ImportError as error:  # pragma: no cover - depends on the installed PyTorch
        raise SystemExit(
            f"this PyTorch has no torch.profiler._memory_profiler.OpTree ({error}); see the docstring."
        ) from None
    return OpTree(prof.profiler.kineto_results), _EventType


def owner(event, event_type) -> str:
    """`operator < autograd node @ code frame` for the allocation `event`."""
    operators, frame = [], None
    parent = event.parent
    while parent is not None:
        if parent.typed[0] == event_type.TorchOp:
            name = parent.name.replace("autograd::engine::evaluate_function: ", "backward of ")
            in_backward = name.startswith("backward of ")
            if in_backward or not operators:  # the allocating operator, then the autograd node running it, if any
                operators.append(name)
            if in_backward:
                break
        elif parent.typed[0] == event_type.PyCall and frame is None and any(c in parent.name for c in CODE_FRAMES):
            frame = parent.name.rsplit("/", 1)[-1]
        parent = parent.parent
    return " < ".join(operators or ["?"]) + (f" @ {frame}" if frame else "")


def peak_groups(prof: profile) -> tuple[int, str, collections.Counter]:
    """`(peak rise in bytes, the allocation that reached it, {owner: bytes alive at the peak})`."""
    tree, event_type = allocation_tree(prof)
    events = sorted((e for e in tree.dfs() if e.typed[0] == event_type.Allocation), key=lambda e: e.start_time_ns)
    live: dict[int, tuple[int, object]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, object]] = {}
    reached = None
    for event in events:
        fields = event.typed[1]
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, event)
            total += fields.alloc_size
        elif fields.ptr in live:  # frees of blocks allocated before the step are not part of its rise
            total -= live.pop(fields.ptr)[0]
        if total > peak:
            peak, at_peak, reached = total, dict(live), event
    groups = collections.Counter()
    for size, event in at_peak.values():
        groups[owner(event, event_type)] += size
    return peak, owner(reached, event_type) if reached is not None else "-", groups


def main(argv: list[str] | None = None) -> dict[str, tuple[int, str, collections.Counter]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(overhead.CONFIGS), default="deit-small")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=None, help="override the config's image size (e.g. 384)")
    parser.add_argument("--only", default="a,b", help="comma-separated variant keys of overhead.py (default: a,b)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--top", type=int, default=15, help="groups printed per variant")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = overhead.vit_config(args.config, args.image_size)
    batch = overhead.random_batch(config, args.batch_size, "cpu")
    mixer = overhead.PatchMixupCutmix(config.num_labels, config.patch_size)
    keys = args.only.split(",")
    variants = overhead.build_variants(config, "cpu", batch, mixer, set(keys))
    results = {}
    for key in keys:
        result, loss_fn, model = variants[key]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):  # warm-up: the optimizer's state exists before the profiled step, as in training
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
            loss_fn().backward()
            optimizer.step()
        results[key] = peak_groups(prof)
        peak, reached, groups = results[key]
        print(f"\n({key}) {result.description}: peak rise {peak / 2**20:.1f} MiB, reached in {reached}")
        for name, size_bytes in groups.most_common(args.top):
            print(f"  {size_bytes / 2**20:9.2f} MiB  {name}")
    if "a" in results and "b" in results:
        (plain, _, plain_groups), (ours, _, our_groups) = results["a"], results["b"]
        difference = (ours - plain) / 2**20
        print(f"\nours / plain HF peak: {ours / plain:.3f} ({difference:+.1f} MiB); what ours holds more of:")
        extra = collections.Counter({name: our_groups[name] - plain_groups.get(name, 0) for name in our_groups})
        for name, size_bytes in extra.most_common(args.top):
            if size_bytes > 0:
                print(f"  {size_bytes / 2**20:+9.2f} MiB  {name}")
    return results


if __name__ == "__main__":
    main()
