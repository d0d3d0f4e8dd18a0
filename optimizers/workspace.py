"""Scratch buffers a CPU learned-optimizer step reuses across steps, so it stops paying page faults.

Why: the learned optimizer's PyTorch step (:meth:`optimizers.learned.BoundLearnedOptimizer.update`)
builds large temporaries per group of tensors (the concatenated gradient, the feature matrix of
``elements x channels``, the MLP's hidden activations, the step itself) and frees them at the end of
the step. With glibc's default malloc settings, large blocks are unmapped (or the heap trimmed) on free,
so the next step touches fresh pages: measured on a 2-core AMD EPYC, about 40% of a 1M-parameter step
was minor page faults. Writing those temporaries into buffers that live as long as the bound optimizer
(``out=`` forms and in-place ops of the same operations, in the same order, on buffers of the same shape
and memory layout) keeps the floats identical and the pages mapped. :mod:`optimizers.malloc` gets the
same effect process-wide by changing the allocator's policy; this needs no such setting.

A :class:`Workspace` is a set of named *slots*, each one flat buffer that grows to the largest size any
step has asked of it and is then viewed at the shape a step needs. Slots are kept per ``(dtype, device,
inference mode)``, for the two most recently used such keys (a tensor made under
``torch.inference_mode`` cannot be written outside it). Growing to the largest request, rather than
keying by the parameters' shapes, is what keeps alternating parameter dicts correct and the memory
bounded: the learned step's buffers hold about ``(largest group's elements) x (2 * feature channels + 3 *
Adafactor decays + 2 * momentum decays + 6)`` floats per key, plus two blocks of the MLP's hidden
activations (``MLP_BLOCK_ROWS x hidden width``): with the default configuration 77 floats per element
of the largest group (21 MiB for 256 x 256 matrices, 310 MiB for 1024 x 1024).

Not thread-safe: one bound optimizer stepping in two threads at once would write the same buffers.
(The project parallelises evaluation with processes, each with its own optimizer.)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

MAX_KEYS = 2  # (dtype, device, inference mode) combinations whose buffers are kept


class Workspace:
    """Named, growable flat scratch buffers (see the module docstring for what they are for)."""

    def __init__(self, max_keys: int = MAX_KEYS):
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        self.max_keys = max_keys
        self._slots: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape`` backed by ``slot``'s buffer (contents undefined).

        Views of one slot share memory: a caller takes a slot again only once the previous view's
        values are no longer needed."""
        key = (dtype, torch.device(device), torch.is_inference_mode_enabled())
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = {}
            while len(self._slots) > self.max_keys:
                self._slots.popitem(last=False)
        else:
            self._slots.move_to_end(key)
        numel = 1
        for s in shape:
            numel *= s
        buf = slots.get(slot)
        if buf is None or buf.numel() < numel:
            buf = slots[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(b.numel() * b.element_size() for slots in self._slots.values() for b in slots.values())

    def clear(self) -> None:
        """Drop every buffer (the memory goes back to the allocator)."""
        self._slots.clear()


__all__ = ["Workspace", "MAX_KEYS"]
