"""Case 20 of issue 30: a training launched as torchrun launches it (two gloo processes on the CPU); one rank
is killed after the first checkpoint: the other stops with one ``sela: error:`` line (exit 1), no traceback,
and the checkpoint stays loadable."""

import socket

import pytest
import torch
from cli_harness import TINY, error_line, finish, kill9, start_sela, wait_until

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_killed_the_other_says_one_line(tmp_path):
    run, port = tmp_path / "run", str(_free_port())
    flags = [*TINY, "--epochs", "30", "--workers", "0"]  # long enough to be killed in the middle
    ranks = [
        start_sela(
            ["train", "--out", run, *flags],
            cwd=tmp_path,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        assert wait_until(lambda: (run / "checkpoint.pt").is_file(), ranks[0]), finish(ranks[0])
        kill9(ranks[1])
        line = error_line(finish(ranks[0]), code=1)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                kill9(proc)
    assert "rank 0" in line and "--resume" in line, line
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] >= 1
