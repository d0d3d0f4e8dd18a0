"""What the evaluation runs on one task (the protocol of :mod:`meta.evaluate`), and nothing else.

:func:`run_task` runs every optimizer and every tuning grid on one task and returns its
:class:`~meta.results.TaskResult`; the worker pool (:mod:`meta.eval_pool`) calls it once per task, the
report (:mod:`meta.eval_report`) aggregates the results. The protocol itself (paired runs, one long run
read at every horizon, oracle tuning per task and horizon, divergence, the speed-up over tuned Adam)
is described in :mod:`meta.evaluate`'s docstring.

A task's run goes in named steps:

1. :class:`GridLanes` steps every grid learning rate of every grid as one lane of a stacked copy of the
   parameters (one vmapped gradient call per step serves all lanes);
2. :class:`SingleRuns` steps every other optimizer on the same minibatches (one run each, or one per
   horizon for a horizon-aware optimizer);
3. after the run, full-batch losses are taken only at the recorded steps, on stored parameter
   snapshots: :func:`grid_results` (the tuned baselines: chosen learning rate per horizon) and
   :func:`optimizer_results`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from meta.results import TUNED_ADAM, TUNED_SGDM, GridRecord, HorizonResult, OptimizerResult, TaskResult
from optimizers.base import Optimizer, for_horizon
from optimizers.hand import SGD, Adam
from tasks.base import Task, seeded

SGDM_MOMENTUM = 0.9


def lr_grid(lo: float, hi: float, per_decade: int = 2) -> tuple[float, ...]:
    """Log-spaced grid from ``lo`` to ``hi`` inclusive; ``per_decade=2`` is the half-decade grid."""
    if lo <= 0 or hi < lo:
        raise ValueError(f"need 0 < lo <= hi, got {lo}, {hi}")
    a, b = math.log10(lo), math.log10(hi)
    n = int(round((b - a) * per_decade))
    return tuple(float(10.0 ** (a + i / per_decade)) for i in range(n + 1))


DEFAULT_ADAM_LRS = lr_grid(1e-4, 1e-1)  # 7 points, half-decade
DEFAULT_SGDM_LRS = lr_grid(1e-3, 1.0)  # 7 points, half-decade


def _adam(lr) -> Adam:
    return Adam(lr=lr)


def _sgdm(lr) -> SGD:
    return SGD(lr=lr, momentum=SGDM_MOMENTUM)


GRID_FACTORIES: dict[str, Callable[[Any], Optimizer]] = {"adam": _adam, "sgdm": _sgdm}
GRID_RESULT_NAME = {"adam": TUNED_ADAM, "sgdm": TUNED_SGDM}


# ---- small numeric helpers -------------------------------------------------------------------
def ema_curve(x: np.ndarray, decay: float) -> np.ndarray:
    """EMA along axis 0 started at the first value: ``e[0] = x[0]``, ``e[t] = d e[t-1] + (1-d) x[t]``."""
    out = np.empty_like(x, dtype=np.float64)
    acc = np.asarray(x[0], dtype=np.float64).copy()
    out[0] = acc
    for t in range(1, x.shape[0]):
        acc = decay * acc + (1.0 - decay) * x[t]
        out[t] = acc
    return out


def speedup(envelope: np.ndarray, loss: float, steps: int, rtol: float = 1e-6) -> tuple[float, bool]:
    """First step at which the reference envelope reaches ``loss``, over ``steps``; censored flag.

    "Reaches" allows a relative ``rtol`` so that float rounding between the batched (grid) and the
    unbatched computation of the same run does not move the hit by a step."""
    hit = np.flatnonzero(envelope <= loss * (1.0 + rtol))
    if hit.size:
        return float(hit[0]) / steps, False
    return float(len(envelope) - 1) / steps, True


def curve_steps(long_horizon: int, points: int = 30, extra: Sequence[int] = ()) -> list[int]:
    """About ``points`` log-spaced steps in ``[1, long_horizon]`` plus 0 and ``extra``."""
    raw = np.round(np.logspace(0.0, math.log10(max(long_horizon, 1)), max(points, 2))).astype(int)
    steps = {0, int(long_horizon), *(int(e) for e in extra), *(int(s) for s in raw)}
    return sorted(s for s in steps if 0 <= s <= long_horizon)


def horizon_labels(horizon: int, long_horizon: int) -> dict[str, int]:
    """Horizon label -> steps: ``{"H": horizon}`` plus e.g. ``"10H"`` for a longer ``long_horizon``."""
    if long_horizon == horizon:
        return {"H": horizon}
    return {"H": horizon, f"{long_horizon / horizon:g}H": long_horizon}


@dataclass
class GridPart:
    """The tuned baselines' part of one task's results, as :class:`meta.eval_cache.EvalCache` keeps it:
    their results, the grid records and tuned Adam's reference envelope (for the speed-ups)."""

    results: dict[str, OptimizerResult]
    grids: dict[str, GridRecord]
    envelope: list[float]


