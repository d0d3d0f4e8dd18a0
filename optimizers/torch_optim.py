"""A trained learned optimizer as a drop-in ``torch.optim.Optimizer`` for any ``nn.Module``.

::

    opt = LearnedOptimizerTorch.from_checkpoint(model.parameters(), "runs/gen3/best")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
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

Parameter groups
    Every group has an ``lr`` (default 1.0) that *multiplies* the learned update,
    ``p_new = p - lr * ((p - p_lo) + weight_decay * p)`` where ``p_lo`` is what the learned optimizer
    proposes, so torch LR schedulers (LambdaLR, CosineAnnealingLR, warm-up, ...) work unchanged:
    they scale the learned step. ``lr=0`` freezes a group's parameters (their accumulators still
    advance, as with ``torch.optim.Adam(lr=0)``). ``weight_decay`` (default 0) is decoupled and is
    the per-step shrink fraction at ``lr=1``, i.e. AdamW's ``lr * weight_decay`` product (AdamW
    with lr 1e-3 and weight decay 0.1 corresponds to ``weight_decay=1e-4`` here).

Parameters without a gradient
    are skipped: they are not changed and their state does not advance (a parameter that never
    received a gradient has no state at all).

State
    Per parameter, as torch optimizers keep it: ``m`` (momenta, one slice per decay), ``v`` (rms),
    ``row`` and, for rank >= 2 tensors, ``col`` (Adafactor accumulators), all kept in at least fp32,
    and ``step``: the optimizer's global step at the parameter's last update. The learned optimizer
    has one *global* step (its time features and the nominal term's bias correction use it); it is
    the maximum of the per-parameter ``step`` entries, so ``state_dict()``/``load_state_dict()`` are
    torch's own and round-trip exactly (a restored optimizer continues bit-for-bit like the original).
    ``load_state_dict`` keeps the saved state dtype instead of casting it to the parameter dtype
    (torch's default), so bf16/fp16 models keep fp32 accumulators.

Meta-training through this optimizer with ``higher.innerloop_ctx`` is supported by
:mod:`optimizers.higher_interop` (registered automatically when ``higher`` is already imported
when the optimizer is built; otherwise call ``optimizers.higher_interop.register()``).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from optimizers.learned import BoundLearnedOptimizer, LearnedOptimizer, LOConfig
from optimizers.tree import Params

STATE_KEYS = ("m", "v", "row", "col")


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


def _check_hyper(name: str, value: Any) -> None:
    v = float(value.detach()) if isinstance(value, Tensor) else value
    if not isinstance(v, (int, float)) or not v >= 0.0:
        raise ValueError(f"invalid {name}: {value!r} (must be a number >= 0)")


def fresh_state(bound: BoundLearnedOptimizer, p: Tensor) -> dict[str, Tensor]:
    """Zero per-parameter state for ``p``, laid out as the functional optimizer's ``init``."""
    st = bound.init({"p": p})
    out = {"step": st["step"], "m": st["m"]["p"], "v": st["v"]["p"], "row": st["row"]["p"]}
    if "p" in st["col"]:
        out["col"] = st["col"]["p"]
    return out


def pack_state(step: int, dtype: torch.dtype, per_param: list[dict[str, Tensor]]) -> dict:
    """Per-parameter states -> the functional state dict (keys ``"0"``, ``"1"``, ...)."""
    state: dict = {"step": torch.tensor(float(step), dtype=dtype), "m": {}, "v": {}, "row": {}, "col": {}}
    for i, st in enumerate(per_param):
        for key in STATE_KEYS:
            if key in st:
                state[key][str(i)] = st[key]
    return state


def unpack_state(new_state: dict, i: int) -> dict[str, Tensor]:
    k = str(i)
    out = {"step": new_state["step"]}
    for key in STATE_KEYS:
        if k in new_state[key]:
            out[key] = new_state[key][k]
    return out


def apply_group(p: Tensor, p_lo: Tensor, lr: Any, weight_decay: Any) -> Tensor:
    """``p - lr * ((p - p_lo) + weight_decay * p)``, skipping arithmetic in the common cases."""
    if not isinstance(lr, Tensor) and not isinstance(weight_decay, Tensor):
        if lr == 1 and weight_decay == 0:
            return p_lo
        if lr == 0:
            return p
    upd = p - p_lo
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        upd = upd + weight_decay * p
    return p - lr * upd


def _plain_groups(items: list[tuple[Tensor, dict]]) -> bool:
    """Every group of the bucket has ``lr == 1`` and ``weight_decay == 0`` (plain Python numbers)."""
    for _, group in items:
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        if isinstance(lr, Tensor) or isinstance(wd, Tensor) or lr != 1 or wd != 0:
            return False
    return True


