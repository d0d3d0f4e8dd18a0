"""Shared test setup. Tiny tensors: one torch thread is faster and avoids oversubscribing CI's 2 cores.

Tests marked ``triton_interpreter`` (the kernel tests) run with ``TRITON_INTERPRET=1`` set for their own
duration only (``tests/triton_interpreter.py`` says why), so no test changes the environment of the
tests that follow it in the same process.
"""

import os

import pytest
import torch

from triton_interpreter import ENV, interpreter

_ENV_AT_START = os.environ.get(ENV)  # what every test outside the marker must see


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton_interpreter: run with TRITON_INTERPRET=1 (set for the test, restored after)")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _triton_interpreter(request):
    if request.node.get_closest_marker("triton_interpreter") is None:
        # a guard: a test (or a test module's import) that left the variable changed would otherwise
        # switch the kernel dispatch of every later test silently
        assert os.environ.get(ENV) == _ENV_AT_START, (
            f"{ENV} changed from {_ENV_AT_START!r} to {os.environ.get(ENV)!r} by an earlier test or test "
            f"module: set it through the triton_interpreter marker (tests/triton_interpreter.py)")
        yield
        return
    with interpreter():
        yield
