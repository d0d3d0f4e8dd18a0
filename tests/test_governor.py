"""Governor: rejects planted bad candidates, adopts a genuinely better one, rate-limits large jumps,
fails closed when its review raises."""

import math
from dataclasses import fields, replace

import pytest
import torch

from meta.config import GovernorConfig, RunConfig, apply_overrides
from meta.generations import LoopTrainer
from meta.governor import Candidate, Governor, TaskSubset, task_scores
from meta.results import EvalMeta, EvalResults, HorizonResult, OptimizerResult, TaskResult
from optimizers.learned import LearnedOptimizer, LOConfig
from tasks import get_distribution

LO = LOConfig(hidden_width=8, hidden_layers=1)
HORIZON = 30
FAST = GovernorConfig(num_tasks=6, train_tasks=2, long_factor=2, adam_lrs=(1e-3, 1e-2, 1e-1), bootstrap=500,
                      loop_steps=2, loop_population=2, loop_tasks=3, probe_tasks=1, probe_steps=5)


def _lo_with_lr(lr: float, cfg: LOConfig = LO, seed: int = 0) -> Candidate:
    lopt = LearnedOptimizer(cfg)
    theta = lopt.init_theta(seed)
    theta["nominal_log_lr"] = torch.tensor(math.log(lr))
    return Candidate(f"lr{lr:g}", lopt, theta, train_task_indices=[0, 1], horizon=HORIZON, outer_scale=0.3)


@pytest.fixture(scope="module")
def dist():
    return get_distribution("digits_mlp")


def _governor(dist, cfg=FAST, loop=True):
    run = apply_overrides(RunConfig(), {"meta.population": 2, "meta.truncation": 5, "meta.horizon": HORIZON,
                                        "lo.hidden_width": 8, "lo.hidden_layers": 1, "wandb": "disabled"})
    run = replace(run, gov=cfg)
    trainer = LoopTrainer(run, run.lo, seed=3) if loop else None
    return Governor(cfg, dist, HORIZON, loop_trainer=trainer)


def test_better_candidate_is_adopted_and_a_large_jump_is_held(dist):
    good, bad = _lo_with_lr(1e-2), _lo_with_lr(1e-4)
    gov = _governor(dist, replace(FAST, rate_limit=10.0, ceiling_vs_incumbent=10.0))
    verdict, ev = gov.review(good, bad)
    assert verdict.decision == "adopt", verdict.reasons
    assert set(verdict.checks) == {"bounds", "generalisation", "overfit", "horizon", "loop", "divergence", "ceiling"}
    assert all(c["passed"] for c in verdict.checks.values())
    assert verdict.improvement > 0
    # the same evidence under the default capability ceiling (+3 over the incumbent at 2H > 1.5): held for a
    # person although the rate limiter (10) would let it through
    capped = Governor(replace(FAST, rate_limit=10.0), dist, HORIZON).decide(ev)
    assert capped.decision == "hold" and capped.reasons[0].startswith("capability ceiling")
    # the same evidence under a tight rate limiter: held for a human, not adopted
    held = Governor(replace(FAST, rate_limit=verdict.improvement / 2, ceiling_vs_incumbent=10.0), dist,
                    HORIZON).decide(ev)
    assert held.decision == "hold" and "rate limiter" in held.reasons[0]
    # and the worse one does not replace the better one
    worse, _ = gov.review(bad, good)
    assert worse.decision == "reject"
    assert not worse.checks["generalisation"]["passed"]


def test_exploding_updates_are_rejected(dist):
    exploding = _lo_with_lr(5.0)  # nominal Adam lr 5: every element moves by max_update each step
    verdict, ev = _governor(dist, loop=False).review(exploding, None)
    assert verdict.decision == "reject"
    assert "update/parameter norm ratio" in verdict.checks["bounds"]["reason"]
    assert ev.held_out is not None  # still evaluated, for the report


def test_nan_weights_are_rejected(dist):
    cand = _lo_with_lr(1e-2)
    cand.theta["w0"] = cand.theta["w0"].clone()
    cand.theta["w0"][0, 0] = float("nan")
    verdict, _ = _governor(dist, loop=False).review(cand, None)
    assert verdict.decision == "reject"
    assert "non-finite" in verdict.checks["bounds"]["reason"]


