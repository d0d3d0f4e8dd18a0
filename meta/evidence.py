"""Typed governor evidence, with explicit JSON round-trips.

:meth:`meta.governor.Governor.gather` returns an :class:`Evidence`; a generation's ``review.json`` holds
its :meth:`Evidence.to_json` under ``"evidence"``, and the lineage entry's ``metrics`` are its
:meth:`Evidence.summary_metrics`. Why types rather than the nested dicts they serialise to: the governor's
checks, the generations loop and the report all read the same numbers, and a string path such as
``ev["held_out"]["H"]["candidate"]["scores"]`` spelled in each of them fails only at run time when the
layout changes; attributes fail at the first read and are checked by pyflakes/IDEs.

The JSON layout is fixed: ``review.json`` is hashed (its digest covers the evidence), so ``to_json`` writes
the keys in the order the governor has always written them and ``from_json(x).to_json() == x`` for every
evidence dict it wrote. Every field may be absent: the governor stops gathering early (a candidate
rejected on its bounds has no evaluation; a review that raised has no evidence at all), and the tests
plant partial evidence. An absent section reads as ``None`` and is not written back; unknown keys are
rejected (a dataclass constructor), so a foreign or damaged file fails where it is read.

Layout, outermost first: :class:`Evidence` holds the names and horizons, a :class:`BoundsEvidence`, a
:class:`SplitEvidence` per evaluated split (``held_out``, the decision split; ``meta_train``, the
candidate's own meta-training tasks) and a :class:`LoopEvidence`. A :class:`SplitEvidence` holds one
:class:`RunScores` per horizon label (``"H"``, ``"10H"``) and optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from meta.results import TUNED_ADAM, EvalResults

JSON = dict[str, Any]


def _present(obj: Any) -> JSON:
    """The dataclass's fields that are set, in declaration order (the order the governor writes them)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


@dataclass
class RunScores:
    """One optimizer at one horizon on one split: per-task scores (log loss vs tuned Adam), speed-ups,
    runs counted as diverged (blow-ups included) and which, and the evaluation's own non-finite count."""

    scores: list[float | None] | None = None  # None inside: a NaN score (written as JSON null)
    speedups: list[float | None] | None = None
    diverged: int | None = None
    diverged_tasks: list[int] | None = None
    nonfinite: int | None = None

    def to_json(self) -> JSON:
        return _present(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunScores:
        return cls(**d)

    def mean_score(self) -> float:
        s = self.scores or []
        return sum(s) / len(s)  # type: ignore[arg-type]

    def mean_speedup(self) -> float:
        s = self.speedups or []
        return sum(s) / len(s)  # type: ignore[arg-type]


@dataclass
class SplitEvidence:
    """Scores on one split, by horizon label then optimizer name (``task_indices``: the split's tasks,
    recorded for the meta-training split, whose indices are the candidate's own)."""

    horizons: dict[str, dict[str, RunScores]] = field(default_factory=dict)
    task_indices: list[int] | None = None

    def to_json(self) -> JSON:
        out: JSON = {} if self.task_indices is None else {"task_indices": self.task_indices}
        out.update({label: {name: run.to_json() for name, run in per.items()}
                    for label, per in self.horizons.items()})
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SplitEvidence:
        return cls(horizons={label: {name: RunScores.from_json(run) for name, run in per.items()}
                             for label, per in d.items() if label != "task_indices"},
                   task_indices=d.get("task_indices"))

    def run(self, label: str, name: str) -> RunScores:
        return self.horizons[label][name]


@dataclass
class BoundsEvidence:
    """Size, cost and probe measurements of the candidate (the probe fields are absent when its weights
    are not finite: nothing was run)."""

    finite: bool | None = None
    num_theta: int | None = None
    flops_per_element: float | None = None
    state_floats_per_element: float | None = None
    max_update_ratio: float | None = None
    probe_finite: bool | None = None
    step_time_ratio: float | None = None  # wall-clock, relative to Adam
    seconds_per_step: float | None = None  # wall-clock

    def to_json(self) -> JSON:
        return _present(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BoundsEvidence:
        return cls(**d)


@dataclass
class LoopEvidence:
    """Held-out scores of a learned optimizer meta-trained by the candidate and by the incumbent, from
    the same start; ``finite``: the weights the candidate produced are finite."""

    by_candidate: list[float | None]
    by_incumbent: list[float | None]
    finite: bool

    def to_json(self) -> JSON:
        return {"by_candidate": self.by_candidate, "by_incumbent": self.by_incumbent, "finite": self.finite}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoopEvidence:
        return cls(**d)


@dataclass
class Evidence:
    """Everything :meth:`meta.governor.Governor.decide` reads. ``held_out_results``: the decision split's
    full evaluation, carried to the generations loop (which writes it apart, not into ``review.json``)."""

    candidate: str | None = None
    incumbent: str | None = None
    horizon: int | None = None
    long_horizon: int | None = None
    bounds: BoundsEvidence | None = None
    held_out: SplitEvidence | None = None
    held_out_results: EvalResults | None = None
    meta_train: SplitEvidence | None = None
    loop: LoopEvidence | None = None

    def to_json(self) -> JSON:
        return {k: v.to_json() if hasattr(v, "to_json") else v for k, v in _present(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | Evidence) -> Evidence:
        """Reads a written (or planted, possibly partial) evidence dict; an :class:`Evidence` passes as is."""
        if isinstance(d, Evidence):
            return d
        parsers = {"bounds": BoundsEvidence.from_json, "held_out": SplitEvidence.from_json,
                   "held_out_results": EvalResults.from_json, "meta_train": SplitEvidence.from_json,
                   "loop": LoopEvidence.from_json}
        return cls(**{k: parsers[k](v) if k in parsers and v is not None else v for k, v in d.items()})

    def summary_metrics(self) -> dict[str, float]:
        """Means of the held-out scores (log loss vs tuned Adam) and speed-ups by optimizer and horizon,
        and the candidate's mean score on its meta-training tasks: the lineage entry's ``metrics``."""
        out: dict[str, float] = {}
        for label, per in (self.held_out.horizons if self.held_out is not None else {}).items():
            for name, run in per.items():
                if name == TUNED_ADAM:
                    continue
                out[f"{name}/{label}/score"] = run.mean_score()
                out[f"{name}/{label}/speedup"] = run.mean_speedup()
        if self.meta_train is not None:
            out["candidate/meta_train/H/score"] = self.meta_train.run("H", "candidate").mean_score()
        return out


__all__ = ["BoundsEvidence", "Evidence", "LoopEvidence", "RunScores", "SplitEvidence"]
