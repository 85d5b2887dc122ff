"""Run ``sela ARGS`` with a fault injected into its checkpoint writes: ``python inject_faults.py ARGS``.

Every ``torch.save`` after the first ``SELA_FAULT_AFTER`` (default 1) fails the way ``SELA_FAULT`` says:

  * ``enospc``: half of the file is written, then ``OSError(ENOSPC)`` (a disk that fills up mid-write);
  * ``erofs``: ``OSError(EROFS)`` before anything is written (the file system went read-only);
  * ``stall``: half of the file is written, then the process sleeps, so that a test can kill it in the
    middle of a checkpoint write.

When the fault fires the file ``SELA_FAULT_SIGNAL`` (if set) is created, so a test can wait for it.
"""

import errno
import io
import os
import sys
import time
from pathlib import Path

import torch


def _write_half(data: bytes, f) -> None:
    if isinstance(f, str | os.PathLike):
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
    else:
        f.write(data[: len(data) // 2])
        f.flush()


def _faulty_save(fault: str, after: int, signal: str | None):
    real_save = torch.save
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls <= after:
            return real_save(obj, f, *args, **kwargs)
        if signal:
            Path(signal).touch()
        name = os.fspath(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", "<file>")
        if fault == "erofs":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        _write_half(buffer.getvalue(), f)
        if fault == "stall":
            time.sleep(600)  # until the test kills this process
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    return save


def main() -> int:
    fault = os.environ["SELA_FAULT"]
    if fault not in ("enospc", "erofs", "stall"):
        raise SystemExit(f"SELA_FAULT must be enospc, erofs or stall, got {fault!r}")
    torch.save = _faulty_save(
        fault, int(os.environ.get("SELA_FAULT_AFTER", "1")), os.environ.get("SELA_FAULT_SIGNAL")
    )
    from sela.cli import main as sela_main

    sys.argv = ["sela", *sys.argv[1:]]
    return sela_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
