"""The loop's safety layer (meta/safety.py): runaway detection and the emergency stop, frozen runs, the
capability ceiling, sustained gains, diminishing returns, goal preservation and divergence that the
governor can see -- each on planted lineages or planted evidence, and end to end on the smoke preset."""

import json
import shutil
import subprocess
import sys
import types
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from meta import safety
from meta.config import GenConfig, GovernorConfig, RunConfig
from meta.generations import GenerationRunner
from meta.governor import Governor, Verdict
from meta.lineage import ADOPTED, PENDING, REJECTED, Lineage, LineageError, goal_digest
from meta.results import EvalMeta, EvalResults, HorizonResult, OptimizerResult, TaskResult
from optimizers.learned import ConfigError
from train import main, presets

ROOT = Path(__file__).resolve().parents[1]
# a permissive governor: decisions in these runs are planted (or the point is the safety layer)
LAX = {"min_improvement": -100.0, "long_tolerance": 100.0, "max_overfit_gap": 100.0, "loop_tolerance": 100.0,
       "rate_limit": 100.0, "ceiling_vs_adam": 100.0, "ceiling_vs_incumbent": 100.0, "sustain_tasks": 0}


def _cfg(tmp_path, name="run", gens=1, approval="auto", patience=3, **gov):
    cfg = presets()["smoke"]
    return replace(cfg, out_dir=str(tmp_path / name),
                   gen=replace(cfg.gen, max_generations=gens, approval=approval, patience=patience),
                   gov=replace(cfg.gov, **{**LAX, **gov}))


def _runner(cfg, **kw):
    return GenerationRunner(cfg, cfg.out_dir, progress=False, log=lambda s: None, **kw)


def _write_config(cfg, path):
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def _plant(monkeypatch, improvements, decision="adopt"):
    """Every review's verdict is planted: ``decision`` with the next planted mean improvement."""
    it = iter(improvements)

    def decide(self, ev):
        x = next(it)
        return Verdict(decision, [f"planted improvement {x:+.3f}"], {"planted": {"passed": True}}, x)

    monkeypatch.setattr(Governor, "decide", decide)


def _planted_lineage(tmp_path, improvements, statuses=None):
    lin = Lineage(tmp_path / "planted")
    for g, x in enumerate(improvements):
        status = (statuses or {}).get(g, ADOPTED)
        lin.append({"kind": "generation", "generation": g, "status": status,
                    "verdict": {"decision": "adopt" if status == ADOPTED else "reject", "improvement": x,
                                "reasons": [], "checks": {}}})
    return lin


# ---- configuration -------------------------------------------------------------------------------
def test_safety_settings_round_trip_json_and_bad_values_are_errors():
    gov = GovernorConfig(diverge_factor=3.0, ceiling_vs_adam=1.0, ceiling_vs_incumbent=0.5, runaway_window=4,
                         runaway_factor=2.0, sustain_tasks=5, sustain_level=0.8, sustain_rollback=False)
    cfg = replace(RunConfig(), gov=gov, gen=GenConfig(patience=5))
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.gov.sustain_rollback is False and back.gen.patience == 5
    for section, key, value in [("gov", "runaway_window", 1), ("gov", "runaway_factor", 1.0),
                                ("gov", "sustain_tasks", 2), ("gov", "sustain_level", 1.0),
                                ("gov", "diverge_factor", 0.5), ("gov", "ceiling_vs_adam", 0.0),
                                ("gov", "sustain_rollback", "yes"), ("gen", "patience", -1)]:
        data = {**cfg.to_dict(), section: {**cfg.to_dict()[section], key: value}}
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            RunConfig.from_dict(data)
    assert GovernorConfig(runaway_window=0, sustain_tasks=0).runaway_window == 0  # 0: off


# ---- divergence the governor can see ----------------------------------------------------------------
def _run(curve, final, div=False):
    return HorizonResult(train_loss=final, valid_loss=final, smoothed_loss=final, speedup=1.0, speedup_censored=False,
                         diverged=div, diverged_step=None, curve=list(curve))


def _record(i, max_loss, **per_name):
    return TaskResult(split_index=i, seed=i, config={}, max_loss=max_loss, run_seconds=0.0,
                      results={n: OptimizerResult(h) for n, h in per_name.items()}, grids={})


