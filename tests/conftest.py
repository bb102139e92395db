"""Fixtures shared by test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is many times faster than several on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
