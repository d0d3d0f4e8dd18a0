"""The governor: decides whether a candidate generation may replace the incumbent.

It reads evaluation results only: the candidate's code never calls into it, and the decision is a pure
function (:meth:`Governor.decide`) of the evidence that :meth:`Governor.gather` collects, so the rule
can be tested on planted evidence and re-checked later from the lineage. :meth:`Governor.review`
wraps both and **fails closed**: any exception while gathering or deciding is a rejection whose
reason names the exception.

Scores. On each task, an optimizer's *normalised loss* is ``log((L + f) / (A + f))`` where ``L`` is its
final full-training-set loss, ``A`` that of Adam tuned per task on a learning-rate grid (the oracle of
:mod:`meta.evaluate`) and ``f = 1e-3 * L0`` a floor at a thousandth of the task's initial loss (so that
two runs both at ~0 loss do not produce huge ratios). 0 is "as good as tuned Adam", negative is better.
A candidate's *improvement* over the incumbent on a task is ``score(incumbent) - score(candidate)``;
before any generation is adopted the incumbent is tuned Adam itself (score 0 on every task).

Checks (all must pass; each returns ``passed``, the measured value, the bound and a reason):

``bounds``          finite weights; learned-optimizer weight count, MLP FLOPs and state floats per
                    parameter element, wall-clock per step relative to Adam on a probe task, and the
                    largest per-step update relative to the parameters' norm on probe tasks. Checked
                    first: non-finite or oversized candidates are rejected before anything expensive
                    runs (the others are still evaluated, so the report can compare them).
``generalisation``  paired bootstrap interval of the mean improvement on the *decision* split
                    (``held_out``: tasks and seeds never used in meta-training) at the meta-training
                    horizon must lie above ``min_improvement``; no run may diverge; the mean speed-up
                    over tuned Adam must not fall below the incumbent's.
``overfit``         the candidate's mean score on the very tasks it was meta-trained on, minus its
                    score on the decision split, is bounded: ``held_out - meta_train <= max_overfit_gap``.
``horizon``         at ``long_factor`` x the horizon: no divergence, and the mean improvement over the
                    incumbent is at least ``-long_tolerance`` (the advantage is not lost).
``loop``            the job the candidate will do next: from the same fresh start, ``loop_steps`` outer
                    steps of meta-training with the candidate as the outer optimizer must produce a
                    learned optimizer at least as good (within ``loop_tolerance``) as the incumbent's
                    doing the same (Adam's, before any adoption).

Rate limiter: a candidate that passes everything with a mean improvement above ``rate_limit`` is
*held* (decision ``hold``) for a human instead of being adopted: a jump that large is more likely a
bug or an exploit of the evaluation than progress, and a person should look first.

Safety layer (:mod:`meta.safety`): ``divergence`` rejects a candidate with any diverged run at any
horizon, on the decision split or its own meta-training tasks, where *diverged* also covers finite
blow-ups (a loss above ``diverge_factor`` x the initial loss, or at the task's loss ceiling), not only
non-finite losses; the generalisation and horizon checks count divergences the same way. The capability
*ceiling* holds for a human any candidate whose mean improvement over tuned Adam exceeds
``ceiling_vs_adam`` or over the incumbent ``ceiling_vs_incumbent`` at any horizon, whatever
``rate_limit`` says.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from meta import stats
from meta.config import GovernorConfig
from meta.eval_cache import EvalCache
from meta.evaluate import TUNED_ADAM, evaluate
from meta.evidence import BoundsEvidence, Evidence, LoopEvidence, RunScores, SplitEvidence
from meta.results import EvalResults
from optimizers.base import Optimizer, for_horizon
from optimizers.hand import Adam
from optimizers.learned import LearnedOptimizer
from optimizers.tree import Params
from tasks.base import TaskDistribution, seeded

@dataclass
class Candidate:
    """What the governor reviews: an architecture bound to weights, plus how it was made."""

    name: str
    lopt: LearnedOptimizer
    theta: Params
    train_task_indices: Sequence[int] = ()  # meta_train-split indices it was meta-trained on
    horizon: int = 200
    outer_scale: float = 1.0  # update scale when used as an outer optimizer (optimizers.transforms)

    def bind(self) -> Optimizer:
        return self.lopt.bind(self.theta)


@dataclass
class Verdict:
    decision: str  # adopt | reject | hold
    reasons: list[str]
    checks: dict[str, dict] = field(default_factory=dict)
    improvement: float | None = None  # mean improvement over the incumbent at the horizon
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TaskSubset:
    """A view of a distribution's split with chosen task indices (``task(split, i)`` -> ``indices[i]``)."""

    def __init__(self, dist: TaskDistribution, indices: Sequence[int]):
        self.dist = dist
        self.indices = [int(i) for i in indices]
        self.name = dist.name

    def task(self, split: str, i: int):
        return self.dist.task(split, self.indices[i])

    def digest(self) -> str:
        return self.dist.digest()


