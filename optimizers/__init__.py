"""Functional optimizers (hand-designed and learned) and torch.optim drop-ins."""

from optimizers.base import LearnableOptimizer, Optimizer
from optimizers.hand import SGD, Adam, adamw, sgd_momentum
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig

__all__ = [
    "Optimizer", "LearnableOptimizer", "SGD", "Adam", "adamw", "sgd_momentum",
    "LearnedOptimizer", "LOConfig", "ConfigError",
]
