"""Typed evaluation results (meta/results.py): a real evaluation's JSON round-trips exactly (same dict, same
key order, so ``results.json`` is byte-identical), its layout equals a dict built by hand from the typed
fields, bad JSON is refused where it is read, and the governor's readings (scores, speed-ups, divergences,
and the verdict built on them) equal the same quantities computed here from the JSON by string paths."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from meta.config import GovernorConfig, RunConfig
from meta.evaluate import TUNED_ADAM, TUNED_SGDM, evaluate, write_report
from meta.governor import Governor
from meta.results import EvalResults, HorizonResult, TaskResult
from optimizers import Adam
from optimizers.learned import LearnedOptimizer, LOConfig
from tasks import get_distribution
from planted_optimizers import NaNAfter

FACTOR = 2.0


@pytest.fixture(scope="module")
def results() -> EvalResults:
    """A small deterministic evaluation: 2 tasks of the default distribution, short horizons, 1 process."""
    lopt = LearnedOptimizer(LOConfig(hidden_width=8, hidden_layers=1))
    opts = {"candidate": lopt.bind(lopt.init_theta(0)), "incumbent": Adam(lr=3e-3), "nan": NaNAfter(3)}
    return evaluate(opts, get_distribution(RunConfig().meta.distribution), num_tasks=2, horizon=5, long_horizon=15,
                    adam_lrs=(1e-3, 1e-2, 1e-1), sgdm_lrs=(1e-2, 1e-1), seed=0, progress=False, workers=1)


def test_json_round_trip_is_exact(results):
    js = results.to_json()
    text = json.dumps(js, indent=1, allow_nan=False)
    again = EvalResults.from_json(json.loads(text))
    assert again == results
    assert again.to_json() == js and json.dumps(again.to_json(), indent=1) == text  # same keys in the same order
    # what ``train.py evaluate`` adds goes last, and only when set
    results2 = replace(results, checkpoint="runs/x/checkpoint", eval_seconds=1.5)
    js2 = results2.to_json()
    assert list(js2)[-2:] == ["checkpoint", "eval_seconds"] and "checkpoint" not in js
    assert EvalResults.from_json(js2).to_json() == js2


def _horizon_by_hand(h: HorizonResult) -> dict:
    d = {"train_loss": h.train_loss, "valid_loss": h.valid_loss, "smoothed_loss": h.smoothed_loss,
         "speedup": h.speedup, "speedup_censored": h.speedup_censored, "diverged": h.diverged,
         "diverged_step": h.diverged_step}
    if h.lr is not None:
        d["lr"] = h.lr
    d["curve"] = h.curve
    return d


def _task_by_hand(t: TaskResult) -> dict:
    return {"split_index": t.split_index, "seed": t.seed, "config": t.config, "max_loss": t.max_loss,
            "run_seconds": t.run_seconds,
            "results": {n: {label: _horizon_by_hand(r[label]) for label in r} for n, r in t.results.items()},
            "grids": {g: {"lrs": r.lrs, "train_loss": r.train_loss, "valid_loss": r.valid_loss,
                          "chosen_lr": r.chosen_lr, "diverged_step": r.diverged_step} for g, r in t.grids.items()}}


def test_json_layout_equals_a_dict_built_by_hand(results):
    m = results.meta
    meta = {k: getattr(m, k) for k in (
        "distribution", "distribution_digest", "split", "task_indices", "num_tasks", "horizons", "adam_lrs",
        "sgdm_lrs", "sgdm_momentum", "seed", "ema", "level", "ci_method", "curve_steps", "runtime_s", "workers",
        "ranks", "torch_threads_per_worker", "speedup_definition", "tuning")}
    summary = {label: {n: {"train_loss": e.train_loss, "valid_loss": e.valid_loss, "speedup": e.speedup,
                           "diverged": e.diverged,
                           **({"diff_vs_tuned_adam": e.diff_vs_tuned_adam} if n != TUNED_ADAM else {})}
                       for n, e in per.items()} for label, per in results.summary.items()}
    want = {"meta": meta, "optimizers": results.optimizers, "tasks": [_task_by_hand(t) for t in results.tasks],
            "summary": summary, "chosen_lrs": results.chosen_lrs, "warnings": results.warnings}
    assert json.dumps(results.to_json(), indent=1) == json.dumps(want, indent=1)
    # only the tuned baselines carry a learning rate; summaries of tuned Adam carry no difference to itself
    for t in results.tasks:
        for n, r in t.results.items():
            assert all((r[label].lr is not None) == (n in (TUNED_ADAM, TUNED_SGDM)) for label in r)
    assert results.summary["H"][TUNED_ADAM].diff_vs_tuned_adam is None
    assert results.summary["H"]["candidate"].diff_vs_tuned_adam is not None


def test_from_json_refuses_unknown_or_missing_keys(results):
    js = results.to_json()
    with pytest.raises(TypeError):
        EvalResults.from_json({**js, "extra": 1})
    bad = json.loads(json.dumps(js))
    del bad["tasks"][0]["results"]["candidate"]["H"]["speedup"]
    with pytest.raises(TypeError):
        EvalResults.from_json(bad)
    for key in ("curve", "grids"):
        bad = json.loads(json.dumps(js))
        del (bad["tasks"][1]["results"]["incumbent"]["H"] if key == "curve" else bad["tasks"][1])[key]
        with pytest.raises(TypeError):
            EvalResults.from_json(bad)
    bad = json.loads(json.dumps(js))
    bad["meta"]["typo"] = bad["meta"].pop("seed")
    with pytest.raises(TypeError):
        EvalResults.from_json(bad)


# ---- the governor's readings, computed here from the JSON by string paths ----------------------------
def _scores_by_hand(js: dict, name: str, label: str) -> list[float]:
    out = []
    for r in js["tasks"]:
        adam = r["results"][TUNED_ADAM]
        floor = 1e-3 * max(float(adam["H"]["curve"][0]) if adam.get("H", {}).get("curve") else 1.0, 1e-12)
        a, x = float(adam[label]["train_loss"]), float(r["results"][name][label]["train_loss"])
        out.append(math.log((x + floor) / (a + floor)))
    return out


def _diverged_by_hand(task: dict, name: str, label: str) -> bool:
    r = task["results"][name][label]
    if r["diverged"]:
        return True
    curve = [float(x) for x in r["curve"]]
    losses = curve[1:] + [float(r["train_loss"])]
    if any(not math.isfinite(x) for x in losses):
        return True
    init = curve[0] if curve else None
    if init is not None and math.isfinite(init) and any(x > FACTOR * init for x in losses):
        return True
    at = float(task["max_loss"]) * (1.0 - 1e-6)
    if init is not None and init < at:
        return any(x >= at for x in losses)
    return float(r["train_loss"]) >= at


def _evidence_by_hand(js: dict, names: list[str]) -> dict:
    out = {}
    for label in js["meta"]["horizons"]:
        out[label] = {}
        for n in [*names, TUNED_ADAM]:
            bad = [i for i, t in enumerate(js["tasks"]) if _diverged_by_hand(t, n, label)]
            out[label][n] = {
                "scores": _scores_by_hand(js, n, label) if n != TUNED_ADAM else [0.0] * len(js["tasks"]),
                "speedups": [float(r["results"][n][label]["speedup"]) for r in js["tasks"]],
                "diverged": len(bad), "diverged_tasks": bad,
                "nonfinite": sum(bool(r["results"][n][label]["diverged"]) for r in js["tasks"])}
    return out


def test_governor_readings_equal_the_json_read_by_hand(results):
    js = results.to_json()
    for name in ("candidate", "incumbent", "nan"):
        for label in results.labels:
            assert results.task_scores(name, label) == _scores_by_hand(js, name, label)
            assert results.speedups(name, label) == [r["results"][name][label]["speedup"] for r in js["tasks"]]
            assert results.divergences(name, label) == sum(r["results"][name][label]["diverged"] for r in js["tasks"])
            assert results.diverged_tasks(name, label, FACTOR) == [
                i for i, t in enumerate(js["tasks"]) if _diverged_by_hand(t, name, label)]
    assert results.divergences("nan", "H") == 2  # the readings see a flagged run (not a vacuous comparison)
    gov = Governor(GovernorConfig(bootstrap=200, diverge_factor=FACTOR), None, 5)
    held = gov._scores(results, ["candidate", "incumbent"]).to_json()
    assert held == _evidence_by_hand(js, ["candidate", "incumbent"])
    bounds = {"finite": True, "num_theta": 10, "flops_per_element": 10, "state_floats_per_element": 3,
              "max_update_ratio": 0.01, "probe_finite": True, "step_time_ratio": 1.0}
    loop = {"by_candidate": results.task_scores("candidate", "H"),
            "by_incumbent": results.task_scores("incumbent", "H"), "finite": True}
    lax = dict(min_improvement=-5.0, rate_limit=100.0, ceiling_vs_adam=100.0, ceiling_vs_incumbent=100.0,
               long_tolerance=100.0, max_overfit_gap=100.0, loop_tolerance=100.0)
    for cfg in (GovernorConfig(bootstrap=200), GovernorConfig(bootstrap=200, **lax)):
        for inc in ("i", TUNED_ADAM):
            def ev(held):
                return {"candidate": "c", "incumbent": inc, "bounds": bounds, "held_out": held, "loop": loop,
                        "meta_train": {"task_indices": [0], "H": {"candidate": held["H"]["candidate"]}}}

            g = Governor(cfg, None, 5)
            typed = g.decide(ev(held)).to_dict()
            by_hand = g.decide(ev(_evidence_by_hand(js, ["candidate", "incumbent"]))).to_dict()
            typed.pop("seconds"), by_hand.pop("seconds")
            assert typed == by_hand


def test_report_from_json_equals_report_from_the_typed_results(results, tmp_path):
    a = write_report(results, tmp_path / "typed")
    b = write_report(json.loads(json.dumps(results.to_json())), tmp_path / "json")
    assert a["json"].read_text() == b["json"].read_text() == json.dumps(results.to_json(), indent=1)
    assert a["md"].read_text() == b["md"].read_text()
