"""Shared test fixtures."""

import pytest
import torch

from sela.data import ImageSet, load_dataset


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread: their tensors are small, and on a shared, oversubscribed
    CPU the OpenMP threads cost far more than they save (use with ``pytest.mark.usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_set():
    """240 digits at 8 px, for tiny training runs (tests/test_train.py, tests/test_objectives.py)."""
    full = load_dataset("digits", split="train")
    idx = torch.arange(240)
    return ImageSet(
        images=full.images[idx],
        targets=full.targets[idx],
        classes=full.classes,
        name="digits",
        mean=full.mean,
        std=full.std,
    )