# ---- step 1: the grid lanes -------------------------------------------------------------------
class GridLanes:
    """Every grid point of every grid as one lane of a stacked, flattened copy of the parameters
    (``{name: (lanes, numel)}``); one vmapped gradient call per step serves all lanes.

    Adam and SGD are elementwise, so stepping the stacked lanes with a learning-rate *column* (lanes, 1)
    is exactly the per-lane update (what vmapping ``Adam(lr=lr).update`` computes), without vmap's
    per-call pytree overhead (measured ~2x faster for the two 7-point grids)."""

    def __init__(self, p0: dict, grids: Mapping[str, Sequence[float]], loss_fn: Callable):
        self.shapes = {k: v.shape for k, v in p0.items()}
        shapes = self.shapes

        def flat_loss(flat: dict, batch) -> torch.Tensor:
            return loss_fn({k: v.reshape(shapes[k]) for k, v in flat.items()}, batch)

        self.lrs: list[float] = []
        self.slices: dict[str, slice] = {}
        self.opt: dict[str, Optimizer] = {}
        self.state: dict[str, Any] = {}
        ref = next(iter(p0.values()))
        for gname, lrs in grids.items():
            self.slices[gname] = slice(len(self.lrs), len(self.lrs) + len(lrs))
            self.lrs.extend(float(lr) for lr in lrs)
            lr_col = torch.tensor([float(lr) for lr in lrs], dtype=ref.dtype, device=ref.device).reshape(-1, 1)
            self.opt[gname] = GRID_FACTORIES[gname](lr_col)
        self.n = len(self.lrs)
        self.lanes = {k: v.reshape(1, -1).repeat(self.n, 1) for k, v in p0.items()}
        for gname, sl in self.slices.items():
            self.state[gname] = self.opt[gname].init({k: v[sl] for k, v in self.lanes.items()})
        self.grad = vmap(grad_and_value(flat_loss), in_dims=(0, None))
        self.loss = vmap(flat_loss, in_dims=(0, None))
        self.losses: list[torch.Tensor] = []
        self.snaps: dict[int, dict] = {}

    def step(self, t: int, batch: Any, record: set[int], last: bool) -> None:
        """Record the lanes at step ``t`` if asked, take their minibatch losses, and (unless ``last``)
        update them."""
        if not self.n:
            return
        if t in record:
            self.snaps[t] = self.lanes
        if last:
            self.losses.append(self.loss(self.lanes, batch).detach())
            return
        grads, lvals = self.grad(self.lanes, batch)
        self.losses.append(lvals)
        if len(self.slices) == 1:
            (gname,) = self.slices
            self.lanes, self.state[gname] = self.opt[gname].update(grads, self.state[gname], self.lanes, loss=lvals)
            return
        parts = []
        for gname, sl in self.slices.items():
            new, self.state[gname] = self.opt[gname].update(
                {k: v[sl] for k, v in grads.items()}, self.state[gname],
                {k: v[sl] for k, v in self.lanes.items()}, loss=lvals[sl])
            parts.append(new)
        self.lanes = {k: torch.cat([p[k] for p in parts]) for k in self.lanes}

    def smoothed(self, task: Task, n_steps: int, ema: float) -> tuple[np.ndarray, np.ndarray]:
        """Per lane, the step its minibatch loss went non-finite (-1: never), and the EMA-smoothed
        normalised minibatch losses ``(steps + 1, lanes)`` (``max_loss`` from a divergence on)."""
        max_loss = float(task.max_loss)
        lane_div = np.full(self.n, -1, dtype=np.int64)
        lane_smoothed = np.zeros((n_steps + 1, self.n))
        if self.n:
            raw = torch.stack(self.losses).detach()
            bad = ~torch.isfinite(raw)
            arr = task.normalizer(raw).double().numpy()
            for j in range(self.n):
                idx = torch.nonzero(bad[:, j])
                if idx.numel():
                    lane_div[j] = int(idx[0])
                    arr[lane_div[j]:, j] = max_loss
            lane_smoothed = ema_curve(arr, ema)
        return lane_div, lane_smoothed

    def params(self, t: int, j: int) -> dict:
        """Lane ``j``'s parameters at recorded step ``t``, in the task's shapes."""
        return {k: v[j].reshape(self.shapes[k]) for k, v in self.snaps[t].items()}


