"""Which meta-training task each member's episode uses: uniform (default) or actively curated.

Why curate: improving the data a learned optimizer is meta-trained on improves it as surely as
improving its architecture. Active learning's rule (sample where the learner is weakest) applied to
tasks: :class:`TrailingTaskSampler` draws the meta_train tasks of a *region* (a bucket of task
configurations, :func:`region_of`) in proportion to how far the learned optimizer trails a reference
there, mixed with a floor so that every region keeps mass::

    p(region) = floor / R + (1 - floor) * w(region) / sum(w),   w = max(trail, 0)

(uniform over regions when no region trails). The probabilities are refreshed every ``every`` outer
steps and frozen in between, so the sampling is a deterministic function of shared statistics: every
rank, a resumed run and an uninterrupted one draw the same tasks.

The trail signal costs no extra inner run: each ended episode's *progress*, the log normalised
training loss after its last inner step minus that after its first (what the estimator computes
anyway; :meth:`meta.estimators.Estimator.accumulate` records it). A region's statistic is a running
mean of its episodes' progress (an exponential one once it has seen ``1 / EMA_RATE`` episodes, so it
follows the learned optimizer as it changes). ``trail = progress - reference``: the reference is a
region's tuned-Adam progress where the caller supplies one (``reference``: e.g. from cached
evaluations), else the mean progress over the regions seen. With the fallback the sampler puts mass
where the learned optimizer makes the least progress relative to its other regions: hard-example
mining over task regions, which cannot tell "the optimizer is weak here" from "the task is hard for
every optimizer" -- a tuned-Adam reference does, at the cost of evaluations.

Only the ``meta_train`` split is ever sampled: the sampler draws among the pool's first
:data:`CATALOGUE_SIZE` meta_train indices (``meta.num_train_tasks``, else 2048 when the pool is
unbounded: the CPU default run trains on ~330 episodes in all), grouped by region, so the held-out and
test splits stay untouched. A region holding under :data:`MIN_REGION_SHARE` of the catalogue is merged
into the largest region of its family and dataset (a region of 4 tasks with a floor share of 3% would
repeat the same few tasks all run long). :class:`UniformTaskSampler` is the historical rule, kept bit
for bit (the default run's tasks are unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from tasks.base import TaskDistribution, seeded

# Running mean of a region's progress: the plain mean of its first 1 / EMA_RATE episodes, then an
# exponential mean with this rate (the learned optimizer changes while it trains).
EMA_RATE = 0.2
# Curation draws among the first CATALOGUE_SIZE tasks of the meta_train pool; regions smaller than
# MIN_REGION_SHARE of them are merged into a larger one.
CATALOGUE_SIZE = 2048
MIN_REGION_SHARE = 0.02


def _size_and_depth(cfg: Mapping[str, Any]) -> tuple[int | None, int | None]:
    for key in ("hidden", "channels"):
        if key in cfg and cfg[key]:
            layers = [int(x) for x in cfg[key]]
            return max(layers), len(layers)
    for key in ("d_model", "dim"):
        if key in cfg:
            return int(cfg[key]), int(cfg["layers"]) if "layers" in cfg else None
    return None, None


def _prefix(region: str) -> str:
    """A region's family and dataset (its parts before the width / depth buckets)."""
    return "/".join(p for p in region.split("/") if not (p[:1] in "wd" and p[1:].isdigit()))


def region_of(cfg: Mapping[str, Any]) -> str:
    """A task configuration's region: family x dataset (or kind) x width octave x depth, e.g.
    ``image_mlp/digits/w5/d2`` (hidden width in [32, 64), two hidden layers). Coarse on purpose: a
    region must hold enough episodes for its statistic to mean something."""
    parts = [str(cfg.get("family", "?"))]
    for key in ("dataset", "seq_task", "kind"):
        if key in cfg:
            parts.append(str(cfg[key]))
            break
    size, depth = _size_and_depth(cfg)
    if size:
        parts.append(f"w{int(math.log2(max(size, 1)))}")
    if depth:
        parts.append(f"d{depth}")
    return "/".join(parts)