def _task(i, cand_curve, cand_final, *, max_loss=3.45, adam_final=0.01, nonfinite=False):
    adam_curve = [2.3, 1.0, adam_final]
    return _record(i, max_loss, tuned_adam={"H": _run(adam_curve, adam_final), "10H": _run(adam_curve, adam_final / 2)},
                   candidate={"H": _run(cand_curve[:2], cand_final[0]), "10H": _run(cand_curve, cand_final[1], nonfinite)})


def _results(tasks, horizons):
    """Planted evaluation results: only the horizons and the tasks are read by the governor's scores."""
    meta = EvalMeta(**{**{f.name: None for f in fields(EvalMeta)}, "horizons": horizons})
    return EvalResults(meta=meta, optimizers=["tuned_adam", "candidate"], tasks=list(tasks))


def test_a_finite_blow_up_counts_as_diverged_and_rejects():
    """Planted evidence: five tasks where the candidate beats tuned Adam, one where it behaves until late and
    then sits at the loss ceiling -- finite, so the evaluation says 'not diverged'."""
    good = [_task(i, [2.3, 0.5, 0.004], (0.006, 0.004)) for i in range(5)]
    blow = _task(5, [2.3, 0.5, 0.004, 3.45, 3.45], (0.006, 3.45))
    results = _results([*good, blow], {"H": 10, "10H": 100})
    assert all(not r["candidate"]["10H"].diverged for r in results.tasks)  # evaluate's view
    gov = Governor(replace(GovernorConfig(num_tasks=6, bootstrap=500), **{**LAX, "long_tolerance": 100.0}),
                   None, 10)
    held = gov._scores(results, ["candidate"]).to_json()
    assert held["10H"]["candidate"]["diverged"] == 1 and held["10H"]["candidate"]["nonfinite"] == 0
    assert held["10H"]["candidate"]["diverged_tasks"] == [5] and held["H"]["candidate"]["diverged"] == 0
    ev = {"candidate": "c", "incumbent": "tuned_adam", "held_out": held,
          "bounds": {"finite": True, "num_theta": 10, "flops_per_element": 10, "state_floats_per_element": 4,
                     "max_update_ratio": 0.01, "probe_finite": True, "step_time_ratio": 2.0},
          "meta_train": {"task_indices": [0], "H": {"candidate": {"scores": [-0.5], "diverged": 0}}}}
    v = gov.decide(ev)
    assert v.improvement > 0  # better than tuned Adam on average at H...
    assert v.decision == "reject" and not v.checks["divergence"]["passed"]  # ...rejected whatever the mean
    assert "1 at held_out/10H" in v.checks["divergence"]["reason"]
    # the same evidence without the blown-up task is adopted: the check is what rejects
    ok = gov.decide({**ev, "held_out": gov._scores(_results(good, {"H": 10, "10H": 100}), ["candidate"]).to_json()})
    assert ok.decision == "adopt", ok.reasons


@pytest.mark.parametrize("curve, final, max_loss, diverged", [
    ([1.0, 2.5, 0.5], 0.01, 1e6, True),     # rose above 2x its initial loss at an evaluated step
    ([1.0, 1.9, 0.5], 0.01, 1e6, False),    # below the multiple
    ([2.3, 0.1, 0.01], 3.45, 3.45, True),   # back at the loss ceiling at the end
    ([3.45, 3.45, 1.0], 0.5, 3.45, False),  # started at the ceiling and left it: not a blow-up
    ([3.45, 3.45, 3.45], 3.45, 3.45, True),  # never left the ceiling
    ([2.3, float("nan"), 0.1], 0.1, 3.45, True),  # non-finite
])
def test_divergence_rule(curve, final, max_loss, diverged):
    rec = _record(0, max_loss, x={"H": _run(curve, final)})
    assert safety.run_diverged(rec, "x", "H", 2.0) is diverged
    assert rec.run_diverged("x", "H", 2.0) is diverged


class _BlowUp:
    """Adam(1e-2) for ``after`` steps, then every element pushed by 0.5 away from zero each step: finite."""

    def __init__(self, after):
        from optimizers.hand import Adam

        self.adam, self.after = Adam(lr=1e-2), after

    def init(self, params):
        return {"adam": self.adam.init(params), "t": torch.zeros(())}

    def update(self, grads, state, params, *, loss=None):
        new, inner = self.adam.update(grads, state["adam"], params)
        if float(state["t"]) >= self.after:
            new = {k: p + 0.5 * torch.where(p >= 0, 1.0, -1.0) for k, p in params.items()}
        return new, {"adam": inner, "t": state["t"] + 1}