def test_candidate_over_the_parameter_bound_is_rejected(dist):
    big = _lo_with_lr(1e-2, LOConfig(hidden_width=64, hidden_layers=2))
    cfg = replace(FAST, max_theta=1000)
    verdict, ev = _governor(dist, cfg, loop=False).review(big, None)
    assert verdict.decision == "reject"
    assert ev.held_out is None  # rejected before anything expensive ran
    assert f"{big.lopt.num_theta()} weights > bound 1000" in verdict.checks["bounds"]["reason"]


def test_review_that_raises_rejects(dist):
    broken = _lo_with_lr(1e-2)
    del broken.theta["w1"]  # the MLP cannot run: update raises inside the review
    verdict, _ = _governor(dist, loop=False).review(broken, None)
    assert verdict.decision == "reject"
    assert verdict.reasons[0].startswith("review raised KeyError")


def _planted(cand_held, inc_held, cand_train, long_cand=None, long_inc=None):
    def block(c, i):
        return {"candidate": {"scores": c, "speedups": [1.0] * len(c), "diverged": 0},
                "incumbent": {"scores": i, "speedups": [1.0] * len(i), "diverged": 0}}

    return {
        "candidate": "c", "incumbent": "i",
        "bounds": {"finite": True, "num_theta": 10, "flops_per_element": 10, "state_floats_per_element": 4,
                   "max_update_ratio": 0.01, "probe_finite": True, "step_time_ratio": 2.0},
        "held_out": {"H": block(cand_held, inc_held),
                     "10H": block(long_cand or cand_held, long_inc or inc_held)},
        "meta_train": {"task_indices": [0], "H": {"candidate": {"scores": cand_train}}},
    }


def test_meta_overfit_candidate_is_rejected(dist):
    """Planted evidence of a candidate meta-overfit to its single training task: far better than tuned
    Adam on it, slightly better than the incumbent on held-out tasks."""
    gov = Governor(FAST, dist, HORIZON)
    inc = [0.3, 0.5, 0.2, 0.4, 0.6, 0.3]
    cand = [x - 0.1 for x in inc]
    assert gov.decide(_planted(cand, inc, cand_train=[0.2])).decision == "adopt"
    overfit = gov.decide(_planted(cand, inc, cand_train=[-3.0]))
    assert overfit.decision == "reject"
    assert [r.split(":")[0] for r in overfit.reasons] == ["overfit"]


def test_loss_of_advantage_at_long_horizon_is_rejected(dist):
    gov = Governor(FAST, dist, HORIZON)
    inc = [0.3, 0.5, 0.2, 0.4, 0.6, 0.3]
    cand = [x - 0.1 for x in inc]
    ev = _planted(cand, inc, cand_train=[0.2], long_cand=[x + 1.0 for x in inc], long_inc=inc)
    v = gov.decide(ev)
    assert v.decision == "reject" and not v.checks["horizon"]["passed"]


def test_task_subset_maps_indices(dist):
    sub = TaskSubset(dist, [5, 2])
    assert sub.task("meta_train", 1).seed == dist.task("meta_train", 2).seed


def test_scores_are_relative_to_tuned_adam():
    def run(loss, curve):
        return HorizonResult(train_loss=loss, valid_loss=loss, smoothed_loss=loss, speedup=1.0,
                             speedup_censored=False, diverged=False, diverged_step=None, curve=curve)

    rec = TaskResult(split_index=0, seed=0, config={}, max_loss=10.0, run_seconds=0.0, grids={},
                     results={"tuned_adam": OptimizerResult({"H": run(0.1, [2.0])}),
                              "x": OptimizerResult({"H": run(0.1 * math.e, [])})})
    s = rec.score("x", "H")
    assert s == pytest.approx(math.log((0.1 * math.e + 2e-3) / (0.1 + 2e-3)))
    meta = EvalMeta(**{**{f.name: None for f in fields(EvalMeta)}, "horizons": {"H": 1}})
    assert task_scores(EvalResults(meta, ["tuned_adam", "x"], [rec]), "x", "H") == [s]
