"""Held-out evaluation against per-task tuned Adam, and the statistics it reports.

One small evaluation (3 tasks, horizons 10 / 40) is shared by most tests: it includes plain Adam at
every grid learning rate (so the vmapped grid can be checked against separate runs, and "Adam at the
grid's best learning rate" against tuned Adam), an SGD with lr=0 that never moves, and an optimizer
that produces NaN parameters.
"""

from __future__ import annotations

import json
import math

import pytest
import torch


from meta import stats  # noqa: E402
from meta.evaluate import (DEFAULT_ADAM_LRS, DEFAULT_SGDM_LRS, TUNED_ADAM, TUNED_SGDM, EvalResults,  # noqa: E402
                           curve_steps, evaluate, lr_grid, write_report)
from optimizers import SGD, Adam  # noqa: E402
from tasks import get_distribution  # noqa: E402
from planted_optimizers import NaNAfter  # noqa: E402

H, LONG = 10, 40
GRID = (1e-3, 1e-2, 1e-1)
NAN_AFTER = 5


def single_name(lr: float) -> str:
    return f"adam_lr{lr:g}"


@pytest.fixture(scope="module")
def results():
    opts = {single_name(lr): Adam(lr=lr) for lr in GRID}
    opts["sgd_lr0"] = SGD(lr=0.0)
    opts["nan_opt"] = NaNAfter(NAN_AFTER)
    return evaluate(opts, get_distribution("digits_mlp"), num_tasks=3, horizon=H, long_horizon=LONG,
                    adam_lrs=GRID, sgdm_lrs=(1e-2, 1e-1), seed=0, progress=False, workers=1)


# ---- structure --------------------------------------------------------------------------------
def test_default_grids():
    assert len(DEFAULT_ADAM_LRS) == 7 and len(DEFAULT_SGDM_LRS) == 7
    assert DEFAULT_ADAM_LRS[0] == pytest.approx(1e-4) and DEFAULT_ADAM_LRS[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(DEFAULT_ADAM_LRS, DEFAULT_ADAM_LRS[1:])]
    assert ratios == pytest.approx([math.sqrt(10)] * 6)
    assert lr_grid(1e-7, 1.0) == pytest.approx([10 ** (-7 + i / 2) for i in range(15)])  # REFERENCE grid
    steps = curve_steps(2000, 30, extra=[200])
    assert steps[0] == 0 and steps[-1] == 2000 and 200 in steps and 20 <= len(steps) <= 34


def test_structure(results):
    """The layout of ``results.json`` (the JSON of the typed results)."""
    typed, results = results, results.to_json()
    json.dumps(results, allow_nan=False)  # strict JSON
    assert EvalResults.from_json(results) == typed
    meta = results["meta"]
    assert meta["horizons"] == {"H": H, "4H": LONG}
    assert meta["num_tasks"] == 3 and meta["task_indices"] == [0, 1, 2]
    assert results["optimizers"][:2] == [TUNED_ADAM, TUNED_SGDM]
    names = results["optimizers"]
    assert set(names) == {TUNED_ADAM, TUNED_SGDM, *map(single_name, GRID), "sgd_lr0", "nan_opt"}
    steps = meta["curve_steps"]
    assert len(results["tasks"]) == 3
    for rec in results["tasks"]:
        assert rec["config"]["seed"] == rec["seed"]
        assert set(rec["results"]) == set(names)
        assert rec["grids"]["adam"]["lrs"] == list(GRID)
        for name in names:
            for label, T in meta["horizons"].items():
                e = rec["results"][name][label]
                for key in ("train_loss", "valid_loss", "smoothed_loss", "speedup", "speedup_censored",
                            "diverged", "diverged_step", "curve"):
                    assert key in e, (name, label, key)
                assert len(e["curve"]) == sum(s <= T for s in steps)
                assert 0.0 <= e["train_loss"] <= rec["max_loss"]
                assert e["speedup"] >= 0.0
                assert e["curve"][-1] == pytest.approx(e["train_loss"])
        for g in ("adam", "sgdm"):
            for label in meta["horizons"]:
                chosen = rec["grids"][g]["chosen_lr"][label]
                losses = rec["grids"][g]["train_loss"][label]
                assert chosen == rec["grids"][g]["lrs"][losses.index(min(losses))]
                assert rec["results"][{"adam": TUNED_ADAM, "sgdm": TUNED_SGDM}[g]][label]["lr"] == chosen
    for label in meta["horizons"]:
        for name in names:
            e = results["summary"][label][name]
            assert {"train_loss", "valid_loss", "speedup", "diverged"} <= set(e)
            assert e["train_loss"]["n"] == 3 and e["train_loss"]["lo"] <= e["train_loss"]["mean"]
            assert {"median", "p10", "p90", "censored"} <= set(e["speedup"])
            assert ("diff_vs_tuned_adam" in e) == (name != TUNED_ADAM)
        assert results["chosen_lrs"]["adam"][label] == [
            r["grids"]["adam"]["chosen_lr"][label] for r in results["tasks"]]
    assert isinstance(results["warnings"], list)


