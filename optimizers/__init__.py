"""Functional optimizers (hand-designed and learned) and torch.optim drop-ins.

The names below are loaded on first use (PEP 562 module ``__getattr__``): ``import optimizers.lo_spec``
(what the kernels import) must not import the learned optimizer and its torch.optim drop-in, or the
specification would stop being a leaf and ``kernels`` would depend on ``optimizers`` again. No module
of this package imports ``kernels``: the fused step is reached through the specification's one seam,
:func:`optimizers.lo_spec.step_backend`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "Optimizer": "optimizers.base", "LearnableOptimizer": "optimizers.base",
    "SGD": "optimizers.hand", "Adam": "optimizers.hand", "adamw": "optimizers.hand",
    "sgd_momentum": "optimizers.hand",
    "LearnedOptimizer": "optimizers.learned",
    "LOConfig": "optimizers.lo_spec", "ConfigError": "optimizers.lo_spec",
    "LearnedOptimizerTorch": "optimizers.torch_optim",
}

__all__ = [
    "Optimizer", "LearnableOptimizer", "SGD", "Adam", "adamw", "sgd_momentum",
    "LearnedOptimizer", "LOConfig", "ConfigError", "LearnedOptimizerTorch",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ loads them
    from optimizers.base import LearnableOptimizer, Optimizer
    from optimizers.hand import SGD, Adam, adamw, sgd_momentum
    from optimizers.learned import LearnedOptimizer
    from optimizers.lo_spec import ConfigError, LOConfig
    from optimizers.torch_optim import LearnedOptimizerTorch


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optimizers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
