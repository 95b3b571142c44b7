"""Fixtures shared by several test modules (data paths and the parity criterion live in helpers.py)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are many small kernels: OpenMP fork/join dominates and degrades badly on a shared 2-core
    machine, so modules that use this run single-threaded (the thread count is restored afterwards)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def no_grad():
    """Autograd off while one module's forward-only tests run, and back on afterwards (a module-level
    ``torch.set_grad_enabled(False)`` would switch it off for every module collected after it)."""
    with torch.no_grad():
        yield
