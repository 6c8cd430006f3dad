"""One training per output folder, and a folder known to be writable before any training.

- **Lock.** `OutputFolderLock` holds an exclusive `fcntl.flock` on `<output_dir>/.diverse-vit.lock` for the life of a
  run. The kernel releases it when the holding process exits, however it exits (a crash, SIGKILL, the node's OOM
  killer), so a killed run never leaves the folder stuck (its lock file stays, unlocked; a run that ends removes it).
  A second run into the same folder is refused at once, naming the process that holds it. Within one process the
  lock is re-entrant (the example script takes it before reading data, `DiverseTrainer.train` takes it again). Under
  several processes only the main process takes it and the others learn the outcome (`prepare_output_folder`), so
  every rank stops with the same error.
- **Writability.** `check_writable` writes, flushes and removes a probe file, so a read-only or permission-denied
  `--output_dir` is found before the first training step instead of at the first save.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

from .checkpointing import CheckpointSaveError, save_error

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the lock is then a no-op (documented)
    fcntl = None

LOCK_NAME = ".diverse-vit.lock"


class OutputFolderLockedError(RuntimeError):
    """Another run holds the output folder's lock."""


class OutputFolderLock:
    """An exclusive, re-entrant (per process) lock on an output folder; use as a context manager or call
    `acquire`/`release`.

    Args:
        output_dir: the run's output folder (created if missing).
    """

    # Locks this process holds, by real path: flock locks belong to an open file, so a second open of the same lock
    # file in the same process would conflict with the first.
    _held: ClassVar[dict[str, tuple[int, int]]] = {}

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._key: str | None = None

    def acquire(self) -> OutputFolderLock:
        """Take the lock, or raise `OutputFolderLockedError` naming the holder. Raises `CheckpointSaveError` when the
        folder cannot be created or the lock file cannot be written."""
        if self._key is not None:
            return self
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(self.path)
            if key in self._held:
                fd, count = self._held[key]
                self._held[key] = (fd, count + 1)
                self._key = key
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise save_error(error, "the run's lock file", self.output_dir, "Nothing was trained.") from error
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_holder(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise save_error(error, "the run's lock", self.output_dir, "Nothing was trained.") from error
                raise OutputFolderLockedError(
                    f"--output_dir {self.output_dir} is in use by another training ({holder}). Two runs in one "
                    "folder would overwrite each other's checkpoints. Wait for that run to end (or stop it), or "
                    "choose another --output_dir."
                ) from None
            if not _same_file(fd, self.path):
                # The holder released and removed the file between our open and our flock: lock the new one.
                os.close(fd)
                return self.acquire()
        try:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass  # a full disk: the lock itself holds, only the holder's description is missing
        self._held[key] = (fd, 1)
        self._key = key
        return self

    def release(self) -> None:
        """Release the lock (the last release of this process closes the lock file, which unlocks it)."""
        if self._key is None:
            return
        fd, count = self._held[self._key]
        if count > 1:
            self._held[self._key] = (fd, count - 1)
        else:
            del self._held[self._key]
            try:
                self.path.unlink()  # while still locked: a process that opened it meanwhile sees it was replaced
            except OSError:
                pass
            os.close(fd)
        self._key = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> OutputFolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"process {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that holds its lock file"


def prepare_output_folder(output_dir: str | os.PathLike, is_main_process: bool = True) -> OutputFolderLock | None:
    """Before a training: on the main process take the output folder's lock (`OutputFolderLock`) and check that the
    folder is writable (`check_writable`). Under several processes (an initialised `torch.distributed` group) every
    process learns the outcome and raises the same error, so none of them goes on to read data and wait forever.

    Returns the held lock on the main process (release it when the run ends), None on the others.

    Raises:
        OutputFolderLockedError: another run holds the folder.
        CheckpointSaveError: the folder cannot be created or written.
    """
    lock, failure = None, None
    if is_main_process:
        try:
            lock = OutputFolderLock(output_dir).acquire()
            check_writable(output_dir)
        except (OutputFolderLockedError, CheckpointSaveError) as error:
            failure = error
    failure = _shared_failure(failure)
    if failure is not None:
        if lock is not None:
            lock.release()
        raise failure
    return lock


def _shared_failure(failure: BaseException | None) -> BaseException | None:
    """The main process's failure (or None) on every process of an initialised process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    message = [None if failure is None else (type(failure).__name__, str(failure))]
    dist.broadcast_object_list(message, src=0)
    if message[0] is None:
        return None
    if failure is not None:
        return failure
    kind, text = message[0]
    return OutputFolderLockedError(text) if kind == OutputFolderLockedError.__name__ else CheckpointSaveError(text)


def check_writable(output_dir: str | os.PathLike) -> None:
    """Create `output_dir` if needed and write, flush and remove a small probe file in it.

    Raises:
        CheckpointSaveError: the folder cannot be created or written (read-only file system, permissions, a full
            disk), with what to do. Nothing has been trained yet.
    """
    folder = Path(output_dir)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise save_error(error, "a test file", folder, "Nothing was trained.") from error
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


__all__ = [
    "LOCK_NAME",
    "OutputFolderLock",
    "OutputFolderLockedError",
    "check_writable",
    "prepare_output_folder",
]
