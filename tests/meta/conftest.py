"""metaopt.meta tests run single-threaded: their tensors are tiny, and thread
synchronisation on a shared 2-core machine costs more than the arithmetic."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
