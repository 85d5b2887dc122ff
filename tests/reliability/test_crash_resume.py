"""kill -9 of a training process at several moments, then ``sela train --resume``: the run ends as if it had
never been interrupted (the same labels.csv as an uninterrupted run with the seed) and metrics.jsonl holds
every epoch once."""

import random
import time

import pytest
from cli_harness import (
    EPOCHS,
    INJECT,
    TINY,
    kill9,
    leftover_tmp,
    metrics_epochs,
    run_sela,
    start_sela,
    wait_until,
)

pytestmark = pytest.mark.slow


def _after_epochs(n):
    # with the checkpoint of epoch 1 on disk, so that --resume has something to continue from
    return lambda run, fired: len(metrics_epochs(run)) >= n and (run / "checkpoint.pt").is_file()


# moment: (condition on (run dir, fault-fired file), longest random wait after it in s, injected fault)
KILL_AT = {
    "after-epoch-1": (_after_epochs(1), 0.0, {}),
    # the second checkpoint write stalls half-written (injected) and is killed there: epoch 2's metrics line
    # is written, its checkpoint is not
    "mid-checkpoint-write": (lambda run, fired: fired.exists(), 0.0, {"SELA_FAULT": "stall"}),
    # anywhere from the first checkpoint on: an epoch, a checkpoint write, the final evaluation and plots
    "random-moment": (_after_epochs(1), 2.5, {}),
}


@pytest.mark.parametrize("moment", list(KILL_AT))
def test_kill_9_then_resume_gives_the_uninterrupted_run(moment, trained_run, tmp_path):
    condition, spread_s, fault = KILL_AT[moment]
    run, fired = tmp_path / "run", tmp_path / "fault-fired"
    delay_s = random.uniform(0, spread_s)
    what = f"{moment} (+{delay_s:.2f} s)" if spread_s else moment
    env = {**fault, "SELA_FAULT_SIGNAL": str(fired)} if fault else {}
    proc = start_sela(["train", "--out", run, *TINY], cwd=tmp_path, wrapper=INJECT if fault else None, **env)
    try:
        caught = wait_until(lambda: condition(run, fired), proc)
        time.sleep(delay_s)
    finally:
        killed = kill9(proc)
    assert caught or killed.code == 0, f"training failed before the kill at {what}: {killed}"

    result = run_sela(["train", "--resume", "--out", run, *TINY], cwd=tmp_path)
    assert result.code == 0, f"--resume after kill -9 at {what} failed: {result}"
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1)), f"metrics.jsonl after kill -9 at {what}"
    assert (run / "labels.csv").read_text() == (trained_run / "labels.csv").read_text(), (
        f"labels.csv after kill -9 at {what} and --resume differs from the uninterrupted run's"
    )
    assert not leftover_tmp(run), f"after kill -9 at {what} and --resume"
