"""The run directory of ``sela train --out DIR``: its file names, formats and the checkpoint's schema.

A run directory holds::

    config.json     the resolved configuration, the command line and sela's version (written once)
    checkpoint.pt   the state after the last finished epoch (replaced atomically every epoch)
    metrics.jsonl   one JSON line per finished epoch
    files.json      the training images as the run started: their paths (relative to data_dir), sizes and
                    mtimes, or only their number for data without files (written once; :func:`write_file_list`)
    labels.csv      the final self-labels: path (or index) and one column per head
    summary.json    the final evaluation and the run's totals
    curves.png, cluster_sizes.png, clusters.png   plots
    .lock           held (an OS lock) while a training process writes into the directory

The checkpoint is a dict of tensors and plain containers, loaded with ``torch.load(weights_only=True)``
only: a file that needs more (arbitrary pickled objects, which could run code) is refused. Its schema
(``format`` 2)::

    format              2
    model_spec          {"arch": name, "n_clusters": [...], **constructor keyword arguments}
    model, optimizer    state dicts
    labels              (H, N) int64; scalings: H (K_h,) float64 or None; label_updates_done: int
    epoch               epochs finished
    plan                {"epochs", "lr_anchor", "label_steps", "label_epochs", "epoch_times"}
    config              the resolved configuration (so that a checkpoint file alone can be evaluated)
    rng                 {"torch": the CPU generator's state}

Format 1 (sela before the format number) is the same without ``format`` and ``model_spec``; it still
resumes and evaluates. Every write goes to a temporary file first and is renamed into place, so a kill
or a full disk never leaves half a file: the previous version stays.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import importlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LABELS = "labels.csv"
FILES = "files.json"
SKIPPED = "skipped.txt"  # the training images left out as unreadable, one "PATH (reason)" a line
SUMMARY = "summary.json"
LOCK = ".lock"
FORMAT_VERSION = 2
_SELA_KEYS = ("model", "optimizer", "labels", "epoch")  # what every sela training checkpoint holds
# numpy's array reconstruction, allowed inside the weights-only unpickler: it builds arrays of plain
# dtypes and calls nothing else (object arrays still need pickle and are refused)
_NUMPY_ARRAYS = [
    importlib.import_module(
        "numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray"
    )._reconstruct,
    np.ndarray,
    np.dtype,
    *{type(np.dtype(t)) for t in ("int64", "int32", "float32", "float64", "uint8", "bool")},
]


class RunWriteError(ValueError):
    """A file of the run could not be written (full disk, read-only directory); the previous version
    of it is kept."""


# ------------------------------------------------------------------------------------------ writing files


def _describe_write_error(e: OSError, path: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"the disk is full: could not write {path}; free some space and --resume (the previous version is kept)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"could not write {path}: the directory is read-only ({e.strerror}); the previous version is kept"
        )
    return f"could not write {path} ({e.strerror or e}); the previous version is kept"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(tmp_path)`` and rename it into place; on an OSError remove the
    temporary file and raise :class:`RunWriteError` naming the file (the old file stays as it was).
    Whatever the failure (an interrupt too), no temporary file is left behind."""
    return atomic_write_all({path: write})[0]


