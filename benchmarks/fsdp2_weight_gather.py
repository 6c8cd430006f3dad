#!/usr/bin/env python
"""Extra communication of the weight-level term under FSDP2: what `attention_projection_weights` all-gathers per
step, counted with DTensor's `CommDebugMode` on a real `fully_shard` model, against what FSDP2 itself gathers.

Run under torchrun (gloo on CPU is enough: the bytes do not depend on the backend):

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp2_weight_gather.py --config deit-small vit-large

For each configuration it prints the collectives and bytes the term's gather moves per step and per rank, and the
ratio to FSDP2's own parameter all-gathers of a step (forward + backward re-gather with `reshard_after_forward`,
2 x the parameter bytes x (N - 1) / N). Only the full (3 * L, D, D) fp32 stack is gathered; the backward of
`full_tensor()` takes each rank's rows locally, without communication.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from transformers import ViTConfig

from diverse_vit_hf import DiverseViTForImageClassification

CONFIGS = {  # hidden, blocks, heads, MLP (timm/DeiT and ViT-L/16), 224 px, patch 16
    "deit-tiny": (192, 12, 3, 768),
    "deit-small": (384, 12, 6, 1536),
    "deit-base": (768, 12, 12, 3072),
    "vit-large": (1024, 24, 16, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["deit-small", "vit-large"], choices=list(CONFIGS))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if rank == 0:
        print("| model | processes | collectives / step | term gather MiB / step / rank | FSDP2 param gathers MiB "
              "/ step / rank | ratio |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
    for name in args.config:
        hidden, blocks, heads, mlp = CONFIGS[name]
        config = ViTConfig(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                           intermediate_size=mlp, num_labels=1000)  # fmt: skip
        with torch.device("meta"):
            model = DiverseViTForImageClassification(config)
        for layer in model.backbone.layers:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        with CommDebugMode() as comm:
            weights = model.attention_projection_weights()
        term_bytes = weights.numel() * weights.element_size() * (world - 1) / world
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        fsdp_bytes = 2 * parameter_bytes * (world - 1) / world
        if rank == 0:
            print(f"| {name} | {world} | {comm.get_total_counts()} | {term_bytes / 2**20:.1f} | "
                  f"{fsdp_bytes / 2**20:.1f} | {term_bytes / fsdp_bytes:.3f} |")  # fmt: skip
        del model, weights
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
