"""Optimizer transforms (optax-style): wrap a functional optimizer, keep its interface.

:func:`scale_updates` is how a learned optimizer becomes an *outer* optimizer (see
:mod:`meta.generations`): the learned optimizer's step sizes were meta-learned for the inner tasks
(learning rates around 1e-2 on small networks), while the meta-parameters it now trains (a few
thousand MLP weights, noisy meta-gradients) want Adam-like steps of about the outer learning rate. Its
*features* are already scale-free (every channel is normalised per tensor, the meta-gradients are
clipped element-wise before they reach it), so only the size of the step needs changing: multiply the
update ``new - params`` by a constant. The direction, the learned schedule's shape and the relative
size of the MLP term are kept as learned.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from optimizers.base import Optimizer
from optimizers.tree import Params


class ScaledUpdates:
    """``opt`` with every update multiplied by ``factor``: ``params + factor * (opt(params) - params)``."""

    def __init__(self, opt: Optimizer, factor: float):
        if not factor > 0:
            raise ValueError(f"update scale must be positive, got {factor}")
        self.opt = opt
        self.factor = float(factor)

    @property
    def horizon_aware(self) -> bool:
        return bool(getattr(self.opt, "horizon_aware", False))

    def with_total_steps(self, total_steps: int) -> "ScaledUpdates":
        return ScaledUpdates(self.opt.with_total_steps(total_steps), self.factor)

    def init(self, params: Params) -> Any:
        return self.opt.init(params)

    def update(self, grads: Params, state: Any, params: Params, *, loss: Tensor | None = None):
        new, state = self.opt.update(grads, state, params, loss=loss)
        return {k: p + self.factor * (new[k] - p) for k, p in params.items()}, state


def scale_updates(opt: Optimizer, factor: float) -> Optimizer:
    return opt if factor == 1.0 else ScaledUpdates(opt, factor)
