"""Functional optimizers (hand-designed and learned) and torch.optim drop-ins."""

from optimizers.base import LearnableOptimizer, Optimizer
from optimizers.hand import SGD, Adam, adamw, sgd_momentum
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig
from optimizers.torch_optim import LearnedOptimizerTorch

__all__ = [
    "Optimizer", "LearnableOptimizer", "SGD", "Adam", "adamw", "sgd_momentum",
    "LearnedOptimizer", "LOConfig", "ConfigError", "LearnedOptimizerTorch",
]
