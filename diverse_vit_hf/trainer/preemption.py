"""Preemption: a signal ends a training with a complete checkpoint instead of losing the steps since the last one.

Cluster schedulers announce the end of a job with a signal before they kill it: SLURM and Kubernetes send SIGTERM
(SLURM's `--signal=USR1@<seconds>` sends SIGUSR1 earlier). `SignalCheckpointCallback` catches the signals of
`--stop_signals` (default SIGTERM and SIGUSR1); at the end of the optimizer step under way it has the `Trainer` write
a checkpoint through the same atomic path as every checkpoint and stop, with no evaluation and no final model. The
example scripts then exit with `EXIT_STOPPED_BY_SIGNAL` (75, `EX_TEMPFAIL`: "try again"), and the same command with
`--resume_from_checkpoint auto` continues from that checkpoint.

Under several processes the stop is agreed every optimizer step (one all-reduce of the signal number; a host read per
step), so every process stops after the same step, and reports the stop, even when the signal reaches them at
different times, or only one of them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

EXIT_STOPPED_BY_SIGNAL = 75
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGUSR1"
# Signals that cannot be caught, or that the launchers and terminals use for other things.
_REFUSED = {"SIGKILL", "SIGSTOP"}


class TrainingStoppedError(Exception):
    """Training stopped on a signal after writing a checkpoint; the run is not finished."""

    exit_code = EXIT_STOPPED_BY_SIGNAL


def parse_stop_signals(value: str | Sequence[str] | None) -> list[signal.Signals]:
    """`"SIGTERM,SIGUSR1"` (names with or without the `SIG` prefix, any case) as signals; empty: none.

    Raises:
        ValueError: an unknown name, or SIGKILL/SIGSTOP (which no process can catch).
    """
    names = value.split(",") if isinstance(value, str) else list(value or [])
    signals = []
    for raw in names:
        name = raw.strip().upper()
        if not name:
            continue
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in _REFUSED or name not in signal.Signals.__members__:
            known = "SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP"
            raise ValueError(
                f"--stop_signals: {raw.strip()!r} is not a signal a process can catch. Use names such as {known}, "
                "separated by commas, or an empty string to turn the handling off."
            )
        signals.append(signal.Signals[name])
    return signals


class SignalCheckpointCallback(TrainerCallback):
    """Checkpoint and stop at the end of the optimizer step during which one of `signals` arrived.

    Args:
        signals: the signals to handle (installed at `on_train_begin` in the main thread, restored at `on_train_end`).
        accelerator: the trainer's `Accelerator`, to agree on the stop under several processes.

    Attributes:
        received: the first signal received during training (None: none).
        stopped_at: the step after which training stopped on it (None: it did not stop).
    """

    def __init__(self, signals: Sequence[signal.Signals], accelerator: Any = None) -> None:
        self.signals = list(signals)
        self.accelerator = accelerator
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning(
                "%s received: finishing the current optimizer step, then writing a checkpoint and stopping.",
                self.received.name,
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.stopped_at = None, None
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: %s cannot be handled.", self._names())
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _stop_requested(self, args: Any) -> bool:
        """Whether any process received a signal; every process then records the same one (the highest number), so
        each of them stops and reports the stop, not only those the signal reached."""
        processes = getattr(self.accelerator, "num_processes", 1)
        if processes <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received is not None
        number = torch.tensor([int(self.received) if self.received is not None else 0], device=args.device)
        dist.all_reduce(number, op=dist.ReduceOp.MAX)
        agreed = int(number.item())
        if agreed and self.received is None:
            self.received = signal.Signals(agreed)
            logger.warning("Another process received %s: stopping after this step too.", self.received.name)
        return agreed > 0

    def on_step_end(self, args, state, control, **kwargs):
        if not self.signals or self.stopped_at is not None or not self._stop_requested(args):
            return control
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint of the stop is written; no second save, no evaluation
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _names(self) -> str:
        return ", ".join(sig.name for sig in self.signals)


__all__ = [
    "DEFAULT_STOP_SIGNALS",
    "EXIT_STOPPED_BY_SIGNAL",
    "SignalCheckpointCallback",
    "TrainingStoppedError",
    "parse_stop_signals",
]
