"""Tests for sela.distributed and the Trainer under torch.distributed: 2 gloo processes on the CPU.

Each multi-process test starts fresh interpreters (``spawn``) with torchrun's environment variables, joins
them with a timeout and kills stragglers, so a broken collective fails the test instead of hanging the
suite; every process group gets a short collective timeout for the same reason. Starting interpreters
is the slow part, so one launch serves the collective and the training tests, and the training modules
are imported only where used (the failure tests' processes need torch and sela.distributed alone).

Equality with one process. A DDP rank normalises with the BatchNorm statistics of its own B / W images,
so a BatchNorm network cannot reproduce the single-process run exactly (``--sync-bn`` would, on GPUs
only: torch's SyncBatchNorm has no CPU kernel). The equality test therefore trains a small network
without normalisation layers (``_plain_net``) under a deterministic augmentation (random crops and flips
are drawn per rank on purpose): with those, W processes compute the same thing as one, regrouped, and
labels and weights must agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from sela import distributed as dist

WORLD = 2
N = 96  # training images of the equality test
JOIN_S = 60.0  # no test process may live longer than this
OFF = {"crop_scale": None, "flip_p": 0.0, "jitter": None, "grayscale_p": 0.0}  # a deterministic augmentation


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------
# launching W processes the way torchrun does


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, timeout_s: float, args: tuple) -> None:
    env = {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(1)
    assert dist.init_from_env(torch.device("cpu"), timeout_s=timeout_s)
    fn(rank, world, *args)
    torch.distributed.destroy_process_group()


def _launch(
    fn, *args, world: int = WORLD, timeout_s: float = 30.0, outlive_s: float = JOIN_S
) -> list[int | None]:
    """Run fn(rank, world, *args) in ``world`` fresh processes; their exit codes (None: killed, hung).

    ``timeout_s`` is the collective timeout; the other ranks are killed ``outlive_s`` after rank 0 ends.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, timeout_s, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_S
    codes = []
    for i, p in enumerate(procs):
        p.join(max(0.1, deadline - time.monotonic()))
        if i == 0:
            deadline = min(deadline, time.monotonic() + outlive_s)
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


# --------------------------------------------------------------------------------------------------------
# what the two processes run: the collectives, then training (straight, and stopped + resumed)


def _check_collectives(rank: int, world: int) -> None:
    for n in (1, 2, 7, 12):
        rows = dist.shard_rows(n)
        assert torch.equal(rows, torch.arange(rank, n, world))
        local = torch.stack([rows * 10, -rows], dim=1).float()  # (n_r, 2): row i holds (10 i, -i)
        full = dist.gather_rows(local, n)  # (n, 2)
        assert torch.equal(full, torch.stack([torch.arange(n) * 10, -torch.arange(n)], dim=1).float())
        assert torch.equal(dist.gather_rows(rows, n), torch.arange(n))  # int64, like labels
        # disjoint rows in any order (a rank's part of an epoch): values land at their rows, -1 elsewhere
        mine = torch.arange(n).flip(0)[rank::world]
        mine = mine[mine != 0] if n == 7 else mine  # at n = 7 no rank holds row 0
        full = dist.scatter_rows(mine * 3, mine, n)
        expected = torch.arange(n) * 3
        if n == 7:
            expected[0] = -1
        assert torch.equal(full, expected)
    with pytest.raises(ValueError, match="shard"):  # raised before any collective, on every rank
        dist.gather_rows(torch.zeros(5), 7)
    assert dist.all_reduce_mean(float(rank), torch.device("cpu")) == (world - 1) / 2
    assert dist.all_reduce_max(float(rank), torch.device("cpu")) == world - 1
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(rank)
    dist.average_buffers(bn)
    assert torch.allclose(bn.running_mean, torch.full((3,), (world - 1) / 2))
    assert int(bn.num_batches_tracked) == 0  # integer buffers are left alone


def _worker(rank: int, world: int, tmp: Path) -> None:
    _check_collectives(rank, world)
    (tmp / f"collectives{rank}.ok").touch()
    # a straight run
    trainer = _trainer(tmp / "run")
    trainer.fit()
    torch.save(_result(trainer), tmp / f"straight{rank}.pt")
    trainer.update_labels()  # its memory: this rank's features (n_r, D), logits and solver kernel (n_r, K)
    n_r, d, k = len(dist.shard_rows(N)), 16, 6
    assert trainer.label_pass.memory[0] == (n_r * d + 2 * n_r * k) * 4
    # a run stopped after one epoch and resumed by a new Trainer from rank 0's checkpoint
    first = _trainer(tmp / "resumed")
    first.fit(max_epochs=1)
    dist.barrier()  # rank 0 has written the checkpoint
    second = _trainer(tmp / "resumed")
    second.load_checkpoint(tmp / "resumed" / "checkpoint.pt")
    second.fit()
    torch.save(_result(second), tmp / f"resumed{rank}.pt")
    # labels from the recorded outputs of the training pass: each rank records and solves its own rows
    recorded = _trainer(tmp / "recorded", label_inputs="recorded")
    recorded.fit()
    torch.save(_result(recorded), tmp / f"recorded{rank}.pt")
    # SyncBatchNorm has no CPU kernel: a clear error on every rank, before any collective
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        _trainer(tmp / "syncbn", sync_bn=True)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, list[int | None]]:
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, _launch(_worker, tmp)


# --------------------------------------------------------------------------------------------------------
# shard_rows / gather_rows and the other collectives