def test_a_real_late_blow_up_is_seen_by_the_governor_not_by_the_evaluation():
    from meta.evaluate import evaluate
    from tasks import get_distribution

    res = evaluate({"candidate": _BlowUp(after=15)}, get_distribution("digits_mlp"), split="held_out", num_tasks=2,
                   horizon=10, long_horizon=40, adam_lrs=(1e-2,), sgdm_lrs=None, seed=0, progress=False, workers=1)
    assert all(not t["candidate"]["4H"].diverged for t in res.tasks)  # losses stayed finite
    gov = Governor(GovernorConfig(num_tasks=3), None, 10)
    held = gov._scores(res, ["candidate"])
    assert held.run("H", "candidate").diverged == 0  # fine before the blow-up
    assert held.run("4H", "candidate").diverged == 2 and held.run("4H", "candidate").nonfinite == 0


# ---- capability ceiling -----------------------------------------------------------------------------
def _evidence(cand, inc=None):
    def block(c, i):
        out = {"candidate": {"scores": c, "speedups": [1.0] * len(c), "diverged": 0},
               "tuned_adam": {"scores": [0.0] * len(c), "speedups": [1.0] * len(c), "diverged": 0}}
        if i is not None:
            out["incumbent"] = {"scores": i, "speedups": [1.0] * len(i), "diverged": 0}
        return out

    return {"candidate": "c", "incumbent": "i" if inc is not None else "tuned_adam",
            "bounds": {"finite": True, "num_theta": 10, "flops_per_element": 10, "state_floats_per_element": 4,
                       "max_update_ratio": 0.01, "probe_finite": True, "step_time_ratio": 2.0},
            "held_out": {"H": block(cand, inc), "10H": block(cand, inc)},
            "meta_train": {"task_indices": [0], "H": {"candidate": {"scores": [sum(cand) / len(cand)]}}}}


def test_the_capability_ceiling_holds_whatever_the_rate_limiter_says():
    cfg = replace(GovernorConfig(num_tasks=6, bootstrap=500), **{**LAX, "ceiling_vs_adam": 2.0,
                                                                 "ceiling_vs_incumbent": 1.5})
    gov = Governor(cfg, None, 10)
    base = [-0.1, -0.2, -0.15, -0.3, -0.1, -0.25]
    assert gov.decide(_evidence(base)).decision == "adopt"
    far = [x - 2.5 for x in base]  # ~2.7 log units better than tuned Adam; rate limit 100 would adopt
    v = gov.decide(_evidence(far))
    assert v.decision == "hold" and v.reasons[0].startswith("capability ceiling") and v.checks["ceiling"]["hold"]
    # over the incumbent: a small score vs tuned Adam, but 1.6 better than the incumbent
    v = gov.decide(_evidence([x - 0.1 for x in base], inc=[x + 1.6 for x in base]))
    assert v.decision == "hold" and "over the incumbent up to +1.700" in v.reasons[0]
    assert Governor(replace(cfg, ceiling_vs_incumbent=2.0), None, 10).decide(
        _evidence([x - 0.1 for x in base], inc=[x + 1.6 for x in base])).decision == "adopt"


def test_approving_a_ceiling_hold_needs_a_name(tmp_path):
    lin = Lineage(tmp_path / "run")
    lin.append({"kind": "generation", "generation": 0, "status": PENDING,
                "verdict": {"decision": "hold", "improvement": 3.0, "reasons": [],
                            "checks": {"ceiling": {"passed": True, "hold": True}}}})
    with pytest.raises(LineageError, match="capability ceiling"):
        lin.append_approval(0, "approve", by="")
    forged = Lineage(tmp_path / "forged")
    shutil.copytree(lin.root, forged.root)
    forged.append({"kind": "approval", "generation": 0, "decision": "approve", "by": ""})  # around the check
    with pytest.raises(LineageError, match="without a name"):
        forged.verify()
    lin.append_approval(0, "approve", by="alice")
    assert lin.state().incumbent == 0 and lin.verify()


