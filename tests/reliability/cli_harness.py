"""Running ``sela`` the way a user does (a subprocess, or ``sela.cli.main`` in this process) and reading what
it leaves: exit code, stdout, stderr, the run directory's files.

The reliability tests only look at these, never at sela's internals, so they hold while the modules behind
the command line change.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sela

SRC = Path(sela.__file__).resolve().parents[1]  # the sela under test, for subprocesses
HERE = Path(__file__).resolve().parent

# A tiny digits run: fp32 on the CPU so that two runs with one seed give the same labels, a narrow net,
# 3 short epochs (about 0.2 s each on one thread).
EPOCHS = 3
TINY = [
    "--epochs",
    str(EPOCHS),
    "--label-updates",
    "3",
    "--heads",
    "1",
    "--clusters",
    "10",
    "--set",
    "widths=[8,16]",
    "--batch-size",
    "256",
    "--precision",
    "fp32",
    "--device",
    "cpu",
    "--seed",
    "0",
    "--no-progress",
]
INJECT = [str(HERE / "inject_faults.py")]  # wrapper= for run_sela/start_sela: faults in checkpoint writes
RUN_TIMEOUT_S = 300  # a safety net against a hung process, not a measurement


@dataclass
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        last = ([line for line in self.err.splitlines() if line.strip()] or ["(nothing)"])[-1]
        return (
            f"exit {self.code}, stderr ends: {last[:300]}\n"
            f"--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"
        )


def sela_env(**extra: str) -> dict[str, str]:
    """The environment of a sela subprocess: this sela first on the path, one thread per op (the tests
    share a small CPU, and one thread keeps runs fast and reproducible)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def sela_command(args: list[str], wrapper: list[str] | None = None) -> list[str]:
    """``python -m sela ARGS``, or ``python WRAPPER... ARGS`` for a script that runs sela (fault injection)."""
    return [sys.executable, *(wrapper or ["-m", "sela"]), *map(str, args)]


def run_sela(args: list[str], cwd: Path, *, wrapper: list[str] | None = None, **env: str) -> Result:
    """Run ``sela ARGS`` in a subprocess to its end."""
    done = subprocess.run(
        sela_command(args, wrapper),
        cwd=cwd,
        env=sela_env(**env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def start_sela(
    args: list[str], cwd: Path, *, wrapper: list[str] | None = None, **env: str
) -> subprocess.Popen:
    """Start ``sela ARGS`` in a subprocess; finish it with ``finish``."""
    return subprocess.Popen(
        sela_command(args, wrapper),
        cwd=cwd,
        env=sela_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> Result:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return Result(proc.returncode, out, err)


def kill9(proc: subprocess.Popen) -> Result:
    """``kill -9`` the process (if it still runs); what it had printed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    return finish(proc)


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, poll_s: float = 0.005) -> bool:
    """Poll ``condition`` until it holds (True) or ``proc`` has exited first (False)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(poll_s)
    raise TimeoutError(f"gave up waiting after {RUN_TIMEOUT_S} s: {proc.args}")


def call_sela(args: list[str]) -> Result:
    """Run ``sela.cli.main(ARGS)`` in this process; an exception that escapes it is reported as a
    traceback on stderr with exit code 1, as the ``sela`` command would show it."""
    from sela.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return Result(int(code), out.getvalue(), err.getvalue())


def error_line(result: Result, code: int = 2) -> str:
    """Assert that sela failed the way the issue asks: ``code``, no traceback and one ``sela: error:`` line
    on stderr (besides sela's own warnings and notes); returns that line."""
    assert result.code == code, f"expected exit {code}: {result}"
    assert "Traceback" not in result.err, str(result)
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("sela: error:")]
    others = [
        line for line in lines if not line.startswith(("sela: error:", "sela: warning:", "sela: note:"))
    ]
    assert len(errors) == 1 and not others, f"expected one 'sela: error:' line: {result}"
    return errors[0]


def metrics_epochs(run: Path) -> list[int]:
    """The epoch of each line of ``run/metrics.jsonl`` (a torn last line, as a kill can leave, is skipped)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    epochs = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            epochs.append(json.loads(line)["epoch"])
    return epochs


def leftover_tmp(folder: Path) -> list[str]:
    """Temporary files an interrupted write left behind (``*.tmp``, ``*.tmp1234``)."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)
