"""Successor architecture search within the governor's bounds, by successive halving on the selection split.

A generation's successor architecture is otherwise fixed (``lo`` + ``gen.successor_lo``). With
``gen.search_candidates = K > 0`` the generations loop (:mod:`meta.generations`) first *searches*:

1. **propose** (:func:`propose`): the plain successor architecture, then seeded mutations of it (one or two
   of: hidden width, depth, feature groups, and the step designs :class:`~optimizers.learned.LOConfig`
   offers -- ``design``, ``step_scale``, ``time_features``, ``loss_features``), until ``K`` distinct
   proposals lie inside the governor's bounds (:class:`~meta.config.GovernorConfig` ``max_theta``,
   ``max_flops_per_element``, ``max_state_floats``). The bounds are checked on the architecture alone,
   before any training, so nothing the governor would reject on size is ever trained; out-of-bounds
   draws are kept in the record with the reason.
2. **successive halving** (:func:`successive_halving`; Jamieson & Talwalkar 2016, "Non-stochastic best
   arm identification and hyperparameter optimization"): every surviving proposal is meta-trained for the
   rung's budget of outer steps, *with the incumbent as the outer optimizer* (Adam before any adoption),
   from the start the full run would use (the incumbent's weights for its own architecture under
   ``gen.start = incumbent``, else a seeded fresh initialisation); the better half by selection score is
   kept and the budget doubles, until one is left. Each rung retrains from that start rather than
   continuing the last rung's run: a learned outer optimizer that sees the fraction of training ``t/T``
   needs to know ``T`` from the first step, and scores at equal budget are what a rung compares.
3. **selection score** (:class:`SelectionScorer`): scored like the governor (mean over tasks of
   ``log((L + f) / (A + f))`` against per-task tuned Adam at the meta-training horizon; lower is better),
   but on the **selection split** (:data:`tasks.base.SELECTION`), disjoint from the meta-training tasks
   and from the governor's decision split, so the evidence the governor decides on never chose what it
   reviews. A proposal with a diverged selection run (as the governor counts them,
   :func:`meta.safety.run_diverged`) ranks below every proposal without one.

Proposals are deterministic functions of ``(seed, generation)`` and every proposal meta-trains with the
same seeds (the same tasks in the same order: common random numbers make the comparison paired).
The winner then goes through the generation's full meta-training and review exactly as a fixed
architecture would; :func:`search` returns it with a JSON record of every proposal, its budget per rung
and its selection scores, which the lineage entry keeps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import torch

from meta.config import GovernorConfig, RunConfig
from optimizers.base import Optimizer
from optimizers.learned import (DESIGNS, FEATURE_GROUPS, LOSS_FEATURES, STEP_SCALES, TIME_FEATURES, ConfigError,
                                LearnedOptimizer, LOConfig)
from optimizers.tree import Params
from tasks.base import SELECTION, TaskDistribution, choice, seeded

# Named feature-group sets a proposal may switch to: all of them, without the Adafactor (factored)
# groups, without the raw parameter value, and a minimal Adam-like set.
_FACTORED = ("fac_grad", "row", "col", "rsqrt_row", "rsqrt_col", "fac_mom")
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "all": FEATURE_GROUPS,
    "no_factored": tuple(f for f in FEATURE_GROUPS if f not in _FACTORED),
    "no_param": tuple(f for f in FEATURE_GROUPS if f != "param"),
    "minimal": ("grad", "momentum", "rms", "adam_dir"),
}

# The axes a proposal mutates and the values each may take (``features`` by FEATURE_SETS name).
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "hidden_width": (8, 16, 32, 64),
    "hidden_layers": (1, 2, 3),
    "features": tuple(FEATURE_SETS),
    "design": DESIGNS,
    "step_scale": STEP_SCALES,
    "time_features": TIME_FEATURES,
    "loss_features": LOSS_FEATURES,
}
MAX_DRAWS_PER_PROPOSAL = 20  # draws (in or out of bounds, or duplicates) allowed per wanted proposal


class SearchError(RuntimeError):
    """The search cannot run as configured."""


# ---- proposals ------------------------------------------------------------------------------------
def bounds_of(lo: LOConfig) -> dict[str, int]:
    """The sizes the governor bounds, computed from the architecture alone (no weights, no training)."""
    lopt = LearnedOptimizer(lo)
    return {"num_theta": lopt.num_theta(), "flops_per_element": lopt.flops_per_element(),
            "state_floats_per_element": lopt.state_floats_per_element()}


def check_bounds(lo: LOConfig, gov: GovernorConfig) -> tuple[bool, dict[str, int], str]:
    """Is ``lo`` inside the governor's size bounds? ``(ok, sizes, reason)``; the reason names every bound
    that fails (the governor's own bounds check, :meth:`meta.governor.Governor.decide`, uses the same
    sizes and limits)."""
    sizes = bounds_of(lo)
    limits = {"num_theta": gov.max_theta, "flops_per_element": gov.max_flops_per_element,
              "state_floats_per_element": gov.max_state_floats}
    over = [f"{k} {sizes[k]} > {limits[k]}" for k in limits if sizes[k] > limits[k]]
    return not over, sizes, ("; ".join(over) if over else "within the governor's bounds")


@dataclass
class Proposal:
    """One successor architecture: ``changes`` (axis -> value, ``features`` by set name) applied to the base."""

    index: int
    changes: dict[str, Any]
    lo: LOConfig | None  # None: the changes make no valid LOConfig
    sizes: dict[str, int] = field(default_factory=dict)
    in_bounds: bool = False
    reason: str = ""
    rungs: list[dict[str, Any]] = field(default_factory=list)  # {"rung", "budget", "score", "diverged", "kept"}

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "changes": dict(self.changes),
                "lo_config": self.lo.to_dict() if self.lo is not None else None, **self.sizes,
                "in_bounds": self.in_bounds, "reason": self.reason, "rungs": [dict(r) for r in self.rungs]}


def apply_changes(base: LOConfig, changes: Mapping[str, Any]) -> LOConfig:
    """``base`` with ``changes``; raises :class:`ConfigError` for a combination LOConfig refuses."""
    kw = {k: (FEATURE_SETS[v] if k == "features" else v) for k, v in changes.items()}
    return LOConfig.from_dict({**base.to_dict(), **kw})


def _mutation(g: torch.Generator, base: LOConfig) -> dict[str, Any]:
    """One or two axes of the base set to another value of the search space."""
    axes = list(SEARCH_SPACE)
    n = 1 + int(torch.randint(2, (), generator=g))
    picked = [axes[int(i)] for i in torch.randperm(len(axes), generator=g)[:n]]
    out: dict[str, Any] = {}
    for axis in sorted(picked):
        current = next((k for k, v in FEATURE_SETS.items() if v == base.features), None) \
            if axis == "features" else getattr(base, axis)
        options = [v for v in SEARCH_SPACE[axis] if v != current]
        out[axis] = choice(g, options)
    return out


def propose(base: LOConfig, k: int, gov: GovernorConfig, *, seed: int, generation: int) -> list[Proposal]:
    """Draw proposals until ``k`` distinct ones lie inside the governor's bounds: the base first, then
    seeded mutations of it. Returns every draw (out-of-bounds and invalid ones too, with the reason;
    duplicates are skipped), in order; the same arguments give the same list."""
    if k < 1:
        raise SearchError(f"need at least one proposal, got {k}")
    out: list[Proposal] = []
    seen: list[LOConfig] = []
    accepted, draw = 0, 0
    while accepted < k and draw < k * MAX_DRAWS_PER_PROPOSAL:
        changes = {} if draw == 0 else _mutation(seeded("search", seed, generation, draw), base)
        draw += 1
        try:
            lo = apply_changes(base, changes)
        except ConfigError as e:
            out.append(Proposal(len(out), changes, None, reason=f"invalid: {e}"))
            continue
        if lo in seen:
            continue
        seen.append(lo)
        ok, sizes, reason = check_bounds(lo, gov)
        out.append(Proposal(len(out), changes, lo, sizes, ok, reason))
        accepted += ok
    return out


# ---- successive halving ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RungScore:
    """A proposal's selection score at one rung (lower is better) and its diverged selection runs."""

    score: float
    diverged: int = 0

    def key(self) -> tuple[bool, float]:
        """Ranking key: any divergence ranks last, then the score (non-finite as +inf)."""
        return self.diverged > 0, self.score if math.isfinite(self.score) else math.inf


