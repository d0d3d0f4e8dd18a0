"""Hand-designed functional optimizers: SGD, SGD with momentum, Adam / AdamW.

Hyperparameters may be Python floats *or tensors*: passing tensors makes them differentiable (learning
rate meta-gradients) and vmappable (a whole learning-rate grid stepped in one call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from optimizers.tree import Params

Scalar = Union[float, Tensor]


@dataclass(frozen=True)
class SGD:
    lr: Scalar = 1e-2
    momentum: Scalar = 0.0
    nesterov: bool = False
    weight_decay: Scalar = 0.0

    def init(self, params: Params) -> dict:
        return {"mu": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(self, grads: Params, state: dict, params: Params, *, loss: Tensor | None = None):
        new_params, mu = {}, {}
        for k, p in params.items():
            g = grads[k] + self.weight_decay * p
            m = self.momentum * state["mu"][k] + g
            direction = g + self.momentum * m if self.nesterov else m
            new_params[k] = p - self.lr * direction
            mu[k] = m
        return new_params, {"mu": mu}


def sgd_momentum(lr: Scalar = 1e-2, momentum: Scalar = 0.9) -> SGD:
    return SGD(lr=lr, momentum=momentum)


@dataclass(frozen=True)
class Adam:
    """Adam; with ``weight_decay > 0`` it is AdamW (decoupled decay, as in ``torch.optim.AdamW``)."""

    lr: Scalar = 1e-3
    b1: Scalar = 0.9
    b2: Scalar = 0.999
    eps: Scalar = 1e-8
    weight_decay: Scalar = 0.0

    def init(self, params: Params) -> dict:
        ref = next(iter(params.values()), None)
        step = torch.zeros((), dtype=ref.dtype if ref is not None else torch.float32)
        return {
            "step": step,
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def update(self, grads: Params, state: dict, params: Params, *, loss: Tensor | None = None):
        step = state["step"] + 1
        bc1 = 1 - self.b1**step
        bc2 = 1 - self.b2**step
        new_params, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            m = self.b1 * state["m"][k] + (1 - self.b1) * g
            v = self.b2 * state["v"][k] + (1 - self.b2) * g * g
            direction = (m / bc1) / (torch.sqrt(v / bc2) + self.eps)
            new_params[k] = p - self.lr * (direction + self.weight_decay * p)
            m_new[k], v_new[k] = m, v
        return new_params, {"step": step, "m": m_new, "v": v_new}


def adamw(lr: Scalar = 1e-3, weight_decay: Scalar = 1e-2, **kw) -> Adam:
    return Adam(lr=lr, weight_decay=weight_decay, **kw)
