"""Generalisation suite: groups derived from the meta-training distribution, a tiny run with a learned
optimizer (finite log-loss ratios, a report), and ``train.py evaluate --suite generalisation``."""

from __future__ import annotations

import json
import math

import pytest

from meta.generalisation import (GROUP_NAMES, LOSS_FLOOR, parse_factors, run_suite, suite_groups,
                                 write_suite_report)
from optimizers.learned import LearnedOptimizer, LOConfig
from tasks import TaskConfigError, TaskDistribution, get_distribution, seeded


def _by_name(groups):
    return {g.name: g for g in groups}


# ---- groups ---------------------------------------------------------------------------------------
def test_groups_of_the_default_distribution():
    dist = get_distribution("digits_mlp")  # image MLPs on digits, ImageMLPFamily defaults: widths 16-64, depth 1-2
    groups = suite_groups(dist)
    assert [g.name for g in groups] == list(GROUP_NAMES)
    g = _by_name(groups)
    assert g["wide"].derived == {"widest": 64, "deepest": 2, "shallowest": 1, "wide_width": 512, "wide_depth": 1,
                                 "deep_depth": 4, "datasets": ["digits"]}
    for i in range(3):
        wide = g["wide"].dist.config("held_out", i)
        assert wide["family"] == "image_mlp" and wide["dataset"] == "digits"
        assert wide["hidden"] == [8 * 64]  # 8x the widest, depth inside the trained range 1-2
        deep = g["deep"].dist.config("held_out", i)
        assert len(deep["hidden"]) == 2 * 2 and all(16 <= h <= 64 for h in deep["hidden"])
    assert g["image_conv"].dist.config("held_out", 0)["dataset"] == "digits"
    assert g["linear_regression"].dist.config("held_out", 0)["kind"] == "linear"
    assert g["logistic_regression"].dist.config("held_out", 0)["kind"] == "logistic"
    assert not any(x.in_distribution for x in groups)  # digits_mlp holds image_mlp only
    json.dumps([x.to_dict() for x in groups])


def test_groups_follow_the_distribution():
    dist = TaskDistribution("custom", [
        ("image_mlp", {"dataset": "digits", "max_width": 32, "max_depth": 3}, 1.0),
        ("image_mlp", {"dataset": "digits", "min_width": 8, "max_width": 100, "min_depth": 2}, 1.0),
        ("quadratic", {"max_dim": 20}, 1.0),
        ("regression", {"kinds": ["logistic"], "datasets": ["digits"]}, 0.5),
    ], seed=3)
    g = _by_name(suite_groups(dist))
    assert g["wide"].derived["widest"] == 100 and g["wide"].derived["deepest"] == 3
    wide = [kw for _, kw, _ in g["wide"].dist.families]
    assert len(wide) == 2 and all(kw["min_width"] == kw["max_width"] == 800 for kw in wide)
    assert all(kw["min_depth"] == kw["max_depth"] == 1 for kw in wide)  # smallest trained depth
    deep = [kw for _, kw, _ in g["deep"].dist.families]
    assert all(kw["min_depth"] == kw["max_depth"] == 6 for kw in deep)
    assert [kw.get("max_width", 64) for kw in deep] == [32, 100]  # each entry keeps its width range
    # families the distribution contains are still run, with its settings, and marked in-distribution
    assert g["quadratic"].in_distribution and g["quadratic"].dist.families == [("quadratic", {"max_dim": 20}, 1.0)]
    assert g["logistic_regression"].in_distribution
    assert g["logistic_regression"].dist.config("held_out", 0)["dataset"] == "digits"
    for name in ("image_conv", "linear_regression", "tiny_transformer", "wide", "deep"):
        assert not g[name].in_distribution, name
    assert g["wide"].dist.seed == 3
    # no image_mlp in the distribution: the family defaults, and a note
    q = _by_name(suite_groups(get_distribution("quadratics"), names=["wide", "deep", "quadratic"]))
    assert list(q) == ["wide", "deep", "quadratic"]
    assert q["wide"].dist.config("test", 0)["hidden"] == [512] and q["wide"].notes
    assert q["quadratic"].in_distribution
    with pytest.raises(TaskConfigError):
        suite_groups(dist, names=["wide", "nope"])


def test_parse_factors():
    assert parse_factors("10") == (10,) and parse_factors("10, 30") == (10, 30) and parse_factors("") == ()
    for bad in ("1", "30,10", "10,10", "x", "2.5"):
        with pytest.raises(ValueError):
            parse_factors(bad)


