"""A trained learned optimizer as a drop-in ``torch.optim.Optimizer`` for any ``nn.Module``.

::

    opt = LearnedOptimizerTorch.from_pretrained("default", model.parameters(), total_steps=1000)
    # or: LearnedOptimizerTorch.from_checkpoint(model.parameters(), "runs/gen3/learned_optimizer",
    #                                           total_steps=1000)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # optional
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

The functional learned optimizer (:class:`~optimizers.learned.BoundLearnedOptimizer`) normalises its
features per tensor and runs one MLP over every element, so :meth:`LearnedOptimizerTorch.step`
gathers all parameters that have a gradient into one dict, calls the functional ``update`` once per
(device, state dtype) bucket (normally exactly one call) and writes the results back in place. Since
every feature is per tensor and the MLP is per element, bucketing gives the same numbers as one joint
call; it only exists so that models spread over several devices, or mixing fp32 and fp64 parameters,
work.

``total_steps``
    Designs that see the fraction of training ``t/T`` (``LOConfig(time_features="fraction")``, the
    default) need the run's total number of optimizer steps ``T``: pass ``total_steps=T`` (to the
    constructor, :meth:`~LearnedOptimizerTorch.from_checkpoint` or
    :meth:`~LearnedOptimizerTorch.from_pretrained`); without it construction raises ``ValueError``.
    Stepping past ``T`` keeps working (the time features saturate: the optimizer behaves as at the
    end of its schedule). Other designs ignore it. ``T`` is kept in the per-parameter state
    (``horizon``), so ``state_dict()`` carries it and ``load_state_dict`` restores it; change it with
    ``opt.total_steps = T``.

``lr``: absolute units, not a multiplier
    Every group's ``lr`` is the learned optimizer's *nominal learning rate* in absolute units: the
    learning rate of its nominal Adam term, which the meta-trained optimizer learned itself
    (``exp(theta["nominal_log_lr"])``, :attr:`~LearnedOptimizerTorch.learned_lr`). The default,
    ``lr=None``, means exactly that learned value: the update as meta-trained. Any other value scales
    the whole learned update by ``lr / learned_lr``, so an Adam-style ``lr=1e-3`` asks for steps of
    the size Adam(lr=1e-3) would take (10x smaller than learned if ``learned_lr`` is 1e-2), not for
    every step to shrink 1000x. The optimizer's own learned schedule (``lr(t)``) and per-tensor step
    scales still apply on top. Torch LR schedulers (LambdaLR, CosineAnnealingLR, warm-up, ...) work
    unchanged: they rescale ``group["lr"]`` and the update scales with it; ``lr=0`` freezes a group's
    parameters (their accumulators still advance, as with ``torch.optim.Adam(lr=0)``).
    ``learned_lr`` is read from theta when the optimizer is built (and by :meth:`set_theta`); later
    in-place edits of theta (meta-training) do not move it, so the default lr keeps meaning "the
    update exactly as the functional optimizer computes it".
    A design without a nominal term (``nominal="none"``, only possible with ``design="additive"``)
    has no learned learning rate: there ``lr`` is a *multiplier* of the learned update with default
    1.0 (:attr:`~LearnedOptimizerTorch.lr_is_multiplier` is True), and a small ``lr`` (< 0.1)
    warns, since it most likely was meant Adam-style.

``weight_decay``
    (default 0) decoupled, exactly AdamW's: every step each parameter shrinks by the fraction
    ``lr * weight_decay`` (with the group's current ``lr``, so schedulers scale it too; the learned
    schedule does not), ``p_new = p - (lr / learned_lr) * (p - p_lo) - lr * weight_decay * p`` where
    ``p_lo`` is what the learned optimizer proposes. AdamW(lr=1e-3, weight_decay=0.1) and
    ``LearnedOptimizerTorch(lr=1e-3, weight_decay=0.1)`` decay the weights alike.

Parameters without a gradient
    are skipped: they are not changed and their state does not advance (a parameter that never
    received a gradient has no state at all).

State
    Per parameter, as torch optimizers keep it: ``m`` (momenta, one slice per decay), ``v`` (rms),
    ``row`` and, for rank >= 2 tensors, ``col`` (Adafactor accumulators), all kept in at least fp32,
    ``step``: the optimizer's global step at the parameter's last update, and, for designs that need
    it, ``horizon`` (``total_steps``). The learned optimizer has one *global* step (its time features
    and the nominal term's bias correction use it); it is the maximum of the per-parameter ``step``
    entries, so ``state_dict()``/``load_state_dict()`` are torch's own and round-trip exactly (a
    restored optimizer continues bit-for-bit like the original; the saved ``total_steps`` and group
    ``lr`` values win over the constructor's, as torch's saved hyperparameters do).
    ``load_state_dict`` keeps the saved state dtype instead of casting it to the parameter dtype
    (torch's default), so bf16/fp16 models keep fp32 accumulators.

Meta-training through this optimizer with ``higher.innerloop_ctx`` is supported by
:mod:`optimizers.higher_interop` (registered automatically when ``higher`` is already imported
when the optimizer is built; otherwise call ``optimizers.higher_interop.register()``).
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from collections import defaultdict
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from optimizers.learned import BoundLearnedOptimizer, LearnedOptimizer, LOConfig
from optimizers.lo_spec import step_backend  # the fused step (the kernels), reached only through the spec
from optimizers.tree import Params

STATE_KEYS = ("m", "v", "row", "col")
RUN_KEYS = ("horizon", "loss_stats")  # one per run, copied into every parameter's state
# the functional update clamps the nominal log learning rate to this range
LOG_LR_RANGE = (-20.0, 2.0)


def as_learned_optimizer(lopt: LearnedOptimizer | LOConfig | None) -> LearnedOptimizer:
    if lopt is None:
        return LearnedOptimizer(LOConfig())
    if isinstance(lopt, LOConfig):
        return LearnedOptimizer(lopt)
    if isinstance(lopt, LearnedOptimizer):
        return lopt
    raise TypeError(f"lopt must be a LearnedOptimizer or LOConfig, got {type(lopt).__name__}")


def check_theta(lopt: LearnedOptimizer, theta: Params) -> None:
    """Raise ``ValueError`` unless ``theta`` has exactly the names and shapes of ``lopt``'s weights."""
    if not isinstance(theta, dict):
        raise TypeError(f"theta must be a dict of tensors, got {type(theta).__name__}")
    expected = lopt.init_theta(0)
    if set(theta) != set(expected):
        raise ValueError(
            f"theta names {sorted(theta)} do not match the learned optimizer's {sorted(expected)}"
        )
    for k, ref in expected.items():
        if not isinstance(theta[k], Tensor) or tuple(theta[k].shape) != tuple(ref.shape):
            got = tuple(theta[k].shape) if isinstance(theta[k], Tensor) else type(theta[k]).__name__
            raise ValueError(f"theta[{k!r}] has shape {got}, expected {tuple(ref.shape)}")


