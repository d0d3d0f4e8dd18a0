"""Named task distributions (presets). ``digits_mlp`` is the embedded default."""

from __future__ import annotations

from typing import Callable

from tasks.base import TaskConfigError, TaskDistribution

DISTRIBUTIONS: dict[str, Callable[..., TaskDistribution]] = {
    "digits_mlp": lambda seed=0: TaskDistribution(
        "digits_mlp", [("image_mlp", {"dataset": "digits"}, 1.0)], seed=seed
    ),
}


def get_distribution(name: str, seed: int = 0) -> TaskDistribution:
    if name not in DISTRIBUTIONS:
        raise TaskConfigError(f"unknown task distribution {name!r}; known: {sorted(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[name](seed=seed)
