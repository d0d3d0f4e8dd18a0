"""Evaluate optimizers on held-out tasks against per-task tuned Adam (and tuned SGD with momentum).

:func:`evaluate` runs every optimizer on ``num_tasks`` tasks of one split of a
:class:`~tasks.base.TaskDistribution` and returns JSON-able results; :func:`write_report` writes them
as ``results.json``, a markdown table ``results.md`` and a loss-curve plot ``curves.png``.

Protocol, per task ``dist.task(split, i)``:

* every run starts from the task's own initialisation (``task.init_default()``) and sees the same
  minibatch sequence (``seeded("evaluate", seed, task.seed)``), so per-task comparisons are paired;
* every optimizer is run ONCE for ``long_horizon`` steps. Its updates do not depend on the total
  horizon, so the parameters after ``horizon`` steps of the long run are the ``horizon``-step result;
  both horizons are reported (labels ``"H"`` and e.g. ``"10H"``);
* at each horizon ``T`` the full training split (``task.full_batch("train")``) and the validation
  split (``task.full_batch("valid")``) losses are recorded, plus a full-train-loss curve at
  ``curve_points`` log-spaced steps (for plots). All losses go through ``task.normalizer`` (clipped to
  ``[0, max_loss]``, NaN/inf -> ``max_loss``);
* **tuned Adam** (``"tuned_adam"``): Adam over the learning-rate grid ``adam_lrs`` (all grid points
  stepped in one ``torch.func.vmap`` call per step), and *per task and per horizon* the grid point with
  the lowest final full-train loss is kept. This is oracle tuning on the evaluation task itself: the
  strongest fair hand-designed baseline, deliberately favourable to Adam. ``"tuned_sgdm"`` is the same
  for SGD with momentum 0.9 over ``sgdm_lrs``. Tuning uses the *train* loss; the validation loss
  reported for a tuned baseline is that of the chosen learning rate;
* a run whose minibatch loss becomes non-finite is stopped there (grid lanes are masked from then on)
  and its losses count as ``task.max_loss`` from that step; such runs are counted as ``diverged``.

Speed-up over tuned Adam (VeLO's protocol, Metz et al. 2022, arXiv:2211.09760, simplified to one seed):

1. each run's per-step *minibatch* training loss (the loss at which its gradient is taken, after
   ``normalizer``) is smoothed by an EMA with decay ``ema`` = 0.95, started at the first value;
2. the tuned-Adam reference curve is the lower envelope of the smoothed curves over all Adam grid
   learning rates at each step, followed by a cumulative minimum over steps: ``env[s]`` is the best
   smoothed loss any grid Adam reached within ``s`` steps;
3. for an optimizer with smoothed loss ``L`` at step ``T`` (no cumulative minimum on its side),
   ``S`` is the first step with ``env[S] <= L`` (up to a relative 1e-6 for float rounding) and the speed-up is ``S / T`` (1 = as fast as tuned
   Adam, 2 = Adam needs twice as many steps to reach the same loss, 0.5 = half as fast);
4. Adam is only run for ``long_horizon`` steps, so if it never reaches ``L`` the reported value is the
   lower bound ``long_horizon / T`` and ``speedup_censored`` is true. At ``T = long_horizon`` the
   largest measurable speed-up is therefore 1: a censored value there means "at least as fast as tuned
   Adam over the whole run".

Speed: all grid learning rates of all grids share one vmapped ``torch.func.grad_and_value`` call per
step over the lane-stacked parameters, followed by one ``Adam(lr=lr_column)`` / ``SGD(...)`` update
per grid on the stacked lanes (elementwise optimizers, so this equals a vmapped update); the full
batch is evaluated only at the recording steps, after the run, on stored parameter snapshots (and for
the grids only for the chosen learning rate). Tasks are spread over ``workers`` forked processes (one
torch thread each): the per-step work is dominated by Python/op overhead, so processes, not threads,
use the cores.
"""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from meta import stats
from meta.eval_cache import EvalCache, optimizer_fingerprint, task_key
from optimizers.base import Optimizer, for_horizon
from optimizers.hand import SGD, Adam
from tasks.base import Task, TaskDistribution, seeded

__all__ = [
    "evaluate", "write_report", "summarize", "lr_grid", "DEFAULT_ADAM_LRS", "DEFAULT_SGDM_LRS",
    "TUNED_ADAM", "TUNED_SGDM",
]

