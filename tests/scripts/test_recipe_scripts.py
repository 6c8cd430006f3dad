"""The recipes in examples/recipes/: scripts, their run_diverse.py flags and the accelerate configs (the refusal of
the weight-level regularizer under parameter sharding is tested in tests/utils/test_distributed.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from fixtures.builders import tiny_config
from fixtures.scripts import REPO, load_script
from transformers import HfArgumentParser

from diverse_vit_hf import DiverseViTForImageClassification
from diverse_vit_hf.scripts import train

RECIPES = REPO / "examples" / "recipes"
CONFIGS = RECIPES / "accelerate"
SCRIPT = REPO / "examples" / "run_diverse.py"
SCRIPTS = sorted(RECIPES.glob("*.sh"))
YAMLS = sorted(CONFIGS.glob("*.yaml"))
BASH = shutil.which("bash")

# What each recipe must contain (the paper's recipe: DeiT's main.py defaults, flag by flag in docs/recipe.md and
# tests/scripts/test_recipe_parity.py).
PAPER_RUN = {
    "learning_rate": 5e-4,
    "scale_lr": True,
    "per_device_train_batch_size": 128,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine_warmup_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr": 1e-5, "warmup_lr_rate": 1e-3},
    "warmup_epochs": 5.0,
    "max_grad_norm": 0.0,
    "num_train_epochs": 300.0,
    "label_smoothing_factor": 0.1,
    "mixing": True,
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "mix_switch_prob": 0.5,
    "patch_mixing_loss": True,
    "augmentation": "deit",
    "drop_path_rate": 0.1,
    "repeated_augmentations": 3,
    "model_ema": True,
    "model_ema_decay": 0.99996,
    "model_ema_eval": False,
    "fp16": True,
    "bf16": False,
    "patch_cosine_coef": 0.5,
    "patch_contrastive_coef": 0.5,
    "attention_cosine_coef": 1e-4,
    "weight_condition_coef": 5e-4,
    "dataset_name": "ILSVRC/imagenet-1k",
    "dataloader_num_workers": 8,
    "report_to": ["tensorboard"],
}
EXPECTED = {
    "deit_small_12_diverse_8gpu.sh": {**PAPER_RUN, "config_name": "deit-small", "num_processes": 8},
    "deit_small_24_diverse_8gpu.sh": {**PAPER_RUN, "config_name": "deit-small-24", "num_processes": 8},
    "finetune_single_gpu.sh": {
        "model_name_or_path": "facebook/deit-small-patch16-224",
        "dataset_name": "beans",
        "fp16": True,
        "max_grad_norm": 0.0,
        "num_processes": 1,
        "weight_condition_coef": 5e-4,
    },
}
EXPECTED_CONFIGS = {
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8),
    "deepspeed_zero2_8gpu.yaml": (DistributedType.DEEPSPEED, 8),
    "single_gpu.yaml": (DistributedType.NO, 1),
}


def test_every_recipe_and_config_is_known():
    assert sorted(p.name for p in SCRIPTS) == sorted(EXPECTED)
    assert sorted(p.name for p in YAMLS) == sorted(EXPECTED_CONFIGS)
    assert (RECIPES / "README.md").is_file()


# ---- Scripts ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_bash_clean_and_documented(script):
    check = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    header = text.split("set -euo pipefail")[0]
    for topic in ("Reproduces:", "Hardware:", "Time:"):
        assert topic in header, f"{script.name}: header comment lacks {topic!r}"
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def _launch_arguments(script: Path, tmp_path: Path) -> list[str]:
    """Run the recipe with a stub `accelerate` first on PATH (bash does every expansion, env defaults included) and
    return the stub's arguments: `launch --config_file ... examples/run_diverse.py <flags>`."""
    stub_dir, record = tmp_path / "bin", tmp_path / f"{script.stem}.args"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "accelerate"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$RECIPE_ARGS_RECORD"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "PER_DEVICE_BATCH", "GRAD_ACCUM")}
    env.update(PATH=f"{stub_dir}{os.pathsep}{env.get('PATH', '')}", RECIPE_ARGS_RECORD=str(record))
    env.pop("ACCELERATE_CONFIG", None)
    env.pop("OUTPUT_DIR", None)
    run = subprocess.run([BASH, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return record.read_text().split("\0")[:-1]


class _Parsed(Exception):
    def __init__(self, parser: HfArgumentParser, result: tuple):
        super().__init__("parsed")
        self.parser, self.result = parser, result


def _parse_like_main(module, argv: list[str]) -> tuple[HfArgumentParser, list, list[str]]:
    """Parse `argv` with exactly the parser `run_diverse.main` builds (its dataclasses and defaults): main (in
    `diverse_vit_hf.scripts.train`) is run with `HfArgumentParser` swapped for a subclass that stops right after
    `parse_args_into_dataclasses`."""

    class RecordingParser(HfArgumentParser):
        def parse_args_into_dataclasses(self, *args, **kwargs):
            raise _Parsed(self, super().parse_args_into_dataclasses(*args, **kwargs))

    original = train.HfArgumentParser
    train.HfArgumentParser = RecordingParser
    try:
        with pytest.raises(_Parsed) as parsed:
            module.main(argv)
    finally:
        train.HfArgumentParser = original
    *dataclasses, unknown = parsed.value.result
    return parsed.value.parser, dataclasses, unknown


@pytest.fixture(scope="module")
def run_diverse():
    module = load_script(SCRIPT, "recipes_run_diverse")
    yield module
    sys.modules.pop("recipes_run_diverse", None)


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_line_parses_with_run_diverse(script, tmp_path, run_diverse):
    arguments = _launch_arguments(script, tmp_path)
    assert arguments[0] == "launch", arguments[:3]
    target = "examples/run_diverse.py"
    assert target in arguments, f"{script.name} does not launch {target}: {arguments}"
    launch_part, flags = arguments[1 : arguments.index(target)], arguments[arguments.index(target) + 1 :]

    # The accelerate part: a config file that exists and loads, and the process count.
    launch = launch_command_parser().parse_args([*launch_part, target])
    config_file = REPO / launch.config_file
    assert config_file.is_file(), f"{script.name}: --config_file {launch.config_file} does not exist"
    config = load_config_from_file(str(config_file))
    num_processes = launch.num_processes if launch.num_processes is not None else config.num_processes

    # The run_diverse.py part, parsed as main() parses it, with the flags of the commented-out optional lines
    # (`# EXTRA_ARGS+=(...)`, e.g. the EMA) added. bf16 needs --use_cpu on a machine without a GPU.
    optional = [
        shlex.split(line.split("(", 1)[1].rsplit(")", 1)[0])
        for line in script.read_text().splitlines()
        if line.startswith("# EXTRA_ARGS+=(")
    ]
    argv = [*flags, *(flag for line in optional for flag in line)]
    if not torch.cuda.is_available() and "--bf16" in argv:
        argv.append("--use_cpu")
    parser, parsed, unknown = _parse_like_main(run_diverse, argv)
    assert not unknown, (
        f"{script.name}: run_diverse.py does not know these flags (not added yet, or misspelt): "
        + run_diverse.unknown_options_message(parser, unknown)
    )
    values = {"num_processes": num_processes}
    for instance in parsed:
        assert is_dataclass(instance)
        values.update({f.name: getattr(instance, f.name) for f in fields(instance)})
    for name, expected in EXPECTED[script.name].items():
        assert name in values, f"{script.name}: run_diverse.py has no argument {name!r}"
        assert values[name] == (pytest.approx(expected) if isinstance(expected, float) else expected), name
    if script.name != "finetune_single_gpu.sh":
        global_batch = num_processes * values["per_device_train_batch_size"] * values["gradient_accumulation_steps"]
        assert global_batch == 1024, f"{script.name}: global batch {global_batch}, the paper's is 1024"
        assert values["eval_strategy"] == "epoch" and values["save_total_limit"] is not None
        assert values["model_ema"] is True, "DeiT keeps an EMA of the weights by default"


# ---- Accelerate configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_file", YAMLS, ids=lambda p: p.name)
def test_accelerate_config_is_valid(config_file):
    config = load_config_from_file(str(config_file))  # rejects unknown top-level keys
    assert isinstance(config, ClusterConfig)
    distributed_type, num_processes = EXPECTED_CONFIGS[config_file.name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == "fp16"  # DeiT's precision, as the scripts' --fp16
    assert not config.use_cpu
    # accelerate copies fsdp_config / deepspeed_config entries onto its launch arguments without checking them:
    # every entry must name a real `accelerate launch` option.
    options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(config_file.read_text())
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in raw.get(section) or {}:
            name = key if key.startswith(prefix) else prefix + key
            assert name in options, f"{config_file.name}: {section}.{key} is not an accelerate option"


def test_fsdp_config_shards_fully_and_wraps_vit_blocks():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp_8gpu.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FSDP2 FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    from transformers.models.vit import modeling_vit

    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "ViTLayer" and hasattr(modeling_vit, "ViTLayer")
    model = DiverseViTForImageClassification(tiny_config())
    assert any(type(m).__name__ == "ViTLayer" for m in model.modules()), "the wrap class must occur in the model"


def test_deepspeed_config_is_zero2_without_param_partitioning():
    deepspeed = load_config_from_file(str(CONFIGS / "deepspeed_zero2_8gpu.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 2
    assert deepspeed["offload_param_device"] == "none"
    # Left to the Trainer ("auto"), so they always match --gradient_accumulation_steps / --max_grad_norm.
    assert "gradient_accumulation_steps" not in deepspeed and "gradient_clipping" not in deepspeed