# ---- step 2: the single optimizers ------------------------------------------------------------
class SingleRuns:
    """One run per optimizer, or, for an optimizer whose updates depend on the run's length
    (``horizon_aware``: a learned optimizer that sees the fraction of training), one run per horizon of
    exactly that length. ``runs`` maps a run key to (optimizer, its last step); ``run_of`` maps
    (name, horizon label) to the run key that answers it."""

    def __init__(self, optimizers: Mapping[str, Optimizer], horizons: Mapping[str, int], n_steps: int, p0: dict):
        self.runs: dict[str, tuple[Optimizer, int]] = {}
        self.run_of: dict[tuple[str, str], str] = {}
        for n, opt in optimizers.items():
            if getattr(opt, "horizon_aware", False):
                for label, T in horizons.items():
                    self.runs[f"{n}@{label}"] = (for_horizon(opt, T), T)
                    self.run_of[(n, label)] = f"{n}@{label}"
            else:
                self.runs[n] = (opt, n_steps)
                self.run_of.update({(n, label): n for label in horizons})
        self.names = list(self.runs)
        self.params = {n: p0 for n in self.names}
        self.states = {n: self.runs[n][0].init(p0) for n in self.names}
        self.losses: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.diverged_at: dict[str, int | None] = {n: None for n in self.names}
        self.snaps: dict[str, dict[int, dict]] = {n: {} for n in self.names}

    def step(self, t: int, batch: Any, record: set[int], loss_fn: Callable, loss_grad: Callable) -> None:
        """Step every live run on this minibatch; a run whose loss is non-finite stops here."""
        for n in self.names:
            if self.diverged_at[n] is not None or t > self.runs[n][1]:
                continue
            last = t == self.runs[n][1]
            p = self.params[n]
            if last:
                grads, lval = None, loss_fn(p, batch).detach()
            else:
                grads, lval = loss_grad(p, batch)
            if not bool(torch.isfinite(lval)):
                self.diverged_at[n] = t  # stop updating this run; its losses count as max_loss from here
                continue
            self.losses[n].append(lval)
            if t in record:
                self.snaps[n][t] = p
            if not last:
                self.params[n], self.states[n] = self.runs[n][0].update(grads, self.states[n], p, loss=lval)

    def smoothed(self, task: Task, ema: float) -> dict[str, np.ndarray]:
        """Per run, the EMA-smoothed normalised minibatch losses (``max_loss`` after a divergence)."""
        max_loss = float(task.max_loss)
        out: dict[str, np.ndarray] = {}
        for n in self.names:
            arr = np.full(self.runs[n][1] + 1, max_loss, dtype=np.float64)
            if self.losses[n]:
                arr[: len(self.losses[n])] = task.normalizer(torch.stack(self.losses[n])).double().numpy()
            out[n] = ema_curve(arr, ema)
        return out


