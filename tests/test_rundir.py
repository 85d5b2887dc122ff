"""The run directory: labels CSV, checkpoints loaded tensors-only, atomic writes, metrics, the lock."""

import errno
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from sela import rundir
from sela.rundir import read_labels_csv, write_labels_csv


def test_csv_round_trip_with_paths_and_confidence(tmp_path):
    labels = torch.randint(0, 7, (3, 25))
    conf = torch.rand(3, 25)
    paths = [f"/data/img, {i}.png" for i in range(25)]  # a comma inside a path survives
    write_labels_csv(tmp_path / "l.csv", labels, paths=paths, confidence=conf)
    table = read_labels_csv(tmp_path / "l.csv")
    assert table.id_column == "path" and table.ids == paths
    assert torch.equal(table.labels, labels)
    assert torch.allclose(table.confidence, conf, atol=5e-5)
    header = (tmp_path / "l.csv").read_text().splitlines()[0]
    assert header == "path,head0,head1,head2,confidence0,confidence1,confidence2"


def test_reads_the_labels_csv_of_sela_train(tmp_path):
    labels = torch.randint(0, 5, (2, 9))
    write_labels_csv(tmp_path / "labels.csv", labels)  # what sela train writes its labels.csv with
    table = read_labels_csv(tmp_path / "labels.csv")
    assert table.id_column == "index" and table.ids == [str(i) for i in range(9)]
    assert torch.equal(table.labels, labels) and table.confidence is None


def test_bad_csv_and_bad_shapes(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a sela labels CSV"):
        read_labels_csv(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("index,head0\n0,zero\n")
    with pytest.raises(ValueError, match="malformed row"):
        read_labels_csv(tmp_path / "y.csv")
    with pytest.raises(FileNotFoundError):
        read_labels_csv(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="one path per image"):
        write_labels_csv(tmp_path / "z.csv", torch.zeros(1, 3, dtype=torch.long), paths=["a"])


class _Payload:
    """Unpickling this calls os.system: the kind of file sela must never execute."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_load_file_refuses_code_and_runs_none(tmp_path, how):
    marker, path = tmp_path / "ran", tmp_path / "checkpoint.pt"
    payload = {"model": _Payload(marker), "epoch": 1}
    if how == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="refuses it|not a readable"):
        rundir.load_file(path)
    assert not marker.exists()


def test_checkpoint_formats(tmp_path):
    rundir.save_checkpoint(tmp_path, {"model": {}, "optimizer": {}, "labels": torch.zeros(1, 2), "epoch": 1})
    ckpt = rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT)
    assert ckpt["format"] == rundir.FORMAT_VERSION == 2
    assert rundir.checkpoint_format({"model": {}, "config": {}, "labels": 0, "epoch": 1}) == 1  # older sela
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a sela training checkpoint"):
        rundir.load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        rundir.load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / rundir.CHECKPOINT).read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        rundir.load_checkpoint(tmp_path / "cut.pt")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    rundir.write_json(path, {"a": 1})

    def full_disk(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(rundir.RunWriteError, match="disk is full: could not write .*summary.json"):
        rundir.atomic_write(path, full_disk)
    assert json.loads(path.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_truncate_metrics_keeps_each_epoch_once(tmp_path):
    for e in (1, 2, 3, 3, 4):
        rundir.append_metrics(tmp_path, {"epoch": e, "time_s": float(e)})
    with open(tmp_path / rundir.METRICS, "a") as f:
        f.write('{"epoch": 5, "ti')  # a line cut short by a kill
    kept = rundir.truncate_metrics(tmp_path, 3)
    assert [m["epoch"] for m in kept] == [1, 2, 3]
    assert [m["epoch"] for m in rundir.read_metrics(tmp_path)] == [1, 2, 3]


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from sela.rundir import RunLock; import time; RunLock({str(tmp_path)!r}).acquire(); "
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another sela train \(pid {holder.pid}\)"):
            rundir.RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock
        holder.wait()
    with rundir.RunLock(tmp_path):
        pass