def atomic_write_all(writers: dict[str | os.PathLike, Callable[[Path], None]]) -> list[Path]:
    """Write several files that belong together (an array and its paths): each through ``write(tmp)``;
    only when all of them are written are they renamed into place. A failure removes every temporary
    file and leaves the old files as they were; it raises :class:`RunWriteError` naming the file."""
    # the temporary name keeps the suffix, so that writers which pick the format by it (savefig, PIL) work
    tmps = {Path(p): Path(p).with_name(f"{Path(p).stem}.tmp{Path(p).suffix}") for p in writers}
    current = next(iter(tmps))
    try:
        for (path, tmp), write in zip(tmps.items(), writers.values(), strict=True):
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
        for path, tmp in tmps.items():
            current = path
            os.replace(tmp, path)
    except OSError as e:
        raise RunWriteError(_describe_write_error(e, current)) from None
    except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError, by its text only
        text = str(e)
        if any(s in text for s in ("not permitted", "Permission denied", "Read-only")):
            raise RunWriteError(_describe_write_error(OSError(errno.EACCES, "read-only"), current)) from None
        if any(s in text for s in ("No space", "unexpected pos", "write", "failed")):
            raise RunWriteError(_describe_write_error(OSError(errno.ENOSPC, "no space"), current)) from None
        raise
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return list(tmps)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that reached the command line: whether a read or a write failed, and the
    file. sela's own writes go through :func:`atomic_write` (a :class:`RunWriteError`), so another error
    is a read unless its errno is one only writes give, or the file it names does not exist."""
    name = e.filename or e.filename2
    what = e.strerror or type(e).__name__
    if e.errno is None and str(e).strip():  # raised by sela with its own message
        return str(e).strip().splitlines()[0]
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: could not write {name or 'a file'}"
    if name is None:
        return f"{what} (reading or writing a file)"
    writing = e.errno in (errno.EROFS, errno.EFBIG) or (
        e.errno in (errno.EACCES, errno.EPERM) and not os.path.lexists(name)
    )
    return f"could not {'write' if writing else 'read'} {name}: {what}"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file ({} when absent); a ValueError when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); it was not written by sela, or was cut short"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(out_dir: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``ckpt`` (the schema above, ``format`` added) as ``out_dir/checkpoint.pt``, atomically."""
    ckpt = {"format": FORMAT_VERSION, **ckpt}
    return atomic_write(Path(out_dir) / CHECKPOINT, lambda tmp: torch.save(ckpt, tmp))


def load_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only.

    Raises:
        ValueError: one line saying why: an empty, truncated or non-PyTorch file, or one that holds
            other objects (which sela refuses to unpickle: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is an empty file, not a {what}")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):  # plain numpy arrays (released SeLa labels)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "global" not in str(e):
            raise ValueError(f"{path} is not a readable PyTorch {what} ({str(e).splitlines()[0]})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path} holds Python objects other than tensors and plain containers{detail}; sela loads "
            f"{what}s with weights_only=True and refuses it, since unpickling it could run code"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable PyTorch {what} ({first})") from None


def checkpoint_format(ckpt: Any) -> int | None:
    """The sela checkpoint format of a loaded file: 2, 1 (before the format number), or None (not sela:
    a sela checkpoint holds the weights under ``model`` and its configuration under ``config``)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        return None
    if not isinstance(ckpt.get("config"), dict) and "format" not in ckpt:
        return None
    version = ckpt.get("format", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A sela training checkpoint, for ``--resume``; a ValueError for a foreign or newer file."""
    ckpt = load_file(path)
    version = checkpoint_format(ckpt)
    if version is None or not all(k in ckpt for k in _SELA_KEYS):
        raise ValueError(
            f"{path} is not a sela training checkpoint (it lacks {', '.join(_SELA_KEYS)}); --resume takes "
            "the checkpoint.pt of a `sela train` run"
        )
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {version}, newer than this sela reads; upgrade sela")
    return ckpt


# ------------------------------------------------------------------------------------------ metrics


def append_metrics(out_dir: str | os.PathLike, stats: dict) -> None:
    """Append one epoch's line to metrics.jsonl."""
    path = Path(out_dir) / METRICS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(stats) + "\n")
    except OSError as e:
        raise RunWriteError(_describe_write_error(e, path)) from None


def read_metrics(out_dir: str | os.PathLike) -> list[dict]:
    """The epoch lines of metrics.jsonl ([] when absent); a line cut short by a crash is skipped."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [m for m in lines if isinstance(m, dict) and "epoch" in m]


def truncate_metrics(out_dir: str | os.PathLike, epoch: int) -> list[dict]:
    """Keep the lines of epochs 1..``epoch`` (the checkpoint's), each once, the last written; rewritten
    atomically. A resumed run repeats the epochs after its checkpoint, so their old lines go."""
    kept: dict[int, dict] = {}
    for m in read_metrics(out_dir):
        if m["epoch"] <= epoch:
            kept[m["epoch"]] = m
    lines = [kept[e] for e in sorted(kept)]
    text = "".join(json.dumps(m) + "\n" for m in lines)
    atomic_write(Path(out_dir) / METRICS, lambda tmp: tmp.write_text(text))
    return lines


# ------------------------------------------------------------------------------------------ labels CSV


@dataclass
class LabelTable:
    """The contents of a labels CSV.

    Attributes:
        ids: the first column of each row (a path, or an index as text).
        id_column: ``"path"`` or ``"index"``.
        labels: (H, N) int64 clusters.
        confidence: (H, N) float32 confidences, or None when the file has none.
    """

    ids: list[str]
    id_column: str
    labels: Tensor
    confidence: Tensor | None = None


def write_labels_csv(
    path: str | os.PathLike,
    labels: Tensor,
    *,
    paths: list[str] | None = None,
    confidence: Tensor | None = None,
) -> Path:
    """Write (H, N) labels (and (H, N) confidences in 0..1) as CSV, one row per image: ``path`` (or
    ``index``), ``head0`` .. ``head{H-1}``, then ``confidence0`` ..; atomically. Returns the path."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, N), got shape {tuple(labels.shape)}")
    h, n = labels.shape
    if paths is not None and len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} labels; pass one path per image")
    if confidence is not None and tuple(confidence.shape) != (h, n):
        raise ValueError(f"confidence must be (H, N) = ({h}, {n}), got {tuple(confidence.shape)}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a file name for the labels CSV, e.g. {path / LABELS}")
    header = ["path" if paths is not None else "index"] + [f"head{i}" for i in range(h)]
    if confidence is not None:
        header += [f"confidence{i}" for i in range(h)]
    cols = labels.t().tolist()  # (N, H)
    conf = confidence.t().tolist() if confidence is not None else None  # (N, H)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", errors="surrogateescape") as f:
            out = csv.writer(f)
            out.writerow(header)
            for i, row in enumerate(cols):
                extra = [f"{c:.4f}" for c in conf[i]] if conf is not None else []
                out.writerow([paths[i] if paths is not None else i, *row, *extra])

    return atomic_write(path, write)