@dataclass(frozen=True)
class EpisodeRecord:
    """An episode that ended: member, episode number, its task's region, its progress (log normalised
    loss at the end minus at the start) and the task index of the member's next episode."""

    member: int
    episode: int
    region: str
    progress: float
    next_index: int


class TaskSampler(Protocol):
    curated: bool

    def index(self, member: int, episode: int) -> int: ...


class UniformTaskSampler:
    """Today's rule: the task of (member, episode) is a seeded uniform draw from the meta_train pool
    (``num_train_tasks`` indices; None: effectively unbounded)."""

    curated = False

    def __init__(self, seed: int, num_train_tasks: int | None = None):
        self.seed, self.num_train_tasks = seed, num_train_tasks

    def index(self, member: int, episode: int) -> int:
        idx = int(torch.randint(2**31 - 1, (), generator=seeded("task_index", self.seed, member, episode)))
        return idx % self.num_train_tasks if self.num_train_tasks else idx


def mixture(trails: list[float | None], floor: float) -> list[float]:
    """``floor / R + (1 - floor) * w / sum(w)`` with ``w = max(trail, 0)`` (an unseen region: 0); uniform
    when no region trails."""
    n = len(trails)
    w = [max(t, 0.0) if t is not None else 0.0 for t in trails]
    total = sum(w)
    if total <= 0.0:
        return [1.0 / n] * n
    return [floor / n + (1.0 - floor) * x / total for x in w]