T = TypeVar("T")


@dataclass
class HalvingResult(Generic[T]):
    winner: int
    rungs: list[dict[str, Any]]  # {"rung", "budget", "alive", "kept", "scores": {id: RungScore}}
    trained: dict[int, T]  # the last thing trained for each id


def successive_halving(ids: Sequence[int], budget: int, train: Callable[[int, int], T],
                       score: Callable[[dict[int, T], int], dict[int, RungScore]],
                       should_stop: Callable[[], bool] = lambda: False) -> HalvingResult[T] | None:
    """Train every id for ``budget``, keep the best ``ceil(n / 2)`` by score, double the budget, repeat
    until one is left (ties go to the earlier id). None if ``should_stop`` says so between trainings.
    One id needs no training: it wins at once (``rungs`` is empty)."""
    if not ids:
        raise SearchError("successive halving needs at least one candidate")
    if budget < 1:
        raise SearchError(f"the first rung's budget must be >= 1 outer step, got {budget}")
    alive, rungs, trained = list(ids), [], {}
    rung = 0
    while len(alive) > 1:
        for i in alive:
            if should_stop():
                return None
            trained[i] = train(i, budget)
        scores = score({i: trained[i] for i in alive}, budget)
        ranked = sorted(alive, key=lambda i: (scores[i].key(), alive.index(i)))
        kept = ranked[: math.ceil(len(alive) / 2)]
        rungs.append({"rung": rung, "budget": budget, "alive": list(alive), "kept": kept, "scores": scores})
        alive = [i for i in alive if i in kept]
        budget *= 2
        rung += 1
    return HalvingResult(alive[0], rungs, trained)