def read_labels_csv(path: str | os.PathLike) -> LabelTable:
    """Read a labels CSV written by :func:`write_labels_csv` (``sela train``, ``sela labels``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a labels CSV written by `sela labels`")
    with open(path, newline="", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] not in (["path"], ["index"]):
        raise ValueError(f"{path} is not a sela labels CSV (its header must start with path or index)")
    header = rows[0]
    heads = [i for i, name in enumerate(header) if name.startswith("head")]
    confs = [i for i, name in enumerate(header) if name.startswith("confidence")]
    if not heads or (confs and len(confs) != len(heads)):
        raise ValueError(f"{path} has no head0.. columns, or not one confidence column per head")
    body = rows[1:]
    try:
        labels = torch.tensor([[int(r[i]) for r in body] for i in heads], dtype=torch.int64)
        confidence = (
            torch.tensor([[float(r[i]) for r in body] for i in confs], dtype=torch.float32) if confs else None
        )
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path} has a malformed row ({e}); rewrite it with `sela labels`") from None
    return LabelTable([r[0] for r in body], header[0], labels.reshape(len(heads), len(body)), confidence)


# ------------------------------------------------------------------------------------------ the lock


class RunLock:
    """An exclusive OS lock (``flock``) on ``out_dir/.lock`` for a training run's lifetime.

    The kernel releases it when the process ends, however it ends (a kill -9 leaves no stale lock). The
    file records the holder's pid, so that a second run into the directory is refused naming it.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def holder(self) -> str | None:
        """The pid of the process that holds the lock now, or None (creates nothing)."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # also drops the shared lock taken by the probe
        return None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"{self.path.parent} is in use by another sela train (pid {holder}); wait for it to finish "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ the file list


@dataclass
class FileList:
    """The training images of a run: N, the data folder, and each file's path (relative to ``data_dir``
    when it lies below it, else absolute), size (bytes) and mtime (ns); ``files`` is None for data
    without files (the embedded digits, CIFAR pickles), which are known by index and N only."""

    n: int
    data_dir: str | None = None
    files: list[tuple[str, int, int]] | None = None

    @classmethod
    def of(cls, paths: list[str] | None, n: int, data_dir: str | None) -> FileList:
        """The file list of ``paths`` (one per image, in the images' order) as the disk holds them now."""
        if paths is None:
            return cls(n, data_dir)
        return cls(n, data_dir, [(_relative(p, data_dir), *_stat(p)) for p in paths])


def _relative(path: str, root: str | None) -> str:
    full = os.path.abspath(path)
    if root:
        base = os.path.abspath(root)
        if full == base or full.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(full, base)
    return full


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1  # gone since the scan: matched by path, reported as modified
    return st.st_size, st.st_mtime_ns


def write_file_list(out_dir: str | os.PathLike, record: FileList) -> Path:
    """Write ``out_dir/files.json`` (one JSON object, atomically): ``{"format": 1, "n", "data_dir",
    "files": [[path, size, mtime_ns], ...] or null}``."""
    data = {"format": 1, "n": record.n, "data_dir": record.data_dir, "files": record.files}
    text = json.dumps(data, separators=(",", ":"))  # ASCII: undecodable names stay \\udcXX escapes
    return atomic_write(Path(out_dir) / FILES, lambda tmp: tmp.write_text(text))


def write_skipped(out_dir: str | os.PathLike, skipped: list[str]) -> Path | None:
    """Write ``out_dir/skipped.txt``: every file the run's reader left out as unreadable, one "PATH
    (reason)" a line (a newline inside a name is written as ``\\n``); None (and no file) when none was."""
    if not skipped:
        return None
    text = "".join(entry.replace("\n", "\\n") + "\n" for entry in skipped)
    return atomic_write(Path(out_dir) / SKIPPED, lambda tmp: tmp.write_text(text, errors="surrogateescape"))


def read_file_list(out_dir: str | os.PathLike) -> FileList | None:
    """The run's recorded file list, or None when it has none (a run of sela before files.json)."""
    path = Path(out_dir) / FILES
    if not path.is_file():
        return None
    data = read_json(path)
    files = data.get("files")
    if not isinstance(data.get("n"), int) or not (files is None or isinstance(files, list)):
        raise ValueError(f"{path} is not a sela file list; it was not written by sela, or was damaged")
    return FileList(data["n"], data.get("data_dir"), None if files is None else [tuple(f) for f in files])


@dataclass
class FileMatch:
    """How the training images as they are now map to a run's recorded ones.

    Attributes:
        rows: (N_now,) int64: for each image now, its index in the recorded list, or -1 for a file added
            since; None when the two cannot be matched (no paths, and N differs).
        added, removed, modified: paths (as recorded) of files added, removed, and present in both with
            another size or mtime.
        n_then, n_now: the two numbers of images.
    """

    rows: Tensor | None
    added: list[str]
    removed: list[str]
    modified: list[str]
    n_then: int
    n_now: int

    @property
    def same(self) -> bool:
        """The same files in the same order (modified contents aside)."""
        return self.rows is not None and bool(torch.equal(self.rows, torch.arange(self.n_now)))

    def describe(self) -> str:
        """What changed, in one clause: counts and a first example of each."""
        if self.rows is None:
            return f"{self.n_then} images when the run was trained, {self.n_now} now"
        parts = [
            f"{len(names)} {what}" + (f" (e.g. {names[0]})" if names else "")
            for names, what in ((self.added, "added"), (self.removed, "removed"), (self.modified, "modified"))
            if names
        ]
        if not parts:
            parts = ["the same files in another order"]
        return ", ".join(parts)


def match_files(recorded: FileList, now: FileList) -> FileMatch:
    """Match the images as they are now to a run's recorded ones by path (by index without paths)."""
    if recorded.files is None or now.files is None:
        rows = torch.arange(now.n) if recorded.n == now.n else None
        return FileMatch(rows, [], [], [], recorded.n, now.n)
    then = {f[0]: i for i, f in enumerate(recorded.files)}
    rows = torch.tensor([then.get(f[0], -1) for f in now.files], dtype=torch.int64)  # (N_now,)
    present = {f[0] for f in now.files}
    added = [f[0] for f in now.files if f[0] not in then]
    removed = [f[0] for f in recorded.files if f[0] not in present]
    modified = [
        f[0] for f in now.files if f[0] in then and tuple(recorded.files[then[f[0]]][1:]) != tuple(f[1:])
    ]
    return FileMatch(rows, added, removed, modified, recorded.n, now.n)


def is_run_dir(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a sela run (its checkpoint, or a config.json that sela wrote: a run
    stopped before its first epoch)."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT).exists():
        return True
    try:
        return "_version" in read_json(out_dir / CONFIG)
    except (ValueError, OSError):
        return False