def learned_lr(lopt: LearnedOptimizer, theta: Params) -> float | None:
    """The nominal learning rate the weights learned, ``exp(theta["nominal_log_lr"])`` (clamped as the
    update clamps it), as a Python float; None for designs without a nominal term."""
    if lopt.config.nominal != "adam":
        return None
    lo, hi = LOG_LR_RANGE
    return math.exp(min(max(float(theta["nominal_log_lr"].detach()), lo), hi))


def check_total_steps(total_steps: Any) -> int | None:
    """``total_steps`` as an int (None stays None); ``ValueError`` unless a positive integer."""
    if total_steps is None:
        return None
    if isinstance(total_steps, Tensor) and total_steps.numel() == 1:
        total_steps = total_steps.item()
    value: int | None = None
    if not isinstance(total_steps, bool):
        try:
            value = operator.index(total_steps)
        except TypeError:
            if isinstance(total_steps, float) and total_steps.is_integer():
                value = int(total_steps)
    if value is None or value < 1:
        raise ValueError(f"total_steps must be a positive integer (the run's number of optimizer steps), "
                         f"got {total_steps!r}")
    return value


def _check_hyper(name: str, value: Any) -> None:
    v = float(value.detach()) if isinstance(value, Tensor) else value
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0.0 or not math.isfinite(v):
        raise ValueError(f"invalid {name}: {value!r} (must be a finite number >= 0)")


