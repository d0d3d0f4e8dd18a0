"""Typed evaluation results, with explicit JSON round-trips.

:func:`meta.evaluate.evaluate` returns an :class:`EvalResults`; ``results.json`` is its
:meth:`EvalResults.to_json`. Why types rather than the nested dicts they serialise to: the governor,
the safety layer, the generations loop, the generalisation suite and the reports all read the same
numbers, and a string path such as ``r["results"][name][label]["train_loss"]`` spelled in each of them
fails only at run time (or silently, through ``.get``) when the layout changes; attributes fail at the
first read and are checked by pyflakes/IDEs.

The JSON layout is fixed (written runs, the lineage's evidence and the caches depend on it):
``to_json`` writes the keys in the order the evaluation has always written them, and
``from_json(x).to_json() == x`` for every results dict it wrote. ``from_json`` rejects unknown or
missing keys (a dataclass constructor), so a foreign or damaged file fails where it is read.

Layout, outermost first: :class:`EvalResults` (the whole evaluation) holds :class:`EvalMeta` (the
protocol), one :class:`TaskResult` per task, and a :class:`SummaryEntry` per horizon and optimizer.
A :class:`TaskResult` holds one :class:`OptimizerResult` per optimizer (tuned baselines included) and a
:class:`GridRecord` per tuning grid; an :class:`OptimizerResult` holds one :class:`HorizonResult` per
horizon label (``"H"``, ``"10H"``).

The governor's scores live here as methods (:meth:`EvalResults.task_scores`, :meth:`~EvalResults.speedups`,
:meth:`~EvalResults.divergences`, :meth:`~EvalResults.diverged_tasks`), next to the numbers they read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

TUNED_ADAM = "tuned_adam"
TUNED_SGDM = "tuned_sgdm"

#: relative floor of the governor's score: ``f = SCORE_FLOOR x`` tuned Adam's initial loss on the task
SCORE_FLOOR = 1e-3

JSON = dict[str, Any]


@dataclass
class HorizonResult:
    """One optimizer's run on one task, read at one horizon ``T``.

    Losses are normalised (``task.normalizer``); ``curve`` is the full-train loss at the evaluation's
    ``curve_steps`` up to ``T`` (``curve[0]``: the initial loss). ``lr`` is the chosen grid learning rate
    for the tuned baselines and absent (None) for any other optimizer."""

    train_loss: float
    valid_loss: float
    smoothed_loss: float
    speedup: float
    speedup_censored: bool
    diverged: bool
    diverged_step: int | None
    curve: list[float]
    lr: float | None = None

    def to_json(self) -> JSON:
        out: JSON = {"train_loss": self.train_loss, "valid_loss": self.valid_loss,
                     "smoothed_loss": self.smoothed_loss, "speedup": self.speedup,
                     "speedup_censored": self.speedup_censored, "diverged": self.diverged,
                     "diverged_step": self.diverged_step}
        if self.lr is not None:
            out["lr"] = self.lr
        out["curve"] = list(self.curve)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HorizonResult:
        out = cls(**d)  # a missing or unknown key is a TypeError here
        out.curve = list(out.curve)
        return out

    def blew_up(self, factor: float, ceiling: float | None) -> bool:
        """Diverged as the governor sees it (:func:`meta.safety.run_diverged`): flagged non-finite by the
        evaluation, or a full-train loss at an evaluated step after the start (or the end) non-finite,
        above ``factor`` x the initial loss, or at the loss ``ceiling`` having started below it (or never
        having left it)."""
        if self.diverged:
            return True
        curve = [float(x) for x in (self.curve or [])]
        losses = curve[1:] + [float(self.train_loss)]  # every evaluated step after the start, and the end
        if any(not math.isfinite(x) for x in losses):
            return True
        init = curve[0] if curve else None
        if init is not None and math.isfinite(init) and any(x > factor * init for x in losses):
            return True
        if ceiling is not None:
            at = float(ceiling) * (1.0 - 1e-6)
            if init is not None and init < at:
                return any(x >= at for x in losses)  # rose to the ceiling at some step
            return float(self.train_loss) >= at  # started there (or unknown start) and never left it
        return False


@dataclass
class OptimizerResult:
    """One optimizer on one task: a :class:`HorizonResult` per horizon label, in the evaluation's order."""

    horizons: dict[str, HorizonResult]

    def __getitem__(self, label: str) -> HorizonResult:
        return self.horizons[label]

    def __iter__(self) -> Iterator[str]:
        return iter(self.horizons)

    def to_json(self) -> JSON:
        return {label: h.to_json() for label, h in self.horizons.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> OptimizerResult:
        return cls({label: HorizonResult.from_json(h) for label, h in d.items()})


@dataclass
class GridRecord:
    """One tuning grid on one task: per grid learning rate and horizon, the full-train and validation
    loss, the chosen learning rate per horizon, and the step each lane diverged at (None: never)."""

    lrs: list[float]
    train_loss: dict[str, list[float]]
    valid_loss: dict[str, list[float]]
    chosen_lr: dict[str, float]
    diverged_step: list[int | None]

    def to_json(self) -> JSON:
        return {"lrs": list(self.lrs), "train_loss": {k: list(v) for k, v in self.train_loss.items()},
                "valid_loss": {k: list(v) for k, v in self.valid_loss.items()}, "chosen_lr": dict(self.chosen_lr),
                "diverged_step": list(self.diverged_step)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GridRecord:
        return cls(**GridRecord(**d).to_json())  # validates the keys, then copies the containers


@dataclass
class TaskResult:
    """Every optimizer's and grid's results on one task (``split_index`` of the evaluated split)."""

    split_index: int | None
    seed: int
    config: dict[str, Any]
    max_loss: float
    run_seconds: float
    results: dict[str, OptimizerResult]
    grids: dict[str, GridRecord]

    def __getitem__(self, name: str) -> OptimizerResult:
        return self.results[name]

    def score(self, name: str, label: str) -> float:
        """The governor's normalised loss ``log((L + f) / (A + f))`` of ``name`` at ``label``: ``L`` its
        final full-train loss, ``A`` tuned Adam's, ``f`` = :data:`SCORE_FLOOR` x tuned Adam's initial loss
        (so that two runs both at ~0 loss do not make a huge ratio). 0: as good as tuned Adam."""
        adam = self.results[TUNED_ADAM]
        first = adam.horizons.get("H")
        floor = SCORE_FLOOR * max(float(first.curve[0]) if first is not None and first.curve else 1.0, 1e-12)
        a = float(adam[label].train_loss)
        x = float(self.results[name][label].train_loss)
        return math.log((x + floor) / (a + floor))

    def run_diverged(self, name: str, label: str, factor: float) -> bool:
        """Did ``name``'s run diverge by ``label``, as the governor counts it (:meth:`HorizonResult.blew_up`
        against this task's loss ceiling)?"""
        return self.results[name][label].blew_up(factor, self.max_loss)

    def to_json(self) -> JSON:
        return {"split_index": self.split_index, "seed": self.seed, "config": self.config,
                "max_loss": self.max_loss, "run_seconds": self.run_seconds,
                "results": {n: r.to_json() for n, r in self.results.items()},
                "grids": {g: r.to_json() for g, r in self.grids.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TaskResult:
        d = dict(d)
        if "results" not in d or "grids" not in d:
            raise TypeError(f"a task result needs 'results' and 'grids', got keys {sorted(d)}")
        results = {n: OptimizerResult.from_json(r) for n, r in d.pop("results").items()}
        grids = {g: GridRecord.from_json(r) for g, r in d.pop("grids").items()}
        return cls(**d, results=results, grids=grids)


@dataclass
class EvalMeta:
    """The protocol of one evaluation (what :mod:`meta.evaluate` ran), in ``results.json``'s order."""

    distribution: str
    distribution_digest: str
    split: str
    task_indices: list[int]
    num_tasks: int
    horizons: dict[str, int]
    adam_lrs: list[float]
    sgdm_lrs: list[float]
    sgdm_momentum: float
    seed: int
    ema: float
    level: float
    ci_method: str
    curve_steps: list[int]
    runtime_s: float
    workers: int  # per rank
    ranks: int
    torch_threads_per_worker: int
    speedup_definition: str
    tuning: str

    def to_json(self) -> JSON:
        out = dict(self.__dict__)
        for key in ("task_indices", "adam_lrs", "sgdm_lrs", "curve_steps"):
            out[key] = list(out[key])
        out["horizons"] = dict(self.horizons)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalMeta:
        return cls(**cls(**d).to_json())


@dataclass
class SummaryEntry:
    """One optimizer at one horizon, across tasks (:func:`meta.evaluate.summarize`): intervals of the
    final losses and the speed-up (``meta.stats`` dicts), the number of diverged runs, and (all but
    tuned Adam) the paired differences to tuned Adam."""

    train_loss: dict[str, Any]
    valid_loss: dict[str, Any]
    speedup: dict[str, Any]
    diverged: int
    diff_vs_tuned_adam: dict[str, dict[str, Any]] | None = None

    def to_json(self) -> JSON:
        out: JSON = {"train_loss": dict(self.train_loss), "valid_loss": dict(self.valid_loss),
                     "speedup": dict(self.speedup), "diverged": self.diverged}
        if self.diff_vs_tuned_adam is not None:
            out["diff_vs_tuned_adam"] = {k: dict(v) for k, v in self.diff_vs_tuned_adam.items()}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SummaryEntry:
        return cls(**cls(**d).to_json())


@dataclass
class EvalResults:
    """A whole evaluation: protocol, result names (tuned baselines first), per-task results, summary per
    horizon label and optimizer, the tuned baselines' chosen learning rates per grid and horizon (one per
    task), and warnings."""

    meta: EvalMeta
    optimizers: list[str]
    tasks: list[TaskResult]
    summary: dict[str, dict[str, SummaryEntry]] = field(default_factory=dict)
    chosen_lrs: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # set by ``train.py evaluate``: the evaluated checkpoint's path
    eval_seconds: float | None = None  # set by ``train.py evaluate``: wall-clock of the whole evaluation

    @property
    def labels(self) -> list[str]:
        """The horizon labels, shortest first (``["H", "10H"]``)."""
        return list(self.meta.horizons)

    def runs(self, name: str, label: str) -> list[HorizonResult]:
        """``name``'s result at ``label`` on every task, in task order."""
        return [t.results[name][label] for t in self.tasks]

    # ---- the governor's readings ---------------------------------------------------------------
    def task_scores(self, name: str, label: str) -> list[float]:
        """Per-task normalised loss of ``name`` at ``label`` (:meth:`TaskResult.score`)."""
        return [t.score(name, label) for t in self.tasks]

    def speedups(self, name: str, label: str) -> list[float]:
        return [float(r.speedup) for r in self.runs(name, label)]

    def divergences(self, name: str, label: str) -> int:
        """Runs the evaluation itself flagged (non-finite minibatch loss)."""
        return sum(bool(r.diverged) for r in self.runs(name, label))

    def diverged_tasks(self, name: str, label: str, factor: float) -> list[int]:
        """Positions (in :attr:`tasks`) of the tasks on which ``name`` diverged by ``label`` as the governor
        counts it (:meth:`TaskResult.run_diverged`)."""
        return [i for i, t in enumerate(self.tasks) if t.run_diverged(name, label, factor)]

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> JSON:
        out: JSON = {
            "meta": self.meta.to_json(), "optimizers": list(self.optimizers),
            "tasks": [t.to_json() for t in self.tasks],
            "summary": {label: {n: e.to_json() for n, e in per.items()} for label, per in self.summary.items()},
            "chosen_lrs": {g: {label: list(c) for label, c in per.items()} for g, per in self.chosen_lrs.items()},
            "warnings": list(self.warnings)}
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        if self.eval_seconds is not None:
            out["eval_seconds"] = self.eval_seconds
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalResults:
        extra = set(d) - {"meta", "optimizers", "tasks", "summary", "chosen_lrs", "warnings", "checkpoint",
                          "eval_seconds"}
        if extra:
            raise TypeError(f"unknown keys in evaluation results: {sorted(extra)}")
        return cls(meta=EvalMeta.from_json(d["meta"]), optimizers=list(d["optimizers"]),
                   tasks=[TaskResult.from_json(t) for t in d["tasks"]],
                   summary={label: {n: SummaryEntry.from_json(e) for n, e in per.items()}
                            for label, per in d["summary"].items()},
                   chosen_lrs={g: {label: list(c) for label, c in per.items()} for g, per in d["chosen_lrs"].items()},
                   warnings=list(d["warnings"]), checkpoint=d.get("checkpoint"), eval_seconds=d.get("eval_seconds"))


__all__ = ["EvalMeta", "EvalResults", "GridRecord", "HorizonResult", "OptimizerResult", "SCORE_FLOOR",
           "SummaryEntry", "TUNED_ADAM", "TUNED_SGDM", "TaskResult"]