TUNED_ADAM = "tuned_adam"
TUNED_SGDM = "tuned_sgdm"
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
def _ema(x: np.ndarray, decay: float) -> np.ndarray:
    """EMA along axis 0 started at the first value: ``e[0] = x[0]``, ``e[t] = d e[t-1] + (1-d) x[t]``."""
    out = np.empty_like(x, dtype=np.float64)
    acc = np.asarray(x[0], dtype=np.float64).copy()
    out[0] = acc
    for t in range(1, x.shape[0]):
        acc = decay * acc + (1.0 - decay) * x[t]
        out[t] = acc
    return out


def _speedup(envelope: np.ndarray, loss: float, steps: int, rtol: float = 1e-6) -> tuple[float, bool]:
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
    if long_horizon == horizon:
        return {"H": horizon}
    return {"H": horizon, f"{long_horizon / horizon:g}H": long_horizon}


# ---- one task --------------------------------------------------------------------------------
def _run_task(task: Task, optimizers: Mapping[str, Optimizer], grids: Mapping[str, Sequence[float]],
              horizons: Mapping[str, int], steps_to_record: Sequence[int], seed: int, ema: float,
              cached_grid: dict | None = None) -> dict:
    """Run all optimizers and grids on one task; returns the JSON-able per-task record.

    ``cached_grid`` (from :class:`meta.eval_cache.EvalCache`): the grids' part of an earlier record of
    this task under the same protocol; the grid lanes are then not run. The record's ``"_grid"`` entry
    is that part (for the cache; the caller removes it)."""
    t_start = time.perf_counter()
    if cached_grid is not None:
        grids = {}
    n_steps = max(horizons.values())
    record = set(steps_to_record) | set(horizons.values())
    gen = seeded("evaluate", seed, task.seed)
    p0 = task.init_default()
    loss_fn = task.loss
    loss_grad = grad_and_value(loss_fn)

    # -- grid lanes: every grid point of every grid is one lane of a stacked, flattened copy of the
    #    parameters ({name: (lanes, numel)}); one vmapped gradient call per step serves all lanes.
    #    Adam and SGD are elementwise, so stepping the stacked lanes with a learning-rate *column*
    #    (lanes, 1) is exactly the per-lane update (what vmapping ``Adam(lr=lr).update`` computes),
    #    without vmap's per-call pytree overhead (measured ~2x faster for the two 7-point grids).
    shapes = {k: v.shape for k, v in p0.items()}

    def flat_loss(flat: dict, batch) -> torch.Tensor:
        return loss_fn({k: v.reshape(shapes[k]) for k, v in flat.items()}, batch)

    lane_lrs: list[float] = []
    slices: dict[str, slice] = {}
    grid_opt: dict[str, Optimizer] = {}
    grid_state: dict[str, Any] = {}
    ref = next(iter(p0.values()))
    for gname, lrs in grids.items():
        slices[gname] = slice(len(lane_lrs), len(lane_lrs) + len(lrs))
        lane_lrs.extend(float(lr) for lr in lrs)
        lr_col = torch.tensor([float(lr) for lr in lrs], dtype=ref.dtype, device=ref.device).reshape(-1, 1)
        grid_opt[gname] = GRID_FACTORIES[gname](lr_col)
    n_lanes = len(lane_lrs)
    lanes = {k: v.reshape(1, -1).repeat(n_lanes, 1) for k, v in p0.items()}
    for gname, sl in slices.items():
        grid_state[gname] = grid_opt[gname].init({k: v[sl] for k, v in lanes.items()})
    lanes_grad = vmap(grad_and_value(flat_loss), in_dims=(0, None))
    lanes_loss = vmap(flat_loss, in_dims=(0, None))
    lane_losses: list[torch.Tensor] = []
    lane_snaps: dict[int, dict] = {}

    # -- single optimizers: one run each, or, for an optimizer whose updates depend on the run's length
    #    (``horizon_aware``: a learned optimizer that sees the fraction of training), one run per horizon
    #    of exactly that length. ``runs`` maps a run key to (optimizer, its last step).
    runs: dict[str, tuple[Optimizer, int]] = {}
    run_of: dict[tuple[str, str], str] = {}  # (name, horizon label) -> run key
    for n, opt in optimizers.items():
        if getattr(opt, "horizon_aware", False):
            for label, T in horizons.items():
                runs[f"{n}@{label}"] = (for_horizon(opt, T), T)
                run_of[(n, label)] = f"{n}@{label}"
        else:
            runs[n] = (opt, n_steps)
            run_of.update({(n, label): n for label in horizons})
    names = list(runs)
    params = {n: p0 for n in names}
    states = {n: runs[n][0].init(p0) for n in names}
    losses: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    diverged_at: dict[str, int | None] = {n: None for n in names}
    snaps: dict[str, dict[int, dict]] = {n: {} for n in names}

    for t in range(n_steps + 1):
        batch = task.sample_batch("train", gen)
        last = t == n_steps
        if n_lanes:
            if t in record:
                lane_snaps[t] = lanes
            if last:
                lane_losses.append(lanes_loss(lanes, batch).detach())
            else:
                grads, lvals = lanes_grad(lanes, batch)
                lane_losses.append(lvals)
                if len(slices) == 1:
                    (gname,) = slices
                    lanes, grid_state[gname] = grid_opt[gname].update(grads, grid_state[gname], lanes, loss=lvals)
                else:
                    parts = []
                    for gname, sl in slices.items():
                        new, grid_state[gname] = grid_opt[gname].update(
                            {k: v[sl] for k, v in grads.items()}, grid_state[gname],
                            {k: v[sl] for k, v in lanes.items()}, loss=lvals[sl])
                        parts.append(new)
                    lanes = {k: torch.cat([p[k] for p in parts]) for k in lanes}
        for n in names:
            if diverged_at[n] is not None or t > runs[n][1]:
                continue
            last = t == runs[n][1]
            p = params[n]
            if last:
                grads, lval = None, loss_fn(p, batch).detach()
            else:
                grads, lval = loss_grad(p, batch)
            if not bool(torch.isfinite(lval)):
                diverged_at[n] = t  # stop updating this run; its losses count as max_loss from here
                continue
            losses[n].append(lval)
            if t in record:
                snaps[n][t] = p
            if not last:
                params[n], states[n] = runs[n][0].update(grads, states[n], p, loss=lval)
    run_seconds = time.perf_counter() - t_start

    # -- bookkeeping after the run (full-batch losses only at the recorded steps)
    max_loss = float(task.max_loss)
    full = {"train": task.full_batch("train"), "valid": task.full_batch("valid")}

    def full_loss(p: dict, split: str) -> float:
        with torch.no_grad():
            return float(task.normalizer(loss_fn(p, full[split]).detach()))

    smoothed: dict[str, np.ndarray] = {}
    for n in names:
        arr = np.full(runs[n][1] + 1, max_loss, dtype=np.float64)
        if losses[n]:
            arr[: len(losses[n])] = task.normalizer(torch.stack(losses[n])).double().numpy()
        smoothed[n] = _ema(arr, ema)
    lane_div = np.full(n_lanes, -1, dtype=np.int64)
    lane_smoothed = np.zeros((n_steps + 1, n_lanes))
    if n_lanes:
        raw = torch.stack(lane_losses).detach()
        bad = ~torch.isfinite(raw)
        arr = task.normalizer(raw).double().numpy()
        for j in range(n_lanes):
            idx = torch.nonzero(bad[:, j])
            if idx.numel():
                lane_div[j] = int(idx[0])
                arr[lane_div[j]:, j] = max_loss
        lane_smoothed = _ema(arr, ema)
    if cached_grid is not None:
        envelope = np.asarray(cached_grid["envelope"], dtype=np.float64)
    else:
        envelope = np.minimum.accumulate(lane_smoothed[:, slices["adam"]].min(axis=1))

    def lane_params(t: int, j: int) -> dict:
        return {k: v[j].reshape(shapes[k]) for k, v in lane_snaps[t].items()}

    def lane_diverged(j: int, t: int) -> bool:
        return bool(0 <= lane_div[j] <= t)

    results: dict[str, dict] = {}
    grid_records: dict[str, dict] = {}
    curve_cache: dict[tuple[int, int], float] = {}
    for gname, sl in slices.items():
        idx = list(range(sl.start, sl.stop))
        rec = {"lrs": [lane_lrs[j] for j in idx], "train_loss": {}, "valid_loss": {}, "chosen_lr": {},
               "diverged_step": [int(lane_div[j]) if lane_div[j] >= 0 else None for j in idx]}
        out: dict[str, dict] = {}
        for label, T in horizons.items():
            train = [max_loss if lane_diverged(j, T) else full_loss(lane_params(T, j), "train") for j in idx]
            valid = [max_loss if lane_diverged(j, T) else full_loss(lane_params(T, j), "valid") for j in idx]
            best = int(np.argmin(train))  # ties -> the smaller learning rate
            j = idx[best]
            curve = []
            for s in sorted(x for x in steps_to_record if x <= T):
                if (j, s) not in curve_cache:
                    curve_cache[(j, s)] = max_loss if lane_diverged(j, s) else full_loss(lane_params(s, j), "train")
                curve.append(curve_cache[(j, s)])
            sm = float(lane_smoothed[T, j])
            sp, censored = _speedup(envelope, sm, T)
            rec["train_loss"][label], rec["valid_loss"][label] = train, valid
            rec["chosen_lr"][label] = lane_lrs[j]
            out[label] = {
                "train_loss": train[best], "valid_loss": valid[best], "smoothed_loss": sm,
                "speedup": sp, "speedup_censored": censored, "diverged": bool(lane_diverged(j, T)),
                "diverged_step": int(lane_div[j]) if lane_diverged(j, T) else None,
                "lr": lane_lrs[j], "curve": curve,
            }
        results[GRID_RESULT_NAME[gname]] = out
        grid_records[gname] = rec
    if cached_grid is not None:
        results = dict(cached_grid["results"])
        grid_records = dict(cached_grid["grids"])
    grid_part = {"results": dict(results), "grids": grid_records, "envelope": envelope.tolist()}

    curves: dict[str, dict[int, float]] = {}
    for n in names:
        div = diverged_at[n]
        curves[n] = {s: (max_loss if (div is not None and s >= div) else full_loss(snaps[n][s], "train"))
                     for s in sorted(steps_to_record) if s <= runs[n][1]}
    for name in optimizers:
        out = {}
        for label, T in horizons.items():
            n = run_of[(name, label)]
            div, curve_all = diverged_at[n], curves[n]
            gone = div is not None and div <= T
            sm = float(smoothed[n][T])
            sp, censored = _speedup(envelope, sm, T)
            out[label] = {
                "train_loss": curve_all[T] if T in curve_all else (
                    max_loss if gone else full_loss(snaps[n][T], "train")),
                "valid_loss": max_loss if gone else full_loss(snaps[n][T], "valid"),
                "smoothed_loss": sm, "speedup": sp, "speedup_censored": censored,
                "diverged": gone, "diverged_step": div if gone else None,
                "curve": [v for s, v in curve_all.items() if s <= T],
            }
        results[name] = out

    return {
        "split_index": None,  # filled by the caller
        "seed": task.seed,
        "config": task.config,
        "max_loss": max_loss,
        "run_seconds": run_seconds,
        "results": results,
        "grids": grid_records,
        "_grid": grid_part,
    }


