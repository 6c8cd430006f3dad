"""`diverse_vit_hf.utils.distributed`: the refusal of the weight-level regularizer under parameter sharding (FSDP1,
ZeRO-3), the setups it supports (single process, DDP, ZeRO-1/2, FSDP2), and a real FSDP2 model whose sharded
projection weights the weight term reads back as the full matrices."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from fixtures.builders import tiny_config
from fixtures.scripts import REPO, SCRIPT_ENV, WORKERS

from diverse_vit_hf import DiverseViTForImageClassification
from diverse_vit_hf.utils.distributed import (
    WeightRegularizerNotSupportedError,
    check_weight_regularizer_supported,
    sharded_parameter_reason,
)


def _tiny_config():
    """A 2-block ViT 16 wide (2 heads) on 8x8 images in 4x4 patches, 2 labels."""
    return tiny_config(hidden_size=16, num_attention_heads=2, intermediate_size=32, image_size=8, num_labels=2)


def _state(**kwargs) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(**{"fsdp_plugin": None, "deepspeed_plugin": None, **kwargs}))


def test_plain_model_ddp_zero2_and_fsdp2_are_supported():
    model = DiverseViTForImageClassification(_tiny_config())
    assert sharded_parameter_reason(model) is None
    check_weight_regularizer_supported(model, 5e-4)
    check_weight_regularizer_supported(model, 5e-4, _state())  # single process / DDP
    check_weight_regularizer_supported(model, 5e-4, _state(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    check_weight_regularizer_supported(model, 5e-4, _state(fsdp_plugin=SimpleNamespace(fsdp_version=2)))


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ({"fsdp_plugin": SimpleNamespace(fsdp_version=1)}, "FSDP (fsdp_version 1)"),
        ({"distributed_type": DistributedType.FSDP}, "set up for FSDP"),
        ({"deepspeed_plugin": SimpleNamespace(zero_stage=3)}, "ZeRO stage 3"),
    ],
)
def test_sharding_accelerator_setups_are_refused_before_training(state, needle):
    # The Trainer wraps the model only when training starts: the Accelerate state is what announces FSDP/ZeRO-3.
    model = DiverseViTForImageClassification(_tiny_config())
    with pytest.raises(WeightRegularizerNotSupportedError) as error:
        check_weight_regularizer_supported(model, 5e-4, _state(**state))
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert needle in message and "--weight_condition_coef 0" in message and "ZeRO-1/2" in message
    check_weight_regularizer_supported(model, 0.0, _state(**state))  # the other terms are fine


def test_zero3_partitioned_parameter_is_detected():
    model = DiverseViTForImageClassification(_tiny_config())
    model.backbone.layers[0].attention.q_proj.weight.ds_id = 0  # what DeepSpeed ZeRO-3 attaches to its parameters
    assert "ZeRO-3" in sharded_parameter_reason(model)
    with pytest.raises(WeightRegularizerNotSupportedError):
        check_weight_regularizer_supported(model, 5e-4)


def test_real_fsdp2_sharded_model_gives_the_weight_term_full_matrices(tmp_path):
    """Real FSDP2 (`fully_shard`) on CPU with a 1-process gloo group: the projection weights become DTensors, and
    `attention_projection_weights` gathers them into the full (plain tensor) matrices the unsharded model has."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DiverseViTForImageClassification(_tiny_config())
        expected = model.attention_projection_weights().detach().clone()
        for layer in model.backbone.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(model.backbone.layers[0].attention.q_proj.weight, DTensor)
        assert "FSDP2" in sharded_parameter_reason(model)
        weights = model.attention_projection_weights()  # what the weight term reads, outside the forward
        assert not isinstance(weights, DTensor) and weights.requires_grad
        torch.testing.assert_close(weights.detach(), expected)
        check_weight_regularizer_supported(model, 5e-4)
    finally:
        dist.destroy_process_group()


TEARDOWN = WORKERS / "process_group_teardown.py"
LATE = 2.0  # seconds rank 1 arrives after rank 0 in `late_peer`
TIMEOUT = 5.0


@pytest.mark.parametrize("mode", ["late_peer", "gone_peer"])
def test_end_process_group_waits_for_the_other_rank_but_not_for_ever(mode, tmp_path):
    """Two real gloo processes. Leaving while the peer still works has aborted the peer at exit (exit -6 after a
    successful run), so a rank waits for its peer; a peer that is gone (crashed) must not keep it past the timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(TEARDOWN), mode, str(LATE), str(TIMEOUT), str(tmp_path)]  # fmt: skip
    env = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    first = json.loads((tmp_path / "rank-0.json").read_text())
    assert not first["initialized"]
    if mode == "late_peer":
        second = json.loads((tmp_path / "rank-1.json").read_text())
        assert first["waited"] >= 0.9 * LATE > second["waited"], (first, second)
    else:
        assert not (tmp_path / "rank-1.json").exists()
        assert first["waited"] < TIMEOUT + 10, first
