"""Keep large freed buffers in the process heap (glibc), so a CPU optimizer step stops paying page faults.

Why: the learned optimizer's step allocates large temporaries (its per-element feature matrix is
``elements x channels`` floats per group of tensors) and frees them at the end of the step. With
glibc's defaults, buffers above the mmap threshold are mapped fresh and unmapped on free, and a large
free block at the top of the heap is trimmed back to the OS, so the next step touches fresh pages:
measured on a 2-core AMD EPYC at 986,880 parameters, 40% of the step (0.40 s -> 0.24 s, system time
0.76 s -> 0 over five steps; ``bench/cpu_speed.py --malloc heap``). XLA-compiled steps allocate far
fewer temporaries, so this is where a PyTorch step loses to a jitted one.

The learned optimizer's step without autograd now writes those temporaries into buffers it keeps
(:mod:`optimizers.workspace`), which removes these faults without any allocator setting; this still
helps the differentiable step (truncated backprop through it allocates every step) and other code.

This is process-wide allocator policy, so nothing in the library sets it on its own: call
:func:`keep_freed_memory_in_heap` at the start of a CPU training script (or set the equivalent
environment variables ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or run
under jemalloc / tcmalloc). The cost: the process keeps its peak heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TOP_PAD = 256 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim in practice


def keep_freed_memory_in_heap() -> bool:
    """Set glibc's mmap threshold to its maximum and turn heap trimming off (process-wide).

    Returns True when the settings were applied, False where the C library is not glibc (nothing is
    changed there; use jemalloc / tcmalloc or the allocator's own settings)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt take other parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return bool(ok)
