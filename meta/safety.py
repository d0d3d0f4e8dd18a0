"""The loop's safety layer: what stops, freezes or rolls back a generations run, beside the governor.

Everything here reads evidence the run has already recorded (the lineage, the evaluation's per-task
records) and is a pure function of it where it decides, so each mechanism can be tested on a planted
lineage or planted evidence (``tests/test_safety.py``). :class:`meta.generations.GenerationRunner` calls
it; the lineage (:mod:`meta.lineage`) refuses entries that break its rules even when written by hand.

* **Divergence the governor can see** (:func:`run_diverged`): a run has diverged when its minibatch loss
  went non-finite (what :mod:`meta.evaluate` flags), *or* a full-batch training loss at any evaluated step
  ``t > 0`` exceeds ``gov.diverge_factor`` x its initial loss, *or* it rose to the task's loss ceiling
  (``task.max_loss``, where the evaluation clips losses) after having been below it, or never left the
  ceiling by the end. The governor rejects a candidate with any diverged run at any horizon.
* **Capability ceiling** (in :meth:`meta.governor.Governor.decide`): a mean improvement over tuned Adam
  above ``gov.ceiling_vs_adam``, or over the incumbent above ``gov.ceiling_vs_incumbent``, at any evaluated
  horizon, is held for a person whatever ``gov.rate_limit`` says, and approving it must name who did.
* **Runaway detection** (:func:`runaway_streak`): the last ``gov.runaway_window`` adoptions each improved
  by more than ``gov.runaway_factor`` x the one before: an *emergency stop* freezes the run (a ``freeze``
  entry), reverts the incumbent to the generation in force before the streak, writes an alert to the log,
  ``RUN/alerts.jsonl``, the report and W&B, and exits with status :data:`FROZEN_STATUS`.
* **Frozen runs** adopt nothing until ``train.py unfreeze RUN --by NAME --reason TEXT``; ``train.py freeze``
  freezes by hand.
* **Sustained gains** (:func:`decide_sustain`; Schmidhuber's success-story criterion): before each
  generation the incumbent is re-evaluated against the generation it was judged against on
  ``gov.sustain_tasks`` fresh ``test``-split tasks (indices never used before, offset by generation); if
  the pooled interval of its improvement no longer lies above ``gov.min_improvement`` (or it diverged),
  it is rolled back to that generation (a ``sustain`` entry with the evidence).
* **Diminishing returns** (:func:`generations_without_adoption`): ``gen.patience`` generations in a row
  without an adoption end the run.
* **Goal preservation** (:func:`goal_of`): the meta-objective, the distribution's digest and the governor's
  settings are recorded with generation 0; a later review under another goal is refused unless a person
  recorded the change (``train.py change-goal``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meta.lineage import ADOPTED, PENDING, Lineage, LineageError, LineageState, goal_digest
from meta.results import EvalResults, TaskResult

FROZEN_STATUS = 5  # exit status of a frozen run (emergency stop, or started while frozen)
ALERTS = "alerts.jsonl"


class GoalError(LineageError):
    """A generation would be reviewed under another goal than the one recorded in the lineage."""


# ---- divergence ---------------------------------------------------------------------------------
def run_diverged(task: TaskResult, name: str, label: str, factor: float) -> bool:
    """Did ``name``'s run on this task (:func:`meta.evaluate.evaluate`) diverge by ``label``? The rule is
    :meth:`meta.results.HorizonResult.blew_up`, against the task's loss ceiling."""
    return task.run_diverged(name, label, factor)


def diverged_tasks(results: EvalResults, name: str, label: str, factor: float) -> list[int]:
    """Positions (in ``results.tasks``) of the tasks on which ``name`` diverged by ``label``."""
    return results.diverged_tasks(name, label, factor)


