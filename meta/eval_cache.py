"""Reuse of per-task evaluation results across :func:`meta.evaluate.evaluate` calls.

Why: a generations run reviews every candidate on the same decision-split tasks with the same seeds,
so tuned Adam's grid and the incumbent (reviewed as the candidate one generation earlier, with the
same weights) produce bit-identical per-task results each time. The evaluation protocol makes every
optimizer's run on a task independent of which other optimizers ride along (same initialisation, same
minibatch stream drawn once per step), so those results can be looked up instead of recomputed.
Measured: a review of candidate + incumbent + control spent ~45% of its held-out evaluation on
tuned Adam and the incumbent.

Keys: a task is named by its distribution digest, split, config and seed, plus everything of the
protocol that changes its numbers (horizons, curve steps, grids, seed, EMA); an optimizer by its
``fingerprint()`` (a hash of its configuration and weights; optimizers without one are never cached).
The cache lives in memory for one process (forked evaluation workers read it; the parent stores what
they return), so a crashed and resumed run only loses the shortcut, never correctness.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from meta.eval_protocol import GridPart
    from meta.results import OptimizerResult


def task_key(dist_digest: str, split: str, task: Any, protocol: Mapping[str, Any]) -> str:
    """A stable name for "this task, evaluated under this protocol"."""
    blob = json.dumps({"dist": dist_digest, "split": split, "config": task.config, "seed": task.seed,
                       "protocol": protocol}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def optimizer_fingerprint(opt: Any) -> str | None:
    """``opt.fingerprint()`` when the optimizer has one, else None (not cacheable)."""
    fp = getattr(opt, "fingerprint", None)
    return fp() if callable(fp) else None


class EvalCache:
    """In-memory store of per-task grid results (tuned baselines + Adam's reference envelope, a
    :class:`meta.eval_protocol.GridPart`) and of per-task, per-optimizer results
    (:class:`meta.results.OptimizerResult`), filled by :func:`meta.evaluate.evaluate`."""

    def __init__(self) -> None:
        self._grids: dict[str, GridPart] = {}
        self._opts: dict[tuple[str, str], OptimizerResult] = {}
        self.hits = 0
        self.misses = 0

    def grid(self, key: str) -> GridPart | None:
        return copy.deepcopy(self._grids.get(key))  # copies: a caller may edit its results

    def result(self, key: str, fingerprint: str | None) -> OptimizerResult | None:
        return None if fingerprint is None else copy.deepcopy(self._opts.get((key, fingerprint)))

    def store(self, key: str, grid: GridPart | None, results: Mapping[str, OptimizerResult],
              fingerprints: Mapping[str, str | None]) -> None:
        """Keep one task record's parts: ``grid`` (baseline results, grid records, envelope) and every
        optimizer result whose optimizer has a fingerprint."""
        if grid is not None:
            self._grids.setdefault(key, copy.deepcopy(grid))
        for name, fp in fingerprints.items():
            if fp is not None and name in results:
                self._opts.setdefault((key, fp), copy.deepcopy(results[name]))

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def __len__(self) -> int:
        return len(self._grids) + len(self._opts)
