"""Tasks, task families, task distributions (with held-out splits) and datasets."""

from tasks.base import (FAMILIES, SPLITS, Task, TaskConfigError, TaskDistribution, TaskFamily,
                        build_task, seeded)
from tasks import image_mlp  # noqa: F401  (registers the family)
from tasks.distributions import DISTRIBUTIONS, get_distribution

__all__ = [
    "FAMILIES", "SPLITS", "Task", "TaskFamily", "TaskDistribution", "TaskConfigError", "build_task",
    "seeded", "DISTRIBUTIONS", "get_distribution",
]
