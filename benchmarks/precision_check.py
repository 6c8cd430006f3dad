#!/usr/bin/env python
"""Mixed-precision and host-sync checks of one diversified training step (`DiverseTrainer.compute_loss`).

For each autocast dtype (bf16, fp16) on the chosen device, with every regularizer and the patch mixing loss at
the released coefficients, on one CutMix-mixed batch:

  float32    every regularizer, evaluated under autocast on that forward's (low-precision) outputs as
             compute_loss evaluates it, is a finite float32 scalar equal (rtol 1e-5) to the same function run
             outside autocast on float32 copies of the same inputs: its math ran in float32 (`docs/method.md`:
             the regularizers compute in float32 whatever the forward's precision);
  agreement  each logged term matches the same step in full float32 within the dtype's tolerance, and the
             gradient of the total points the same way (cosine with the float32 gradient);
  weight     with Q/K/V grown to a spectral norm of 12 the weight term (about 2e4 per matrix) is far above fp16's
             largest finite value (65504): under autocast it must be finite and equal its float32 value;
  no sync    compute_loss + backward, the trainer mixing the batch itself, under
             `torch.cuda.set_sync_debug_mode("error")` on CUDA (any device-to-host synchronisation raises); off CUDA
             on the meta device, where any read of a value raises.

Without `--json` the last line printed is `precision: N of M checks passed`; the exit code is 1 when any check failed.

    python benchmarks/precision_check.py --config deit-small --batch_size 32 --device cuda
    python benchmarks/precision_check.py --config tiny --device cpu --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import ALL_TERMS, CONFIGS, make_trainer, random_batch, vit_config

from diverse_vit_hf import DiverseViTForImageClassification
from diverse_vit_hf.losses.mixing import PatchMixupCutmix
from diverse_vit_hf.losses.regularizers import (
    attention_cosine_loss,
    patch_contrastive_loss,
    patch_cosine_loss,
    patch_mixing_loss,
    weight_condition_loss,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Relative tolerance of a term against float32, and the least cosine between the autocast and float32 gradients.
TOLERANCE = {"bf16": (5e-2, 0.98), "fp16": (1e-2, 0.995)}
SPECTRAL_NORM = 12.0
FP16_MAX = torch.finfo(torch.float16).max


def sync_site(error: BaseException) -> str:
    """Where a synchronising call was made: the innermost frames of the traceback in this project's code (the
    package or the benchmark), as `file:line (function)`, so a failed check names the line to change."""
    frames = [
        f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
        for frame in traceback.extract_tb(error.__traceback__)
        if "diverse_vit_hf" in frame.filename or "benchmarks" in frame.filename
    ]
    return " < ".join(reversed(frames[-3:])) or "outside this project's code"


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def diversified_step(
    trainer, model, batch: dict[str, torch.Tensor], dtype: torch.dtype | None, seed: int = 0, evaluate_raw: bool = True
):
    """`compute_loss` + backward under autocast.

    Returns the total, the terms compute_loss logged, the flat float32 gradient, and the raw value of every
    regularizer evaluated (under the same autocast) on the diversity outputs of that forward, as compute_loss
    evaluates them, each paired with the same function run outside autocast on float32 copies of those outputs
    (only with `evaluate_raw` and a premixed batch). The logged copies are cast to float32 for logging, so their
    dtype proves nothing.
    """
    # The terms compute_loss accumulates for logging (read here directly, one step at a time).
    trainer.term_log.sums, trainer.term_log.count = {}, 0
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same fresh power-iteration vectors in every run
    with autocast(batch["pixel_values"].device.type, dtype):
        total, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        raw = {}
        if evaluate_raw:
            with torch.no_grad():  # the values only; the step's graph is compute_loss's
                raw = {name: term() for name, term in regularizer_terms(model, outputs, batch).items()}
    if evaluate_raw:
        with torch.no_grad():
            names = ("first_hidden_state", "last_block_hidden_state", "first_block_attention_probs", "token_logits")
            float_outputs = SimpleNamespace(**{name: getattr(outputs, name).float() for name in names})
            terms = regularizer_terms(model, float_outputs, batch)
            raw = {name: (raw[name], terms[name]()) for name in raw}
    total.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).float()
    return total.detach(), dict(trainer.term_log.sums), gradient, raw


def regularizer_terms(model, outputs, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """Each loss term as compute_loss evaluates it, as a thunk (the weight term re-seeded: same random vectors)."""
    prefix = model.num_prefix_tokens

    def weight_term() -> torch.Tensor:
        torch.manual_seed(1)
        return weight_condition_loss(model.attention_projection_weights())

    return {
        "loss_cls": lambda: patch_mixing_loss(outputs.token_logits, batch["labels"], batch["patch_labels"], prefix),
        "loss_patch_cosine": lambda: patch_cosine_loss(outputs.last_block_hidden_state, prefix),
        "loss_patch_contrastive": lambda: patch_contrastive_loss(
            outputs.first_hidden_state, outputs.last_block_hidden_state, prefix
        ),
        "loss_attention_cosine": lambda: attention_cosine_loss(outputs.first_block_attention_probs),
        "loss_weight_condition": weight_term,
    }


def grow_attention_weights(model: DiverseViTForImageClassification, spectral_norm: float) -> None:
    """Rescale every Q/K/V matrix to the given largest singular value (the conditioning the loss sees is kept)."""
    with torch.no_grad():
        for layer in model.vit.layers:
            for projection in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
                weight = projection.weight
                weight.mul_(spectral_norm / torch.linalg.matrix_norm(weight.float(), ord=2))


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, dtype: str, name: str, ok: bool, detail: str) -> None:
        self.rows.append({"dtype": dtype, "check": name, "ok": bool(ok), "detail": detail})

    @property
    def failed(self) -> int:
        return sum(not row["ok"] for row in self.rows)


def run(args: argparse.Namespace) -> dict:
    device = args.device
    config = vit_config(args.config)
    plain = random_batch(config, args.batch_size, "cpu")
    # One CutMix batch given to every run (compute_loss uses premixed `patch_labels` as they are).
    torch.manual_seed(0)
    mixer = PatchMixupCutmix(config.num_labels, config.patch_size, switch_prob=1.0)
    mixed = mixer(plain["pixel_values"], plain["labels"])
    batch = {
        "pixel_values": mixed.pixel_values.to(device),
        "labels": mixed.targets.to(device),
        "patch_labels": mixed.patch_targets.to(device),
    }
    torch.manual_seed(0)
    model = DiverseViTForImageClassification(config).to(device).train()
    trainer = make_trainer(model, device, **ALL_TERMS)
    model = trainer.model
    checks = Checks()

    ref_total, ref_terms, ref_grad, _ = diversified_step(trainer, model, batch, None)
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        rtol, min_cosine = TOLERANCE[name]
        total, terms, grad, raw = diversified_step(trainer, model, batch, dtype)
        bad = [
            k
            for k, (v, f32) in raw.items()
            if v.dtype != torch.float32
            or v.shape != ()
            or not torch.isfinite(v)
            or not torch.allclose(v, f32, rtol=1e-5)
        ]
        detail = f"{len(raw)} terms" + (f"; not float32 math: {bad}" if bad else "")
        detail += "; total " + ("float32" if total.dtype == torch.float32 else f"{total.dtype} (should be float32)")
        checks.add(name, "float32", not bad and total.dtype == torch.float32, detail)
        values = {"loss": total, **terms}
        references = {"loss": ref_total, **ref_terms}
        errors = {
            k: (abs(v.double() - references[k].double()) / references[k].double().abs().clamp_min(1e-6)).item()
            for k, v in values.items()
        }
        worst = max(errors, key=errors.get)
        checks.add(
            name,
            "agreement",
            errors[worst] <= rtol,
            f"largest relative difference from float32: {worst} {errors[worst]:.2e} (tolerance {rtol:g})",
        )
        cosine = F.cosine_similarity(grad.double(), ref_grad.double(), dim=0).item()
        checks.add(name, "gradient", cosine >= min_cosine, f"cosine with the float32 gradient {cosine:.5f}")

    grown = DiverseViTForImageClassification(config).to(device).train()
    grown.load_state_dict(model.state_dict())
    grow_attention_weights(grown, SPECTRAL_NORM)
    grown_trainer = make_trainer(grown, device, **ALL_TERMS)
    grown = grown_trainer.model
    _, grown_ref, _, _ = diversified_step(grown_trainer, grown, batch, None)
    for name in args.dtypes.split(","):
        _, terms, _, _ = diversified_step(grown_trainer, grown, batch, DTYPES[name])
        value, reference = terms["loss_weight_condition"], grown_ref["loss_weight_condition"]
        same = bool(torch.isfinite(value)) and torch.allclose(value, reference, rtol=1e-5)
        above = "above" if reference.item() > FP16_MAX else "NOT above (the check proves little)"
        checks.add(
            name,
            "weight",
            same and reference.item() > FP16_MAX,
            f"weight term {value.item():.6g} vs float32 {reference.item():.6g}, {above} fp16's {FP16_MAX:g}",
        )

    # Class-index labels: the trainer draws and applies Mixup/CutMix on the device itself, as in training.
    unmixed = dict(plain)
    if torch.device(device).type == "cuda":
        unmixed = {key: value.to(device) for key, value in unmixed.items()}
        for name in ["fp32", *args.dtypes.split(",")]:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                diversified_step(trainer, model, unmixed, DTYPES.get(name), evaluate_raw=False)
                ok, detail = True, "compute_loss + backward ran under set_sync_debug_mode('error')"
            except RuntimeError as error:
                ok, detail = False, f"synchronising call: {str(error).splitlines()[0]} at {sync_site(error)}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            checks.add(name, "no sync", ok, detail)
    else:
        # No sync debug mode off CUDA: run the step on the meta device instead, where any host read raises.
        meta_model = DiverseViTForImageClassification(config)
        meta_trainer = make_trainer(meta_model, "cpu", **ALL_TERMS)
        meta_model = meta_trainer.model.to("meta").train()
        try:
            diversified_step(
                meta_trainer, meta_model, {k: v.to("meta") for k, v in unmixed.items()}, None, evaluate_raw=False
            )
            ok, detail = True, "compute_loss + backward ran on the meta device (no value can be read there)"
        except (RuntimeError, NotImplementedError) as error:
            ok, detail = False, f"host read: {str(error).splitlines()[0]}"
        checks.add("fp32", "no sync", ok, detail)

    return {
        "config": args.config,
        "batch_size": args.batch_size,
        "device": device,
        "machine": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "checks": checks.rows,
        "passed": len(checks.rows) - checks.failed,
        "failed": checks.failed,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated autocast dtypes: bf16, fp16")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch_size must be >= 2 (CutMix mixes pairs of images)")
    unknown = set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes: unknown {sorted(unknown)}; choose from {sorted(DTYPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA device is available")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"# {report['config']}, batch {report['batch_size']}, {report['device']} ({report['machine']})")
    for row in report["checks"]:
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['dtype']:<5} {row['check']:<17} {row['detail']}")
    print(f"precision: {report['passed']} of {len(report['checks'])} checks passed")
    return report


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["failed"] else 0)
