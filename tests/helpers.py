"""Builders shared by the test files: a tiny ViT, training arguments, random image batches, script loading, and the
environment and fast flags of the example scripts run as subprocesses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from datasets import Dataset
from transformers import AutoConfig, PretrainedConfig, ViTConfig

from diverse_vit_hf import DiverseTrainer, DiverseTrainingArguments, DiverseViTForImageClassification
from diverse_vit_hf.data.image_datasets import collate_image_batch

REPO = Path(__file__).resolve().parents[1]
RUN_DIVERSE = REPO / "examples" / "run_diverse.py"
NUM_LABELS = 4
# The environment of an example script run as a subprocess: offline, unbuffered output.
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def fast_flags(max_train_samples: int = 64, max_eval_samples: int = 32, batch_size: int | None = 16) -> list[str]:
    """`run_diverse.py` flags for a one-epoch run of a 2-block, 32-wide ViT on a few embedded digits, on the CPU."""
    flags = ["--max_train_samples", str(max_train_samples), "--max_eval_samples", str(max_eval_samples),
             "--num_train_epochs", "1", "--hidden_size", "32", "--num_hidden_layers", "2", "--logging_steps", "2",
             "--disable_tqdm", "true", "--use_cpu"]  # fmt: skip
    return flags + (["--per_device_train_batch_size", str(batch_size)] if batch_size is not None else [])


def run_checked(command: list[str], env: dict[str, str] | None = None, timeout: int = 900) -> str:
    """Run a command from the repository root; fail with the end of its output unless it exits 0. Returns stdout."""
    run = subprocess.run(command, cwd=REPO, env=env or SCRIPT_ENV, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def tiny_config(**overrides) -> ViTConfig:
    """A 2-block ViT (hidden 32, 4 heads) on 16x16 images with 4x4 patches (P = 16), no dropout."""
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return ViTConfig(**values)


# Per-family settings on top of tiny_config's sizes: the features that make each family different are switched on
# (layer scale, registers, relative position bias, mean pooling), so the tests exercise them.
FAMILY_OVERRIDES: dict[str, dict] = {
    "vit": {},
    "deit": {},
    "vit_msn": {},
    "dinov2": {"mlp_ratio": 2, "layerscale_value": 0.5},
    "dinov2_with_registers": {"mlp_ratio": 2, "layerscale_value": 0.5, "num_register_tokens": 2},
    "beit": {"use_relative_position_bias": True, "use_mean_pooling": True, "layer_scale_init_value": 0.1},
    "ijepa": {},
}


def tiny_family_config(model_type: str, **overrides) -> PretrainedConfig:
    """tiny_config's sizes for any supported `model_type`, with the family's distinguishing features on."""
    values = tiny_config().to_dict()
    values = {k: values[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                     "image_size", "patch_size", "hidden_dropout_prob",
                                     "attention_probs_dropout_prob")}  # fmt: skip
    values |= {"num_labels": NUM_LABELS} | FAMILY_OVERRIDES[model_type] | overrides
    return AutoConfig.for_model(model_type, **values)


def make_args(output_dir: str | Path, **overrides) -> DiverseTrainingArguments:
    """CPU, no reporting, no saving, no workers, seed 0; `overrides` win."""
    values = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return DiverseTrainingArguments(**values)


def make_batch(batch_size: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """`pixel_values` (B, 3, 16, 16) ~ N(0, 1) and `labels` (B,) in [0, NUM_LABELS), from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch_size, 3, 16, 16, generator=generator),
        "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=generator),
    }


def make_dataset(size: int = 16, seed: int = 0) -> Dataset:
    """`make_batch(size, seed)` as a torch-formatted `datasets.Dataset`."""
    batch = make_batch(size, seed)
    dataset = Dataset.from_dict({"pixel_values": batch["pixel_values"].numpy(), "labels": batch["labels"].tolist()})
    return dataset.with_format("torch")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def load_script(path: Path = RUN_DIVERSE, name: str = "run_diverse") -> ModuleType:
    """Import a script as a module (registered in sys.modules: dataclasses resolve string annotations there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)  # no half-imported module for the next test
        raise
    return module


def build_trainer(
    args: DiverseTrainingArguments,
    model_seed: int = 0,
    dataset_size: int = 32,
    collator=None,
    eval_dataset: Dataset | None = None,
) -> DiverseTrainer:
    """A `DiverseTrainer` on a freshly seeded `tiny_config()` model and `make_dataset(dataset_size)`."""
    torch.manual_seed(model_seed)
    return DiverseTrainer(
        model=DiverseViTForImageClassification(tiny_config()),
        args=args,
        train_dataset=make_dataset(dataset_size),
        eval_dataset=eval_dataset,
        data_collator=collator or collate_image_batch,
    )