# ---- scores -------------------------------------------------------------------------------------
def task_scores(results: EvalResults, name: str, label: str) -> list[float]:
    """Per-task normalised loss ``log((L + f) / (A + f))`` of ``name`` at horizon ``label``
    (:meth:`meta.results.EvalResults.task_scores`)."""
    return results.task_scores(name, label)


def _check(passed: bool, value: Any, bound: Any, reason: str, **extra: Any) -> dict:
    return {"passed": bool(passed), "value": value, "bound": bound, "reason": reason, **extra}


# ---- probes ---------------------------------------------------------------------------------------
def probe_updates(opt: Optimizer, dist: TaskDistribution, indices: Sequence[int], steps: int,
                  seed: int = 0) -> dict[str, float]:
    """Largest per-step ``||update|| / ||params||`` and seconds per step of ``opt`` on a few tasks."""
    worst, seconds, n, finite = 0.0, 0.0, 0, True
    for i in indices:
        task = dist.task("held_out", i)
        params = task.init_default()
        opt_i = for_horizon(opt, steps)
        state = opt_i.init(params)
        gen = seeded("probe", seed, task.seed)
        grad_fn = torch.func.grad_and_value(task.loss)
        for _ in range(steps):
            grads, loss = grad_fn(params, task.sample_batch("train", gen))
            t0 = time.perf_counter()
            new, state = opt_i.update(grads, state, params, loss=loss)
            seconds += time.perf_counter() - t0
            n += 1
            num = math.sqrt(sum(float(((new[k] - params[k]).double() ** 2).sum()) for k in params))
            den = math.sqrt(sum(float((params[k].double() ** 2).sum()) for k in params))
            ratio = num / max(den, 1e-12)
            if not math.isfinite(ratio):
                finite = False
                worst = float("inf")
                break
            worst = max(worst, ratio)
            params = new
    return {"max_update_ratio": worst, "seconds_per_step": seconds / max(n, 1), "finite": finite}