def fresh_state(bound: BoundLearnedOptimizer, p: Tensor, total_steps: int | None = None) -> dict[str, Tensor]:
    """Zero per-parameter state for ``p``, laid out as the functional optimizer's ``init``
    (``horizon`` included for designs that need ``total_steps``)."""
    st = bound.init({"p": p}, total_steps=total_steps)
    out = {"step": st["step"], "m": st["m"]["p"], "v": st["v"]["p"], "row": st["row"]["p"]}
    if "p" in st["col"]:
        out["col"] = st["col"]["p"]
    for key in RUN_KEYS:
        if key in st:
            out[key] = st[key]
    return out


def pack_state(step: int, dtype: torch.dtype, per_param: list[dict[str, Tensor]],
               total_steps: int | None = None) -> dict:
    """Per-parameter states -> the functional state dict (keys ``"0"``, ``"1"``, ...). ``total_steps``
    (given for designs that need it) becomes the functional state's ``horizon``."""
    state: dict = {"step": torch.tensor(float(step), dtype=dtype), "m": {}, "v": {}, "row": {}, "col": {}}
    if total_steps is not None:
        state["horizon"] = torch.tensor(float(total_steps), dtype=dtype)
    for i, st in enumerate(per_param):
        for key in STATE_KEYS:
            if key in st:
                state[key][str(i)] = st[key]
    # the run's loss statistics (loss features) are one per run, kept in every parameter's state:
    # the most advanced copy (a parameter that got its first gradient late starts from zeros)
    stats = [st["loss_stats"] for st in per_param if "loss_stats" in st]
    if stats:
        state["loss_stats"] = max(stats, key=lambda t: float(t[0]))
    return state


def unpack_state(new_state: dict, i: int) -> dict[str, Tensor]:
    k = str(i)
    out = {"step": new_state["step"]}
    for key in RUN_KEYS:
        if key in new_state:
            out[key] = new_state[key]
    for key in STATE_KEYS:
        if k in new_state[key]:
            out[key] = new_state[key][k]
    return out


def group_factors(group: dict, lr_unit: float) -> tuple[Any, Any]:
    """``(scale, decay)`` of a param group: the learned update is multiplied by ``scale = lr / lr_unit``
    and every parameter shrinks by the fraction ``decay = lr * weight_decay``. ``lr`` may be a tensor
    (higher's differentiable ``override``)."""
    lr, wd = group["lr"], group.get("weight_decay", 0.0)
    scale = lr if lr_unit == 1.0 else lr / lr_unit
    if not isinstance(wd, Tensor) and wd == 0:
        return scale, 0.0
    return scale, lr * wd


def apply_group(p: Tensor, p_lo: Tensor, scale: Any, decay: Any) -> Tensor:
    """``p - scale * (p - p_lo) - decay * p``, skipping arithmetic in the common cases."""
    plain_decay = not isinstance(decay, Tensor) and decay == 0
    if not isinstance(scale, Tensor) and plain_decay:
        if scale == 1:
            return p_lo
        if scale == 0:
            return p
    out = p_lo if not isinstance(scale, Tensor) and scale == 1 else p - scale * (p - p_lo)
    if not plain_decay:
        out = out - decay * p
    return out


def _plain_groups(items: list[tuple[Tensor, dict]], lr_unit: float) -> bool:
    """Every group of the bucket takes the update exactly as learned (scale 1, no weight decay)."""
    for _, group in items:
        scale, decay = group_factors(group, lr_unit)
        if isinstance(scale, Tensor) or isinstance(decay, Tensor) or scale != 1 or decay != 0:
            return False
    return True