def test_bad_arguments_fail_before_any_work():
    dist = get_distribution("digits_mlp")
    with pytest.raises(ValueError, match="reserved"):
        evaluate({TUNED_ADAM: Adam()}, dist, num_tasks=1, horizon=2, progress=False)
    with pytest.raises(ValueError, match="horizon"):
        evaluate({}, dist, num_tasks=1, horizon=5, long_horizon=3, progress=False)
    with pytest.raises(ValueError, match="ci_method"):
        evaluate({}, dist, num_tasks=1, horizon=2, ci_method="wald", progress=False)
    with pytest.raises(TypeError):
        evaluate({"x": object()}, dist, num_tasks=1, horizon=2, progress=False)


def test_vmapped_grid_matches_separate_runs(results):
    """Each lane of the vmapped Adam grid equals a separate Adam run at that learning rate."""
    for rec in results.tasks:
        for label in results.labels:
            lane = rec.grids["adam"].train_loss[label]
            sep = [rec[single_name(lr)][label].train_loss for lr in GRID]
            assert lane == pytest.approx(sep, rel=1e-4, abs=1e-5)
            lane_v = rec.grids["adam"].valid_loss[label]
            sep_v = [rec[single_name(lr)][label].valid_loss for lr in GRID]
            assert lane_v == pytest.approx(sep_v, rel=1e-4, abs=1e-5)
    # the learning rates really differ in effect (a wiring bug could make all lanes identical)
    rec = results.tasks[0]
    assert len({round(x, 4) for x in rec.grids["adam"].train_loss["4H"]}) == len(GRID)


def test_adam_at_best_grid_lr_matches_tuned_adam(results):
    """Adam at the per-task best grid lr: paired difference ~0 and the same speed-up as tuned Adam (~1)."""
    for label in results.labels:
        same, tuned, sp_same, sp_tuned = [], [], [], []
        for rec in results.tasks:
            lr = rec.grids["adam"].chosen_lr[label]
            e = rec[single_name(lr)][label]
            t = rec[TUNED_ADAM][label]
            same.append(e.train_loss)
            tuned.append(t.train_loss)
            sp_same.append(e.speedup)
            sp_tuned.append(t.speedup)
        diff = stats.paired_diff_ci(same, tuned)
        assert abs(diff["mean"]) < 1e-4 and abs(diff["lo"]) < 1e-3 and abs(diff["hi"]) < 1e-3
        assert not stats.excludes_zero({"lo": diff["lo"] - 1e-9, "hi": diff["hi"] + 1e-9})
        assert sp_same == pytest.approx(sp_tuned, abs=0.15)
        for s in sp_tuned:
            assert 0.5 <= s <= 1.0 + 1e-9  # tuned Adam's own curve is bounded by its envelope
        assert results.summary[label][TUNED_ADAM].speedup["mean"] == pytest.approx(1.0, abs=0.3)


def test_bad_optimizer_is_significantly_worse(results):
    for label in results.labels:
        e = results.summary[label]["sgd_lr0"]
        d = e.diff_vs_tuned_adam["train_loss"]
        assert d["mean"] > 0 and d["lo"] > 0 and d["excludes_zero"]
        assert e.speedup["mean"] < 0.5
    # lr = 0: the training loss stays at the initial loss (curve is flat)
    for rec in results.tasks:
        curve = rec["sgd_lr0"]["4H"].curve
        assert max(curve) - min(curve) < 1e-6


def test_nonfinite_runs_are_stopped_and_counted(results):
    for rec in results.tasks:
        for label, T in results.meta.horizons.items():
            e = rec["nan_opt"][label]
            assert e.diverged and e.diverged_step == NAN_AFTER
            assert e.train_loss == rec.max_loss and e.valid_loss == rec.max_loss
            steps = results.meta.curve_steps
            for s, v in zip(steps, e.curve):
                assert (v == rec.max_loss) == (s >= NAN_AFTER)
        assert rec.run_diverged("nan_opt", "H", 2.0)  # the governor's rule counts it too
    for label in results.labels:
        assert results.summary[label]["nan_opt"].diverged == 3
        assert results.divergences("nan_opt", label) == 3
        assert results.diverged_tasks("nan_opt", label, 2.0) == [0, 1, 2]
    assert any(w.startswith("nan_opt diverged on 3/3") for w in results.warnings)


def test_parallel_matches_serial():
    dist = get_distribution("digits_mlp")
    kw = dict(num_tasks=2, horizon=5, long_horizon=10, adam_lrs=(1e-2, 1e-1), sgdm_lrs=None,
              progress=False, start=3)
    serial = evaluate({"adam": Adam(lr=3e-3)}, dist, workers=1, **kw)
    parallel = evaluate({"adam": Adam(lr=3e-3)}, dist, workers=2, **kw)
    assert parallel.meta.workers == 2
    assert [r.split_index for r in parallel.tasks] == [3, 4]
    for a, b in zip(serial.tasks, parallel.tasks):
        assert a.results == b.results