class TrailingTaskSampler:
    """Curated sampling of meta_train tasks towards the regions the learned optimizer trails on.

    ``observe`` folds ended episodes into the regions' statistics (in (member, episode) order, so the
    result is the same whatever the sharding), ``refresh(step)`` recomputes the probabilities when
    ``step`` is a multiple of ``every``; ``index(member, episode)`` draws (and remembers) a task."""

    curated = True

    def __init__(self, dist: TaskDistribution, *, seed: int, num_train_tasks: int | None = None,
                 floor: float = 0.2, every: int = 10, reference: Mapping[str, float] | None = None,
                 split: str = "meta_train"):
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must lie in [0, 1], got {floor}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if split != "meta_train":
            raise ValueError(f"curation samples the meta_train split only, got {split!r}")
        self.dist, self.split, self.seed = dist, split, seed
        self.num_train_tasks, self.floor, self.every = num_train_tasks, floor, every
        self.reference = dict(reference or {})
        pool = range(min(num_train_tasks or CATALOGUE_SIZE, CATALOGUE_SIZE))
        raw: dict[str, list[int]] = {}
        for i in pool:
            raw.setdefault(region_of(dist.config(split, i)), []).append(i)
        self.merged = _merge_small(raw, MIN_REGION_SHARE * len(pool))  # raw region -> region
        self.catalogue: dict[str, list[int]] = {}
        for r in sorted(raw):
            self.catalogue.setdefault(self.merged[r], []).extend(raw[r])
        self.catalogue = {r: sorted(v) for r, v in self.catalogue.items()}
        self.regions: list[str] = sorted(self.catalogue)
        self.progress = [0.0] * len(self.regions)
        self.counts = [0] * len(self.regions)
        self.probs = [1.0 / len(self.regions)] * len(self.regions)
        self.refreshed_at = 0
        self.history: dict[tuple[int, int], int] = {}

    # -- statistics ----------------------------------------------------------------------------
    def observe(self, records: list[EpisodeRecord]) -> None:
        """Fold ended episodes into the statistics; remember every member's next task."""
        pos = {r: k for k, r in enumerate(self.regions)}
        for rec in sorted(records, key=lambda r: (r.member, r.episode)):
            self.history[(rec.member, rec.episode + 1)] = rec.next_index
            k = pos.get(self.merged.get(rec.region, rec.region))
            if k is None or not math.isfinite(rec.progress):
                continue
            self.counts[k] += 1
            rate = max(1.0 / self.counts[k], EMA_RATE)
            self.progress[k] += rate * (rec.progress - self.progress[k])

    def trails(self) -> list[float | None]:
        """Per region: progress minus the reference (tuned Adam's where given, else the mean progress of
        the regions seen); None for a region without episodes yet."""
        seen = [p for p, n in zip(self.progress, self.counts) if n]
        if not seen:
            return [None] * len(self.regions)
        mean = sum(seen) / len(seen)
        return [p - self.reference.get(r, mean) if n else None
                for r, p, n in zip(self.regions, self.progress, self.counts)]

    def refresh(self, step: int) -> bool:
        """Recompute the probabilities if ``step`` is a refresh step; True if it was."""
        if step % self.every:
            return False
        self.probs = mixture(self.trails(), self.floor)
        self.refreshed_at = step
        return True

    # -- drawing -------------------------------------------------------------------------------
    def index(self, member: int, episode: int) -> int:
        if (member, episode) not in self.history:
            self.history[(member, episode)] = self._draw(member, episode)
        return self.history[(member, episode)]

    def _draw(self, member: int, episode: int) -> int:
        g = seeded("curated_task", self.seed, member, episode)
        region = self.regions[int(torch.multinomial(torch.tensor(self.probs, dtype=torch.float64), 1, generator=g))]
        pool = self.catalogue[region]
        return pool[int(torch.randint(len(pool), (), generator=g))]

    # -- checkpoint (tensors + JSON, no pickle) ---------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"curation/progress": torch.tensor(self.progress, dtype=torch.float64),
                "curation/counts": torch.tensor(self.counts, dtype=torch.int64),
                "curation/probs": torch.tensor(self.probs, dtype=torch.float64)}

    def state_json(self) -> dict[str, Any]:
        return {"regions": self.regions, "refreshed_at": self.refreshed_at,
                "history": [[m, e, i] for (m, e), i in sorted(self.history.items())]}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_tensors` and :meth:`state_json` saved; the regions must match (the
        same distribution and pool), else ValueError."""
        if list(meta.get("regions", [])) != self.regions:
            raise ValueError("the checkpoint's curation regions differ from this distribution's")
        n = len(self.regions)
        for key in ("progress", "counts", "probs"):
            if tuple(tensors[f"curation/{key}"].shape) != (n,):
                raise ValueError(f"curation/{key} must hold one value per region ({n})")
        self.progress = [float(x) for x in tensors["curation/progress"].tolist()]
        self.counts = [int(x) for x in tensors["curation/counts"].tolist()]
        self.probs = [float(x) for x in tensors["curation/probs"].tolist()]
        self.refreshed_at = int(meta.get("refreshed_at", 0))
        self.history = {(int(m), int(e)): int(i) for m, e, i in meta.get("history", [])}


def _merge_small(raw: Mapping[str, list[int]], min_size: float) -> dict[str, str]:
    """Map each raw region to itself, or (when it holds fewer than ``min_size`` tasks) to the largest
    region of the same family and dataset that is big enough (else the largest region of all)."""
    big = sorted((r for r in raw if len(raw[r]) >= min_size), key=lambda r: (-len(raw[r]), r))
    if not big:  # a tiny pool: one region per raw region, however small
        return {r: r for r in raw}
    out = {}
    for r in raw:
        if r in big:
            out[r] = r
        else:
            same = [b for b in big if _prefix(b) == _prefix(r)]
            out[r] = (same or big)[0]
    return out


def make_sampler(curation: str, dist: TaskDistribution, *, seed: int, num_train_tasks: int | None,
                 floor: float, every: int) -> UniformTaskSampler | TrailingTaskSampler:
    """The sampler ``meta.curation`` names: ``uniform`` or ``trailing``."""
    if curation == "uniform":
        return UniformTaskSampler(seed, num_train_tasks)
    if curation == "trailing":
        return TrailingTaskSampler(dist, seed=seed, num_train_tasks=num_train_tasks, floor=floor, every=every)
    raise ValueError(f"curation must be uniform or trailing, got {curation!r}")
