"""Fused kernels for the learned-optimizer step.

* :mod:`kernels.lo_step_reference`: the PyTorch reference with the kernels' exact semantics (equal to
  ``optimizers.learned``), structured in the kernels' phases. Pure torch; always importable.
* :mod:`kernels.lo_step_triton`: the Triton kernels and the ``lo_step`` wrapper (imports triton).
* :mod:`kernels.lo_step_backward`: the Triton backward of the step (gradients w.r.t. theta and every input).
* :mod:`kernels.lo_step_autograd`: ``lo_step_autograd``, a ``torch.autograd.Function`` around the step
  (Triton or reference forward; Triton backward or the *reference backward*, recomputation +
  ``torch.autograd.grad``).
* :mod:`kernels.lo_step_population`: P members under P weight sets (ES / PES) in one set of launches.
* :mod:`kernels.bench_lo_step`: CUDA benchmark (forward: eager / compiled reference, Triton, fused AdamW;
  backward; population), also ``python train.py bench-kernels``.

Importing this package does not import triton; :func:`use_kernels` does, once, when asked.
Dispatch: ``LearnedOptimizer.bind(theta, kernels=None|True|False, precision=...)`` and
``LearnedOptimizerTorch(..., kernels=..., kernel_precision=...)`` use the fused step where
:func:`use_kernels` (or the explicit flag) allows it and the step runs under no torch.func transform or
``torch.compile``; under autograd ``update`` runs the differentiable step (Triton forward + backward).
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "OUROBOROS_KERNELS"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (cached: the import is slow)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def use_kernels(device: torch.device | str | None) -> bool:
    """Whether the fused Triton step should be used for tensors on ``device``.

    Default: True on CUDA devices when triton imports and ``TRITON_INTERPRET`` is not set (under the
    interpreter every launch would run in Python, e.g. after ``tests/test_kernels.py`` switched the
    test process to it), else False. ``OUROBOROS_KERNELS=0`` turns the kernels off everywhere;
    ``OUROBOROS_KERNELS=1`` turns them on wherever triton imports (on a CPU that only works together
    with ``TRITON_INTERPRET=1``, which is how the tests run them). Any other value of the variable is an
    error, so a typo does not silently change what runs.
    """
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env not in ("", "1", "true", "on", "yes"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 0 or 1 (or leave it unset)")
    if not triton_available():
        return False
    if env:
        return True
    if device is None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return torch.device(device).type == "cuda"


__all__ = ["use_kernels", "triton_available", "ENV"]