# ---- step 3: results at the recorded steps ------------------------------------------------------
FullLoss = Callable[[dict, str], float]


def grid_results(lanes: GridLanes, horizons: Mapping[str, int], steps_to_record: Sequence[int],
                 envelope: np.ndarray, lane_div: np.ndarray, lane_smoothed: np.ndarray, max_loss: float,
                 full_loss: FullLoss) -> tuple[dict[str, OptimizerResult], dict[str, GridRecord]]:
    """The tuned baselines: per grid and horizon, the grid point with the lowest full-train loss (ties:
    the smaller learning rate), its losses, curve and speed-up; and every grid point's losses."""

    def diverged(j: int, t: int) -> bool:
        return bool(0 <= lane_div[j] <= t)

    def loss_at(j: int, t: int, split: str) -> float:
        return max_loss if diverged(j, t) else full_loss(lanes.params(t, j), split)

    results: dict[str, OptimizerResult] = {}
    records: dict[str, GridRecord] = {}
    curve_cache: dict[tuple[int, int], float] = {}
    for gname, sl in lanes.slices.items():
        idx = list(range(sl.start, sl.stop))
        rec = GridRecord(lrs=[lanes.lrs[j] for j in idx], train_loss={}, valid_loss={}, chosen_lr={},
                         diverged_step=[int(lane_div[j]) if lane_div[j] >= 0 else None for j in idx])
        out: dict[str, HorizonResult] = {}
        for label, T in horizons.items():
            train = [loss_at(j, T, "train") for j in idx]
            valid = [loss_at(j, T, "valid") for j in idx]
            best = int(np.argmin(train))  # ties -> the smaller learning rate
            j = idx[best]
            curve = []
            for s in sorted(x for x in steps_to_record if x <= T):
                if (j, s) not in curve_cache:
                    curve_cache[(j, s)] = loss_at(j, s, "train")
                curve.append(curve_cache[(j, s)])
            sm = float(lane_smoothed[T, j])
            sp, censored = speedup(envelope, sm, T)
            rec.train_loss[label], rec.valid_loss[label] = train, valid
            rec.chosen_lr[label] = lanes.lrs[j]
            out[label] = HorizonResult(
                train_loss=train[best], valid_loss=valid[best], smoothed_loss=sm, speedup=sp,
                speedup_censored=censored, diverged=bool(diverged(j, T)),
                diverged_step=int(lane_div[j]) if diverged(j, T) else None, lr=lanes.lrs[j], curve=curve)
        results[GRID_RESULT_NAME[gname]] = OptimizerResult(out)
        records[gname] = rec
    return results, records


def optimizer_results(single: SingleRuns, names: Sequence[str], horizons: Mapping[str, int],
                      steps_to_record: Sequence[int], envelope: np.ndarray, smoothed: Mapping[str, np.ndarray],
                      max_loss: float, full_loss: FullLoss) -> dict[str, OptimizerResult]:
    """Every optimizer's losses, curve and speed-up at each horizon, from the run that answers it."""
    curves: dict[str, dict[int, float]] = {}
    for n in single.names:
        div = single.diverged_at[n]
        curves[n] = {s: (max_loss if (div is not None and s >= div) else full_loss(single.snaps[n][s], "train"))
                     for s in sorted(steps_to_record) if s <= single.runs[n][1]}
    results: dict[str, OptimizerResult] = {}
    for name in names:
        out: dict[str, HorizonResult] = {}
        for label, T in horizons.items():
            n = single.run_of[(name, label)]
            div, curve_all, snaps = single.diverged_at[n], curves[n], single.snaps[n]
            gone = div is not None and div <= T
            sm = float(smoothed[n][T])
            sp, censored = speedup(envelope, sm, T)
            out[label] = HorizonResult(
                train_loss=curve_all[T] if T in curve_all else (max_loss if gone else full_loss(snaps[T], "train")),
                valid_loss=max_loss if gone else full_loss(snaps[T], "valid"),
                smoothed_loss=sm, speedup=sp, speedup_censored=censored,
                diverged=gone, diverged_step=div if gone else None,
                curve=[v for s, v in curve_all.items() if s <= T])
        results[name] = OptimizerResult(out)
    return results