# ---- runaway detection and the emergency stop ---------------------------------------------------------
def test_runaway_streak_on_planted_lineages(tmp_path):
    lin = _planted_lineage(tmp_path, [0.1, 0.2, 0.4])
    streak = safety.runaway_streak(lin.entries(), window=3, factor=1.5)
    assert streak["generations"] == [0, 1, 2] and streak["revert_to"] is None
    assert safety.runaway_streak(lin.entries(), window=3, factor=2.5) is None  # 2x is not > 2.5x
    for imps in ([0.1, 0.2, 0.25], [0.1, -0.2, 0.4], [0.4, 0.2, 0.1]):
        assert safety.runaway_streak(_planted_lineage(tmp_path / str(imps), imps).entries(), 3, 1.5) is None
    # the streak is over adoptions: a rejection between them does not break it; the revert target is the
    # incumbent before the streak's first adoption
    lin = _planted_lineage(tmp_path / "r", [0.5, 0.1, 0.9, 0.2, 0.4], statuses={2: REJECTED})
    streak = safety.runaway_streak(lin.entries(), 3, 1.5)
    assert streak["generations"] == [1, 3, 4] and streak["revert_to"] == 0
    # a freeze and a person's unfreeze start a new window
    lin.append_freeze("governor", "runaway", revert_to=0)
    lin.append_unfreeze("alice", "looked at it")
    assert safety.runaway_streak(lin.entries(), 3, 1.5) is None
    assert lin.state().incumbent == 0 and lin.verify()


def test_the_runaway_streak_freezes_reverts_alerts_and_exits_5(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, gens=2, runaway_window=2)
    path = _write_config(cfg, tmp_path / "cfg.json")
    _plant(monkeypatch, [0.1, 0.3, 0.05])  # 0.3 > 1.5 x 0.1: accelerating over 2 adoptions
    assert main(["generations", "--config", path, "--quiet"]) == safety.FROZEN_STATUS
    lin = Lineage(cfg.out_dir)
    entries = lin.verify()
    st = lin.state(entries)
    assert st.status == {0: ADOPTED, 1: ADOPTED} and st.frozen
    freeze = entries[-1]
    assert freeze["kind"] == "freeze" and freeze["by"] == "governor" and freeze["from"] == 1
    assert freeze["revert_to"] is None and st.incumbent is None  # back to tuned Adam, before the streak
    assert freeze["evidence"]["improvements"] == [0.1, 0.3]
    alerts = safety.read_alerts(cfg.out_dir)
    assert [a["title"] for a in alerts] == ["EMERGENCY STOP"]
    report = (Path(cfg.out_dir) / "report.md").read_text()
    assert "**ALERT**" in report and "EMERGENCY STOP" in report and "**FROZEN**" in report
    assert "ALERT: EMERGENCY STOP" in capsys.readouterr().out  # the log
    # frozen: a relaunch does nothing and exits 5 again
    assert main(["generations", "--config", path, "--max-generations", "3", "--quiet"]) == safety.FROZEN_STATUS
    assert len(Lineage(cfg.out_dir).entries()) == len(entries)
    # a person unfreezes (name and reason required); the run goes on from the reverted incumbent
    with pytest.raises(SystemExit):
        main(["unfreeze", cfg.out_dir, "--by", "alice"])
    assert main(["unfreeze", cfg.out_dir, "--by", "alice", "--reason", "checked the evaluation"]) == 0
    assert main(["generations", "--config", path, "--max-generations", "3", "--quiet"]) == 0
    st = Lineage(cfg.out_dir).state()
    assert st.records[2]["trained_by"] == "adam" and st.status[2] == ADOPTED and st.incumbent == 2
    assert not st.frozen


def test_a_frozen_run_adopts_nothing_until_unfrozen(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, gens=1)
    _plant(monkeypatch, [0.1, 0.1, 0.1])
    _runner(cfg).run()
    assert main(["freeze", cfg.out_dir, "--by", "alice", "--reason", "suspicious curves"]) == 0
    assert safety.read_alerts(cfg.out_dir)[-1]["title"] == "FROZEN BY HAND"
    assert "**FROZEN**" in (Path(cfg.out_dir) / "report.md").read_text()
    n = len(Lineage(cfg.out_dir).entries())
    path = _write_config(replace(cfg, gen=replace(cfg.gen, max_generations=2)), tmp_path / "cfg.json")
    assert main(["generations", "--config", path, "--quiet"]) == safety.FROZEN_STATUS
    assert len(Lineage(cfg.out_dir).entries()) == n and not (Path(cfg.out_dir) / "gen-0001").exists()
    # a generation in flight when the freeze came is recorded, but as pending, not adopted
    runner = _runner(replace(cfg, gen=replace(cfg.gen, max_generations=2)))
    runner.run_generation(1)
    st = Lineage(cfg.out_dir).state()
    assert st.status[1] == PENDING and st.records[1]["frozen_at_record"] == n - 1 and st.incumbent == 0
    capsys.readouterr()
    assert main(["approve", cfg.out_dir, "1", "--by", "alice"]) == 2
    assert "frozen" in capsys.readouterr().err
    assert main(["freeze", cfg.out_dir, "--by", "bob", "--reason", "again"]) == 2  # already frozen
    assert main(["unfreeze", cfg.out_dir, "--by", "alice", "--reason", "false alarm"]) == 0
    assert main(["approve", cfg.out_dir, "1", "--by", "alice"]) == 0
    assert Lineage(cfg.out_dir).state().incumbent == 1