# ---- parallel driver -------------------------------------------------------------------------
_WORK: dict | None = None  # set in the parent right before forking workers; inherited, never pickled


def _init_worker() -> None:
    torch.set_num_threads(1)


def _work(index: int) -> dict:
    """One task's record. With a cache (``spec["cache"]``), the grid lanes and the optimizers already
    evaluated on this task under this protocol are looked up, and only the rest is run; the record then
    carries ``_cache_key`` so the parent can store what was computed."""
    spec = _WORK
    assert spec is not None, "worker started without a work spec"
    task = spec["dist"].task(spec["split"], index)
    cache, optimizers = spec.get("cache"), spec["optimizers"]
    if cache is None:
        rec = _run_task(task, optimizers, spec["grids"], spec["horizons"], spec["curve_steps"],
                        spec["seed"], spec["ema"])
        rec.pop("_grid")
    else:
        key = task_key(spec["dist"].digest(), spec["split"], task, spec["protocol"])
        hits = {n: cache.result(key, spec["fingerprints"][n]) for n in optimizers}
        todo = {n: o for n, o in optimizers.items() if hits[n] is None}
        cached_grid = cache.grid(key)
        if todo or cached_grid is None:
            rec = _run_task(task, todo, spec["grids"], spec["horizons"], spec["curve_steps"], spec["seed"],
                            spec["ema"], cached_grid=cached_grid)
        else:  # everything known: no run at all
            rec = {"seed": task.seed, "config": task.config, "max_loss": float(task.max_loss),
                   "run_seconds": 0.0, "results": dict(cached_grid["results"]),
                   "grids": dict(cached_grid["grids"]), "_grid": cached_grid}
        found = {n: r for n, r in hits.items() if r is not None}
        rec["results"] = {**{n: r for n, r in rec["results"].items() if n not in optimizers},
                          **{n: found[n] if n in found else rec["results"][n] for n in optimizers}}
        rec["_cache_key"] = key
        rec["_cache_hits"] = len(found) + (cached_grid is not None)
    rec["split_index"] = index
    return rec


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _can_fork() -> bool:
    return "fork" in mp.get_all_start_methods() and not mp.current_process().daemon