# ---- the pieces the generations loop plugs in -----------------------------------------------------
class SelectionScorer:
    """Selection scores of trained proposals on the selection split, as the governor scores (tuned Adam
    per task at the meta-training horizon, divergences counted the same way)."""

    def __init__(self, dist: TaskDistribution, gov: GovernorConfig, horizon: int, num_tasks: int, *,
                 progress: bool = False, cache: Any = None):
        self.dist, self.gov, self.horizon, self.num_tasks = dist, gov, horizon, num_tasks
        self.progress, self.cache = progress, cache
        self.split = SELECTION  # never the governor's decision split: see the module docstring

    def __call__(self, trained: dict[int, Optimizer], budget: int) -> dict[int, RungScore]:
        from meta.evaluate import evaluate
        from meta.governor import task_scores
        from meta.safety import diverged_tasks

        assert self.split == SELECTION, "selection must never use the governor's evidence"
        opts = {f"proposal-{i}": opt for i, opt in trained.items()}
        with torch.no_grad():
            res = evaluate(opts, self.dist, split=self.split, num_tasks=self.num_tasks, horizon=self.horizon,
                           long_horizon=self.horizon, adam_lrs=self.gov.adam_lrs, sgdm_lrs=None, seed=self.gov.seed,
                           progress=self.progress, cache=self.cache)
        assert res.meta.split == SELECTION
        out = {}
        for i in trained:
            s = task_scores(res, f"proposal-{i}", "H")
            mean = sum(s) / len(s)
            out[i] = RungScore(mean if math.isfinite(mean) else math.inf,
                               len(diverged_tasks(res, f"proposal-{i}", "H", self.gov.diverge_factor)))
        return out


