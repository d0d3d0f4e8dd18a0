"""Tasks, task families, task distributions (with held-out splits) and datasets.

Families (registered in ``FAMILIES`` on import): ``image_mlp``, ``image_conv``, ``regression``,
``quadratic``, ``tiny_transformer``, ``learned_optimizer`` (meta-training a tiny learned optimizer).
"""

from tasks.base import (FAMILIES, SPLITS, Task, TaskConfigError, TaskDistribution, TaskFamily,
                        build_task, seeded)
from tasks import image_mlp, image_conv, learned_optimizer_task, quadratic, regression, tiny_transformer  # noqa: F401  (register)
from tasks.data import LOADERS, DatasetError, get_dataset
from tasks.distributions import DISTRIBUTIONS, get_distribution

__all__ = [
    "FAMILIES", "SPLITS", "Task", "TaskFamily", "TaskDistribution", "TaskConfigError", "build_task",
    "seeded", "DISTRIBUTIONS", "get_distribution", "LOADERS", "DatasetError", "get_dataset",
]
