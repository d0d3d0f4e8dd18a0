"""Evaluate optimizers on held-out tasks against per-task tuned Adam (and tuned SGD with momentum).

:func:`evaluate` runs every optimizer on ``num_tasks`` tasks of one split of a
:class:`~tasks.base.TaskDistribution` and returns typed results (:class:`meta.results.EvalResults`,
whose ``to_json()`` is ``results.json``); :func:`write_report` writes them as ``results.json``, a
markdown table ``results.md`` and a loss-curve plot ``curves.png``.

This module is the public entry; the work is in three modules, so each can change alone:
:mod:`meta.eval_protocol` (what runs on one task), :mod:`meta.eval_pool` (where tasks run: this process
or forked workers, and the cache) and :mod:`meta.eval_report` (summary, warnings, files).

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

import math
from typing import Mapping, Sequence

from meta.eval_cache import EvalCache
from meta.eval_pool import EvalWork, TaskOutcome, run_all, store_outcomes, worker_count
from meta.eval_protocol import (DEFAULT_ADAM_LRS, DEFAULT_SGDM_LRS, GRID_RESULT_NAME, SGDM_MOMENTUM, curve_steps,
                                horizon_labels, lr_grid, run_task)
from meta.eval_report import chosen_lrs, report_warnings, summarize, write_outputs, write_report
from meta.results import TUNED_ADAM, TUNED_SGDM, EvalMeta, EvalResults, TaskResult
from optimizers.base import Optimizer
from tasks.base import TaskDistribution

__all__ = [
    "evaluate", "write_report", "write_outputs", "summarize", "lr_grid", "curve_steps", "horizon_labels",
    "run_task", "DEFAULT_ADAM_LRS", "DEFAULT_SGDM_LRS", "GRID_RESULT_NAME", "SGDM_MOMENTUM", "TUNED_ADAM",
    "TUNED_SGDM", "EvalResults", "TaskResult",
]


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
) -> EvalResults:
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

    Returns an :class:`~meta.results.EvalResults`; its ``to_json()`` (``results.json``) holds:

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
    * ``summary[label][name]``: means and intervals across tasks, see
      :func:`meta.eval_report.summarize`;
    * ``chosen_lrs[g][label]``: the chosen grid learning rate of every task;
    * ``warnings``: e.g. best grid learning rate at the edge of the grid, diverged runs.
    """
    long_horizon = 10 * horizon if long_horizon is None else long_horizon
    adam_lrs = [float(x) for x in adam_lrs]
    sgdm_lrs = [float(x) for x in (sgdm_lrs or ())]
    _check_arguments(optimizers, horizon, long_horizon, num_tasks, adam_lrs, sgdm_lrs, ema, ci_method, level)
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
    workers, notes = worker_count(workers, num_tasks, len(mine), D.local_world_size())
    work = EvalWork(dist=dist, split=split, optimizers=dict(optimizers), grids=grids, horizons=horizons,
                    curve_steps=steps, seed=seed, ema=ema, cache=cache)
    outcomes, runtime, workers = _run_tasks(work, mine, workers, progress, sharded)
    ordered = [outcomes[i] for i in indices]
    store_outcomes(cache, ordered, work)
    task_records = [o.result for o in ordered]
    names = [TUNED_ADAM] + ([TUNED_SGDM] if sgdm_lrs else []) + list(optimizers)
    meta = EvalMeta(
        distribution=dist.name, distribution_digest=dist.digest(), split=split, task_indices=indices,
        num_tasks=num_tasks, horizons=horizons, adam_lrs=adam_lrs, sgdm_lrs=sgdm_lrs, sgdm_momentum=SGDM_MOMENTUM,
        seed=seed, ema=ema, level=level, ci_method=ci_method, curve_steps=steps, runtime_s=runtime,
        workers=workers, ranks=D.world_size() if sharded else 1, torch_threads_per_worker=1,
        speedup_definition=(
            "S/T where S is the first step at which tuned Adam's reference curve (EMA(%g)-smoothed "
            "normalised minibatch loss, lower envelope over the Adam learning-rate grid, cumulative "
            "min) reaches the optimizer's smoothed loss at step T; if never reached within the "
            "%d steps run, the lower bound %d/T is reported with speedup_censored=true" % (
                ema, long_horizon, long_horizon)
        ),
        tuning="per-task, per-horizon oracle: grid learning rate with the lowest final full-train loss",
    )
    results = EvalResults(meta=meta, optimizers=names, tasks=task_records,
                          summary=summarize(task_records, names, list(horizons), level=level, method=ci_method),
                          chosen_lrs=chosen_lrs(task_records, list(grids), list(horizons)))
    results.warnings = notes + report_warnings(results, grids)
    return results


def _check_arguments(optimizers: Mapping[str, Optimizer], horizon: int, long_horizon: int, num_tasks: int,
                     adam_lrs: list[float], sgdm_lrs: list[float], ema: float, ci_method: str, level: float) -> None:
    """Refuse settings the protocol cannot run (before any work), and optimizers without init/update."""
    if horizon < 1 or long_horizon < horizon:
        raise ValueError(f"need 1 <= horizon <= long_horizon, got {horizon}, {long_horizon}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
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


def _run_tasks(work: EvalWork, mine: Sequence[int], workers: int, progress: bool,
               sharded: bool) -> tuple[dict[int, TaskOutcome], float, int]:
    """This rank's tasks on the worker pool, with a progress bar; under a process group, every rank's
    outcomes gathered. Returns the outcomes by task index, the runtime (the slowest rank's) and the
    workers per rank."""
    import time

    from tqdm import tqdm

    from meta import distributed as D

    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"evaluate {work.dist.name}/{work.split}", unit="task",
               disable=not (progress and D.is_main()))
    try:
        outcomes = run_all(work, mine, workers, done=lambda: bar.update(1))
    finally:
        bar.close()
    runtime = time.perf_counter() - t0
    if sharded:
        parts = D.all_gather_object((outcomes, runtime, workers))
        outcomes = {i: rec for part, _, _ in parts for i, rec in part.items()}
        runtime, workers = max(p[1] for p in parts), parts[0][2]
    return outcomes, runtime, workers
