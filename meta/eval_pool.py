"""Where the evaluation's tasks run: in this process, or spread over forked worker processes.

Why processes, not threads: the per-step work of one task is dominated by Python and per-op
overhead, so threads of one interpreter do not use the cores; each worker runs one torch thread
(intra-op threads only add overhead on these tiny ops, 4x under load). Workers are *forked* from the
parent right after it sets :data:`_WORK`, so the optimizers and the distribution are inherited, never
pickled (a bound learned optimizer need not be picklable); only task indices go out and
:class:`TaskOutcome` records come back.

With an :class:`meta.eval_cache.EvalCache`, a worker looks up the tuned baselines and every optimizer
already evaluated on its task under the same protocol and runs only the rest; the parent stores what
the workers computed (:func:`store_outcomes`), since a forked worker's cache dies with it.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from meta.eval_cache import EvalCache, optimizer_fingerprint, task_key
from meta.eval_protocol import GridPart, run_task
from meta.results import TaskResult
from optimizers.base import Optimizer


@dataclass
class EvalWork:
    """Everything a worker needs to evaluate one task of ``dist``'s ``split`` (see :func:`run_task`)."""

    dist: Any
    split: str
    optimizers: dict[str, Optimizer]
    grids: dict[str, list[float]]
    horizons: dict[str, int]
    curve_steps: list[int]
    seed: int
    ema: float
    cache: EvalCache | None = None
    fingerprints: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache is not None:
            self.fingerprints = {n: optimizer_fingerprint(o) for n, o in self.optimizers.items()}

    @property
    def protocol(self) -> dict[str, Any]:
        """Everything of the protocol that changes a task's numbers (the cache key's part)."""
        return {"horizons": self.horizons, "curve_steps": self.curve_steps, "grids": self.grids, "seed": self.seed,
                "ema": self.ema}


@dataclass
class TaskOutcome:
    """A worker's answer for one task: its result, and for the cache the grids' part of it, the task's
    cache key and how many lookups hit (grid part and optimizers)."""

    result: TaskResult
    grid: GridPart | None = None
    cache_key: str | None = None
    cache_hits: int = 0


_WORK: EvalWork | None = None  # set in the parent right before forking workers; inherited, never pickled


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_one(index: int) -> TaskOutcome:
    """Task ``index`` of :data:`_WORK`, run (or looked up in its cache)."""
    work = _WORK
    assert work is not None, "worker started without a work spec"
    task = work.dist.task(work.split, index)
    if work.cache is None:
        rec, _ = run_task(task, work.optimizers, work.grids, work.horizons, work.curve_steps, work.seed, work.ema)
        rec.split_index = index
        return TaskOutcome(rec)
    return _run_cached(work, work.cache, task, index)


def _run_cached(work: EvalWork, cache: EvalCache, task: Any, index: int) -> TaskOutcome:
    """Look up the grid part and the optimizers already evaluated on this task; run only the rest."""
    key = task_key(work.dist.digest(), work.split, task, work.protocol)
    hits = {n: cache.result(key, work.fingerprints[n]) for n in work.optimizers}
    todo = {n: o for n, o in work.optimizers.items() if hits[n] is None}
    cached_grid = cache.grid(key)
    if todo or cached_grid is None:
        rec, grid = run_task(task, todo, work.grids, work.horizons, work.curve_steps, work.seed, work.ema,
                             cached_grid=cached_grid)
    else:  # everything known: no run at all
        rec = TaskResult(split_index=None, seed=task.seed, config=task.config, max_loss=float(task.max_loss),
                         run_seconds=0.0, results=dict(cached_grid.results), grids=dict(cached_grid.grids))
        grid = cached_grid
    found = {n: r for n, r in hits.items() if r is not None}
    rec.results = {**{n: r for n, r in rec.results.items() if n not in work.optimizers},
                   **{n: found[n] if n in found else rec.results[n] for n in work.optimizers}}
    rec.split_index = index
    return TaskOutcome(rec, grid, key, len(found) + (cached_grid is not None))


def store_outcomes(cache: EvalCache | None, outcomes: Sequence[TaskOutcome], work: EvalWork) -> None:
    """Keep what the workers computed in the parent's cache, and count its hits and misses."""
    if cache is None:
        return
    for out in outcomes:
        cache.store(out.cache_key, out.grid, out.result.results, work.fingerprints)
        cache.count(bool(out.cache_hits))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods() and not mp.current_process().daemon


def run_all(work: EvalWork, indices: Sequence[int], workers: int,
            done: Callable[[], Any] = lambda: None) -> dict[int, TaskOutcome]:
    """Every task of ``indices``: in this process (``workers == 1``, one torch thread for the duration) or
    on ``workers`` forked processes; ``done()`` is called after each task (a progress bar)."""
    global _WORK
    outcomes: dict[int, TaskOutcome] = {}
    try:
        if workers == 1:
            _WORK = work
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny ops: intra-op threads only add overhead (4x under load)
            try:
                for i in indices:
                    outcomes[i] = run_one(i)
                    done()
            finally:
                torch.set_num_threads(threads)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            importlib.import_module("torch._dynamo")  # vmapped grads import it lazily (~3 s): once, not per fork

            _WORK = work
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                     initializer=_init_worker) as pool:
                futures = {pool.submit(run_one, i): i for i in indices}
                try:
                    for fut in as_completed(futures):
                        outcomes[futures[fut]] = fut.result()
                        done()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        _WORK = None
    return outcomes


def worker_count(requested: int | None, num_tasks: int, mine: int, local_world_size: int) -> tuple[int, list[str]]:
    """Processes to use: ``requested`` or the available cores (this rank's share), at most one per task;
    1 (with a note) where forking is not possible."""
    workers = requested
    if workers is None:
        workers = min(max(1, available_cores() // local_world_size), num_tasks)
    workers = max(1, min(int(workers), num_tasks, max(mine, 1)))
    notes: list[str] = []
    if workers > 1 and not can_fork():
        notes.append("parallel evaluation needs the 'fork' start method in a non-daemon process; ran serially")
        workers = 1
    return workers, notes


__all__ = ["EvalWork", "TaskOutcome", "available_cores", "can_fork", "run_all", "run_one", "store_outcomes",
           "worker_count"]
