"""Which distributed set-ups the weight-level regularizer (condition-number loss on Q, K, V) supports, and how it
reads the matrices under FSDP2.

`DiverseTrainer.compute_loss` reads `model.attention_projection_weights()` *after* the forward pass, outside any
FSDP/ZeRO-3 hook. What each set-up leaves there:

- **DDP, one device, DeepSpeed ZeRO-1/2**: every rank holds every full parameter (ZeRO-1/2 shard only the
  optimizer state and the gradients; DeepSpeed: "ZeRO Stage 3: the 16-bit model parameters are partitioned").
- **FSDP2** (`fully_shard`, `fsdp_version: 2`): `q_proj.weight` is a `DTensor` sharded on dim 0. `full_weight`
  all-gathers it with `full_tensor()`, which is differentiable: its backward hands each rank the rows of its own
  shard, with no further communication, and autograd adds them to the sharded `.grad` that FSDP2's own
  reduce-scatter also accumulates into. Every rank computes the same loss on the same full matrices, provided the
  power estimator starts from the same vectors: `broadcast_start_vectors` draws them on rank 0 (per-rank seeds
  differ). The persistent state then evolves identically on every rank. Cost: one all-gather per matrix per step,
  about 12% of FSDP2's own parameter gathers for DeiT-S and ViT-L (`benchmarks/fsdp2_weight_gather.py`).
  Tested with two gloo processes against one unsharded process (tests/trainer/test_distributed_sharding.py).
- **FSDP1** (`FullyShardedDataParallel`): each rank holds a slice of a flattened `FlatParameter` per unit; with
  `use_orig_params=True` `q_proj.weight` is a view of that slice (flattened, or empty on most ranks), otherwise it
  is not a registered parameter any more. No full copy exists to gather differentiably. (FSDP1 also refuses to
  start without an accelerator: "FSDP needs a non-CPU accelerator device".)
- **DeepSpeed ZeRO-3**: each rank holds an empty placeholder (`param.ds_tensor` holds its partition); gathering
  it (`deepspeed.zero.GatheredParameters`) is not differentiable.

`check_weight_regularizer_supported` refuses FSDP1 and ZeRO-3 before training starts, with a message saying what to
do, instead of training on wrong numbers. They remain usable with `--weight_condition_coef 0` (the other terms
only read activations, which are full tensors on every rank).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "end_process_group",
    "WeightRegularizerNotSupportedError",
    "broadcast_start_vectors",
    "check_weight_regularizer_supported",
    "full_weight",
    "has_dtensor_parameters",
    "sharded_parameter_reason",
]


class WeightRegularizerNotSupportedError(ValueError):
    """The weight-level regularizer was asked for under a set-up that shards the parameters (FSDP, ZeRO-3)."""


_OPTIONS = (
    "The weight-level regularizer (--weight_condition_coef > 0) reads the full Q, K and V matrices of every block "
    "outside the forward pass, where FSDP1 and ZeRO-3 leave each process only a flattened or empty shard, so the loss "
    "would be computed on the wrong matrices. Choose one of: (1) FSDP2 (`fsdp_version: 2`, "
    "examples/recipes/accelerate/fsdp_8gpu.yaml), where the term all-gathers the full matrices; (2) plain data "
    "parallelism: `accelerate launch --config_file examples/recipes/accelerate/ddp_8gpu.yaml` (or torchrun); (3) "
    "DeepSpeed ZeRO-1/2 (examples/recipes/accelerate/deepspeed_zero2_8gpu.yaml), which shards the optimizer state "
    "and the gradients but keeps full parameters on every GPU; (4) keep FSDP1 / ZeRO-3 and pass "
    "--weight_condition_coef 0 (the patch and attention terms still work). See diverse_vit_hf/distributed.py and "
    "examples/recipes/README.md."
)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The full matrix of a parameter: an FSDP2 `DTensor` shard is all-gathered differentiably (`full_tensor()`:
    its backward hands each rank the gradient rows of its own shard, with no further communication); any other
    tensor is returned as it is."""
    return weight.full_tensor() if _is_dtensor(weight) else weight


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether `model` holds FSDP2 (`fully_shard`) `DTensor` parameters."""
    return any(_is_dtensor(parameter) for parameter in model.parameters())


def broadcast_start_vectors(shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two `(M, D)` uniform random starting vectors for the power estimator, drawn on rank 0 (from its per-rank
    seeded RNG) and broadcast, so every rank of a sharded run estimates the same eigenvalues. Without an initialised
    process group they are simply drawn here."""
    vectors = torch.rand((2, *shape), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(vectors, src=0)
    return vectors[0], vectors[1]


def end_process_group(timeout: timedelta = timedelta(seconds=60)) -> None:
    """Tear down the default process group, if any, before the process exits, once every rank has come here (or
    `timeout` has passed, or the wait failed because a rank has already gone).

    A rank tearing gloo down while its peer still works has aborted the peer at exit ("terminate called without an
    active exception", exit code -6) after a training that succeeded, so the launcher reported a failure. The wait is
    bounded so that a rank whose peer failed and will never arrive still exits, with its own exit code."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    try:
        torch.distributed.barrier(async_op=True).wait(timeout)
    except RuntimeError as error:  # DistBackendError (a peer gone) and gloo's timeout are both RuntimeErrors
        logger.warning("Leaving the process group without the other ranks: %s", error)
    torch.distributed.destroy_process_group()


def _fsdp_module_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:
        pass
    return tuple(types)


def sharded_parameter_reason(model: nn.Module) -> str | None:
    """Why the parameters of `model` (possibly already wrapped) are sharded, or None when every rank holds them all.

    Detects FSDP1 wrappers (`FullyShardedDataParallel`) and `FlatParameter`s, FSDP2 (`fully_shard`: an `FSDPModule`
    or `DTensor` parameters) and DeepSpeed ZeRO-3 partitioned parameters (`ds_id` attribute).
    """
    fsdp_types = _fsdp_module_types()
    for name, module in model.named_modules():
        if fsdp_types and isinstance(module, fsdp_types):
            kind = "FSDP2 (fully_shard)" if type(module).__name__ != "FullyShardedDataParallel" else "FSDP1"
            return f"module {name or '<root>'!r} is wrapped by {kind}"
    for name, parameter in model.named_parameters():
        if _is_dtensor(parameter):
            return f"parameter {name!r} is a DTensor with placements {tuple(parameter.placements)}"
        if type(parameter).__name__ == "FlatParameter" or getattr(parameter, "_is_flat_param", False):
            return f"parameter {name!r} is an FSDP1 FlatParameter"
        if hasattr(parameter, "ds_id"):
            return f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3"
    return None


def _accelerator_reason(accelerator: Any) -> str | None:
    """Why the Accelerate set-up of `accelerator` (an `Accelerator`, or anything with its `state`) shards parameters."""
    state = getattr(accelerator, "state", None)
    if state is None:
        return None
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        version = getattr(fsdp_plugin, "fsdp_version", 1)
        return f"Accelerate is set up for FSDP (fsdp_version {version})"
    distributed_type = getattr(state, "distributed_type", None)
    if str(getattr(distributed_type, "value", distributed_type)) == "FSDP":
        return "Accelerate is set up for FSDP"
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        stage = getattr(deepspeed_plugin, "zero_stage", None)
        if stage is None:
            stage = (
                (getattr(deepspeed_plugin, "deepspeed_config", None) or {}).get("zero_optimization", {}).get("stage")
            )
        if stage == 3:
            return "Accelerate is set up for DeepSpeed ZeRO stage 3 (parameters partitioned)"
    return None


def _unsupported_reason(model: nn.Module, accelerator: Any | None) -> str | None:
    """`sharded_parameter_reason` / the Accelerate set-up, minus what the weight term now supports (FSDP2)."""
    if accelerator is not None:
        state = getattr(accelerator, "state", None)
        fsdp_plugin = getattr(state, "fsdp_plugin", None)
        if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) == 2:
            accelerator = None  # FSDP2 is coming: supported; the model itself is still checked below
    reason = _accelerator_reason(accelerator) if accelerator is not None else None
    if reason is not None:
        return reason
    fsdp_types = _fsdp_module_types()
    for name, module in model.named_modules():
        if fsdp_types and type(module).__name__ == "FullyShardedDataParallel" and isinstance(module, fsdp_types):
            return f"module {name or '<root>'!r} is wrapped by FSDP1"
    for name, parameter in model.named_parameters():
        if type(parameter).__name__ == "FlatParameter" or getattr(parameter, "_is_flat_param", False):
            return f"parameter {name!r} is an FSDP1 FlatParameter"
        if hasattr(parameter, "ds_id"):
            return f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3"
    return None


def check_weight_regularizer_supported(
    model: nn.Module, weight_condition_coef: float, accelerator: Any | None = None
) -> None:
    """Raise `WeightRegularizerNotSupportedError` (a `ValueError`) when `weight_condition_coef > 0` and the
    parameters are, or will be, sharded in a way the weight term cannot read (FSDP1, DeepSpeed ZeRO-3). FSDP2
    (`fully_shard`, `fsdp_version: 2`) is supported: `full_weight` all-gathers each Q/K/V shard differentiably and
    the power estimator starts from vectors broadcast from rank 0. Does nothing otherwise.

    Call it once before training with the (not yet wrapped) model and the Trainer's `accelerator`: the Trainer wraps
    the model only when training starts, so the Accelerate state is what tells that FSDP1/ZeRO-3 is coming. A model
    that was sharded by hand (`FullyShardedDataParallel`, ZeRO-3) is recognised from its modules/parameters.
    """
    if not weight_condition_coef > 0:
        return
    reason = _unsupported_reason(model, accelerator)
    if reason is not None:
        raise WeightRegularizerNotSupportedError(
            f"--weight_condition_coef {weight_condition_coef} cannot be used with sharded parameters: {reason}. "
            + _OPTIONS
        )
