"""Shared test setup. Tiny tensors: one torch thread is faster and avoids oversubscribing CI's 2 cores."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