def test_write_report(results, tmp_path):
    paths = write_report(results, tmp_path / "report")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results.to_json()))
    md = paths["md"].read_text()
    assert "| optimizer | horizon | train loss | valid loss | speed-up vs tuned Adam |" in md
    assert "Paired difference vs tuned Adam" in md
    for name in results.optimizers:
        assert f"| {name} | H={H} |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- statistics -------------------------------------------------------------------------------
def test_t_quantiles_known_values():
    for df, q in ((1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (19, 2.0930240), (30, 2.0422725)):
        assert stats.t_quantile(0.975, df) == pytest.approx(q, rel=1e-6)
    assert stats.t_quantile(0.995, 3) == pytest.approx(5.8409093, rel=1e-6)
    assert stats.t_quantile(0.025, 10) == pytest.approx(-2.2281389, rel=1e-6)
    assert stats.t_quantile(0.975, 1e9) == pytest.approx(1.959964, rel=1e-6)


def test_ci_of_constant_and_small_samples():
    for method in ("t", "bootstrap"):
        ci = stats.mean_ci([2.5] * 6, method=method)
        assert ci["mean"] == ci["lo"] == ci["hi"] == 2.5 and ci["n"] == 6
        one = stats.mean_ci([1.0], method=method)
        assert one["mean"] == 1.0 and one["lo"] is None and one["hi"] is None
        assert not stats.excludes_zero(one)
    ci = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = stats.t_quantile(0.975, 3) * math.sqrt((5 / 3) / 4)  # sample variance 5/3, n = 4
    assert (ci["lo"], ci["hi"]) == pytest.approx((2.5 - half, 2.5 + half))
    assert stats.excludes_zero({"lo": 0.1, "hi": 0.3}) and stats.excludes_zero({"lo": -0.3, "hi": -0.1})
    assert not stats.excludes_zero({"lo": -0.1, "hi": 0.3})
    d = stats.paired_diff_ci([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert d["mean"] == d["lo"] == d["hi"] == 2.0 and stats.excludes_zero(d)
    with pytest.raises(ValueError):
        stats.mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        stats.paired_diff_ci([1.0], [1.0, 2.0])
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5 and stats.percentile([5, 1, 3], 100) == 5


def test_interval_coverage_on_normal_samples():
    g = torch.Generator().manual_seed(123)
    reps, n = 300, 20
    data = torch.randn(reps, n, generator=g, dtype=torch.float64) + 1.0
    t_hits = boot_hits = 0
    for i, row in enumerate(data.tolist()):
        t = stats.mean_ci(row)
        b = stats.mean_ci(row, method="bootstrap", n_boot=1000, seed=i)
        t_hits += t["lo"] <= 1.0 <= t["hi"]
        boot_hits += b["lo"] <= 1.0 <= b["hi"]
        assert b["lo"] < b["mean"] < b["hi"]
    assert 0.91 <= t_hits / reps <= 0.98
    assert 0.87 <= boot_hits / reps <= 0.98
    # the bootstrap is deterministic given its seed
    row = data[0].tolist()
    assert stats.bootstrap_ci(row, seed=7) == stats.bootstrap_ci(row, seed=7)


# ---- cache ----------------------------------------------------------------------------------------
def _strip_times(res: dict) -> list:
    return [{k: v for k, v in rec.to_json().items() if k != "run_seconds"} for rec in res.tasks]


def test_cache_reuses_identical_results_and_never_a_changed_optimizer():
    """A second evaluation on the same tasks looks up tuned Adam and an optimizer with the same weights
    (the generations reviews' case) and gives exactly what an uncached evaluation gives; an optimizer
    with other weights (another fingerprint) is run, not looked up."""
    from meta.eval_cache import EvalCache
    from optimizers.learned import LearnedOptimizer, LOConfig

    lopt = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1))
    a, b = lopt.init_theta(0), lopt.init_theta(1)
    dist = get_distribution("digits_mlp")
    kw = dict(num_tasks=2, horizon=4, long_horizon=8, adam_lrs=GRID, sgdm_lrs=None, seed=0, progress=False,
              workers=1)
    cache = EvalCache()
    evaluate({"first": lopt.bind(a)}, dist, cache=cache, **kw)
    assert cache.hits == 0 and cache.misses == 2
    both = {"incumbent": lopt.bind(a), "candidate": lopt.bind(b)}
    cached = evaluate(both, dist, cache=cache, **kw)
    assert cache.hits == 2
    plain = evaluate(both, dist, **kw)
    assert _strip_times(cached) == _strip_times(plain)
    assert cached.summary == plain.summary
    # the candidate (other weights) was really run: its results differ from the incumbent's
    assert cached.tasks[0]["candidate"] != cached.tasks[0]["incumbent"]
    assert lopt.bind(a).fingerprint() == lopt.bind(a.copy()).fingerprint() != lopt.bind(b).fingerprint()
    assert lopt.bind(a).fingerprint() != lopt.bind(a, total_steps=8).fingerprint()
    # a different protocol (seed) is a different key: nothing reused
    hits = cache.hits
    evaluate({"incumbent": lopt.bind(a)}, dist, cache=cache, **{**kw, "seed": 1})
    assert cache.hits == hits