# ---- a tiny run ------------------------------------------------------------------------------------
def test_tiny_run_and_report(tmp_path):
    cfg = LOConfig(hidden_width=8, hidden_layers=1)  # default time features: needs T (evaluate supplies it)
    lopt = LearnedOptimizer(cfg)
    opt = lopt.bind(lopt.init_theta(seeded("theta", 0)))
    assert getattr(opt, "horizon_aware", False)
    res = run_suite({"learned": opt}, get_distribution("digits_mlp"), 5, tasks_per_group=1, factors=(2, 3),
                    groups=["deep", "quadratic"], adam_lrs=(1e-3, 1e-2), progress=False, workers=1)
    json.dumps(res, allow_nan=False)
    meta = res["meta"]
    assert meta["horizons"] == {"H": 5, "2H": 10, "3H": 15} and meta["floor"] == LOSS_FLOOR
    assert [c["labels"] for c in meta["calls"]] == [{"H": "H", "2H": "2H"}, {"H": "3H"}]
    assert [g["name"] for g in res["groups"]] == ["deep", "quadratic"]
    for group in ("deep", "quadratic"):
        (rec,) = res["tasks"][group]
        for label in meta["horizons"]:
            r, a = rec["results"]["learned"][label], rec["results"]["tuned_adam"][label]
            assert a["lr"] in (1e-3, 1e-2)
            for key in ("train", "valid"):
                f = r["floor"]
                assert f > 0  # relative floor x the task's initial loss
                want = math.log((r[f"{key}_loss"] + f) / (a[f"{key}_loss"] + f))
                assert math.isfinite(r[f"{key}_ratio"]) and r[f"{key}_ratio"] == pytest.approx(want)
            s = res["summary"][group][label]["learned"]
            assert s["n"] == 1 and s["train_ratio"]["mean"] == pytest.approx(r["train_ratio"])
            assert s["wins_train"] == int(r["train_ratio"] < 0) and s["diverged"] == 0
    # pooled out-of-distribution summary: both tasks, with an interval
    pooled = res["overall"]["3H"]["learned"]
    assert pooled["n"] == 2 and pooled["train_ratio"]["lo"] is not None
    paths = write_suite_report(res, tmp_path / "suite")
    assert json.loads(paths["json"].read_text())["meta"]["horizons"]["3H"] == 15
    md = paths["md"].read_text()
    assert "| deep | 3H=15 | learned |" in md and "all out-of-distribution" in md
    assert paths["png"].stat().st_size > 1000


# ---- command line ----------------------------------------------------------------------------------
def test_cli_suite_on_the_smoke_checkpoint(tmp_path, capsys):
    from train import main

    out = tmp_path / "smoke"
    assert main(["meta-train", "--preset", "smoke", "--out-dir", str(out), "--quiet"]) == 0
    args = ["evaluate", "--preset", "smoke", "--out-dir", str(out), "--quiet", "--suite", "generalisation",
            "--suite-tasks", "1", "--suite-groups", "wide,linear_regression", "--suite-factors", "2",
            "--eval.horizon", "4", "--eval.adam_lrs", "1e-3,1e-2"]
    assert main(args) == 0
    res = json.loads((out / "eval" / "generalisation" / "results.json").read_text())
    assert res["meta"]["horizons"] == {"H": 4, "2H": 8} and res["meta"]["meta_distribution"] == "digits_mlp"
    assert [g["name"] for g in res["groups"]] == ["wide", "linear_regression"]
    assert res["tasks"]["wide"][0]["config"]["hidden"] == [512]
    assert (out / "eval" / "generalisation" / "ratios.png").is_file()
    assert not (out / "eval" / "results.json").exists()  # the default suite's report is left alone
    assert "generalisation suite:" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    from train import main

    for bad in (["--suite", "nope"], ["--suite", "generalisation", "--suite-factors", "30,10"],
                ["--suite", "generalisation", "--suite-tasks", "0"],
                ["--suite", "generalisation", "--suite-groups", "wide,bogus"]):
        with pytest.raises(SystemExit) as e:
            main(["evaluate", *bad])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err
    # suite options without the suite, and a missing checkpoint: an error line before any work, exit 2
    assert main(["evaluate", "--preset", "smoke", "--out-dir", str(tmp_path), "--suite-tasks", "2"]) == 2
    assert "need --suite generalisation" in capsys.readouterr().err
    assert main(["evaluate", "--preset", "smoke", "--out-dir", str(tmp_path), "--suite", "generalisation"]) == 2
    assert "error: no checkpoint" in capsys.readouterr().err
