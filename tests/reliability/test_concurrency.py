"""Two ``sela train --out R`` into one directory at once: the second is refused in one line that names the
running process, and the first finishes with its results intact."""

import os
import signal

import pytest
from cli_harness import (
    EPOCHS,
    TINY,
    error_line,
    finish,
    kill9,
    metrics_epochs,
    run_sela,
    start_sela,
    wait_until,
)

pytestmark = pytest.mark.slow


def test_second_training_into_a_running_run_is_refused(tmp_path):
    run = tmp_path / "run"
    first = start_sela(["train", "--out", run, *TINY], cwd=tmp_path)
    try:
        started = wait_until(lambda: len(metrics_epochs(run)) >= 1, first)
        assert started, f"the first run ended before its first epoch: {finish(first)}"
        config = (run / "config.json").read_bytes()
        # the first is stopped (not ended) while the others start, so it is certainly still running
        os.kill(first.pid, signal.SIGSTOP)
        try:
            again = run_sela(["train", "--out", run, *TINY], cwd=tmp_path)
            resumed = run_sela(["train", "--resume", "--out", run, *TINY], cwd=tmp_path)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        done = finish(first)
    finally:
        if first.poll() is None:
            kill9(first)
    for name, second in (("train", again), ("train --resume", resumed)):
        line = error_line(second)
        assert str(first.pid) in line, f"sela {name} into a running run must name the running process: {line}"
    assert done.code == 0, f"the first run did not finish: {done}"
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1))
    assert (run / "config.json").read_bytes() == config
    assert (run / "labels.csv").is_file() and (run / "summary.json").is_file()
