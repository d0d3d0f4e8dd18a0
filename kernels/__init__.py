"""Fused kernels for the learned-optimizer step.

* :mod:`kernels.lo_step_reference`: the PyTorch reference with the kernels' exact semantics (equal to
  ``optimizers.learned``), structured in the kernels' phases. Pure torch; always importable.
* :mod:`kernels.lo_step_triton`: the Triton kernels and the ``lo_step`` wrapper (imports triton).
* :mod:`kernels.lo_step_backward`: the Triton backward of the step (gradients w.r.t. theta and every input).
* :mod:`kernels.lo_step_autograd`: ``lo_step_autograd``, a ``torch.autograd.Function`` around the step
  (Triton or reference forward; Triton backward or the *reference backward*, recomputation +
  ``torch.autograd.grad``).
* :mod:`kernels.lo_step_population`: P members under P weight sets (ES / PES) in one set of launches.
* :mod:`kernels.lo_step_common`: what the three Triton modules share (layouts, Triton building blocks,
  host tables).

The specification they implement (config, feature table, accumulator rules) is
:mod:`optimizers.lo_spec`, the one module of ``optimizers`` that ``kernels`` imports. The optimizers do
not import this package: they reach the fused step through :data:`STEP_BACKEND`, which provides the
specification's ``StepBackend`` interface and which ``optimizers.lo_spec.step_backend`` loads by name
(the one seam between the two packages). The tools around
the kernels live beside the other benchmarks: ``bench/bench_lo_step.py`` (CUDA benchmark, also
``python train.py bench-kernels``), ``bench/check_lo_step.py`` (compiled kernels against the reference on
a GPU; ``--record`` writes :data:`GPU_CHECKS`) and ``bench/compile_check.py`` (compile every variant
without a GPU).

Importing this package does not import triton; :func:`use_kernels` does, once, when asked, and the
step functions of :data:`STEP_BACKEND` import the Triton modules when they are called.
Dispatch: ``LearnedOptimizer.bind(theta, kernels=None|True|False, precision=...)`` and
``LearnedOptimizerTorch(..., kernels=..., kernel_precision=...)`` use the fused step where
:func:`use_kernels` (or the explicit flag) allows it and the step runs under no torch.func transform or
``torch.compile``; under autograd ``update`` runs the differentiable step (Triton forward + backward).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: importing this package loads nothing of optimizers
    from optimizers.lo_spec import LOConfig

Tensors = dict[str, Tensor]

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


def triton_interpreted() -> bool:
    """Whether Triton runs through its interpreter in this process: ``TRITON_INTERPRET`` is set, or
    triton was imported while it was. Triton decides when a function is decorated (its own library
    functions at import), so unsetting the variable later does not bring the compiler back; the tests
    set it only around their kernel imports and tests (``tests/triton_interpreter.py``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    tl = sys.modules.get("triton.language")
    return type(getattr(getattr(tl, "standard", None), "sum", None)).__name__ == "InterpretedFunction"


# Device classes on which the compiled kernels passed `python bench/check_lo_step.py --record`
# (committed with the repository): only there does the automatic choice use them.
GPU_CHECKS = Path(__file__).with_name("gpu_checks.json")


def recorded_checks() -> dict[str, dict]:
    """``{device name: record}`` of passing GPU checks (empty when none was recorded)."""
    return _read_checks(str(GPU_CHECKS))


@functools.lru_cache(maxsize=4)
def _read_checks(path: str) -> dict[str, dict]:  # read once per process: dispatch asks every step
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    return {name: rec for name, rec in data.get("devices", {}).items() if rec.get("passed") is True}


def kernel_decision(device: torch.device | str | None) -> tuple[bool, str]:
    """``(use the fused Triton step on device, why)``.

    Default: on a CUDA device whose name has a recorded passing check (:data:`GPU_CHECKS`, written by
    ``python bench/check_lo_step.py --record`` on that device), when triton imports and
    ``TRITON_INTERPRET`` is not set (under the interpreter every launch would run in Python); elsewhere
    the PyTorch step. Why a record: kernels that never ran on a device class are not trusted by
    default. ``OUROBOROS_KERNELS=0`` turns the kernels off everywhere; ``OUROBOROS_KERNELS=1`` turns
    them on wherever triton imports (on a CPU only together with ``TRITON_INTERPRET=1``, as the tests
    run them). Any other value of the variable is an error, so a typo does not silently change what runs.
    """
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False, f"{ENV}={os.environ[ENV]}"
    if env not in ("", "1", "true", "on", "yes"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 0 or 1 (or leave it unset)")
    if not triton_available():
        return False, "triton is not importable"
    if env:
        return True, f"{ENV}={os.environ[ENV]}"
    if device is None:
        return False, "no device"
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "TRITON_INTERPRET is set (interpreted launches are for tests)"
    if triton_interpreted():
        return False, "triton was imported under TRITON_INTERPRET in this process (interpreted launches are for tests)"
    if device.type != "cuda":
        return False, f"{device.type} device (the kernels are for CUDA; {ENV}=1 with TRITON_INTERPRET=1 to test)"
    try:
        name = torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError) as e:  # no usable CUDA here
        return False, f"cannot query {device}: {e}"
    if name not in recorded_checks():
        return False, (f"no recorded passing GPU check for {name!r} in {GPU_CHECKS.name} (run "
                       f"`python bench/check_lo_step.py --record` on it, or {ENV}=1 to use them anyway)")
    return True, f"{name!r} passed the GPU check ({GPU_CHECKS.name})"


def kernel_refusal(requested: bool | None, device: torch.device) -> str | None:
    """None when the Triton kernels may run on ``device`` given the caller's ``kernels`` setting
    (``requested``: None = automatic, :func:`kernel_decision`; True = wherever they can run; False =
    never), else why not. The whole policy lives in this package so that every front end
    (``BoundLearnedOptimizer``, the ``torch.optim`` drop-in) decides alike."""
    if requested is None:
        use, why = kernel_decision(device)
        return None if use else f"kernels not chosen for {device}: {why}"
    if not requested:
        return "kernels=False"
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return f"{ENV}=0"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return f"device {device} needs TRITON_INTERPRET=1"
    if not triton_available():
        return "triton not importable"
    return None


def use_kernels(device: torch.device | str | None) -> bool:
    """Whether the fused Triton step should be used for tensors on ``device`` (:func:`kernel_decision`)."""
    return kernel_decision(device)[0]


def describe_step_path(device: torch.device | str) -> str:
    """One log line: which learned-optimizer step a run on ``device`` uses, and why."""
    use, why = kernel_decision(device)
    return f"learned-optimizer step: {'fused Triton kernels' if use else 'PyTorch'} ({why})"


class KernelStepBackend:
    """The fused step as the optimizers see it (``optimizers.lo_spec.StepBackend``): the dispatch policy
    (:func:`kernel_refusal`), the kernels' support check and the two steps. Each function imports its
    Triton module when called and looks the function up there, so importing this package stays free of
    triton, and a step patched on its module (as the tests' spies do) is the one that runs."""

    def refusal(self, requested: bool | None, device: torch.device) -> str | None:
        return kernel_refusal(requested, device)

    def unsupported(self, cfg: LOConfig, params: Tensors, grads: Tensors | None = None,
                    state: dict | None = None) -> str | None:
        from kernels import lo_step_common

        return lo_step_common.unsupported(cfg, params, grads, state)

    def step(self, params: Tensors, grads: Tensors, state: dict, theta: Tensors, cfg: LOConfig, *,
             precision: str = "ieee", inplace: bool = False) -> tuple[Tensors, dict]:
        from kernels import lo_step_triton

        return lo_step_triton.lo_step(params, grads, state, theta, cfg, precision=precision, inplace=inplace)

    def step_autograd(self, params: Tensors, grads: Tensors, state: dict, theta: Tensors, cfg: LOConfig, *,
                      forward: str = "reference", backward: str = "auto",
                      precision: str = "ieee") -> tuple[Tensors, dict]:
        from kernels import lo_step_autograd

        return lo_step_autograd.lo_step_autograd(params, grads, state, theta, cfg, forward=forward,
                                                 backward=backward, precision=precision)


# what optimizers.lo_spec.step_backend() returns
STEP_BACKEND = KernelStepBackend()


__all__ = ["use_kernels", "kernel_decision", "kernel_refusal", "describe_step_path", "recorded_checks",
           "triton_available", "triton_interpreted",
           "ENV", "GPU_CHECKS", "KernelStepBackend", "STEP_BACKEND"]