class BriefMetaTraining:
    """Meta-train a proposal for a rung's budget: the run's recipe (``cfg.meta``) with ``outer_steps`` set
    to the budget, seed ``seed`` (the same for every proposal), the given outer optimizer and start."""

    def __init__(self, cfg: RunConfig, seed: int, outer: Callable[[], Optimizer],
                 start: Callable[[LOConfig], Params]):
        self.cfg = replace(cfg, wandb="disabled")
        self.seed, self.outer, self.start = seed, outer, start

    def __call__(self, lo: LOConfig, budget: int) -> tuple[LearnedOptimizer, Params]:
        from meta.trainer import MetaTrainer

        cfg = replace(self.cfg, lo=lo, meta=replace(self.cfg.meta, seed=self.seed, outer_steps=budget))
        trainer = MetaTrainer(cfg, outer=self.outer(), theta={k: v.clone() for k, v in self.start(lo).items()})
        for _ in range(budget):
            trainer.train_step()
        return trainer.lopt, trainer.theta


@dataclass
class SearchResult:
    winner: Proposal
    record: dict[str, Any]  # JSON-able: goes into the lineage entry


def search(base: LOConfig, k: int, budget: int, gov: GovernorConfig, *, seed: int, generation: int,
           train: Callable[[LOConfig, int], tuple[LearnedOptimizer, Params]],
           scorer: SelectionScorer | Callable[[dict[int, Optimizer], int], dict[int, RungScore]],
           should_stop: Callable[[], bool] = lambda: False, outer: str = "adam",
           log: Callable[[str], None] = lambda s: None) -> SearchResult | None:
    """Propose, filter by bounds, successive-halve; the winner and the record (None if stopped).

    When no proposal lies inside the bounds the base wins unexamined (the governor then rejects it on
    bounds, as it would without a search)."""
    t0 = time.time()
    proposals = propose(base, k, gov, seed=seed, generation=generation)
    ok = [p.index for p in proposals if p.in_bounds]
    by_id = {p.index: p for p in proposals}
    log(f"search: {len(proposals)} proposal(s) drawn, {len(ok)} within the governor's bounds; first rung "
        f"{budget} outer steps by {outer}")

    def train_one(i: int, steps: int) -> Optimizer:
        lopt, theta = train(by_id[i].lo, steps)
        return lopt.bind(theta)

    def score(trained: dict[int, Optimizer], steps: int) -> dict[int, RungScore]:
        s = scorer(trained, steps)
        log("search: rung at " + str(steps) + " outer steps: " +
            ", ".join(f"#{i} {s[i].score:+.3f}" + (f" ({s[i].diverged} diverged)" if s[i].diverged else "")
                      for i in trained))
        return s

    if ok:
        result = successive_halving(ok, budget, train_one, score, should_stop)
        if result is None:
            return None
        winner, rungs = by_id[result.winner], result.rungs
    else:
        winner, rungs = proposals[0], []
    for r in rungs:
        for i in r["alive"]:
            s = r["scores"][i]
            by_id[i].rungs.append({"rung": r["rung"], "budget": r["budget"],
                                   "score": s.score if math.isfinite(s.score) else None,
                                   "diverged": s.diverged, "kept": i in r["kept"]})
    record = {
        "split": getattr(scorer, "split", SELECTION), "selection_tasks": getattr(scorer, "num_tasks", None),
        "horizon": getattr(scorer, "horizon", None), "candidates": k, "first_budget": budget, "seed": seed,
        "outer": outer, "proposals": [p.to_dict() for p in proposals],
        "rungs": [{"rung": r["rung"], "budget": r["budget"], "alive": r["alive"], "kept": r["kept"]} for r in rungs],
        "winner": winner.index, "winner_lo_config": winner.lo.to_dict() if winner.lo is not None else None,
        "outer_steps_spent": sum(r["budget"] * len(r["alive"]) for r in rungs),
        "seconds": time.time() - t0,
    }
    return SearchResult(winner, record)


__all__ = ["FEATURE_SETS", "SEARCH_SPACE", "BriefMetaTraining", "Proposal", "RungScore", "SearchError", "SearchResult",
           "SelectionScorer", "apply_changes", "check_bounds", "propose", "search", "successive_halving"]
