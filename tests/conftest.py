"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread: their tensors are small, and on a shared, oversubscribed
    CPU the OpenMP threads cost far more than they save (use with ``pytest.mark.usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
