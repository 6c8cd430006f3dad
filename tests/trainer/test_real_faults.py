"""Real faults, end to end, no mocks: examples/run_diverse.py runs as a subprocess against a real full disk (a small
tmpfs), a real read-only file system, and real signals, under one process and under two (accelerate launch, gloo).

What each case checks is what a user sees: the exit code (`EXIT_CODES` in examples/run_diverse.py: 4 a write failed,
75 stopped on a signal), a message that names the folder and says what to do, no traceback, and on disk either an
intact checkpoint (`verify_checkpoint`) or nothing half-written.

The tmpfs cases need root (CAP_SYS_ADMIN, to mount); they are skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.scripts import REPO, RUN_DIVERSE, SCRIPT_ENV, load_script

from diverse_vit_hf.trainer.checkpoint_integrity import MANIFEST_NAME, verify_checkpoint

ENV = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}
# The tiny run: a 2-block, 32-wide ViT on 256 embedded digits, batches of 16 (16 steps an epoch), on the CPU; no
# evaluation during training and no redundancy analysis, so every second goes to the fault under test.
TINY = [
    "--max_train_samples", "256", "--max_eval_samples", "32", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--use_cpu", "--redundancy_images", "0",
    "--eval_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", "--logging_steps", "1",
]  # fmt: skip
PAGE = 4096  # tmpfs charges whole pages
DATA_LOADED = "training / evaluation images"  # logged by run() once the data is loaded
EXIT_WRITE_FAILED, EXIT_STOPPED = 4, 75
STOPPED = re.compile(r"Stopped on (SIG\w+) after step (\d+) of (\d+)")


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def _run(args: list[str], env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_DIVERSE), *args], cwd=REPO, env=env or ENV, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _output(run: subprocess.CompletedProcess) -> str:
    return run.stdout + run.stderr


def _tail(text: str) -> str:
    return text[-4000:]


def _no_traceback(text: str) -> None:
    at = text.find("Traceback")
    assert at < 0, text[max(0, at - 500) : at + 3500]


def _checkpoints(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("checkpoint-*"))


def _leftovers(folder: Path) -> list[str]:
    """Hidden staging folders a failed save could leave: `.checkpoint-N.saving`, `.saving-*` (final model)."""
    return sorted(path.name for pattern in (".checkpoint-*", ".saving-*") for path in folder.glob(pattern))


def _assert_intact(checkpoint: Path, step: int) -> None:
    check = verify_checkpoint(checkpoint)
    assert check.intact and check.has_manifest and not check.missing_state, check.describe()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert json.loads((checkpoint / MANIFEST_NAME).read_text())["global_step"] == step


# ---- A real full disk and a real read-only file system (tmpfs) -------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sizes(tmp_path_factory) -> dict[str, int]:
    """What the tiny run writes, in tmpfs bytes (whole pages), measured once: one checkpoint folder and the final
    model's weights. In this process (torch and transformers are imported already), one step, one checkpoint."""
    out = tmp_path_factory.mktemp("measure") / "run"
    module = load_script(name="run_diverse_measure")
    try:
        module.main(["--output_dir", str(out), *TINY, "--max_steps", "1", "--save_strategy", "steps",
                     "--save_steps", "1"])  # fmt: skip
    finally:
        sys.modules.pop("run_diverse_measure", None)
    checkpoint = sum(_pages(p.stat().st_size) for p in (out / "checkpoint-1").rglob("*") if p.is_file())
    return {"checkpoint": checkpoint, "weights": _pages((out / "model.safetensors").stat().st_size)}


@pytest.fixture
def small_disk(tmp_path) -> Iterator:
    """`mount(size_kib)`: a fresh tmpfs of that size under tmp_path, unmounted at teardown. Skips where mounting is
    not permitted (not root, no CAP_SYS_ADMIN, no mount command)."""
    mounted: list[Path] = []

    def mount(size_kib: int, name: str = "disk") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs (a real small disk) needs root with CAP_SYS_ADMIN and the mount command")
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here (needs CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)  # busy (a killed run): detach it


def _assert_disk_full_message(text: str, out: Path) -> None:
    assert "the disk is full" in text, _tail(text)
    assert str(out) in text, _tail(text)  # names the output folder
    assert "Free some space" in text and "--resume_from_checkpoint auto" in text, _tail(text)  # what to do
    _no_traceback(text)


