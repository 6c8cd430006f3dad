"""One run per output folder (a real flock held by real processes, released by a real SIGKILL) and a writable folder
checked before training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fixtures.scripts import REPO, RUN_DIVERSE, SCRIPT_ENV, fast_flags

from diverse_vit_hf.trainer.checkpointing import CheckpointSaveError
from diverse_vit_hf.trainer.output_folder import (
    LOCK_NAME,
    OutputFolderLock,
    OutputFolderLockedError,
    check_writable,
    prepare_output_folder,
)

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from diverse_vit_hf.trainer.output_folder import OutputFolderLock
    lock = OutputFolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def hold_lock_in_another_process(folder) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_and_a_killed_holder_frees_the_folder(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(OutputFolderLockedError, match=rf"in use by another training \(process {holder.pid} on"):
            OutputFolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # a killed run leaves the file, not the lock
    with OutputFolderLock(tmp_path) as lock:
        assert lock.held
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    outer = OutputFolderLock(tmp_path).acquire()
    inner = prepare_output_folder(tmp_path)
    inner.release()
    holder = subprocess.run(
        [sys.executable, "-c", HOLD_LOCK.replace("time.sleep(120)", ""), str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert holder.returncode != 0 and "OutputFolderLockedError" in holder.stderr, "the outer lock was released"
    outer.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_unwritable_folder_is_found_before_training(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(CheckpointSaveError, match=r"Could not save a test file to .*file.*Nothing was trained"):
        check_writable(blocked / "out")
    check_writable(tmp_path / "new" / "out")
    assert os.listdir(tmp_path / "new" / "out") == []


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system (a tmpfs remounted read-only); skipped where mounting is not permitted."""
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root with CAP_SYS_ADMIN: {made.stderr.decode().strip()}")
    (mount / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    yield mount / "out"
    subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_file_system_is_reported_as_such(read_only_folder):
    with pytest.raises(CheckpointSaveError, match=r"the folder is read-only"):
        prepare_output_folder(read_only_folder)


@pytest.mark.slow
def test_two_launches_into_one_folder_the_second_is_refused_before_reading_data(tmp_path):
    output = tmp_path / "out"
    flags = [*fast_flags(max_train_samples=256), "--max_steps", "400", "--save_strategy", "steps", "--save_steps",
             "1000", "--redundancy_images", "0", "--output_dir", str(output),
             "--resume_from_checkpoint", "auto"]  # fmt: skip
    command = [sys.executable, str(RUN_DIVERSE), *flags]
    first = subprocess.Popen(command, cwd=REPO, env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    try:
        lines = []
        for line in first.stdout:  # wait until the first run trains
            lines.append(line)
            if "'loss'" in line:
                break
        assert first.poll() is None, "".join(lines)[-3000:]
        started = time.perf_counter()
        second = subprocess.run(command, cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
        text = second.stdout + second.stderr
        assert second.returncode == 5, text[-3000:]
        assert f"--output_dir {output} is in use by another training (process {first.pid}" in text
        assert "training / " not in text and "Traceback" not in text  # refused before any data was read
        assert time.perf_counter() - started < 60
        first.send_signal(signal.SIGTERM)  # the first run is unharmed: it stops cleanly on its own terms
        first.communicate(timeout=300)
        assert first.returncode == 75
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