# ---- goal -----------------------------------------------------------------------------------------
def goal_of(cfg: Any, dist: Any) -> dict[str, Any]:
    """What the run optimises and under which rules: recorded with generation 0, refused when changed."""
    gov = cfg.to_dict()["gov"]
    return {"meta_loss": cfg.meta.meta_loss, "distribution": cfg.meta.distribution, "dist_seed": cfg.meta.dist_seed,
            "distribution_digest": dist.digest(), "governor": gov}


def goal_differences(recorded: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    names = {"meta_loss": "meta.meta_loss", "distribution": "meta.distribution", "dist_seed": "meta.dist_seed"}
    out = [names.get(k, k) for k in sorted(set(recorded) | set(mine))
           if k != "governor" and recorded.get(k) != mine.get(k)]
    g0, g1 = recorded.get("governor") or {}, mine.get("governor") or {}
    out += [f"gov.{k}" for k in sorted(set(g0) | set(g1)) if g0.get(k) != g1.get(k)]
    return out


def check_goal(state: LineageState, goal: dict[str, Any], run_dir: str | Path) -> None:
    """Raise :class:`GoalError` if ``goal`` differs from the goal in force in the lineage."""
    if state.goal is None:
        return
    diff = goal_differences(state.goal, goal)
    if diff:
        raise GoalError(
            f"{run_dir}: this run's goal was recorded with generation 0 (or last changed by a person) and the "
            f"config differs in {diff}; a later generation may not be reviewed under another meta-objective, "
            f"task distribution or governor settings. To change them, a person records it: `python train.py "
            f"change-goal {run_dir} --set KEY=VALUE ... --by NAME --reason TEXT`")


# ---- adoptions, runaway, patience -------------------------------------------------------------------
def adoption_events(entries: Sequence[dict]) -> list[dict[str, Any]]:
    """Every adoption in order, since the last freeze or unfreeze (a person's look resets the window):
    the generation, its verdict's improvement over what it replaced, the incumbent before it, the entry."""
    events: list[dict[str, Any]] = []
    lin = Lineage("/nonexistent")  # state() of given entries reads nothing from disk
    st = LineageState()
    for i, e in enumerate(entries):
        kind = e.get("kind")
        if kind in ("freeze", "unfreeze"):
            events = []
        before = st.incumbent
        st = lin.state(list(entries[: i + 1]))
        g = e.get("generation")
        adopted = (kind == "generation" and e.get("status") == ADOPTED) or \
            (kind == "approval" and e.get("decision") == "approve" and st.status.get(g) == ADOPTED)
        if adopted:
            rec = st.records[g]
            events.append({"generation": g, "improvement": (rec.get("verdict") or {}).get("improvement"),
                           "incumbent_before": before, "entry": e.get("index", i)})
    return events


def runaway_streak(entries: Sequence[dict], window: int, factor: float) -> dict[str, Any] | None:
    """The last ``window`` adoptions if each improved by more than ``factor`` x the one before (all
    positive), with ``revert_to``: the incumbent before the streak (None: tuned Adam); else None."""
    if window < 2:
        return None
    events = adoption_events(entries)[-window:]
    if len(events) < window:
        return None
    imps = [ev["improvement"] for ev in events]
    if any(x is None or not math.isfinite(x) or x <= 0 for x in imps):
        return None
    if all(b > factor * a for a, b in zip(imps, imps[1:])):
        return {"generations": [ev["generation"] for ev in events], "improvements": imps,
                "ratios": [b / a for a, b in zip(imps, imps[1:])], "window": window, "factor": factor,
                "revert_to": events[0]["incumbent_before"], "entries": [ev["entry"] for ev in events]}
    return None


def generations_without_adoption(state: LineageState) -> int:
    """Generations in a row, at the end of the lineage, whose verdict was decided without an adoption."""
    n = 0
    for g in sorted(state.records, reverse=True):
        if state.status[g] in (ADOPTED, PENDING):
            break
        n += 1
    return n


# ---- sustained gains ----------------------------------------------------------------------------
def judged_against(record: dict) -> int | None:
    """The generation a generation was compared with when it was reviewed (None: tuned Adam)."""
    if "incumbent_at_review" in record:
        return record["incumbent_at_review"]
    by = str(record.get("trained_by", "adam"))  # older entries: the incumbent that trained it
    return int(by.split("-", 1)[1]) if by.startswith("gen-") else None


def sustain_indices(entries: Sequence[dict], g: int, n: int) -> list[int]:
    """``n`` test-split task indices for the check before generation ``g``: offset by generation, and past
    every index an earlier check used, so no test task is ever seen twice."""
    used = [i for e in entries if e.get("kind") == "sustain" for i in e.get("task_indices", [])]
    start = max(g * n, max(used) + 1 if used else 0)
    return list(range(start, start + n))


def pooled_diffs(entries: Sequence[dict], incumbent: int, parent: int | None) -> list[float]:
    """Fresh-task improvements of ``incumbent`` over ``parent`` from every earlier re-check of the pair."""
    return [float(x) for e in entries if e.get("kind") == "sustain" and e.get("incumbent") == incumbent
            and e.get("parent") == parent for x in e.get("diffs", [])]


def decide_sustain(diffs: Sequence[float], pooled_before: Sequence[float], diverged: int, gov: Any) -> dict:
    """Is the incumbent's gain over its parent still significant on fresh tasks? ``diffs``: this check's
    per-task improvements (parent's score minus the incumbent's; > 0 = the gain holds)."""
    from meta import stats

    pool = [*pooled_before, *diffs]
    ci = stats.bootstrap_ci(pool, gov.sustain_level, n_boot=gov.bootstrap, seed=gov.seed)
    passed = ci["lo"] is not None and ci["lo"] > gov.min_improvement and diverged == 0
    why = (f"improvement over the generation it was judged against, on {len(pool)} fresh test tasks "
           f"({len(diffs)} new): {ci['mean']:+.3f} [{_f(ci['lo'])}, {_f(ci['hi'])}] at level {gov.sustain_level}"
           f" (must lie above {gov.min_improvement:+g}){f'; {diverged} diverged' if diverged else ''}")
    return {"passed": passed, "mean": ci["mean"], "ci": [ci["lo"], ci["hi"]], "level": gov.sustain_level,
            "pooled": len(pool), "bound": gov.min_improvement, "diverged": diverged, "reason": why}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


# ---- alerts -------------------------------------------------------------------------------------
def alert(run_dir: str | Path, title: str, text: str, *, wandb: str = "disabled", project: str = "ouroboros",
          log: Callable[[str], None] | None = None, **fields: Any) -> dict[str, Any]:
    """An alert: a log line, a record in ``RUN/alerts.jsonl`` (the report lists them), and with W&B on a
    W&B alert (``wandb.alert``; wandb is imported only then)."""
    run_dir = Path(run_dir)
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "title": title, "text": text, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ALERTS, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
    (log or (lambda s: print(f"[ouroboros] {s}", flush=True)))(f"ALERT: {title}: {text}")
    if wandb != "disabled":
        from meta.logging import MetricsLogger

        logger = MetricsLogger(run_dir / "alerts", mode=wandb, project=project, name=f"{run_dir.name}-alert",
                               group=run_dir.name, job_type="alert", config={"alert": title})
        try:
            logger.alert(title, text)
        finally:
            logger.finish()
    return rec


def read_alerts(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / ALERTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the lineage holds the authoritative record
    return out


__all__ = ["ALERTS", "FROZEN_STATUS", "GoalError", "adoption_events", "alert", "check_goal", "decide_sustain",
           "diverged_tasks", "generations_without_adoption", "goal_digest", "goal_of", "judged_against", "pooled_diffs",
           "read_alerts", "run_diverged", "runaway_streak", "sustain_indices"]
