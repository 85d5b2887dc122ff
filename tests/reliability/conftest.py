"""One tiny trained digits run for the whole session (the tests that need a run copy it), and the sela
command's harness (``cli_harness``)."""

import shutil
from pathlib import Path

import pytest
from cli_harness import TINY, run_sela


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished ``sela train --out RUN`` with the ``TINY`` settings. Read-only: copy it with ``run_copy``.
    Its labels.csv is also the uninterrupted reference of the crash tests."""
    base = tmp_path_factory.mktemp("trained")
    run = base / "run"
    result = run_sela(["train", "--out", run, *TINY], cwd=base)
    assert result.code == 0 and (run / "labels.csv").is_file(), f"the shared tiny run failed: {result}"
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared trained run."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