class LearnedOptimizerTorch(torch.optim.Optimizer):
    """``torch.optim`` front end of a (trained) learned optimizer.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lopt: the architecture (:class:`LearnedOptimizer` or :class:`LOConfig`; default ``LOConfig()``).
        theta: its weights (``lopt.init_theta(...)`` or meta-trained). Kept by reference: tensors with
            ``requires_grad`` stay differentiable for :mod:`optimizers.higher_interop`; in-place edits
            are seen by the next ``step`` (after moving theta to another device call :meth:`set_theta`).
        lr: default multiplier of the learned update (1.0 = the update as meta-trained).
        weight_decay: default decoupled weight decay per step at ``lr=1`` (see module docstring).
        kernels: use the fused Triton step (:mod:`kernels`): ``None`` (default) on CUDA when triton
            is available (``OUROBOROS_KERNELS=0/1`` overrides), ``False`` never, ``True`` wherever it can
            run (see :meth:`LearnedOptimizer.bind`). Buckets whose groups all have ``lr == 1`` and
            ``weight_decay == 0`` are updated in place by the kernels; others get the kernels' functional
            form and the group arithmetic. Unsupported configurations fall back to PyTorch.
        kernel_precision: ``tl.dot`` input precision of the kernels (``"tf32"``, ``"ieee"``, ``"tf32x3"``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lopt: LearnedOptimizer | LOConfig | None = None,
        theta: Params | None = None,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        kernels: bool | None = None,
        kernel_precision: str = "tf32",
    ):
        lopt = as_learned_optimizer(lopt)
        if theta is None:
            raise ValueError(
                "LearnedOptimizerTorch needs the learned optimizer's weights: pass theta=... "
                "(e.g. lopt.init_theta(seed) or meta-trained weights) or use from_checkpoint(params, path)"
            )
        check_theta(lopt, theta)
        _check_hyper("lr", lr)
        _check_hyper("weight_decay", weight_decay)
        self.lopt = lopt
        self.theta: Params = dict(theta)
        # validated by BoundLearnedOptimizer
        BoundLearnedOptimizer(lopt.config, {}, kernels=kernels, precision=kernel_precision)
        self.kernels = kernels
        self.kernel_precision = kernel_precision
        self._bound_cache: dict[torch.device, BoundLearnedOptimizer] = {}
        self._global_step: int | None = 0
        self.checkpoint_meta: dict[str, Any] = {}
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if "higher" in sys.modules:  # make higher.innerloop_ctx(model, opt) work without ceremony
            from optimizers.higher_interop import register

            register()

    @classmethod
    def from_checkpoint(cls, params, path: str | Path, **kwargs) -> "LearnedOptimizerTorch":
        """Build from a checkpoint written by ``optimizers.checkpoint.save_learned_optimizer`` (or a
        meta-training checkpoint holding a learned optimizer). Raises ``CheckpointError`` when the
        checkpoint is missing or corrupt. Its metadata is kept in ``.checkpoint_meta``."""
        from optimizers.checkpoint import load_learned_optimizer

        lopt, theta, meta = load_learned_optimizer(path)
        opt = cls(params, lopt=lopt, theta=theta, **kwargs)
        opt.checkpoint_meta = dict(meta)
        return opt

    # ---- theta ------------------------------------------------------------------------------
    def set_theta(self, theta: Params) -> None:
        """Replace the learned optimizer's weights (state and step are kept)."""
        check_theta(self.lopt, theta)
        self.theta = dict(theta)
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
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
                    st.update(fresh_state(self.bound(p.device), p))
                buckets[(p.device, st["v"].dtype)].append((p, group))
        if not buckets:
            return loss
        t = self.global_step
        loss_arg = loss.detach() if isinstance(loss, Tensor) else None
        for (device, dtype), items in buckets.items():
            params = {str(i): p for i, (p, _) in enumerate(items)}
            grads = {str(i): p.grad for i, (p, _) in enumerate(items)}
            state = pack_state(t, dtype, [self.state[p] for p, _ in items])
            bound = self.bound(device)
            if _plain_groups(items) and bound.kernel_reason(grads, state, params) is None:
                # fused step in place: the parameters and the per-parameter state tensors themselves
                from kernels.lo_step_triton import lo_step

                _, new_state = lo_step(params, grads, state, bound.theta, self.lopt.config,
                                       precision=self.kernel_precision, inplace=True)
                for p, _ in items:
                    self.state[p]["step"] = new_state["step"]
                continue
            new_params, new_state = bound.update(grads, state, params, loss=loss_arg)
            for i, (p, group) in enumerate(items):
                self.state[p] = unpack_state(new_state, i)
                p_new = apply_group(p, new_params[str(i)], group["lr"], group.get("weight_decay", 0.0))
                if p_new is not p:
                    p.copy_(p_new)
        self._global_step = t + 1
        return loss

    # ---- state dict -------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; the learned optimizer keeps >= fp32
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        current = chain.from_iterable(g["params"] for g in self.param_groups)
        for sid, p in zip(saved_ids, current):
            saved = state_dict["state"].get(sid)
            if isinstance(saved, dict):
                for key in STATE_KEYS:
                    if isinstance(saved.get(key), Tensor):
                        # a copy: the fused step updates state in place, never the caller's dict
                        self.state[p][key] = saved[key].to(device=p.device, copy=True)
        self._global_step = None
        self._bound_cache.clear()

    def __getstate__(self) -> dict[str, Any]:  # pickling / copy.deepcopy keep the learned optimizer
        return {**super().__getstate__(), "lopt": self.lopt, "theta": self.theta,
                "checkpoint_meta": self.checkpoint_meta, "kernels": self.kernels,
                "kernel_precision": self.kernel_precision}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_bound_cache", {})
        self.__dict__.setdefault("kernels", None)
        self.__dict__.setdefault("kernel_precision", "tf32")
        self._global_step = None