def test_the_lineage_refuses_adoptions_while_frozen_and_unsigned_unfreezes(tmp_path):
    lin = _planted_lineage(tmp_path, [0.1])
    lin.append_freeze("alice", "look first")
    forgeries = [({"kind": "generation", "generation": 1, "status": ADOPTED}, "adopted while the run was frozen"),
                 ({"kind": "approval", "generation": 0, "decision": "approve", "by": "x"}, "approved while"),
                 ({"kind": "unfreeze", "by": "", "reason": "x"}, "needs a person"),
                 ({"kind": "freeze", "by": "bob", "reason": "x"}, "already frozen")]
    for i, (forged, match) in enumerate(forgeries):
        copy = Lineage(tmp_path / f"copy{i}")
        shutil.copytree(lin.root, copy.root)
        copy.append(forged)  # written around the checks: verify still refuses it
        with pytest.raises(LineageError, match=match):
            copy.verify()
    with pytest.raises(LineageError, match="needs"):
        lin.append_unfreeze("", "no name")
    lin.append_unfreeze("alice", "done")
    with pytest.raises(LineageError, match="revert to an adopted"):
        lin.append_freeze("bob", "why", revert_to=7)
    assert lin.verify() and not lin.state().frozen


# ---- sustained gains ----------------------------------------------------------------------------
def test_sustain_decision_and_fresh_task_indices():
    gov = GovernorConfig(bootstrap=1000)
    strong = safety.decide_sustain([0.5, 0.6, 0.4, 0.55], [], 0, gov)
    assert strong["passed"] and strong["pooled"] == 4
    vanished = safety.decide_sustain([0.1, -0.2, 0.05, -0.1], [], 0, gov)
    assert not vanished["passed"]
    assert not safety.decide_sustain([0.5, 0.6, 0.4, 0.55], [], 1, gov)["passed"]  # diverged on a fresh task
    # evidence pools across re-checks: a gain that fades drags the pooled interval down
    assert not safety.decide_sustain([-0.4, -0.5, -0.3, -0.2], [0.5, 0.6, 0.4, 0.55], 0, gov)["passed"]
    entries = [{"kind": "sustain", "task_indices": [3, 4, 5]}, {"kind": "sustain", "task_indices": [6, 7, 8]}]
    assert safety.sustain_indices([], 1, 3) == [3, 4, 5]
    assert safety.sustain_indices(entries, 3, 3) == [9, 10, 11]
    assert safety.sustain_indices(entries, 2, 5) == [10, 11, 12, 13, 14]  # past every used index


def test_a_vanished_gain_rolls_back(tmp_path, monkeypatch):
    """Generation 0 is adopted on planted evidence; on fresh test tasks it is not better than tuned Adam,
    so before generation 1 it is rolled back, with the evidence, and generation 1 is trained by Adam."""
    cfg = _cfg(tmp_path, gens=2, min_improvement=0.0, sustain_tasks=3)
    _plant(monkeypatch, [0.5, 0.1])
    _runner(cfg).run()
    lin = Lineage(cfg.out_dir)
    entries = lin.verify()
    (check,) = [e for e in entries if e["kind"] == "sustain"]
    assert check["generation"] == 1 and check["incumbent"] == 0 and check["parent"] is None
    assert check["task_indices"] == [3, 4, 5] and check["split"] == "test" and len(check["diffs"]) == 3
    assert not check["passed"] and check["action"] == "rollback" and check["to"] is None
    assert check["ci"][0] <= 0.0
    st = lin.state(entries)
    assert st.records[1]["trained_by"] == "adam"  # the rollback happened before generation 1 was made
    assert "rolled back" in (Path(cfg.out_dir) / "report.md").read_text()
    # a re-check that passed may not roll back, even when written around the check
    forged = Lineage(tmp_path / "forged")
    shutil.copytree(lin.root, forged.root)
    forged.append({"kind": "sustain", "generation": 2, "incumbent": st.incumbent, "passed": True,
                   "action": "rollback", "to": None, "task_indices": [6]})
    with pytest.raises(LineageError, match="passed rolled back"):
        forged.verify()