def test_shard_and_gather_rows_round_trip(two_process_run):
    assert torch.equal(dist.shard_rows(5, 1, 2), torch.tensor([1, 3]))
    assert torch.equal(dist.gather_rows(torch.arange(4), 4), torch.arange(4))  # one process: unchanged
    tmp, codes = two_process_run
    assert all((tmp / f"collectives{r}.ok").exists() for r in range(WORLD)), f"exit codes {codes}"


# --------------------------------------------------------------------------------------------------------
# training: W processes == one process


def _plain_net(n_clusters: list[int]):
    """conv -> ReLU -> strided conv -> ReLU -> pool (D = 16): no normalisation, so batch-independent."""
    from sela.models import SelaModel

    class PlainNet(SelaModel):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.default_input_size = 8
            self._build_heads(16, n_clusters)

        def _stages(self):
            return [("conv1", lambda x: self.conv1(x).relu()), ("conv2", lambda x: self.conv2(x).relu())]

    return PlainNet()


def _images():
    """N 8 x 8 grey images of 4 noisy stroke patterns (so that the labels have something to find)."""
    from sela.data import ImageSet

    g = torch.Generator().manual_seed(0)
    cls = torch.arange(N) % 4
    base = torch.zeros(4, 8, 8)
    base[0, 3:5, :] = 1  # horizontal bar
    base[1, :, 3:5] = 1  # vertical bar
    base[2] = torch.eye(8)  # diagonal
    base[3, 1:7, 1:7] = 1  # block
    x = base[cls] * 200 + torch.rand(N, 8, 8, generator=g) * 55
    return ImageSet(x[:, None].round().to(torch.uint8), targets=cls, name="strokes")


def _trainer(out: Path, *, sync_bn: bool = False, label_inputs: str = "eval"):
    from sela.data import BatchAugment, EvalTransform
    from sela.objectives import SelaObjective
    from sela.train import Trainer

    train_set = _images()
    torch.manual_seed(0)  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
    return Trainer(
        _plain_net([4, 6]),
        train_set,
        objective=SelaObjective(BatchAugment(8, **OFF, mean=train_set.mean, std=train_set.std)),
        out_dir=out,
        epochs=2,
        batch_size=16,
        lr=0.05,
        warmup_epochs=0.5,
        label_updates=3,  # before steps 0, 1 and 5 of 12; recorded: step 0 and the end of epoch 1
        label_inputs=label_inputs,
        eval_transform=EvalTransform(8, mean=train_set.mean, std=train_set.std),
        device=torch.device("cpu"),
        workers=0,
        progress=False,
        sync_bn=sync_bn,
        precision="fp32",  # compared with one process to 1e-4: bf16 rounding would differ with the split
    )


def _result(trainer) -> dict[str, Tensor]:
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return {"labels": trainer.state.labels.clone(), **weights}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-4) -> None:
    assert torch.equal(a["labels"], b["labels"]), "labels differ"
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), f"{k} differs"


@pytest.mark.filterwarnings("ignore:epoch")  # health warnings about this tiny run's clusters
def test_two_processes_train_like_one(two_process_run, tmp_path):
    from sela.rundir import METRICS

    single = _trainer(tmp_path / "single")
    single.fit()
    expected = _result(single)
    tmp, codes = two_process_run
    assert codes == [0] * WORLD
    for kind in ("straight", "resumed"):
        for rank in range(WORLD):
            _assert_same(torch.load(tmp / f"{kind}{rank}.pt"), expected)
    recorded = _trainer(tmp_path / "recorded", label_inputs="recorded")
    recorded.fit()
    assert recorded.plan.label_epochs == [1] and recorded.state.n_updates == 2
    for rank in range(WORLD):
        _assert_same(torch.load(tmp / f"recorded{rank}.pt"), _result(recorded))
    # rank 0 alone writes: one metrics line per epoch, with the label step's memory (the largest rank's)
    lines = (tmp / "run" / METRICS).read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert "label_buffers_mb" in first and "label_buffers_mb" not in second  # no label step in epoch 2
    assert first["label_peak_mb"] is None or first["label_peak_mb"] > 0
    assert not (tmp / "syncbn").exists()


# --------------------------------------------------------------------------------------------------------
# failure: a rank that dies or hangs makes the others fail within the collective timeout


def _failing_worker(rank: int, world: int, tmp: Path, how: str) -> None:
    dist.barrier()  # everyone is in
    if rank == 1:
        if how == "dies":
            os._exit(3)
        time.sleep(JOIN_S)  # hangs; the test kills it
        return
    start = time.monotonic()
    try:
        for _ in range(10_000):
            dist.all_reduce_mean(1.0, torch.device("cpu"))
            time.sleep(0.01)
        outcome = "no error"
    except Exception as e:  # gloo raises RuntimeError (closed connection) or DistBackendError (timeout)
        outcome = f"{type(e).__name__}: {e}"
    (tmp / "rank0.txt").write_text(f"{time.monotonic() - start:.2f}\n{outcome}")
    os._exit(0)  # skip the process-group teardown, which would wait for the lost rank


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_lost_rank_fails_the_others_in_bounded_time(tmp_path, how):
    start = time.monotonic()
    codes = _launch(_failing_worker, tmp_path, how, timeout_s=3.0, outlive_s=2.0)
    elapsed, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert codes[0] == 0 and outcome != "no error", outcome
    assert float(elapsed) < 20.0  # the 3 s collective timeout, with slack for a loaded machine
    assert codes[1] == (3 if how == "dies" else None)
    assert time.monotonic() - start < JOIN_S / 2
