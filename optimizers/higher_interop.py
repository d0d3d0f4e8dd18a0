"""Meta-train through :class:`~optimizers.torch_optim.LearnedOptimizerTorch` with ``higher``.

Code written around ``higher.innerloop_ctx`` works unchanged once the learned optimizer is registered::

    from optimizers import higher_interop
    higher_interop.register()          # done automatically if higher was imported before the optimizer

    theta = {k: v.requires_grad_() for k, v in lopt.init_theta(0).items()}
    opt = LearnedOptimizerTorch(model.parameters(), lopt=lopt, theta=theta, total_steps=len(batches))
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss = loss_fn(fmodel(xv), yv)
    meta_grads = torch.autograd.grad(meta_loss, list(theta.values()))

The differentiable optimizer reads ``theta`` from the ``LearnedOptimizerTorch`` it was built from (by
reference, so tensors with ``requires_grad`` are differentiated through), or from a ``theta=`` keyword
given to ``higher.optim.get_diff_optim``; ``diffopt.theta`` may be reassigned between steps. It starts
from a copy of the torch optimizer's state, global step and ``total_steps`` (designs that see the
fraction of training need it: ``LearnedOptimizerTorch(..., total_steps=T)``), applies each group's
``lr`` and ``weight_decay`` exactly as :class:`LearnedOptimizerTorch` does (the update scales by
``lr / opt.lr_unit``, the learned learning rate read when the torch optimizer was built, so the default
``lr`` leaves the functional update, and its meta-gradient, untouched; ``lr`` may be a differentiable
tensor through higher's ``override``), and skips parameters whose gradient is ``None``.

``higher`` is imported lazily: ``import optimizers`` never imports it.
"""

from __future__ import annotations

from typing import Any

import torch

from optimizers.learned import LearnedOptimizer
from optimizers.torch_optim import (LearnedOptimizerTorch, apply_group, check_theta, fresh_state, group_factors,
                                    pack_state, unpack_state)

_DIFF_CLASS: type | None = None


def _import_higher():
    try:
        import higher
        import higher.optim
    except ImportError as e:  # pragma: no cover - exercised only without higher installed
        raise ImportError(
            "optimizers.higher_interop needs the 'higher' package (pip install 'higher>=0.2.1'); "
            "the rest of Ouroboros works without it"
        ) from e
    return higher


def _build_class(higher) -> type:
    base = higher.optim.DifferentiableOptimizer

    class DifferentiableLearnedOptimizer(base):
        """higher's differentiable counterpart of :class:`LearnedOptimizerTorch`."""

        def __init__(self, other: LearnedOptimizerTorch, reference_params, *args: Any,
                     theta: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
            if not isinstance(other, LearnedOptimizerTorch):
                raise TypeError(f"expected a LearnedOptimizerTorch, got {type(other).__name__}")
            super().__init__(other, reference_params, *args, **kwargs)
            self.lopt: LearnedOptimizer = other.lopt
            theta = other.theta if theta is None else theta
            check_theta(self.lopt, theta)
            self.theta: dict[str, torch.Tensor] = dict(theta)
            self.global_step: int = other.global_step
            self.total_steps: int | None = other.total_steps
            self.lr_unit: float = other.lr_unit

        def _update(self, grouped_grads, **kwargs: Any) -> None:
            track = self._track_higher_grads
            theta = self.theta if track else {k: v.detach() for k, v in self.theta.items()}
            bound_by_device: dict[torch.device, Any] = {}
            horizon = self.total_steps if self.lopt.config.needs_total_steps else None

            def bound(device: torch.device):
                if device not in bound_by_device:
                    bound_by_device[device] = self.lopt.bind({k: v.to(device) for k, v in theta.items()})
                return bound_by_device[device]

            buckets: dict[tuple, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
            for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for pi, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is None or p.numel() == 0:
                        continue
                    st = self.state[gi][pi]
                    if "v" not in st:
                        st.update(fresh_state(bound(p.device), p, horizon))
                    buckets.setdefault((p.device, st["v"].dtype), []).append((gi, pi, p, g))
            if not buckets:
                return
            t = self.global_step
            for (device, dtype), items in buckets.items():
                params = {str(i): p for i, (_, _, p, _) in enumerate(items)}
                grads = {str(i): g for i, (_, _, _, g) in enumerate(items)}
                state = pack_state(t, dtype, [self.state[gi][pi] for gi, pi, _, _ in items], horizon)
                new_params, new_state = bound(device).update(grads, state, params)
                for i, (gi, pi, p, _) in enumerate(items):
                    st = unpack_state(new_state, i)
                    if not track:
                        st = {k: v.detach() for k, v in st.items()}
                    self.state[gi][pi] = st
                    group = self.param_groups[gi]
                    group["params"][pi] = apply_group(p, new_params[str(i)], *group_factors(group, self.lr_unit))
            self.global_step = t + 1

    DifferentiableLearnedOptimizer.__module__ = __name__
    return DifferentiableLearnedOptimizer


def register() -> type:
    """Register :class:`LearnedOptimizerTorch` with ``higher`` (idempotent); returns the
    differentiable optimizer class. Raises ``ImportError`` with install advice if higher is missing."""
    global _DIFF_CLASS
    higher = _import_higher()
    if _DIFF_CLASS is None:
        _DIFF_CLASS = _build_class(higher)
    if getattr(higher.optim, "_opt_mapping", {}).get(LearnedOptimizerTorch) is not _DIFF_CLASS:
        higher.register_optim(LearnedOptimizerTorch, _DIFF_CLASS)
    return _DIFF_CLASS


def __getattr__(name: str):
    if name == "DifferentiableLearnedOptimizer":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