# ---- diminishing returns ------------------------------------------------------------------------
def test_the_run_stops_after_patience_generations_without_an_adoption(tmp_path):
    cfg = _cfg(tmp_path, gens=5, patience=2, min_improvement=100.0)  # rejects everything
    result = _runner(cfg).run()
    st = Lineage(cfg.out_dir).state()
    assert st.status == {0: REJECTED, 1: REJECTED} and result["patience_stop"] and not result["frozen"]
    assert "stopped for diminishing returns" in (Path(cfg.out_dir) / "report.md").read_text()


# ---- goal preservation --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_gen(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("goal"))
    _runner(cfg).run()
    return cfg


def test_generation_zero_records_the_goal(one_gen):
    st = Lineage(one_gen.out_dir).state()
    goal = st.records[0]["goal"]
    assert goal["meta_loss"] == one_gen.meta.meta_loss and goal["governor"]["rate_limit"] == 100.0
    assert goal["distribution_digest"] == st.records[0]["distribution_digest"]
    assert st.goal_hash == goal_digest(goal) == st.records[0]["goal_hash"]


@pytest.mark.parametrize("section, key, value", [("gov", "min_improvement", -1000.0), ("meta", "meta_loss", "train")])
def test_a_changed_objective_is_refused_until_a_person_records_it(one_gen, tmp_path, capsys, section, key, value):
    run = tmp_path / "run"
    shutil.copytree(one_gen.out_dir, run)
    cfg = replace(one_gen, out_dir=str(run), gen=replace(one_gen.gen, max_generations=2))
    # config.json edited to match (check_config alone would accept it): the lineage's goal refuses it
    edited = replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})
    (run / "config.json").write_text(json.dumps(edited.to_dict()))
    path = _write_config(edited, tmp_path / "cfg.json")
    assert main(["generations", "--config", path, "--quiet"]) == 2
    assert f"{section}.{key}" in capsys.readouterr().err
    assert len(Lineage(run).entries()) == 1 and not (run / "gen-0001").exists()
    with pytest.raises(safety.GoalError, match="change-goal"):
        _runner(edited).run()
    # a person records the change: the run goes on under the new goal
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["change-goal", str(run), "--set", f"{section}.{key}={json.dumps(value)}", "--by", "alice",
                 "--reason", "agreed in review"]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored[section][key] == value
    assert main(["generations", "--config", str(run / "config.json"), "--quiet"]) == 0
    lin = Lineage(run)
    entries = lin.verify()
    assert [e["kind"] for e in entries] == ["generation", "goal", "generation"]
    assert entries[1]["by"] == "alice" and entries[2]["goal_hash"] == entries[1]["goal_hash"]


def test_change_goal_needs_a_goal_key_a_name_and_a_reason(one_gen, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_gen.out_dir, run)
    assert main(["change-goal", str(run), "--set", "meta.outer_lr=0.1", "--by", "a", "--reason", "r"]) == 2
    assert "not a goal setting" in capsys.readouterr().err
    assert main(["change-goal", str(run), "--set", "gov.rate_limit=2", "--by", " ", "--reason", "r"]) == 2
    # a generation reviewed under another goal, appended around the checks: verify refuses the lineage
    lin = Lineage(run)
    lin.append({"kind": "generation", "generation": 1, "status": REJECTED, "goal_hash": "0" * 64})
    with pytest.raises(LineageError, match="different goal"):
        lin.verify()


# ---- alerts reach W&B; wandb stays a lazy import ----------------------------------------------------
def test_an_alert_reaches_wandb_when_it_is_on(tmp_path, monkeypatch):
    calls = []

    class Run:
        id, summary = "fake", {}

        def alert(self, **kw):
            calls.append(kw)

        def finish(self):
            calls.append("finish")

    fake = types.SimpleNamespace(init=lambda **kw: Run(), AlertLevel=types.SimpleNamespace(ERROR="ERROR"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    safety.alert(tmp_path, "EMERGENCY STOP", "runaway", wandb="offline", log=lambda s: None)
    assert calls == [{"title": "EMERGENCY STOP", "text": "runaway", "level": "ERROR"}, "finish"]
    calls.clear()
    safety.alert(tmp_path, "EMERGENCY STOP", "runaway", wandb="disabled", log=lambda s: None)
    assert calls == [] and len(safety.read_alerts(tmp_path)) == 2


def test_the_safety_layer_does_not_import_wandb():
    code = "import sys, meta.safety, meta.generations, meta.governor, train; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
