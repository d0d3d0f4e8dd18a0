"""Optimizers planted in tests (imported by test modules; pytest puts tests/ on the path)."""


class NaNAfter:
    """Plain SGD that turns every parameter into NaN from step ``at``: a run the evaluation flags as diverged."""

    def __init__(self, at: int):
        self.at = at

    def init(self, params):
        return {"step": 0}

    def update(self, grads, state, params, *, loss=None):
        step = state["step"] + 1
        scale = float("nan") if step >= self.at else 1.0
        return {k: (p - 0.01 * grads[k]) * scale for k, p in params.items()}, {"step": step}