class LearnedOptimizerTorch(torch.optim.Optimizer):
    """``torch.optim`` front end of a (trained) learned optimizer (semantics: module docstring).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lopt: the architecture (:class:`LearnedOptimizer` or :class:`LOConfig`; default ``LOConfig()``).
        theta: its weights (``lopt.init_theta(...)`` or meta-trained). Kept by reference: tensors with
            ``requires_grad`` stay differentiable for :mod:`optimizers.higher_interop`; in-place edits
            are seen by the next ``step`` (after moving theta to another device call :meth:`set_theta`).
        total_steps: the run's total number of optimizer steps ``T``; required by designs that see the
            fraction of training ``t/T`` (``lopt.config.needs_total_steps``), ignored by the others.
        lr: default nominal learning rate in absolute units; ``None`` (default) = the learned one,
            :attr:`learned_lr` (the update as meta-trained). The update scales by ``lr / learned_lr``.
            For designs without a nominal term: a multiplier of the update, ``None`` = 1.0.
        weight_decay: default decoupled weight decay, AdamW's: each step shrinks parameters by the
            fraction ``lr * weight_decay``.
        kernels: use the fused Triton step (:mod:`kernels`): ``None`` (default) on CUDA when triton
            is available (``OUROBOROS_KERNELS=0/1`` overrides), ``False`` never, ``True`` wherever it can
            run (see :meth:`LearnedOptimizer.bind`). Buckets whose groups all take the update as learned
            (``lr == learned_lr``, ``weight_decay == 0``) are updated in place by the kernels; others get
            the kernels' functional form and the group arithmetic. Unsupported configurations fall back
            to PyTorch.
        kernel_precision: ``tl.dot`` input precision of the kernels (``"tf32"``, ``"ieee"``, ``"tf32x3"``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lopt: LearnedOptimizer | LOConfig | None = None,
        theta: Params | None = None,
        *,
        total_steps: int | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        kernels: bool | None = None,
        kernel_precision: str = "tf32",
    ):
        lopt = as_learned_optimizer(lopt)
        if theta is None:
            raise ValueError(
                "LearnedOptimizerTorch needs the learned optimizer's weights: pass theta=... "
                "(e.g. lopt.init_theta(seed) or meta-trained weights) or use from_checkpoint(params, path) "
                "/ from_pretrained(name, params)"
            )
        check_theta(lopt, theta)
        if lr is not None:
            _check_hyper("lr", lr)
        _check_hyper("weight_decay", weight_decay)
        self.lopt = lopt
        self.theta: Params = dict(theta)
        self._total_steps: int | None = None
        self.total_steps = total_steps  # validated (and required where the design needs it)
        self._learned_lr = learned_lr(lopt, self.theta)
        if self._learned_lr is None and lr is not None and 0 < float(lr) < 0.1:
            warnings.warn(
                f"this learned optimizer has no nominal term (nominal='none'), so lr is a multiplier of "
                f"the learned update (1.0 = as meta-trained): lr={lr} shrinks every step {1 / float(lr):.0f}x",
                UserWarning, stacklevel=2,
            )
        # validated by BoundLearnedOptimizer
        BoundLearnedOptimizer(lopt.config, {}, kernels=kernels, precision=kernel_precision)
        self.kernels = kernels
        self.kernel_precision = kernel_precision
        self._bound_cache: dict[torch.device, BoundLearnedOptimizer] = {}
        self._global_step: int | None = 0
        self.checkpoint_meta: dict[str, Any] = {}
        super().__init__(params, dict(lr=self.lr_unit if lr is None else lr, weight_decay=weight_decay))
        if "higher" in sys.modules:  # make higher.innerloop_ctx(model, opt) work without ceremony
            from optimizers.higher_interop import register

            register()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; a group's ``lr=None`` means the learned learning rate (:attr:`lr_unit`)."""
        if isinstance(param_group, dict) and "lr" in param_group:
            if param_group["lr"] is None:
                param_group = {**param_group, "lr": self.lr_unit}
            else:
                _check_hyper("lr", param_group["lr"])
        super().add_param_group(param_group)

    @classmethod
    def from_checkpoint(cls, params, path: str | Path, *, total_steps: int | None = None,
                        **kwargs) -> "LearnedOptimizerTorch":
        """Build from a checkpoint written by ``optimizers.checkpoint.save_learned_optimizer`` (or a
        meta-training checkpoint holding a learned optimizer). Raises ``CheckpointError`` when the
        checkpoint is missing or corrupt, or its weights are not finite. Its metadata is kept in
        ``.checkpoint_meta``. ``total_steps`` and the other keywords: as the constructor's."""
        from optimizers.checkpoint import check_learned_optimizer, load_learned_optimizer

        lopt, theta, meta = load_learned_optimizer(path)
        check_learned_optimizer(lopt, theta, path)
        opt = cls(params, lopt=lopt, theta=theta, total_steps=total_steps, **kwargs)
        opt.checkpoint_meta = dict(meta)
        return opt

    @classmethod
    def from_pretrained(cls, name: str, params, *, total_steps: int | None = None,
                        **kwargs) -> "LearnedOptimizerTorch":
        """Build from the pretrained learned optimizer ``name`` shipped inside the package
        (``optimizers/pretrained/<name>/``; :func:`optimizers.pretrained.available` lists them, and
        :func:`optimizers.pretrained.model_card` tells what each was meta-trained on, how it measured and
        where it is known to fail). An unknown name raises ``ValueError`` listing the available ones;
        weights that are not finite or a config that is not sane raise ``CheckpointError``.
        ``total_steps`` and the other keywords: as the constructor's."""
        from optimizers import pretrained

        lopt, theta, meta = pretrained.load(name)
        opt = cls(params, lopt=lopt, theta=theta, total_steps=total_steps, **kwargs)
        opt.checkpoint_meta = {**meta, "pretrained": name}
        return opt

    # ---- hyperparameters --------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        """The run's total number of optimizer steps ``T`` (None where the design does not need it and
        none was given). Setting it takes effect at the next ``step``."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        value = check_total_steps(value)
        cfg = self.lopt.config
        if value is None and cfg.needs_total_steps:
            raise ValueError(
                f"this learned optimizer (time_features={cfg.time_features!r}) sees the fraction of training "
                f"t/T, so it needs the run's length: pass total_steps=<number of optimizer steps of the run> "
                f"(LearnedOptimizerTorch(..., total_steps=T), from_checkpoint(..., total_steps=T) or "
                f"from_pretrained(..., total_steps=T)); stepping past T is fine"
            )
        self._total_steps = value

    @property
    def learned_lr(self) -> float | None:
        """The nominal learning rate the weights learned (``exp(theta["nominal_log_lr"])``, read when
        built or by :meth:`set_theta`); the default ``lr``. None for designs without a nominal term."""
        return self._learned_lr

    @property
    def lr_is_multiplier(self) -> bool:
        """True where ``lr`` multiplies the learned update (no nominal term) instead of being a learning rate."""
        return self._learned_lr is None

    @property
    def lr_unit(self) -> float:
        """The ``lr`` at which the update is exactly the meta-trained one: :attr:`learned_lr`, or 1.0."""
        return 1.0 if self._learned_lr is None else self._learned_lr

    def _horizon(self) -> int | None:
        return self._total_steps if self.lopt.config.needs_total_steps else None

    # ---- theta ------------------------------------------------------------------------------
    def set_theta(self, theta: Params) -> None:
        """Replace the learned optimizer's weights (state and step are kept). :attr:`learned_lr` becomes
        the new weights'; each group keeps its ``lr`` (absolute units), so set ``group["lr"] =
        opt.learned_lr`` to take the new weights' update exactly as learned."""
        check_theta(self.lopt, theta)
        self.theta = dict(theta)
        self._learned_lr = learned_lr(self.lopt, self.theta)
        self._bound_cache.clear()

    def bound(self, device: torch.device) -> BoundLearnedOptimizer:
        """The functional optimizer with (detached) theta on ``device``."""
        b = self._bound_cache.get(device)
        if b is None:
            b = self.lopt.bind({k: v.detach().to(device) for k, v in self.theta.items()},
                               kernels=self.kernels, precision=self.kernel_precision)
            self._bound_cache[device] = b
        return b

    # ---- step -------------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Number of steps taken that updated at least one parameter (survives ``load_state_dict``)."""
        if self._global_step is None:
            steps = [
                float(st["step"]) for st in self.state.values() if isinstance(st, dict) and "step" in st
            ]
            self._global_step = int(max(steps, default=0.0))
        return self._global_step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None):
        """One step. A learned optimizer with loss features (``loss_features="ema"``; the shipped
        ``default`` has none and ignores the loss) reads the run's loss: from ``closure()`` as in
        ``torch.optim``, or, without a closure, from ``loss=`` (the value you called ``backward()`` on).
        Without either its loss inputs stay where they were (zero in a run that never gave one), which
        it was not meta-trained for."""
        if closure is not None:
            if loss is not None:
                raise ValueError("give the loss through closure or loss=, not both")
            with torch.enable_grad():
                loss = closure()
        elif loss is not None and not isinstance(loss, Tensor):
            loss = torch.tensor(float(loss))
        horizon = self._horizon()
        buckets: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, dict]]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizerTorch does not support sparse gradients")
                if p.is_complex():
                    raise RuntimeError("LearnedOptimizerTorch does not support complex parameters")
                st = self.state[p]
                if "v" not in st:
                    st.update(fresh_state(self.bound(p.device), p, horizon))
                buckets[(p.device, st["v"].dtype)].append((p, group))
        if not buckets:
            return loss
        t = self.global_step
        loss_arg = loss.detach() if isinstance(loss, Tensor) else None
        unit = self.lr_unit
        for (device, dtype), items in buckets.items():
            params = {str(i): p for i, (p, _) in enumerate(items)}
            grads = {str(i): p.grad for i, (p, _) in enumerate(items)}
            state = pack_state(t, dtype, [self.state[p] for p, _ in items], horizon)
            bound = self.bound(device)
            if _plain_groups(items, unit) and bound.kernel_reason(grads, state, params) is None:
                # fused step in place: the parameters and the per-parameter state tensors themselves
                state = bound.observe_loss(state, loss_arg)  # as BoundLearnedOptimizer.update does
                _, new_state = step_backend().step(params, grads, state, bound.theta, self.lopt.config,
                                                   precision=self.kernel_precision, inplace=True)
                for p, _ in items:
                    self.state[p]["step"] = new_state["step"]
                    for key in RUN_KEYS:
                        if key in state:
                            self.state[p][key] = state[key]
                continue
            new_params, new_state = bound.update(grads, state, params, loss=loss_arg)
            for i, (p, group) in enumerate(items):
                self.state[p] = unpack_state(new_state, i)
                p_new = apply_group(p, new_params[str(i)], *group_factors(group, unit))
                if p_new is not p:
                    p.copy_(p_new)
        self._global_step = t + 1
        return loss

    # ---- state dict -------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_state = state_dict["state"]
        horizons = {float(st["horizon"]) for st in saved_state.values()
                    if isinstance(st, dict) and isinstance(st.get("horizon"), Tensor)}
        if len(horizons) > 1:
            raise ValueError(f"the state dict's parameters disagree on total_steps: {sorted(horizons)}")
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; the learned optimizer keeps >= fp32
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        current = chain.from_iterable(g["params"] for g in self.param_groups)
        for sid, p in zip(saved_ids, current):
            saved = saved_state.get(sid)
            if isinstance(saved, dict):
                for key in (*STATE_KEYS, *RUN_KEYS):
                    if isinstance(saved.get(key), Tensor):
                        # a copy: the fused step updates state in place, never the caller's dict
                        self.state[p][key] = saved[key].to(device=p.device, copy=True)
        if horizons and self.lopt.config.needs_total_steps:
            self.total_steps = horizons.pop()  # the saved run's length, as saved group hyperparameters win
        self._global_step = None
        self._bound_cache.clear()

    def __getstate__(self) -> dict[str, Any]:  # pickling / copy.deepcopy keep the learned optimizer
        return {**super().__getstate__(), "lopt": self.lopt, "theta": self.theta,
                "checkpoint_meta": self.checkpoint_meta, "kernels": self.kernels,
                "kernel_precision": self.kernel_precision, "_total_steps": self._total_steps,
                "_learned_lr": self._learned_lr}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_bound_cache", {})
        self.__dict__.setdefault("kernels", None)
        self.__dict__.setdefault("kernel_precision", "tf32")
        self.__dict__.setdefault("_total_steps", None)
        self.__dict__.setdefault("_learned_lr", None)  # pickles from before: lr was a multiplier
        self._global_step = None