@pytest.mark.slow
def test_first_checkpoint_does_not_fit(tiny_sizes, small_disk):
    """Room for half a checkpoint: the save fails with exit 4, and nothing of it is left, visible or hidden."""
    disk = small_disk(tiny_sizes["checkpoint"] // 2 // 1024)
    out = disk / "run"
    run = _run(["--output_dir", str(out), *TINY, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"])
    assert run.returncode == EXIT_WRITE_FAILED, _tail(_output(run))
    _assert_disk_full_message(_output(run), out)
    assert "checkpoint-1" in run.stderr, _tail(run.stderr)
    assert _checkpoints(out) == [] and _leftovers(out) == []
    # The partial files were deleted, not only hidden: the disk holds the lock file alone.
    assert shutil.disk_usage(disk).used <= 2 * PAGE, sorted(p.name for p in out.rglob("*"))


@pytest.mark.slow
def test_later_checkpoint_does_not_fit_and_the_earlier_one_stays_intact(tiny_sizes, small_disk):
    """Room for one and a half checkpoints, three kept: checkpoint-1 is written, checkpoint-2 fails with exit 4, and
    checkpoint-1 still verifies against its manifest."""
    disk = small_disk(tiny_sizes["checkpoint"] * 3 // 2 // 1024)
    out = disk / "run"
    run = _run(["--output_dir", str(out), *TINY, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
                "--save_total_limit", "3"])  # fmt: skip
    assert run.returncode == EXIT_WRITE_FAILED, _tail(_output(run))
    _assert_disk_full_message(_output(run), out)
    assert "checkpoint-2" in run.stderr, _tail(run.stderr)
    assert _checkpoints(out) == ["checkpoint-1"] and _leftovers(out) == []
    _assert_intact(out / "checkpoint-1", 1)
    assert not (out / "model.safetensors").exists()


RESCUED_CHECK = r"""
import json, sys
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
folder = sys.argv[1]
model = AutoModelForImageClassification.from_pretrained(folder).eval()
AutoImageProcessor.from_pretrained(folder)
size = model.config.image_size
with torch.no_grad():
    logits = model(pixel_values=torch.randn(2, model.config.num_channels, size, size)).logits
print(json.dumps({"class": type(model).__name__, "shape": list(logits.shape), "finite": bool(logits.isfinite().all()),
                  "imported_ours": any(name.startswith("diverse_vit_hf") for name in sys.modules)}))
"""


@pytest.mark.slow
def test_final_model_that_does_not_fit_is_rescued_to_tmpdir(tiny_sizes, small_disk, tmp_path):
    """`--save_strategy no` and room for half the final weights: exit 4, the message names the rescue folder under
    TMPDIR (on the real disk), and vanilla transformers loads and runs what is there."""
    disk = small_disk(tiny_sizes["weights"] // 2 // 1024)
    out, tmpdir = disk / "run", tmp_path / "tmpdir"
    tmpdir.mkdir()
    run = _run(["--output_dir", str(out), *TINY, "--max_steps", "2", "--save_strategy", "no"],
               env={**ENV, "TMPDIR": str(tmpdir)})  # fmt: skip
    assert run.returncode == EXIT_WRITE_FAILED, _tail(_output(run))
    _assert_disk_full_message(_output(run), out)
    rescued = sorted(tmpdir.glob(f"diverse-vit-rescued-{out.name}-*"))
    assert len(rescued) == 1, (sorted(p.name for p in tmpdir.iterdir()), _tail(run.stderr))
    assert f"saved to {rescued[0]}" in run.stderr, _tail(run.stderr)
    assert not (out / "model.safetensors").exists() and _leftovers(out) == []

    check = subprocess.run([sys.executable, "-c", RESCUED_CHECK, str(rescued[0])], env=ENV, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert check.returncode == 0, _tail(check.stderr)
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result == {"class": "ViTForImageClassification", "shape": [2, 10], "finite": True, "imported_ours": False}


@pytest.mark.slow
def test_read_only_output_folder_fails_before_the_data_is_loaded(small_disk):
    """An existing output folder on a file system remounted read-only: exit 4 before any data is read."""
    disk = small_disk(1024)
    out = disk / "run"
    out.mkdir()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"remounting the tmpfs read-only is not permitted here: {remount.stderr.strip()}")
    run = _run(["--output_dir", str(out), *TINY, "--max_steps", "2"])
    text = _output(run)
    assert run.returncode == EXIT_WRITE_FAILED, _tail(text)
    assert "read-only" in text and str(out) in text and "Make the folder writable" in text, _tail(text)
    assert "Nothing was trained" in text, _tail(text)
    assert DATA_LOADED not in text, "the data was loaded before the read-only folder was found"
    _no_traceback(text)


# ---- Signals ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _launched(command: list[str], logs: Path, env: dict[str, str] = ENV) -> Iterator[subprocess.Popen]:
    """Start `command` in its own session, output to `logs`.out/.err; whatever happens, nothing it started survives
    the block (its process group, and the process groups of the workers recorded in `process.workers`)."""
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        process.workers = []
        try:
            yield process
        finally:
            for group in [process.pid, *process.workers]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            process.wait()


def _logged_steps(logs: Path) -> int:
    return Path(f"{logs}.out").read_text().count("{'loss': ")


def _wait_for_steps(process: subprocess.Popen, logs: Path, steps: int, timeout: float = 120) -> None:
    """Until the run has logged `steps` training steps (`--logging_steps 1`), so its signal handlers are in place."""
    deadline = time.monotonic() + timeout
    while _logged_steps(logs) < steps:
        if process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {steps} steps: {_tail(Path(f'{logs}.err').read_text())}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {steps} logged steps within {timeout} s")
        time.sleep(0.05)


def _wait(process: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout} s after the signal: it hangs")


def _read(logs: Path) -> tuple[str, str]:
    return Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def _stopped_at(text: str, signal_name: str, max_steps: int) -> int:
    found = STOPPED.findall(text)
    assert len(found) == 1, _tail(text)
    name, step, total = found[0]
    assert (name, int(total)) == (signal_name, max_steps), found
    return int(step)


def _assert_no_final_model(out: Path) -> None:
    for name in ("model.safetensors", "README.md", "eval_results.json", "trainer_state.json"):
        assert not (out / name).exists(), f"{name} written although the run stopped on a signal"


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_75(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    command = [sys.executable, str(RUN_DIVERSE), "--output_dir", str(out), *TINY, "--max_steps", "5000",
               "--save_strategy", "steps", "--save_steps", "1000"]  # fmt: skip
    with _launched(command, logs) as process:
        _wait_for_steps(process, logs, 3)
        os.kill(process.pid, signal.SIGTERM)
        code = _wait(process)
    stdout, stderr = _read(logs)
    assert code == EXIT_STOPPED, _tail(stderr)
    step = _stopped_at(stderr, "SIGTERM", 5000)
    assert step >= 3
    assert f"{out / f'checkpoint-{step}'} holds the complete training state" in stderr, _tail(stderr)
    assert "--resume_from_checkpoint auto" in stderr, _tail(stderr)
    assert _checkpoints(out) == [f"checkpoint-{step}"] and _leftovers(out) == []
    _assert_intact(out / f"checkpoint-{step}", step)
    _assert_no_final_model(out)
    assert "eval_loss" not in stdout, "evaluated although the run stopped on a signal"
    _no_traceback(stdout + stderr)


@pytest.mark.slow
def test_sigusr1_then_auto_resume_finishes_then_auto_has_nothing_to_do(tmp_path):
    """The requeue loop: one command (`--resume_from_checkpoint auto`) launched three times. The first launch stops
    on SIGUSR1 with a checkpoint, the second resumes from it and finishes, the third finds the training finished."""
    out, max_steps = tmp_path / "run", 60
    command = [sys.executable, str(RUN_DIVERSE), "--output_dir", str(out), *TINY, "--max_steps", str(max_steps),
               "--save_strategy", "steps", "--save_steps", "1000", "--resume_from_checkpoint", "auto"]  # fmt: skip
    first = tmp_path / "first"
    with _launched(command, first) as process:
        _wait_for_steps(process, first, 3)
        os.kill(process.pid, signal.SIGUSR1)
        code = _wait(process)
    stdout, stderr = _read(first)
    assert code == EXIT_STOPPED, f"exit {code} (0: the run finished before the signal arrived): {_tail(stderr)}"
    step = _stopped_at(stderr, "SIGUSR1", max_steps)
    assert 3 <= step < max_steps
    _assert_intact(out / f"checkpoint-{step}", step)
    _assert_no_final_model(out)
    _no_traceback(stdout + stderr)

    second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, _tail(_output(second))
    assert f"Resuming from {out / f'checkpoint-{step}'}" in second.stderr, _tail(second.stderr)
    assert second.stdout.count("{'loss': ") == max_steps - step, "the resumed run did not continue where it stopped"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, max_steps + 1))
    assert (out / "model.safetensors").is_file() and (out / "eval_results.json").is_file()
    _no_traceback(_output(second))

    weights_written = (out / "model.safetensors").stat().st_mtime_ns
    third = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, _tail(_output(third))
    assert "nothing to do" in third.stdout, _tail(_output(third))
    assert DATA_LOADED not in _output(third) and "{'loss': " not in third.stdout, "trained again"
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_written
    _no_traceback(_output(third))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").split("=", 1) for entry in raw if b"=" in entry)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _workers(launcher: int, count: int, timeout: float = 30) -> dict[int, int]:
    """RANK -> pid of the launcher's child processes (the training processes), from /proc."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == launcher and "RANK" in (environ := _environ(int(entry.name))):
                    found[int(environ["RANK"])] = int(entry.name)
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile, or not ours to read
        if len(found) == count or time.monotonic() > deadline:
            assert len(found) == count, f"found workers {found}, expected {count}"
            return found
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_under_two_processes_stops_both_after_the_same_step(tmp_path, target):
    """accelerate launch, two CPU processes (gloo). "rank 1": SIGTERM reaches one worker only (a node-local kill);
    "launcher": it reaches the launcher, which forwards it to both workers (Kubernetes signals the container's first
    process). Either way both workers stop after the same step, the checkpoint of that step holds both processes' RNG
    state, every worker says where it stopped, and nothing hangs."""
    out, logs, rank_logs = tmp_path / "run", tmp_path / "launcher", tmp_path / "ranks"
    # --multi_gpu: without it, accelerate launch starts one process on a machine without a GPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "--tee", "3", "--log_dir", str(rank_logs),
               str(RUN_DIVERSE), "--output_dir", str(out), *TINY, "--max_steps", "5000", "--save_strategy", "steps",
               "--save_steps", "1000"]  # fmt: skip
    with _launched(command, logs) as process:
        _wait_for_steps(process, logs, 3)
        workers = _workers(process.pid, 2)
        process.workers.extend(workers.values())
        os.kill(workers[1] if target == "rank 1" else process.pid, signal.SIGTERM)
        code = _wait(process)
        time.sleep(0.5)
        survivors = [pid for pid in workers.values() if _alive(pid)]
        assert not survivors, f"worker(s) {survivors} outlived the launcher"
    launcher_out, launcher_err = _read(logs)

    steps, texts = {}, {}
    for rank in (0, 1):  # each worker's own output (--tee 3 --log_dir: <log_dir>/<run>/attempt_0/<rank>/)
        folders = list(rank_logs.glob(f"*/attempt_0/{rank}"))
        assert len(folders) == 1, folders
        texts[rank] = (folders[0] / "stdout.log").read_text() + (folders[0] / "stderr.log").read_text()
    for rank, text in texts.items():
        assert STOPPED.search(text), f"rank {rank} did not stop on the signal: {_tail(text)}"
        steps[rank] = _stopped_at(text, "SIGTERM", 5000)
        _no_traceback(text)
    assert steps[0] == steps[1] >= 3, steps
    step = steps[0]
    checkpoint = out / f"checkpoint-{step}"
    assert _checkpoints(out) == [checkpoint.name] and _leftovers(out) == []
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    _assert_intact(checkpoint, step)
    _assert_no_final_model(out)

    # The launcher's own exit code (accelerate launch -> torch.distributed.run's agent):
    if target == "launcher":
        # the agent forwards the signal, waits for the workers (30 s, then SIGKILL), and exits with 128 + SIGTERM.
        assert code == 128 + signal.SIGTERM, _tail(launcher_err)
        _no_traceback(launcher_out + launcher_err)
    else:
        # a worker's nonzero exit is a failed worker to the agent: it sends SIGTERM to the others, raises
        # ChildFailedError (a traceback and a summary of the workers' exit codes) and exits 1; 75 does not come
        # through. The workers' own codes depend on timing (75; -15 when the agent's SIGTERM reaches a worker that is
        # still shutting down; -6 was seen once, a C++ abort while the process exited), so only the launcher's code
        # is checked.
        worker_codes = re.findall(r"exitcode\s*:\s*(-?\d+)", launcher_err)
        assert code == 1 and "ChildFailedError" in launcher_err, (code, worker_codes, _tail(launcher_err))