# ---- public API ------------------------------------------------------------------------------
def evaluate(
    optimizers: Mapping[str, Optimizer],
    dist: TaskDistribution,
    *,
    split: str = "held_out",
    num_tasks: int = 20,
    horizon: int = 200,
    long_horizon: int | None = None,
    adam_lrs: Sequence[float] = DEFAULT_ADAM_LRS,
    sgdm_lrs: Sequence[float] | None = DEFAULT_SGDM_LRS,
    seed: int = 0,
    progress: bool = True,
    curve_points: int = 30,
    ema: float = 0.95,
    level: float = 0.95,
    ci_method: str = "t",
    start: int = 0,
    workers: int | None = None,
    cache: EvalCache | None = None,
) -> dict:
    """Compare ``optimizers`` with per-task tuned Adam / SGDM on tasks ``start..start+num_tasks-1``.

    ``long_horizon`` defaults to ``10 * horizon``. ``adam_lrs`` / ``sgdm_lrs`` are the tuning grids
    (default: half-decade grids 1e-4..1e-1 and 1e-3..1, 7 points each; ``sgdm_lrs=None`` or empty skips
    SGDM). Tuned Adam is an *oracle* per-task, per-horizon choice of the grid learning rate with the
    lowest final full-train loss: the strongest fair hand-designed baseline. ``workers``: processes to
    spread tasks over (default: the available cores, at most ``num_tasks``; 1 runs in this process;
    optimizers are inherited by forking, so they need not be picklable). See the module docstring for
    the protocol and the speed-up definition. ``cache`` (:class:`meta.eval_cache.EvalCache`): reuse
    per-task results of an earlier call under the same protocol (tuned baselines, and optimizers with
    a ``fingerprint()``) and store this call's; the results are identical, only faster.

    Under a process group (``torchrun``, see :mod:`meta.distributed`) call it on every rank with the
    same arguments: tasks are dealt round-robin to ranks (each may still fork ``workers`` processes;
    default: its share of the node's cores), the per-task records are all-gathered, and every rank
    returns the same results, equal to the single-process ones except the timings (``runtime_s``,
    ``run_seconds``). Code that decides on them (e.g. the governor) therefore decides the same on
    every rank.

    Returns a JSON-able dict:

    * ``meta``: distribution, split, ``task_indices``, ``horizons`` (label -> steps, e.g.
      ``{"H": 200, "10H": 2000}``), grids, seed, ``curve_steps``, ``runtime_s``, ``workers``, the
      speed-up definition;
    * ``optimizers``: result names, ``"tuned_adam"``, ``"tuned_sgdm"`` (if a grid was given), then the
      keys of ``optimizers``;
    * ``tasks``: one record per task: ``split_index``, ``seed``, ``config``, ``max_loss``,
      ``run_seconds``, ``results[name][label]`` = ``{train_loss, valid_loss, smoothed_loss, speedup,
      speedup_censored, diverged, diverged_step, curve}`` (+ ``lr`` for the tuned baselines; ``curve``
      holds the full-train loss at the ``curve_steps`` up to that horizon), and ``grids[g]`` =
      ``{lrs, train_loss[label], valid_loss[label] (per grid lr), chosen_lr[label], diverged_step}``;
    * ``summary[label][name]``: means and intervals across tasks, see :func:`summarize`;
    * ``chosen_lrs[g][label]``: the chosen grid learning rate of every task;
    * ``warnings``: e.g. best grid learning rate at the edge of the grid, diverged runs.
    """
    long_horizon = 10 * horizon if long_horizon is None else long_horizon
    if horizon < 1 or long_horizon < horizon:
        raise ValueError(f"need 1 <= horizon <= long_horizon, got {horizon}, {long_horizon}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    adam_lrs = [float(x) for x in adam_lrs]
    sgdm_lrs = [float(x) for x in (sgdm_lrs or ())]
    if not adam_lrs or any(not (x >= 0 and math.isfinite(x)) for x in adam_lrs + sgdm_lrs):
        raise ValueError("adam_lrs must be non-empty and grid learning rates finite and >= 0, "
                         f"got adam_lrs={adam_lrs}, sgdm_lrs={sgdm_lrs}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must lie in [0, 1), got {ema}")
    if ci_method not in ("t", "bootstrap") or not 0.0 < level < 1.0:
        raise ValueError(f"need ci_method 't' or 'bootstrap' and 0 < level < 1, got {ci_method!r}, {level}")
    for name in optimizers:
        if name in (TUNED_ADAM, TUNED_SGDM):
            raise ValueError(f"optimizer name {name!r} is reserved for the tuned baselines")
        if not isinstance(optimizers[name], Optimizer):
            raise TypeError(f"optimizers[{name!r}] has no init/update (got {type(optimizers[name]).__name__})")
    grids = {"adam": adam_lrs}
    if sgdm_lrs:
        grids["sgdm"] = sgdm_lrs
    horizons = horizon_labels(horizon, long_horizon)
    steps = curve_steps(long_horizon, curve_points, extra=list(horizons.values()))
    indices = list(range(start, start + num_tasks))
    # under a process group (torchrun) each rank runs every world_size-th task, then all ranks gather
    # all records, so every rank returns the same (identical to single-process) results
    from meta import distributed as D

    sharded = D.active()
    mine = D.shard(indices, mode="strided") if sharded else indices
    if workers is None:
        workers = min(max(1, _available_cores() // D.local_world_size()), num_tasks)
    workers = max(1, min(int(workers), num_tasks, max(len(mine), 1)))
    notes: list[str] = []
    if workers > 1 and not _can_fork():
        notes.append("parallel evaluation needs the 'fork' start method in a non-daemon process; ran serially")
        workers = 1

    from tqdm import tqdm

    global _WORK
    t0 = time.perf_counter()
    records: dict[int, dict] = {}
    spec = dict(dist=dist, split=split, optimizers=dict(optimizers), grids=grids, horizons=horizons,
                curve_steps=steps, seed=seed, ema=ema)
    if cache is not None:
        fingerprints = {n: optimizer_fingerprint(o) for n, o in optimizers.items()}
        spec.update(cache=cache, fingerprints=fingerprints,
                    protocol={"horizons": horizons, "curve_steps": steps, "grids": grids, "seed": seed,
                              "ema": ema})
    bar = tqdm(total=len(mine), desc=f"evaluate {dist.name}/{split}", unit="task",
               disable=not (progress and D.is_main()))
    try:
        if workers == 1:
            _WORK = spec
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny ops: intra-op threads only add overhead (4x under load)
            try:
                for i in mine:
                    records[i] = _work(i)
                    bar.update(1)
            finally:
                torch.set_num_threads(threads)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            importlib.import_module("torch._dynamo")  # vmapped grads import it lazily (~3 s): once, not per fork

            _WORK = spec
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                     initializer=_init_worker) as pool:
                futures = {pool.submit(_work, i): i for i in mine}
                try:
                    for fut in as_completed(futures):
                        records[futures[fut]] = fut.result()
                        bar.update(1)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        _WORK = None
        bar.close()
    runtime = time.perf_counter() - t0
    if sharded:
        parts = D.all_gather_object((records, runtime, workers))
        records = {i: rec for part, _, _ in parts for i, rec in part.items()}
        runtime, workers = max(p[1] for p in parts), parts[0][2]

    task_records = [records[i] for i in indices]
    for rec in task_records:
        grid_part = rec.pop("_grid", None)
        if cache is not None:
            cache.store(rec.pop("_cache_key"), grid_part, rec["results"], fingerprints)
            cache.count(bool(rec.pop("_cache_hits")))
    names = [TUNED_ADAM] + ([TUNED_SGDM] if sgdm_lrs else []) + list(optimizers)
    results = {
        "meta": {
            "distribution": dist.name,
            "distribution_digest": dist.digest(),
            "split": split,
            "task_indices": indices,
            "num_tasks": num_tasks,
            "horizons": horizons,
            "adam_lrs": adam_lrs,
            "sgdm_lrs": sgdm_lrs,
            "sgdm_momentum": SGDM_MOMENTUM,
            "seed": seed,
            "ema": ema,
            "level": level,
            "ci_method": ci_method,
            "curve_steps": steps,
            "runtime_s": runtime,
            "workers": workers,  # per rank
            "ranks": D.world_size() if sharded else 1,
            "torch_threads_per_worker": 1,
            "speedup_definition": (
                "S/T where S is the first step at which tuned Adam's reference curve (EMA(%g)-smoothed "
                "normalised minibatch loss, lower envelope over the Adam learning-rate grid, cumulative "
                "min) reaches the optimizer's smoothed loss at step T; if never reached within the "
                "%d steps run, the lower bound %d/T is reported with speedup_censored=true" % (
                    ema, long_horizon, long_horizon)
            ),
            "tuning": "per-task, per-horizon oracle: grid learning rate with the lowest final full-train loss",
        },
        "optimizers": names,
        "tasks": task_records,
    }
    results["summary"] = summarize(task_records, names, list(horizons), level=level, method=ci_method)
    results["chosen_lrs"] = {
        g: {label: [r["grids"][g]["chosen_lr"][label] for r in task_records] for label in horizons}
        for g in grids
    }
    results["warnings"] = notes + _warnings(results, grids)
    return results


def summarize(task_records: Sequence[dict], names: Sequence[str], labels: Sequence[str], *,
              level: float = 0.95, method: str = "t") -> dict:
    """Aggregate per-task records: ``summary[label][name]`` holds

    * ``train_loss``, ``valid_loss``: ``{mean, lo, hi, n, level, method}`` (final normalised losses);
    * ``speedup``: the same plus ``median``, ``p10``, ``p90`` and ``censored`` (count of lower bounds);
    * ``diverged``: number of tasks on which the run diverged by that horizon;
    * ``diff_vs_tuned_adam`` (all but tuned Adam itself): paired per-task differences (this optimizer
      minus tuned Adam) of ``train_loss`` and ``valid_loss``, each an interval plus ``excludes_zero``.
      A negative difference whose interval excludes zero means "better than tuned Adam".
    """
    summary: dict[str, dict] = {}
    for label in labels:
        per: dict[str, dict] = {}
        ref_train = [r["results"][TUNED_ADAM][label]["train_loss"] for r in task_records]
        ref_valid = [r["results"][TUNED_ADAM][label]["valid_loss"] for r in task_records]
        for name in names:
            rows = [r["results"][name][label] for r in task_records]
            train = [x["train_loss"] for x in rows]
            valid = [x["valid_loss"] for x in rows]
            speed = [x["speedup"] for x in rows]
            entry = {
                "train_loss": stats.mean_ci(train, level, method),
                "valid_loss": stats.mean_ci(valid, level, method),
                "speedup": {**stats.describe(speed, level, method),
                            "censored": sum(bool(x["speedup_censored"]) for x in rows)},
                "diverged": sum(bool(x["diverged"]) for x in rows),
            }
            if name != TUNED_ADAM:
                diff = {}
                for key, ref in (("train_loss", ref_train), ("valid_loss", ref_valid)):
                    ci = stats.paired_diff_ci([x[key] for x in rows], ref, level, method)
                    ci["excludes_zero"] = stats.excludes_zero(ci)
                    diff[key] = ci
                entry["diff_vs_tuned_adam"] = diff
            per[name] = entry
        summary[label] = per
    return summary


def _warnings(results: dict, grids: Mapping[str, Sequence[float]]) -> list[str]:
    out: list[str] = []
    horizons = results["meta"]["horizons"]
    n = results["meta"]["num_tasks"]
    for g, lrs in grids.items():
        if len(lrs) < 2:
            continue
        lo, hi = min(lrs), max(lrs)
        for label, T in horizons.items():
            chosen = results["chosen_lrs"][g][label]
            n_lo = sum(c == lo for c in chosen)
            n_hi = sum(c == hi for c in chosen)
            if n_lo or n_hi:
                out.append(
                    f"{GRID_RESULT_NAME[g]} at {label}={T}: best learning rate at the edge of the grid on "
                    f"{n_lo + n_hi}/{n} tasks ({n_lo} at the lowest {lo:.3g}, {n_hi} at the highest "
                    f"{hi:.3g}); widen {g}_lrs for a fully tuned baseline"
                )
    for label, per in results["summary"].items():
        for name, entry in per.items():
            if entry["diverged"]:
                out.append(f"{name} diverged on {entry['diverged']}/{n} tasks by {label}={horizons[label]}")
    return out


# ---- report ----------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _fmt_ci(ci: dict, digits: int = 4) -> str:
    if ci.get("lo") is None:
        return _fmt(ci["mean"], digits)
    return f"{_fmt(ci['mean'], digits)} [{_fmt(ci['lo'], digits)}, {_fmt(ci['hi'], digits)}]"


def _markdown(results: dict) -> str:
    meta = results["meta"]
    pct = int(round(100 * meta["level"]))
    lines = [
        f"# Evaluation on {meta['distribution']} / {meta['split']}",
        "",
        f"{meta['num_tasks']} tasks (indices {meta['task_indices'][0]}..{meta['task_indices'][-1]}), "
        f"horizons {', '.join(f'{k}={v}' for k, v in meta['horizons'].items())}, eval seed {meta['seed']}, "
        f"runtime {meta['runtime_s']:.1f} s ({meta['workers']} worker(s)).",
        "",
        f"Mean over tasks with {pct}% {meta['ci_method']}-interval. Losses are normalised "
        "(`task.normalizer`): full training split and validation split at the final step.",
        f"Tuned Adam: per-task oracle over lr {_grid_str(meta['adam_lrs'])}"
        + (f"; tuned SGDM (momentum {meta['sgdm_momentum']}) over {_grid_str(meta['sgdm_lrs'])}."
           if meta["sgdm_lrs"] else "."),
        f"Speed-up over tuned Adam: {meta['speedup_definition']}.",
        "",
        "| optimizer | horizon | train loss | valid loss | speed-up vs tuned Adam | censored | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    n = meta["num_tasks"]
    for name in results["optimizers"]:
        for label, T in meta["horizons"].items():
            e = results["summary"][label][name]
            lines.append(
                f"| {name} | {label}={T} | {_fmt_ci(e['train_loss'])} | {_fmt_ci(e['valid_loss'])} | "
                f"{_fmt_ci(e['speedup'], 3)} (median {_fmt(e['speedup']['median'], 3)}) | "
                f"{e['speedup']['censored']}/{n} | {e['diverged']}/{n} |"
            )
    lines += [
        "",
        f"## Paired difference vs tuned Adam (optimizer minus tuned Adam, per task; {pct}% interval)",
        "",
        "| optimizer | horizon | train loss diff | excludes 0 | valid loss diff | excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name in results["optimizers"]:
        if name == TUNED_ADAM:
            continue
        for label, T in meta["horizons"].items():
            d = results["summary"][label][name]["diff_vs_tuned_adam"]
            lines.append(
                f"| {name} | {label}={T} | {_fmt_ci(d['train_loss'])} | {'yes' if d['train_loss']['excludes_zero'] else 'no'} "
                f"| {_fmt_ci(d['valid_loss'])} | {'yes' if d['valid_loss']['excludes_zero'] else 'no'} |"
            )
    lines += ["", "## Chosen learning rates (tasks per grid point)", ""]
    for g, per in results["chosen_lrs"].items():
        grid = meta["adam_lrs"] if g == "adam" else meta["sgdm_lrs"]
        for label, chosen in per.items():
            counts = ", ".join(f"{lr:.3g}: {sum(c == lr for c in chosen)}" for lr in grid)
            lines.append(f"- {GRID_RESULT_NAME[g]} at {label}: {counts}")
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def _grid_str(lrs: Sequence[float]) -> str:
    return f"{min(lrs):.3g}..{max(lrs):.3g} ({len(lrs)} points)" if lrs else "-"


def write_outputs(results: dict, out_dir: str | os.PathLike, markdown: str, plot: Callable[[dict, Path], Any],
                  png: str) -> dict[str, Path]:
    """``results.json``, ``results.md`` (``markdown``) and ``png`` (drawn by ``plot``) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / png}
    paths["json"].write_text(json.dumps(results, indent=1, allow_nan=False))
    paths["md"].write_text(markdown)
    plot(results, paths["png"])
    return paths


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``curves.png`` into ``out_dir``; returns their paths."""
    from meta.plots import plot_curves

    return write_outputs(results, out_dir, _markdown(results), plot_curves, "curves.png")
