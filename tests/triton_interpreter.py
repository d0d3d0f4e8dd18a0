"""Triton's CPU interpreter for the kernel tests, set where they need it and restored afterwards.

Triton decides between interpreter and compiler when a function is decorated, its own library
functions (``tl.sum``, ...) included, so ``TRITON_INTERPRET=1`` must be set when triton and the kernel
modules are first imported. It need not stay set: :func:`load_kernels` sets it only around those imports
(the kernels are interpreted from then on), and the ``triton_interpreter`` marker (``tests/conftest.py``)
sets it, and the backport below where this triton needs it, only for the duration of each marked test,
since the project's dispatch (``kernels.kernel_refusal``) asks for the variable before it runs kernels on
a CPU. Every other test in the same pytest process sees the environment and triton's interpreter as
they were. (Triton itself stays imported in interpreter mode for the rest of the process: a module
cannot be un-imported; ``kernels.kernel_decision`` refuses the kernels where that is so, and the checks
of the compiled kernels run in subprocesses: ``tests/test_kernels_cuda.py``.)
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Callable, Iterator

ENV = "TRITON_INTERPRET"
# the kernel modules that define Triton functions: imported (interpreted) by load_kernels
KERNEL_MODULES = ("kernels.lo_step_common", "kernels.lo_step_triton", "kernels.lo_step_backward")

_needs_backport = False  # set by load_kernels when this triton's interpreter needs it


@contextlib.contextmanager
def _env(value: str) -> Iterator[None]:
    old = os.environ.get(ENV)
    os.environ[ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def _interpreter_defect(triton, tl) -> str | None:
    """Why this triton's interpreter cannot run the kernels at all, or None. A defect outside this project
    becomes one skip reason that says what to change, instead of every kernel test failing with it.

    Known: triton <= 3.6 turns a loaded scalar into a loop bound with ``int()`` of a one-element NumPy
    array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars";
    triton 3.7 squeezes first; :func:`_backport_scalar_index` does the same). Every kernel here loops to a
    bound read from memory. The compiled kernels are unaffected (``python bench/compile_check.py``
    and ``bench/check_lo_step.py``)."""
    import torch

    @triton.jit
    def probe(n_ptr, out_ptr):
        total = 0
        for i in range(0, tl.load(n_ptr)):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](torch.tensor([4], dtype=torch.int32), out)
    except Exception as e:  # noqa: BLE001
        import numpy

        return (f"triton {triton.__version__}'s interpreter cannot loop to a bound loaded from memory with "
                f"numpy {numpy.__version__} ({e!r}); use triton >= 3.7, or numpy < 2.4 with triton <= 3.6")
    if int(out) != 0 + 1 + 2 + 3:
        return f"triton {triton.__version__}'s interpreter computed a loop sum of {int(out)}, not 6"
    return None


def _backport_scalar_index() -> Callable[[], None] | None:
    """Give triton <= 3.6's interpreter triton 3.7's ``tensor.__index__`` (squeeze, then ``int()``), so the
    kernel tests also run with the triton that torch 2.11 pins and a current NumPy. Test-only: it patches
    a private function, hence the probe before and after. Returns the function that undoes it (None when
    nothing was patched)."""
    import triton.runtime.interpreter as ti

    original = getattr(ti, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ouroboros_backport", False):
        return None

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._ouroboros_backport = True
    ti._patch_lang_tensor = patched

    def undo() -> None:
        ti._patch_lang_tensor = original

    return undo


@contextlib.contextmanager
def interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` and (where needed) the backport, for the duration of the block only."""
    with _env("1"):
        undo = _backport_scalar_index() if _needs_backport else None
        try:
            yield
        finally:
            if undo is not None:
                undo()


def load_kernels() -> tuple[dict[str, ModuleType], str | None, Exception | None]:
    """``(modules, skip reason, load error)``: the kernel modules imported under the interpreter
    (``{"common": ..., "triton": ..., "backward": ...}``), or why the kernel tests skip (no triton,
    an interpreter defect, triton or the kernels already imported compiled), or the exception a kernel
    module raised on import (a failure, not a skip)."""
    global _needs_backport
    import sys

    compiled = [m for m in KERNEL_MODULES if m in sys.modules and not _interpreted(sys.modules[m])]
    with _env("1"):
        try:
            import triton
            import triton.language as tl
        except ImportError as e:  # no triton: the kernel tests skip, the reference tests run
            return {}, f"triton not importable: {e!r}", None
        if type(tl.standard.sum).__name__ != "InterpretedFunction":
            return {}, ("triton was imported in compiled mode before the kernel tests (TRITON_INTERPRET "
                        "unset); run `pytest tests/test_kernels.py` in a process of its own"), None
        if compiled:
            return {}, f"{compiled} were imported compiled before the kernel tests", None
        skip = _interpreter_defect(triton, tl)
        if skip is not None:
            undo = _backport_scalar_index()
            if undo is not None:
                skip = _interpreter_defect(triton, tl)
                undo()
                _needs_backport = skip is None
        if skip is not None:
            return {}, skip, None
        try:
            modules = {name.rpartition("_")[2]: importlib.import_module(name) for name in KERNEL_MODULES}
        except Exception as e:  # a broken kernel module is a failure, not a skip (see the tests' fixture)
            return {}, None, e
    return modules, None, None


def _interpreted(module: ModuleType) -> bool:
    """Whether ``module``'s Triton functions were decorated under the interpreter."""
    fns = [v for v in vars(module).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    return all(type(v).__name__ == "InterpretedFunction" for v in fns)
