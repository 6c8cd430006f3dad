"""The non-finite guard: an optimizer step whose loss, any loss term or gradient is NaN/Inf changes nothing.

The loss, every loss term and (without a GradScaler) the gradient norm of each optimizer step are checked with one
fused `torch.isfinite(...).all()` read *per optimizer step*, on `on_pre_optimizer_step` (after the accumulation
window's last backward). A bad step is skipped: its gradients are dropped, so the optimizer changes no parameter and
no moment (the step still counts: `global_step` and the LR schedule advance). It is counted (`nonfinite_steps`,
`nonfinite_<term>` in the logs); after N consecutive bad steps training stops with `NonFiniteLossError`, before
anything is saved, so the last checkpoint is the last good one. The read is a host-device sync, the price of
detecting the bad step before the update (the stock `logging_nan_inf_filter` already reads the loss of every
micro-batch).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped after `max_consecutive_nonfinite` consecutive optimizer steps with NaN/Inf values."""


def drop_gradients(parameters: Iterable[nn.Parameter], scaler: Any | None = None) -> None:
    """Discard the accumulated gradients so that the coming optimizer step changes nothing.

    torch optimizers skip parameters whose `.grad` is None: no update, no weight decay, no moment update. A
    `GradScaler` asserts that it saw at least one gradient, so with an enabled scaler one gradient is set to NaN
    instead: the scaler then skips the step itself (and backs off its scale, its usual reaction to non-finite values).
    """
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    for parameter in trainable:
        parameter.grad = None
    if scaler is not None and trainable and (not hasattr(scaler, "is_enabled") or scaler.is_enabled()):
        trainable[0].grad = torch.full_like(trainable[0], float("nan"))


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors, on the first tensor's device (non-finite as soon as one element is)."""
    device = tensors[0].device
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))


class TermLog:
    """Per-term sums of the logged loss terms on the device (no host read per step), averaged at each log.

    Attributes:
        sums: `{"loss_<term>": ()}` summed over the micro-batches since the last log.
        count: how many micro-batches the sums hold.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor], count: int = 1) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += count

    def pop_means(self, accelerator: Any) -> dict[str, float]:
        """The means since the last call, averaged over processes (one host read), and a fresh start."""
        if not self.count:
            return {}
        names = sorted(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[n] for n in names]) / self.count, reduction="mean")
        self.sums, self.count = {}, 0
        return dict(zip(names, means.tolist(), strict=True))


class NonFiniteGuard(TrainerCallback):
    """Skips the optimizer steps with non-finite values (see the module docstring).

    The trainer hands each training micro-batch's total loss and terms to `record`; they wait in the window until
    `on_pre_optimizer_step` has checked it, and only a finite window's terms reach `log` (the `TermLog`).

    Args:
        accelerator: the trainer's `Accelerator` (its scaler, and the processes that must take the same decision).
        log: where a finite window's terms go.
        max_consecutive: stop with `NonFiniteLossError` after this many skipped steps in a row.
        output_dir: named in the error (its checkpoints are intact).

    Attributes:
        nonfinite_steps: optimizer steps skipped since the guard was created.
        nonfinite_terms: how often each value was non-finite in a skipped step (`loss_<term>`, `loss` for the total,
            `grad_norm` for gradients that were non-finite while every loss term was finite).
        last_step_skipped: whether the latest optimizer step was skipped (the EMA must not move either).
    """

    def __init__(self, accelerator: Any, log: TermLog, max_consecutive: int, output_dir: str) -> None:
        self.accelerator = accelerator
        self.log = log
        self.max_consecutive = max_consecutive
        self.output_dir = output_dir
        self.window: dict[str, torch.Tensor] = {}
        self.window_count = 0
        self.consecutive = 0
        self.nonfinite_steps = 0
        self.nonfinite_terms: Counter[str] = Counter()
        self.last_step_skipped = False

    def record(self, total: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        """Keep a micro-batch's total loss (and its terms, if any) for the window's check: no host sync."""
        values = {"loss": total, **(terms or {})}
        for name, value in values.items():
            value = value.detach().float().reshape(())
            self.window[name] = self.window[name] + value if name in self.window else value
        if terms is not None:
            self.window_count += 1

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.consecutive = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_step_skipped = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any):
        """Check the window's loss, terms and gradients; drop the gradients when any is NaN/Inf."""
        window, count = self.window, self.window_count
        self.window, self.window_count = {}, 0
        names = sorted(window)
        values = [window[name] for name in names]
        # With a GradScaler, inf gradients are the scaler's business (it skips the step and lowers the scale).
        if self.accelerator.scaler is None and model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                names.append("grad_norm")
                values.append(_total_norm(grads))
        if not values:
            return
        device = args.device
        finite = torch.isfinite(torch.stack([value.reshape(()).to(device) for value in values]))
        all_finite = finite.all()
        if self.accelerator.num_processes > 1:  # every process must take the same decision
            all_finite = self.accelerator.reduce(all_finite.float(), reduction="sum") == self.accelerator.num_processes
        if bool(all_finite):  # the guard's single device-to-host read per optimizer step
            self.log.add({name: value for name, value in window.items() if name != "loss"}, count)
            self.consecutive = 0
            return
        bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]
        # Name the most specific culprits: a bad term makes the total and the gradients bad too.
        reported = [n for n in bad if n not in ("loss", "grad_norm")] or bad[:1] or ["values on another process"]
        drop_gradients(model.parameters(), self.accelerator.scaler)
        self.last_step_skipped = True
        self.nonfinite_steps += 1
        self.consecutive += 1
        self.nonfinite_terms.update(reported)
        step = state.global_step + 1
        logger.warning(
            "Optimizer step %d skipped (no parameter update): non-finite %s. %d consecutive, %d in total.",
            step,
            ", ".join(reported),
            self.consecutive,
            self.nonfinite_steps,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"Training stopped at optimizer step {step}: the last {self.consecutive} steps all had "
                f"non-finite values (last: {', '.join(reported)}) and were skipped without changing the model "
                f"(--max_consecutive_nonfinite {self.max_consecutive}). The model still holds the weights "
                f"of the last good step and the checkpoints in {self.output_dir} are intact. Check the data for "
                "NaN/Inf pixels, lower the learning rate or the regularizer coefficients (or use --weight_estimator "
                "exact), then resume with --resume_from_checkpoint auto."
            )

    def counters(self) -> dict[str, int]:
        """The logged counters: `nonfinite_steps` and `nonfinite_<value>` for each value that was non-finite."""
        return {"nonfinite_steps": self.nonfinite_steps} | {
            f"nonfinite_{name}": count for name, count in sorted(self.nonfinite_terms.items())
        }


__all__ = ["NonFiniteGuard", "NonFiniteLossError", "TermLog", "drop_gradients"]