class Governor:
    def __init__(self, config: GovernorConfig, dist: TaskDistribution, horizon: int,
                 loop_trainer: Callable[[Optimizer | None, int], Params] | None = None,
                 progress: bool = False, cache: EvalCache | None = None):
        """``loop_trainer(outer, steps)``: meta-trains a fresh learned optimizer for ``steps`` outer
        steps with ``outer`` (None: Adam) from a fixed start and returns its weights (see
        :mod:`meta.generations`); None disables the loop check. ``cache``: evaluation results kept
        across reviews (tuned Adam and the incumbent recur on the same tasks; identical results)."""
        self.cfg = config
        self.cache = cache
        self.dist = dist
        self.horizon = horizon
        self.loop_trainer = loop_trainer
        self.progress = progress

    # ---- evidence ---------------------------------------------------------------------------
    def gather(self, candidate: Candidate, incumbent: Candidate | None,
               extra: dict[str, Optimizer] | None = None) -> Evidence:
        """Run everything the decision needs; returns the evidence (JSON: :meth:`Evidence.to_json`).
        ``extra`` optimizers (e.g. the control arm) ride along in the decision-split evaluation for the
        report only."""
        c = self.cfg
        ev = Evidence(candidate=candidate.name, incumbent=incumbent.name if incumbent else TUNED_ADAM,
                      horizon=self.horizon, long_horizon=self.horizon * c.long_factor)
        ev.bounds = b = self._bounds_evidence(candidate)
        if not b.finite or b.num_theta > c.max_theta or b.flops_per_element > c.max_flops_per_element:
            return ev  # cannot or must not be run at scale: rejected on bounds, nothing expensive runs
        # other bound failures are still rejections, but the evaluation runs so the report can compare
        opts = {"candidate": candidate.bind()}
        if incumbent is not None:
            opts["incumbent"] = incumbent.bind()
        opts.update(extra or {})
        with torch.no_grad():
            held = evaluate(opts, self.dist, split="held_out", num_tasks=c.num_tasks, horizon=self.horizon,
                            long_horizon=self.horizon * c.long_factor, adam_lrs=c.adam_lrs, sgdm_lrs=None,
                            seed=c.seed, progress=self.progress, cache=self.cache)
            ev.held_out = self._scores(held, list(opts))
            ev.held_out_results = held
            train_idx = list(dict.fromkeys(int(i) for i in candidate.train_task_indices))[: c.train_tasks]
            if train_idx:
                train = evaluate({"candidate": opts["candidate"]}, TaskSubset(self.dist, train_idx),
                                 split="meta_train", num_tasks=len(train_idx), horizon=self.horizon,
                                 long_horizon=self.horizon, adam_lrs=c.adam_lrs, sgdm_lrs=None, seed=c.seed,
                                 progress=self.progress, cache=self.cache)
                ev.meta_train = self._scores(train, ["candidate"])
                ev.meta_train.task_indices = train_idx
        if c.loop_steps and self.loop_trainer is not None:
            ev.loop = self._loop_evidence(candidate, incumbent)
        return ev

    def _scores(self, results: EvalResults, names: list[str]) -> SplitEvidence:
        """Per horizon and optimizer: scores, speed-ups and divergences, where a run counts as diverged
        also when its loss blew up while staying finite (:meth:`meta.results.HorizonResult.blew_up`);
        ``nonfinite`` keeps the evaluation's own count (non-finite minibatch losses only)."""
        out = SplitEvidence()
        f = self.cfg.diverge_factor
        for label in results.labels:
            out.horizons[label] = {}
            for n in [*names, TUNED_ADAM]:
                bad = results.diverged_tasks(n, label, f)
                out.horizons[label][n] = RunScores(
                    scores=results.task_scores(n, label) if n != TUNED_ADAM else [0.0] * len(results.tasks),
                    speedups=results.speedups(n, label), diverged=len(bad), diverged_tasks=bad,
                    nonfinite=results.divergences(n, label))
        return out

    def _bounds_evidence(self, candidate: Candidate) -> BoundsEvidence:
        c = self.cfg
        lopt = candidate.lopt
        ev = BoundsEvidence(finite=all(bool(torch.isfinite(v).all()) for v in candidate.theta.values()),
                            num_theta=lopt.num_theta(), flops_per_element=lopt.flops_per_element(),
                            state_floats_per_element=lopt.state_floats_per_element())
        if not ev.finite:
            return ev
        probe = list(range(c.probe_tasks))
        with torch.no_grad():
            cand = probe_updates(candidate.bind(), self.dist, probe, c.probe_steps, c.seed)
            adam = probe_updates(Adam(lr=1e-3), self.dist, probe, c.probe_steps, c.seed)
        ev.max_update_ratio = cand["max_update_ratio"]
        ev.probe_finite = cand["finite"]
        ev.step_time_ratio = cand["seconds_per_step"] / max(adam["seconds_per_step"], 1e-9)
        ev.seconds_per_step = cand["seconds_per_step"]
        return ev

    def _loop_evidence(self, candidate: Candidate, incumbent: Candidate | None) -> LoopEvidence:
        from optimizers.transforms import scale_updates

        c = self.cfg
        cand_theta = self.loop_trainer(scale_updates(candidate.bind(), candidate.outer_scale), c.loop_steps)
        inc_outer = None if incumbent is None else scale_updates(incumbent.bind(), incumbent.outer_scale)
        inc_theta = self.loop_trainer(inc_outer, c.loop_steps)
        lopt = self.loop_trainer.lopt  # type: ignore[attr-defined]
        with torch.no_grad():
            res = evaluate({"by_candidate": lopt.bind(cand_theta), "by_incumbent": lopt.bind(inc_theta)},
                           self.dist, split="held_out", num_tasks=c.loop_tasks, horizon=self.horizon,
                           long_horizon=self.horizon, adam_lrs=c.adam_lrs, sgdm_lrs=None, seed=c.seed + 1,
                           progress=self.progress, cache=self.cache)
        return LoopEvidence(by_candidate=res.task_scores("by_candidate", "H"),
                            by_incumbent=res.task_scores("by_incumbent", "H"),
                            finite=all(bool(torch.isfinite(v).all()) for v in cand_theta.values()))

    # ---- decision (pure) ----------------------------------------------------------------------
    def decide_bounds(self, b: BoundsEvidence | dict[str, Any]) -> dict:
        """An absent measurement fails its bound (fail closed)."""
        c = self.cfg
        if isinstance(b, dict):
            b = BoundsEvidence.from_json(b)
        problems = []
        if not _or(b.finite, False):
            problems.append("non-finite learned-optimizer weights")
        if _or(b.num_theta, math.inf) > c.max_theta:
            problems.append(f"{_need(b.num_theta, 'num_theta')} weights > bound {c.max_theta}")
        if _or(b.flops_per_element, math.inf) > c.max_flops_per_element:
            problems.append(f"{_need(b.flops_per_element, 'flops_per_element')} "
                            f"FLOPs/element > bound {c.max_flops_per_element}")
        if _or(b.state_floats_per_element, math.inf) > c.max_state_floats:
            problems.append(f"{_need(b.state_floats_per_element, 'state_floats_per_element')} "
                            f"state floats/element > bound {c.max_state_floats}")
        if b.max_update_ratio is not None or _or(b.finite, False):
            if not _or(b.probe_finite, False):
                problems.append("non-finite update on a probe task")
            elif not _or(b.max_update_ratio, math.inf) <= c.max_update_ratio:
                ratio = _need(b.max_update_ratio, "max_update_ratio")
                problems.append(f"update/parameter norm ratio {ratio:.3g} > bound {c.max_update_ratio}")
            if not _or(b.step_time_ratio, math.inf) <= c.max_step_time_ratio:
                problems.append(f"step time {_or(b.step_time_ratio, math.inf):.3g}x Adam's > bound "
                                f"{c.max_step_time_ratio}x")
        return _check(not problems, b.to_json(), {
            "max_theta": c.max_theta, "max_flops_per_element": c.max_flops_per_element,
            "max_state_floats": c.max_state_floats, "max_update_ratio": c.max_update_ratio,
            "max_step_time_ratio": c.max_step_time_ratio}, "; ".join(problems) or "within bounds")

    def _improvement(self, ev_label: dict[str, RunScores], other: str) -> tuple[list[float], dict]:
        cand, inc = ev_label["candidate"].scores, ev_label[other].scores
        diffs = [b - a for a, b in zip(cand, inc)]
        ci = stats.bootstrap_ci(diffs, self.cfg.level, n_boot=self.cfg.bootstrap, seed=self.cfg.seed)
        return diffs, ci

    def decide(self, ev: Evidence | dict[str, Any]) -> Verdict:
        """``ev``: gathered evidence, or its JSON (a written ``review.json``'s, or planted and partial)."""
        c = self.cfg
        ev = Evidence.from_json(ev)
        checks: dict[str, dict] = {"bounds": self.decide_bounds(ev.bounds or BoundsEvidence())}
        improvement = None
        if checks["bounds"]["passed"]:
            other = "incumbent" if ev.incumbent != TUNED_ADAM else TUNED_ADAM
            if ev.held_out is None:
                raise KeyError("held_out")
            held = ev.held_out.horizons
            H = held["H"]
            _, ci = self._improvement(H, other)
            improvement = ci["mean"]
            sp_c = H["candidate"].mean_speedup()
            sp_i = H[other].mean_speedup()
            cand_diverged = H["candidate"].diverged
            ok = ci["lo"] is not None and ci["lo"] > c.min_improvement and cand_diverged == 0 and sp_c >= sp_i
            checks["generalisation"] = _check(
                ok, {"mean_improvement": ci["mean"], "ci": [ci["lo"], ci["hi"]], "speedup": sp_c,
                     "incumbent_speedup": sp_i, "diverged": cand_diverged},
                {"ci_lo_above": c.min_improvement, "level": c.level},
                f"improvement over {ev.incumbent} {ci['mean']:+.3f} "
                f"[{_f(ci['lo'])}, {_f(ci['hi'])}] (log loss vs tuned Adam), speed-up {sp_c:.2f} vs {sp_i:.2f}"
                + (f", {cand_diverged} diverged" if cand_diverged else ""))
            if ev.meta_train is not None:
                gap = H["candidate"].mean_score() - ev.meta_train.run("H", "candidate").mean_score()
                checks["overfit"] = _check(gap <= c.max_overfit_gap, gap, c.max_overfit_gap,
                                           f"held-out minus meta-train score {gap:+.3f} (bound {c.max_overfit_gap})")
            else:
                checks["overfit"] = _check(False, None, c.max_overfit_gap, "no meta-training tasks to compare with")
            long_label = next(k for k in held if k != "H") if len(held) > 1 else "H"
            L = held[long_label]
            _, lci = self._improvement(L, other)
            long_diverged = L["candidate"].diverged
            ok = long_diverged == 0 and lci["mean"] >= -c.long_tolerance
            checks["horizon"] = _check(
                ok, {"mean_improvement": lci["mean"], "ci": [lci["lo"], lci["hi"]],
                     "diverged": long_diverged, "label": long_label},
                -c.long_tolerance,
                f"at {long_label}: improvement {lci['mean']:+.3f} [{_f(lci['lo'])}, {_f(lci['hi'])}], "
                f"{long_diverged} diverged")
            checks["divergence"] = self._decide_divergence(ev)
            if ev.loop is not None:
                lp = ev.loop
                d = [a - b for a, b in zip(lp.by_candidate, lp.by_incumbent)]
                gap = sum(d) / len(d)
                checks["loop"] = _check(lp.finite and gap <= c.loop_tolerance, gap, c.loop_tolerance,
                                        f"LO meta-trained by the candidate scores {gap:+.3f} vs by the "
                                        f"incumbent (bound {c.loop_tolerance:+})")
        failed = [k for k, v in checks.items() if not v["passed"]]
        if failed:
            return Verdict("reject", [f"{k}: {checks[k]['reason']}" for k in failed], checks, improvement)
        if checks["bounds"]["passed"]:
            checks["ceiling"] = self._decide_ceiling(ev, other)
        reasons = [f"{k}: {v['reason']}" for k, v in checks.items()]
        if checks.get("ceiling", {}).get("hold"):
            return Verdict("hold", [(f"capability ceiling: {checks['ceiling']['reason']}; adoption needs a "
                                     f"person's signed approval (approve --by NAME)"), *reasons], checks, improvement)
        if improvement is not None and improvement > c.rate_limit:
            return Verdict("hold", [(f"rate limiter: improvement {improvement:+.3f} > {c.rate_limit} needs a "
                                    f"human's approval"), *reasons], checks, improvement)
        return Verdict("adopt", reasons, checks, improvement)

    def _decide_divergence(self, ev: Evidence) -> dict:
        """Any diverged candidate run at any horizon, on the decision split or its meta-training tasks,
        rejects, whatever the mean score says."""
        found = {}
        for split, scores in (("held_out", ev.held_out), ("meta_train", ev.meta_train)):
            for label, per in (scores.horizons if scores is not None else {}).items():
                if "candidate" in per and per["candidate"].diverged:
                    found[f"{split}/{label}"] = per["candidate"].diverged
        what = ", ".join(f"{n} at {k}" for k, n in found.items())
        return _check(not found, found, 0,
                      f"diverged runs ({what}): a loss non-finite, above {self.cfg.diverge_factor:g}x its initial "
                      f"loss or at the task's loss ceiling" if found else "no diverged run at any horizon")

    def _decide_ceiling(self, ev: Evidence, other: str) -> dict:
        """Capability ceiling: mean improvement over tuned Adam and over the incumbent, at every horizon."""
        c = self.cfg
        over_adam, over_inc = {}, {}
        assert ev.held_out is not None  # decide reads it first
        for label, per in ev.held_out.horizons.items():
            s = per["candidate"].scores
            over_adam[label] = -sum(s) / len(s)
            if other != TUNED_ADAM:
                d = [b - a for a, b in zip(s, per[other].scores)]
                over_inc[label] = sum(d) / len(d)
        worst_adam, worst_inc = max(over_adam.values()), max(over_inc.values(), default=-math.inf)
        hold = worst_adam > c.ceiling_vs_adam or worst_inc > c.ceiling_vs_incumbent
        if other == TUNED_ADAM:  # before any adoption the incumbent is tuned Adam: both bounds apply
            hold = hold or worst_adam > c.ceiling_vs_incumbent
        if over_inc:
            reason = (f"improvement over tuned Adam up to {worst_adam:+.3f} (ceiling {c.ceiling_vs_adam:g}), over "
                      f"the incumbent up to {worst_inc:+.3f} (ceiling {c.ceiling_vs_incumbent:g})")
        else:
            reason = (f"improvement over tuned Adam (the incumbent) up to {worst_adam:+.3f} (ceiling "
                      f"{min(c.ceiling_vs_adam, c.ceiling_vs_incumbent):g})")
        return {"passed": True, "hold": bool(hold), "value": {"vs_tuned_adam": over_adam, "vs_incumbent": over_inc},
                "bound": {"ceiling_vs_adam": c.ceiling_vs_adam, "ceiling_vs_incumbent": c.ceiling_vs_incumbent},
                "reason": ("over the ceiling: " if hold else "under the ceiling: ") + reason}

    def review(self, candidate: Candidate, incumbent: Candidate | None,
               extra: dict[str, Optimizer] | None = None) -> tuple[Verdict, Evidence]:
        """Gather evidence and decide; any exception rejects (fail closed) with no evidence."""
        t0 = time.perf_counter()
        ev = Evidence()
        try:
            ev = self.gather(candidate, incumbent, extra)
            verdict = self.decide(ev)
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            verdict = Verdict("reject", [f"review raised {type(e).__name__}: {e}"],
                              {"error": {"passed": False, "traceback": traceback.format_exc(limit=8)}})
        verdict.seconds = time.perf_counter() - t0
        return verdict, ev


def _need(x: Any, name: str) -> Any:
    """``x``; an absent measurement the reason must quote raises, as reading the evidence dict did."""
    if x is None:
        raise KeyError(name)
    return x


def _or(x: Any, default: Any) -> Any:
    """``x``, or ``default`` where the measurement is absent."""
    return default if x is None else x


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


__all__ = ["Candidate", "Governor", "GovernorConfig", "TaskSubset", "Verdict", "task_scores"]
