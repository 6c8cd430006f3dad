"""A few training steps with every Diverse-ViT term, unsharded in one process or under FSDP2 (`fully_shard`) with
`torchrun --nproc_per_node N` over gloo, for tests/trainer/test_distributed_sharding.py.

Each rank trains on its 1/N of one fixed batch, with the same initialisation and the same seed (the reference draws
its power-iteration start vectors from that seed; under FSDP2 rank 0 draws them and broadcasts). Writes JSON to
argv[1]: per step the rank-mean of every loss term, the full parameters after the last step, and the bytes the
weight term all-gathered per step (counted with DTensor's CommDebugMode).

    python tests/workers/fsdp2_weight_term.py out.json [persistent]
    torchrun --nproc_per_node 2 tests/workers/fsdp2_weight_term.py out.json [persistent]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fixtures package
from fixtures.builders import tiny_config

from diverse_vit_hf import DiverseViTForImageClassification, DiversityConfig, DiversityObjective
from diverse_vit_hf.trainer.optim import adamw_parameter_groups
from diverse_vit_hf.utils.distributed import check_weight_regularizer_supported, end_process_group

STEPS, BATCH = 3, 8


def main() -> None:
    out, persistent = Path(sys.argv[1]), "persistent" in sys.argv[2:]
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(tiny_config(num_hidden_layers=2))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.backbone.layers:
            fully_shard(layer)
        fully_shard(model)
    config = DiversityConfig(mixing=False, patch_mixing_loss=False, weight_condition_coef=1e-3,
                             power_persistent=persistent)  # fmt: skip
    check_weight_regularizer_supported(model, config.weight_condition_coef)  # FSDP2 is supported now
    objective = DiversityObjective(config, num_labels=model.config.num_labels, patch_size=4)
    optimizer = torch.optim.AdamW(adamw_parameter_groups(model, 0.05), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    labels = torch.randint(0, model.config.num_labels, (BATCH,), generator=generator)
    share = BATCH // world
    batch = {
        "pixel_values": images[rank * share : (rank + 1) * share],
        "labels": labels[rank * share : (rank + 1) * share],
    }
    torch.manual_seed(7 + rank)  # per-rank seeds, as in training (DeiT: seed + rank); rank 0 is the reference
    steps, gathered = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        if sharded:
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as comm:  # what the weight term's gather costs, counted apart from the step
                weights = model.attention_projection_weights()
            received = weights.numel() * weights.element_size() * (world - 1) // world  # per rank
            gathered.append({"collectives": comm.get_total_counts(), "bytes_received_per_rank": received})
        result = objective(model, batch)
        result.loss.backward()
        optimizer.step()
        terms = {name: value.detach().clone() for name, value in result.terms.items()} | {"loss": result.loss.detach()}
        if sharded:
            for value in terms.values():
                dist.all_reduce(value)
                value /= world
        steps.append({name: value.item() for name, value in terms.items()})
    parameters = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        parameters[name] = full.detach().flatten().tolist()
    if rank == 0:
        out.write_text(json.dumps({"world": world, "steps": steps, "parameters": parameters, "gathered": gathered}))
    end_process_group()
    if sharded:
        # Everything is written and both ranks have left the group. gloo's teardown at interpreter exit still aborts
        # now and then ("terminate called without an active exception", exit -6; about 1 run in 12 without the
        # barrier of end_process_group, rarer with it), which is torch's, not this run's: skip it.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