# ---- one task ----------------------------------------------------------------------------------
def run_task(task: Task, optimizers: Mapping[str, Optimizer], grids: Mapping[str, Sequence[float]],
             horizons: Mapping[str, int], steps_to_record: Sequence[int], seed: int, ema: float,
             cached_grid: GridPart | None = None) -> tuple[TaskResult, GridPart]:
    """Run all optimizers and grids on one task; returns its result (``split_index`` None: the caller
    knows it) and the grids' part of it (what the cache keeps).

    ``cached_grid`` (from :class:`meta.eval_cache.EvalCache`): the grids' part of an earlier result on
    this task under the same protocol; the grid lanes are then not run and its results are used."""
    t_start = time.perf_counter()
    if cached_grid is not None:
        grids = {}
    n_steps = max(horizons.values())
    record = set(steps_to_record) | set(horizons.values())
    gen = seeded("evaluate", seed, task.seed)
    p0 = task.init_default()
    loss_fn = task.loss
    loss_grad = grad_and_value(loss_fn)
    lanes = GridLanes(p0, grids, loss_fn)
    single = SingleRuns(optimizers, horizons, n_steps, p0)
    for t in range(n_steps + 1):
        batch = task.sample_batch("train", gen)
        lanes.step(t, batch, record, last=t == n_steps)
        single.step(t, batch, record, loss_fn, loss_grad)
    run_seconds = time.perf_counter() - t_start

    max_loss = float(task.max_loss)
    full = {"train": task.full_batch("train"), "valid": task.full_batch("valid")}

    def full_loss(p: dict, split: str) -> float:
        with torch.no_grad():
            return float(task.normalizer(loss_fn(p, full[split]).detach()))

    smoothed = single.smoothed(task, ema)
    lane_div, lane_smoothed = lanes.smoothed(task, n_steps, ema)
    if cached_grid is not None:
        envelope = np.asarray(cached_grid.envelope, dtype=np.float64)
        results, grid_records = dict(cached_grid.results), dict(cached_grid.grids)
    else:
        envelope = np.minimum.accumulate(lane_smoothed[:, lanes.slices["adam"]].min(axis=1))
        results, grid_records = grid_results(lanes, horizons, steps_to_record, envelope, lane_div, lane_smoothed,
                                             max_loss, full_loss)
    grid_part = GridPart(dict(results), grid_records, envelope.tolist())
    results.update(optimizer_results(single, list(optimizers), horizons, steps_to_record, envelope, smoothed,
                                     max_loss, full_loss))
    result = TaskResult(split_index=None, seed=task.seed, config=task.config, max_loss=max_loss,
                        run_seconds=run_seconds, results=results, grids=grid_records)
    return result, grid_part


__all__ = ["DEFAULT_ADAM_LRS", "DEFAULT_SGDM_LRS", "GRID_FACTORIES", "GRID_RESULT_NAME", "GridLanes", "GridPart",
           "SGDM_MOMENTUM", "SingleRuns", "curve_steps", "ema_curve", "grid_results", "horizon_labels", "lr_grid",
           "optimizer_results", "run_task", "speedup"]
