"""The disk fills up, or the run directory turns read-only, in the middle of a run: sela stops with one line
that says what happened and to which file (exit 2), the last good checkpoint stays loadable, and no
temporary file is left behind.

Each fault is made for real where this machine allows it (a small tmpfs that the test fills up; ``chattr +i``
as root, ``chmod`` otherwise) and injected into the checkpoint writes (``inject_faults.py``) everywhere.
"""

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch
from cli_harness import (
    INJECT,
    TINY,
    error_line,
    finish,
    kill9,
    leftover_tmp,
    metrics_epochs,
    start_sela,
    wait_until,
)

pytestmark = pytest.mark.slow

RUN_FILE = r"checkpoint\.pt|metrics\.jsonl|labels\.csv|summary\.json|config\.json|\.png"


def _check_last_good_checkpoint(run, epoch=None):
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] >= 1 if epoch is None else ckpt["epoch"] == epoch
    assert not leftover_tmp(run), f"temporary files left in {run}"


def _train_and_break_after_first_checkpoint(run, cwd, fault):
    """Train; once the first checkpoint is on disk, stop the process, call ``fault()``, let it go on."""
    proc = start_sela(["train", "--out", run, *TINY], cwd=cwd)
    try:
        started = wait_until(lambda: (run / "checkpoint.pt").is_file() and metrics_epochs(run), proc)
        assert started, f"training ended before its first checkpoint: {finish(proc)}"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            fault()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        return finish(proc)
    finally:
        if proc.poll() is None:
            kill9(proc)


# ------------------------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _small_tmpfs(where, size="4m"):
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected ENOSPC test covers a full disk")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the injected ENOSPC test runs"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk):
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def test_disk_full_mid_run_on_a_real_small_disk(tmp_path):
    with _small_tmpfs(tmp_path / "disk") as disk:
        run = disk / "run"
        result = _train_and_break_after_first_checkpoint(run, tmp_path, lambda: _fill(disk))
        line = error_line(result)
        assert re.search(r"full|no space", line, re.IGNORECASE), line
        assert re.search(RUN_FILE, line), f"the message must name the file: {line}"
        (disk / "filler").unlink()
        _check_last_good_checkpoint(run)


def test_disk_full_mid_checkpoint_write_injected(tmp_path):
    run = tmp_path / "run"
    env = {"SELA_FAULT": "enospc", "SELA_FAULT_AFTER": "1"}  # the second checkpoint's write fails half-way
    result = finish(start_sela(["train", "--out", run, *TINY], cwd=tmp_path, wrapper=INJECT, **env))
    line = error_line(result)
    assert re.search(r"full|no space", line, re.IGNORECASE), line
    assert "checkpoint.pt" in line, f"the message must name the file: {line}"
    _check_last_good_checkpoint(run, epoch=1)


# ---------------------------------------------------------------------------------- a read-only directory


def _read_only(folder):
    """Make ``folder`` read-only for this process (root ignores permissions: ``chattr +i``); returns the undo."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if not shutil.which("chattr"):
        pytest.skip("root ignores permissions and there is no chattr; the injected EROFS test runs")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i fails here ({done.stderr.decode().strip()}); the injected EROFS test runs")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_run_directory_turns_read_only_mid_run(tmp_path):
    run = tmp_path / "run"
    undo = []
    try:
        result = _train_and_break_after_first_checkpoint(run, tmp_path, lambda: undo.append(_read_only(run)))
    finally:
        for f in undo:
            f()
    line = error_line(result)
    assert re.search(r"read-only|permission|not permitted", line, re.IGNORECASE), line
    assert re.search(RUN_FILE, line), f"the message must name the file: {line}"
    _check_last_good_checkpoint(run)


def test_read_only_file_system_injected(tmp_path):
    run = tmp_path / "run"
    env = {"SELA_FAULT": "erofs", "SELA_FAULT_AFTER": "1"}
    line = error_line(finish(start_sela(["train", "--out", run, *TINY], cwd=tmp_path, wrapper=INJECT, **env)))
    assert re.search(r"read-only", line, re.IGNORECASE), line
    assert "checkpoint.pt" in line, f"the message must name the file: {line}"
    _check_last_good_checkpoint(run, epoch=1)
