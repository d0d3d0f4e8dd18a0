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

import torch
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


class WarmDown:
    """``opt`` at full step for the first ``1 - fraction`` of ``total_steps``, then its updates scaled
    linearly down to 0 at ``total_steps`` (a warmup-stable-decay schedule without the warmup).

    Why: meta-training with a constant outer learning rate ends on a noisy iterate. Measured on the
    default run: the held-out loss of the learned optimizer at H swung between 0.015 and 0.028 (tuned
    Adam 0.022) from one 5-step window to the next after 400 steps, so the run's verdict depended on
    which step it stopped at. Annealing the last part lets the weights settle. The step counter lives in
    the state (``{"inner": ..., "step": ...}``), so a resumed run continues the schedule."""

    def __init__(self, opt: Optimizer, total_steps: int, fraction: float):
        if not 0.0 < fraction <= 1.0 or total_steps < 1:
            raise ValueError(f"warm-down needs 0 < fraction <= 1 and total_steps >= 1, got {fraction}, {total_steps}")
        self.opt, self.total_steps, self.fraction = opt, int(total_steps), float(fraction)

    def factor(self, step: int) -> float:
        """The update scale of update number ``step`` (0-based)."""
        start = self.total_steps * (1.0 - self.fraction)
        if step < start:
            return 1.0
        return max(0.0, (self.total_steps - step) / (self.total_steps - start))

    def init(self, params: Params) -> Any:
        return {"inner": self.opt.init(params), "step": torch.zeros((), dtype=torch.float64)}

    def update(self, grads: Params, state: Any, params: Params, *, loss: Tensor | None = None):
        new, inner = self.opt.update(grads, state["inner"], params, loss=loss)
        f = self.factor(int(state["step"]))
        return ({k: p + f * (new[k] - p) for k, p in params.items()},
                {"inner": inner, "step": state["step"] + 1})
