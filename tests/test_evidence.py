"""Typed governor evidence (meta.evidence): exact JSON round-trips of the evidence Governor.gather
produces, and verdicts equal to those of the governor's rule read by string paths from the same dicts."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from meta import stats
from meta.config import GovernorConfig
from meta.evaluate import TUNED_ADAM
from meta.evidence import Evidence, RunScores, SplitEvidence
from meta.generations import summary_metrics
from meta.governor import Governor, Verdict, _check, _f
from test_governor import FAST, HORIZON, _governor, _lo_with_lr, _planted
from test_safety import _evidence as _ceiling_evidence
from tasks import get_distribution

KEY_ORDER = ["candidate", "incumbent", "horizon", "long_horizon", "bounds", "held_out", "held_out_results",
             "meta_train", "loop"]


class DictGovernor(Governor):
    """The governor's decision as it read the evidence before it was typed: nested dicts by string keys.
    The reference the typed decision must reproduce, float for float."""

    def decide_bounds(self, b: dict[str, Any]) -> dict:
        c = self.cfg
        problems = []
        if not b.get("finite", False):
            problems.append("non-finite learned-optimizer weights")
        if b.get("num_theta", math.inf) > c.max_theta:
            problems.append(f"{b['num_theta']} weights > bound {c.max_theta}")
        if b.get("flops_per_element", math.inf) > c.max_flops_per_element:
            problems.append(f"{b['flops_per_element']} FLOPs/element > bound {c.max_flops_per_element}")
        if b.get("state_floats_per_element", math.inf) > c.max_state_floats:
            problems.append(f"{b['state_floats_per_element']} state floats/element > bound {c.max_state_floats}")
        if "max_update_ratio" in b or b.get("finite", False):
            if not b.get("probe_finite", False):
                problems.append("non-finite update on a probe task")
            elif not b.get("max_update_ratio", math.inf) <= c.max_update_ratio:
                problems.append(f"update/parameter norm ratio {b['max_update_ratio']:.3g} > bound "
                                f"{c.max_update_ratio}")
            if not b.get("step_time_ratio", math.inf) <= c.max_step_time_ratio:
                problems.append(f"step time {b.get('step_time_ratio', math.inf):.3g}x Adam's > bound "
                                f"{c.max_step_time_ratio}x")
        return _check(not problems, {k: v for k, v in b.items()}, {
            "max_theta": c.max_theta, "max_flops_per_element": c.max_flops_per_element,
            "max_state_floats": c.max_state_floats, "max_update_ratio": c.max_update_ratio,
            "max_step_time_ratio": c.max_step_time_ratio}, "; ".join(problems) or "within bounds")

    def _improvement(self, ev_label: dict, other: str) -> tuple[list[float], dict]:
        cand, inc = ev_label["candidate"]["scores"], ev_label[other]["scores"]
        diffs = [b - a for a, b in zip(cand, inc)]
        ci = stats.bootstrap_ci(diffs, self.cfg.level, n_boot=self.cfg.bootstrap, seed=self.cfg.seed)
        return diffs, ci

    def decide(self, ev: dict[str, Any]) -> Verdict:
        c = self.cfg
        checks: dict[str, dict] = {"bounds": self.decide_bounds(ev.get("bounds", {}))}
        improvement = None
        if checks["bounds"]["passed"]:
            other = "incumbent" if ev.get("incumbent") != TUNED_ADAM else TUNED_ADAM
            held = ev["held_out"]
            H = held["H"]
            _, ci = self._improvement(H, other)
            improvement = ci["mean"]
            sp_c = sum(H["candidate"]["speedups"]) / len(H["candidate"]["speedups"])
            sp_i = sum(H[other]["speedups"]) / len(H[other]["speedups"])
            ok = ci["lo"] is not None and ci["lo"] > c.min_improvement and H["candidate"]["diverged"] == 0 \
                and sp_c >= sp_i
            checks["generalisation"] = _check(
                ok, {"mean_improvement": ci["mean"], "ci": [ci["lo"], ci["hi"]], "speedup": sp_c,
                     "incumbent_speedup": sp_i, "diverged": H["candidate"]["diverged"]},
                {"ci_lo_above": c.min_improvement, "level": c.level},
                f"improvement over {ev.get('incumbent')} {ci['mean']:+.3f} "
                f"[{_f(ci['lo'])}, {_f(ci['hi'])}] (log loss vs tuned Adam), speed-up {sp_c:.2f} vs {sp_i:.2f}"
                + (f", {H['candidate']['diverged']} diverged" if H["candidate"]["diverged"] else ""))
            if "meta_train" in ev:
                tr = ev["meta_train"]["H"]["candidate"]["scores"]
                gap = sum(H["candidate"]["scores"]) / len(H["candidate"]["scores"]) - sum(tr) / len(tr)
                checks["overfit"] = _check(gap <= c.max_overfit_gap, gap, c.max_overfit_gap,
                                           f"held-out minus meta-train score {gap:+.3f} (bound {c.max_overfit_gap})")
            else:
                checks["overfit"] = _check(False, None, c.max_overfit_gap, "no meta-training tasks to compare with")
            long_label = next(k for k in held if k != "H") if len(held) > 1 else "H"
            L = held[long_label]
            _, lci = self._improvement(L, other)
            ok = L["candidate"]["diverged"] == 0 and lci["mean"] >= -c.long_tolerance
            checks["horizon"] = _check(
                ok, {"mean_improvement": lci["mean"], "ci": [lci["lo"], lci["hi"]],
                     "diverged": L["candidate"]["diverged"], "label": long_label},
                -c.long_tolerance,
                f"at {long_label}: improvement {lci['mean']:+.3f} [{_f(lci['lo'])}, {_f(lci['hi'])}], "
                f"{L['candidate']['diverged']} diverged")
            checks["divergence"] = self._decide_divergence(ev)
            if "loop" in ev:
                lp = ev["loop"]
                d = [a - b for a, b in zip(lp["by_candidate"], lp["by_incumbent"])]
                gap = sum(d) / len(d)
                checks["loop"] = _check(lp["finite"] and gap <= c.loop_tolerance, gap, c.loop_tolerance,
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

    def _decide_divergence(self, ev: dict[str, Any]) -> dict:
        """Any diverged candidate run at any horizon, on the decision split or its meta-training tasks,
        rejects, whatever the mean score says."""
        found = {}
        for split in ("held_out", "meta_train"):
            for label, per in (ev.get(split) or {}).items():
                if isinstance(per, dict) and "candidate" in per and per["candidate"].get("diverged"):
                    found[f"{split}/{label}"] = per["candidate"]["diverged"]
        what = ", ".join(f"{n} at {k}" for k, n in found.items())
        return _check(not found, found, 0,
                      f"diverged runs ({what}): a loss non-finite, above {self.cfg.diverge_factor:g}x its initial "
                      f"loss or at the task's loss ceiling" if found else "no diverged run at any horizon")

    def _decide_ceiling(self, ev: dict[str, Any], other: str) -> dict:
        """Capability ceiling: mean improvement over tuned Adam and over the incumbent, at every horizon."""
        c = self.cfg
        over_adam, over_inc = {}, {}
        for label, per in ev["held_out"].items():
            s = per["candidate"]["scores"]
            over_adam[label] = -sum(s) / len(s)
            if other != TUNED_ADAM:
                d = [b - a for a, b in zip(s, per[other]["scores"])]
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


def _summary_by_hand(ev: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, per in ev.get("held_out", {}).items():
        for name, d in per.items():
            if name == TUNED_ADAM:
                continue
            out[f"{name}/{label}/score"] = sum(d["scores"]) / len(d["scores"])
            out[f"{name}/{label}/speedup"] = sum(d["speedups"]) / len(d["speedups"])
    if "meta_train" in ev:
        s = ev["meta_train"]["H"]["candidate"]["scores"]
        out["candidate/meta_train/H/score"] = sum(s) / len(s)
    return out


def _verdicts_agree(cfg: GovernorConfig, ev: dict) -> dict:
    typed = Governor(cfg, None, HORIZON).decide(Evidence.from_json(ev)).to_dict()
    as_dict = Governor(cfg, None, HORIZON).decide(ev).to_dict()
    by_hand = DictGovernor(cfg, None, HORIZON).decide(ev).to_dict()
    for v in (typed, as_dict, by_hand):
        v.pop("seconds")
    assert json.dumps(typed) == json.dumps(as_dict) == json.dumps(by_hand)
    return typed


@pytest.fixture(scope="module")
def gathered() -> Evidence:
    """Real evidence on tiny settings: an incumbent, a control riding along, meta-train tasks, the loop."""
    dist = get_distribution("digits_mlp")
    gov = _governor(dist, replace(FAST, num_tasks=3, loop_steps=1, loop_tasks=2))
    good, inc = _lo_with_lr(1e-2), _lo_with_lr(1e-4)
    return gov.gather(good, inc, extra={"control": _lo_with_lr(1e-3).bind()})


def test_gathered_evidence_round_trips_exactly(gathered):
    js = gathered.to_json()
    assert list(js) == KEY_ORDER  # the order the governor has always written
    assert list(js["bounds"]) == ["finite", "num_theta", "flops_per_element", "state_floats_per_element",
                                  "max_update_ratio", "probe_finite", "step_time_ratio", "seconds_per_step"]
    assert list(js["meta_train"])[0] == "task_indices"
    assert list(js["held_out"]["H"]) == ["candidate", "incumbent", "control", TUNED_ADAM]
    text = json.dumps(js)
    back = Evidence.from_json(json.loads(text))
    assert json.dumps(back.to_json()) == text  # byte-identical, key order included
    # review.json's layout: written sorted and without the full results, read back as is
    body = {k: v for k, v in js.items() if k != "held_out_results"}
    sorted_text = json.dumps(body, sort_keys=True)
    assert json.dumps(Evidence.from_json(json.loads(sorted_text)).to_json(), sort_keys=True) == sorted_text


def test_gathered_scores_equal_the_results_read_by_string_paths(gathered):
    res = gathered.held_out_results.to_json()
    for label, per in gathered.held_out.horizons.items():
        for name, run in per.items():
            if name != TUNED_ADAM:
                assert run.scores == gathered.held_out_results.task_scores(name, label)
            assert run.speedups == [float(t["results"][name][label]["speedup"]) for t in res["tasks"]]
            assert run.nonfinite == sum(bool(t["results"][name][label]["diverged"]) for t in res["tasks"])


def test_summary_metrics_equal_the_dict_read_by_hand(gathered):
    js = {k: v for k, v in gathered.to_json().items() if k != "held_out_results"}
    assert gathered.summary_metrics() == summary_metrics(js) == _summary_by_hand(js)
    assert json.dumps(gathered.summary_metrics()) == json.dumps(_summary_by_hand(js))  # same order
    assert "candidate/meta_train/H/score" in gathered.summary_metrics()


@pytest.mark.parametrize("cfg", [FAST, replace(FAST, rate_limit=10.0, ceiling_vs_incumbent=10.0),
                                 replace(FAST, min_improvement=-10.0, rate_limit=1e-6, max_step_time_ratio=1e9),
                                 replace(FAST, max_theta=10)])
def test_decide_on_gathered_evidence_equals_the_rule_by_string_paths(gathered, cfg):
    js = {k: v for k, v in gathered.to_json().items() if k != "held_out_results"}
    typed = Governor(cfg, None, HORIZON).decide(gathered).to_dict()
    typed.pop("seconds")
    assert typed == _verdicts_agree(cfg, js)


def test_decide_on_planted_evidence_equals_the_rule_by_string_paths():
    inc = [0.3, 0.5, 0.2, 0.4, 0.6, 0.3]
    cand = [x - 0.1 for x in inc]
    base = [-0.1, -0.2, -0.15, -0.3, -0.1, -0.25]
    planted = [
        _planted(cand, inc, cand_train=[0.2]),  # adopted
        _planted(cand, inc, cand_train=[-3.0]),  # overfit
        _planted(cand, inc, cand_train=[0.2], long_cand=[x + 1.0 for x in inc], long_inc=inc),  # horizon
        _ceiling_evidence(base), _ceiling_evidence([x - 2.5 for x in base]),
        _ceiling_evidence([x - 0.1 for x in base], inc=[x + 1.6 for x in base]),
    ]
    no_meta_train = {k: v for k, v in planted[0].items() if k != "meta_train"}
    no_probe = {**planted[0], "bounds": {"finite": True, "num_theta": 10, "flops_per_element": 10,
                                         "state_floats_per_element": 4}}
    nan_weights = {"candidate": "c", "incumbent": TUNED_ADAM, "bounds": {"finite": False, "num_theta": 10,
                                                                          "flops_per_element": 10,
                                                                          "state_floats_per_element": 4}}
    decisions = set()
    for ev in [*planted, no_meta_train, no_probe, nan_weights]:
        for cfg in (FAST, replace(FAST, ceiling_vs_adam=2.0, ceiling_vs_incumbent=1.5, rate_limit=100.0)):
            decisions.add(_verdicts_agree(cfg, ev)["decision"])
    for gov in (Governor(FAST, None, HORIZON), DictGovernor(FAST, None, HORIZON)):  # no evidence: both raise
        with pytest.raises(KeyError, match="num_theta"):
            gov.decide({})
    assert decisions == {"adopt", "reject", "hold"}  # the comparison saw every outcome


def test_missing_sections_read_as_none_and_are_not_written_back():
    ev = Evidence.from_json({"meta_train": {"task_indices": [0], "H": {"candidate": {"scores": [0.5]}}}})
    assert ev.held_out is None and ev.bounds is None and ev.loop is None
    assert ev.meta_train == SplitEvidence({"H": {"candidate": RunScores(scores=[0.5])}}, task_indices=[0])
    assert ev.to_json() == {"meta_train": {"task_indices": [0], "H": {"candidate": {"scores": [0.5]}}}}
    assert Evidence.from_json({}).to_json() == {}


def test_unknown_keys_are_rejected():
    with pytest.raises(TypeError):
        Evidence.from_json({"bogus": 1})
    with pytest.raises(TypeError):
        Evidence.from_json({"bounds": {"finite": True, "bogus": 1}})
    with pytest.raises(TypeError):
        Evidence.from_json({"held_out": {"H": {"candidate": {"scores": [0.0], "bogus": 1}}}})


def test_a_review_that_raises_has_empty_evidence():
    verdict, ev = Governor(FAST, None, HORIZON).review(_lo_with_lr(1e-2), None)  # no distribution: raises
    assert verdict.decision == "reject" and ev.to_json() == {}
    assert math.isfinite(verdict.seconds)
