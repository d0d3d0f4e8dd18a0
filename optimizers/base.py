"""The one optimizer interface used by inner *and* outer loops.

An :class:`Optimizer` is a pure pair of functions over dicts of tensors (optax-style):

* ``init(params) -> state``
* ``update(grads, state, params, *, loss=None) -> (new_params, new_state)``

Nothing is mutated, so an optimizer can be differentiated through (truncated backprop through an
unroll), vmapped over a leading population axis (ES/PES pairs, learning-rate grids), and used as the
*outer* optimizer of meta-training. Adam, a learned optimizer bound to its weights and "generation k"
are all objects of this kind; that sameness is what lets one generation meta-train the next.

``update`` returns the new parameters rather than an additive update because learned optimizers may
want to act on parameters directly (weight decay, clipping in parameter space) and it keeps the
call-site one line.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from optimizers.tree import Params

State = Any  # nested dict of tensors


@runtime_checkable
class Optimizer(Protocol):
    def init(self, params: Params) -> State: ...

    def update(
        self, grads: Params, state: State, params: Params, *, loss: Tensor | None = None
    ) -> tuple[Params, State]: ...


@runtime_checkable
class LearnableOptimizer(Protocol):
    """An optimizer *architecture* whose weights (``theta``) live outside it and are meta-learned."""

    def init_theta(self, generator: Any) -> Params: ...

    def bind(self, theta: Params) -> Optimizer: ...


def for_horizon(opt: Any, total_steps: int) -> Any:
    """``opt`` set up for a run of ``total_steps`` steps.

    Optimizers whose updates depend on the run's length (a learned optimizer that sees the fraction
    of training ``t/T``) say so with ``horizon_aware = True`` and provide ``with_total_steps(T)``;
    every other optimizer is returned as it is."""
    if getattr(opt, "horizon_aware", False):
        return opt.with_total_steps(int(total_steps))
    return opt
