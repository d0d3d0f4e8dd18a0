"""Task augmentation (VeLO-style): the same task, seen through a different parameterisation or noisier
gradients, so a learned optimizer meta-trained on it cannot rely on one scale or one noise level.

An augmented task is described entirely by its config (``config["augment"]``), so checkpoints that
name tasks by config rebuild them exactly (see :func:`tasks.base.build_task`):

* ``{"reparam": s}``: *parameter-scale reparameterisation*. The optimizer sees ``p' = p / s`` and
  the task computes with ``p = s * p'``; ``s`` is one number (VeLO's "global" level) or a mapping
  ``{tensor name: s}`` ("tensor" level). Gradients become ``s * g`` and the right step in ``p'``
  is ``1 / s`` of the right step in ``p``: an optimizer that reads parameter scale (or is invariant
  to it) handles this, one that assumes unit-scale weights does not.
* ``{"grad_noise": sigma}``: additive gradient noise. Each training batch carries Gaussian noise
  tensors ``eps`` (one per parameter) and the loss gains ``sigma * sum(eps * p)``, so the gradient is
  ``g + sigma * eps`` exactly while the loss's expectation is unchanged; the full-batch (evaluation)
  losses carry no noise. It stands for the noisy meta-gradients of the outer job (ES / PES).

:func:`sample_augment` draws an ``augment`` entry for a config from its own generator, so adding
augmentation to a distribution does not change which tasks it samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optimizers.tree import Params
from tasks.base import Batch, Task, TaskConfigError, seeded


def sample_augment(seed: int, names_hint: int = 0, *, reparam_prob: float = 0.0,
                   reparam_range: tuple[float, float] = (1e-2, 1e2), tensor_level_prob: float = 0.5,
                   grad_noise_prob: float = 0.0, grad_noise_range: tuple[float, float] = (1e-3, 3e-2)
                   ) -> dict[str, Any] | None:
    """An ``augment`` entry for the task with seed ``seed`` (None: no augmentation).

    Tensor-level scales are stored as a list and applied to the task's tensors in sorted-name order
    (cycled), so the entry does not need the tensor names."""
    g = seeded("augment", seed)
    out: dict[str, Any] = {}
    u_reparam, u_level, u_noise = (float(x) for x in torch.rand(3, generator=g))
    if u_reparam < reparam_prob:
        lo, hi = math.log(reparam_range[0]), math.log(reparam_range[1])
        if u_level < tensor_level_prob:
            n = max(int(names_hint), 8)
            out["reparam"] = [round(math.exp(lo + (hi - lo) * float(u)), 5) for u in torch.rand(n, generator=g)]
        else:
            out["reparam"] = round(math.exp(lo + (hi - lo) * float(torch.rand((), generator=g))), 5)
    if u_noise < grad_noise_prob:
        lo, hi = math.log(grad_noise_range[0]), math.log(grad_noise_range[1])
        out["grad_noise"] = round(math.exp(lo + (hi - lo) * float(torch.rand((), generator=g))), 5)
    return out or None


def _scales(spec: Any, names: list[str]) -> dict[str, float]:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        values = [float(spec)] * len(names)
    elif isinstance(spec, list) and spec and all(isinstance(v, (int, float)) for v in spec):
        values = [float(spec[i % len(spec)]) for i in range(len(names))]
    else:
        raise TaskConfigError(f"augment.reparam must be a positive number or a list of them, got {spec!r}")
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise TaskConfigError(f"augment.reparam scales must be positive and finite, got {spec!r}")
    return dict(zip(sorted(names), values))


class AugmentedTask(Task):
    """``inner`` with reparameterised parameters and/or additive gradient noise (module docstring)."""

    def __init__(self, inner: Task, augment: dict[str, Any], config: dict[str, Any]):
        unknown = set(augment) - {"reparam", "grad_noise"}
        if unknown:
            raise TaskConfigError(f"unknown augment key(s) {sorted(unknown)}; known: ['grad_noise', 'reparam']")
        self.inner = inner
        self.config = config
        shapes = {k: v.shape for k, v in inner.init(torch.Generator().manual_seed(0)).items()}
        self.names = sorted(shapes)
        self.shapes = shapes
        self.scales = _scales(augment["reparam"], self.names) if "reparam" in augment else None
        self.sigma = float(augment.get("grad_noise", 0.0))
        self._inner_len = len(tuple(inner.full_batch("train")))
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise TaskConfigError(f"augment.grad_noise must be >= 0 and finite, got {augment['grad_noise']!r}")

    # -- parameterisation ------------------------------------------------------------------------
    def _outer(self, params: Params) -> Params:
        if self.scales is None:
            return params
        return {k: v * self.scales[k] for k, v in params.items()}

    def init(self, generator: torch.Generator) -> Params:
        p = self.inner.init(generator)
        if self.scales is None:
            return p
        return {k: v / self.scales[k] for k, v in p.items()}

    # -- data ----------------------------------------------------------------------------------
    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        batch = tuple(self.inner.sample_batch(split, generator))
        if self.sigma > 0 and split == "train":  # training gradients only; validation stays clean
            noise = tuple(torch.randn(self.shapes[k], generator=generator) for k in self.names)
            return (*batch, *noise)
        return batch

    def full_batch(self, split: str) -> Batch:
        return tuple(self.inner.full_batch(split))

    def loss(self, params: Params, batch: Batch) -> Tensor:
        n = len(self.names)
        noisy = self.sigma > 0 and len(batch) == self._inner_len + n
        inner_batch = batch[:-n] if noisy else batch
        loss = self.inner.loss(self._outer(params), inner_batch)
        if noisy:
            loss = loss + self.sigma * sum((params[k] * e).sum() for k, e in zip(self.names, batch[-n:]))
        return loss

    # -- the rest is the inner task's ---------------------------------------------------------------
    @property
    def max_loss(self) -> float:
        return self.inner.max_loss

    def normalizer(self, loss: Tensor) -> Tensor:
        return self.inner.normalizer(loss)

    def accuracy(self, params: Params, batch: Batch) -> Tensor:  # pragma: no cover - image tasks only
        return self.inner.accuracy(self._outer(params), batch)


__all__ = ["AugmentedTask", "sample_augment"]
