"""Successor architecture search: the selection split, the bounds filter, seeded proposals, successive
halving, the selection score, and the generations loop with the search on (lineage entry and report)."""

import json
import math
from dataclasses import replace

import pytest
import torch

from meta import search as S
from meta.config import GenConfig, GovernorConfig
from meta.lineage import Lineage, LineageError, search_record_problem
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig
from tasks import FAMILIES, SPLITS, TaskConfigError, get_distribution, seeded
from tasks.base import ALL_SPLITS, SELECTION

SMALL = LOConfig(hidden_width=8, hidden_layers=1)


# ---- the selection split ------------------------------------------------------------------------
def _legacy_config(dist, split: str, index: int) -> dict:
    """A task config as the distribution built it before the selection split existed (three splits,
    seed ``(base * 1_000_003 + i) * 3 + s``), written out here independently of ``task_seed``."""
    seed = (dist.seed * 1_000_003 + index) * 3 + ("meta_train", "held_out", "test").index(split)
    g = seeded("task", seed)
    weights = torch.tensor([w for _, _, w in dist.families], dtype=torch.float64)
    fam_name, fam_kwargs, _ = dist.families[int(torch.multinomial(weights, 1, generator=g))]
    cfg = FAMILIES[fam_name](**fam_kwargs).sample(g)
    cfg.update(dist.overrides)
    cfg["family"], cfg["seed"] = fam_name, seed
    if dist.augment:
        from tasks.augment import sample_augment

        aug = sample_augment(seed, **dist.augment)
        if aug:
            cfg["augment"] = aug
    return cfg


@pytest.mark.parametrize("name,seed", [("digits_mlp", 0), ("mixed", 0), ("broad", 3), ("digits_mixed", 1)])
def test_selection_split_is_disjoint_deterministic_and_leaves_the_other_splits_unchanged(name, seed):
    dist = get_distribution(name, seed=seed)
    n = 3000
    seeds = {s: [dist.task_seed(s, i) for i in range(n)] for s in ALL_SPLITS}
    sel = set(seeds[SELECTION])
    assert len(sel) == n
    for s in SPLITS:
        assert not sel & set(seeds[s]), s
        assert all(dist.split_of(x) == s for x in seeds[s])
    assert all(dist.split_of(x) == SELECTION for x in sel)
    # every selection seed lies below every seed the other splits can ever have (any index >= 0)
    assert max(sel) < min(dist.task_seed(s, 0) for s in SPLITS)
    # the existing splits' task configs are exactly those of the three-split construction
    for s in SPLITS:
        for i in list(range(40)) + [999, 123_456]:
            assert dist.config(s, i) == _legacy_config(dist, s, i)
    again = get_distribution(name, seed=seed)
    assert [again.config(SELECTION, i) for i in range(10)] == [dist.config(SELECTION, i) for i in range(10)]
    # the configs (not only the seeds) differ from every meta_train / held_out / test config drawn
    others = {json.dumps(dist.config(s, i), sort_keys=True) for s in SPLITS for i in range(200)}
    assert not {json.dumps(dist.config(SELECTION, i), sort_keys=True) for i in range(200)} & others


def test_selection_tasks_build_and_bad_indices_are_refused():
    dist = get_distribution("digits_mlp")
    task = dist.task(SELECTION, 3)
    params = task.init_default()
    loss = task.loss(params, task.sample_batch("train", seeded(0)))
    assert math.isfinite(float(loss))
    with pytest.raises(TaskConfigError, match="index must be >= 0"):
        dist.config(SELECTION, -1)
    with pytest.raises(TaskConfigError, match="index must be >= 0"):  # would reach into the selection block
        dist.config("meta_train", -1)
    with pytest.raises(TaskConfigError, match="unknown split"):
        dist.config("selections", 0)


# ---- proposals and the bounds filter ----------------------------------------------------------
def test_bounds_filter_rejects_oversized_proposals():
    big = LOConfig(hidden_width=64, hidden_layers=3)  # 21,760 FLOPs per element > the default bound
    ok, sizes, reason = S.check_bounds(big, GovernorConfig())
    assert not ok and sizes["flops_per_element"] == LearnedOptimizer(big).flops_per_element() > 20_000
    assert "flops_per_element" in reason
    assert S.check_bounds(LOConfig(), GovernorConfig())[0]
    assert not S.check_bounds(LOConfig(), GovernorConfig(max_state_floats=3))[0]  # 4 state floats
    # a bound at the base's own size: every larger draw is rejected, and no accepted one exceeds it
    gov = GovernorConfig(max_theta=LearnedOptimizer(LOConfig(hidden_width=16)).num_theta())
    props = S.propose(LOConfig(hidden_width=16), 6, gov, seed=0, generation=1)
    accepted = [p for p in props if p.in_bounds]
    assert len(accepted) == 6
    assert all(p.sizes["num_theta"] <= gov.max_theta for p in accepted)
    rejected = [p for p in props if p.lo is not None and not p.in_bounds]
    assert rejected and all(p.sizes["num_theta"] > gov.max_theta and "num_theta" in p.reason for p in rejected)


def test_proposals_are_seeded_distinct_and_start_with_the_base():
    gov = GovernorConfig()
    a = S.propose(SMALL, 5, gov, seed=0, generation=1)
    b = S.propose(SMALL, 5, gov, seed=0, generation=1)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.to_dict() for p in S.propose(SMALL, 5, gov, seed=0, generation=2)] != [p.to_dict() for p in a]
    assert a[0].changes == {} and a[0].lo == SMALL
    los = [p.lo for p in a if p.in_bounds]
    assert len(los) == 5 and len(set(map(str, los))) == 5
    for p in a[1:]:
        assert 1 <= len(p.changes) <= 2 and set(p.changes) <= set(S.SEARCH_SPACE)
    with pytest.raises(S.SearchError):
        S.propose(SMALL, 0, gov, seed=0, generation=1)


# ---- successive halving -----------------------------------------------------------------------
def _planted(table):
    calls = []

    def train(i, budget):
        calls.append((i, budget))
        return (i, budget)

    def score(trained, budget):
        assert all(b == budget for _, b in trained.values())
        return {i: table(i, budget) for i in trained}

    return train, score, calls


def test_successive_halving_keeps_the_best_half_and_doubles_the_budget():
    planted = {0: 0.5, 1: -0.2, 2: 0.9, 3: -0.1, 4: 0.3}
    train, score, calls = _planted(lambda i, b: S.RungScore(planted[i]))
    res = S.successive_halving(list(planted), 3, train, score)
    assert res.winner == 1
    assert [r["budget"] for r in res.rungs] == [3, 6, 12]
    assert [r["alive"] for r in res.rungs] == [[0, 1, 2, 3, 4], [1, 3, 4], [1, 3]]
    assert [r["kept"] for r in res.rungs] == [[1, 3, 4], [1, 3], [1]]
    assert calls == [(i, 3) for i in range(5)] + [(1, 6), (3, 6), (4, 6), (1, 12), (3, 12)]


def test_successive_halving_ranks_by_the_latest_rung_and_divergence_last():
    # 2 leads at the first rung, 3 overtakes it with more budget; 0 scores best but diverged
    def table(i, b):
        if i == 0:
            return S.RungScore(-5.0, diverged=1)
        if i == 1:
            return S.RungScore(1.0)
        return S.RungScore({2: -1.0, 3: -0.5}[i] if b == 1 else {2: -1.0, 3: -2.0}[i])

    train, score, _ = _planted(table)
    res = S.successive_halving([0, 1, 2, 3], 1, train, score)
    assert res.rungs[0]["kept"] == [2, 3] and res.winner == 3
    nan = S.successive_halving([0, 1], 1, *_planted(lambda i, b: S.RungScore(math.nan if i == 0 else 2.0))[:2])
    assert nan.winner == 1  # a non-finite score ranks as +inf
    assert S.successive_halving([7], 4, *_planted(lambda i, b: 1 / 0)[:2]).winner == 7  # nothing to choose
    assert S.successive_halving([0, 1], 1, train, score, should_stop=lambda: True) is None


def test_search_returns_the_winner_and_records_every_proposal():
    gov = GovernorConfig(max_theta=LearnedOptimizer(LOConfig(hidden_width=16)).num_theta())
    base = LOConfig(hidden_width=16)
    props = S.propose(base, 4, gov, seed=0, generation=1)
    ok = [p for p in props if p.in_bounds]
    best = ok[2].lo  # planted: the third in-bounds proposal is the best at every budget

    def train(lo, budget):
        return LearnedOptimizer(lo), {"lo": lo}

    class Scorer:
        split = SELECTION

        def __call__(self, trained, budget):
            return {i: S.RungScore(-1.0 if opt.theta["lo"] == best else float(i)) for i, opt in trained.items()}

    res = S.search(base, 4, 2, gov, seed=0, generation=1, train=train, scorer=Scorer())
    rec = res.record
    assert res.winner.lo == best and rec["winner_lo_config"] == best.to_dict() and rec["split"] == SELECTION
    assert len(rec["proposals"]) == len(props)
    assert [r["budget"] for r in rec["rungs"]] == [2, 4]
    assert rec["outer_steps_spent"] == 4 * 2 + 2 * 4
    for p in rec["proposals"]:
        assert bool(p["rungs"]) == p["in_bounds"]  # every in-bounds proposal was trained and scored
        assert all(r["budget"] in (2, 4) and isinstance(r["score"], float) for r in p["rungs"])
    assert search_record_problem(rec, best.to_dict()) is None
    json.dumps(rec)  # JSON-able


def test_lineage_refuses_a_search_record_that_did_not_use_the_selection_split():
    rec = {"split": "selection", "winner": 1, "winner_lo_config": {"a": 1},
           "proposals": [{"index": 0, "lo_config": {"a": 0}, "in_bounds": True},
                         {"index": 1, "lo_config": {"a": 1}, "in_bounds": True}]}
    assert search_record_problem(rec, {"a": 1}) is None
    assert "held_out" in search_record_problem({**rec, "split": "held_out"}, {"a": 1})
    assert "not the architecture" in search_record_problem(rec, {"a": 0})
    assert "not among" in search_record_problem({**rec, "winner": 5}, {"a": 1})
    out = {**rec, "proposals": [rec["proposals"][0], {**rec["proposals"][1], "in_bounds": False}]}
    assert "outside" in search_record_problem(out, {"a": 1})


def test_selection_scorer_evaluates_on_the_selection_split_only(monkeypatch):
    import meta.evaluate as E

    seen = []
    real = E.evaluate

    def spy(opts, dist, **kw):
        seen.append(kw["split"])
        return real(opts, dist, **kw)

    monkeypatch.setattr(E, "evaluate", spy)
    gov = GovernorConfig(adam_lrs=(1e-2, 1e-1))
    scorer = S.SelectionScorer(get_distribution("digits_mlp"), gov, horizon=5, num_tasks=2)
    lopt = LearnedOptimizer(SMALL)
    scores = scorer({0: lopt.bind(lopt.init_theta(0)), 1: lopt.bind(lopt.init_theta(1))}, 1)
    assert seen == [SELECTION] and set(scores) == {0, 1}
    assert all(math.isfinite(s.score) for s in scores.values())


def test_search_settings_are_validated():
    assert GenConfig().search_candidates == 0  # off by default: today's behaviour
    for bad in ({"search_candidates": -1}, {"search_budget": 0}, {"search_tasks": 0}):
        with pytest.raises(ConfigError):
            GenConfig(**bad)


# ---- the generations loop with the search on --------------------------------------------------
def test_generations_with_search_record_the_proposals(tmp_path, monkeypatch):
    from meta.generations import GenerationRunner, gen_dir
    from tests.test_generations import _cfg

    import meta.evaluate as E

    splits = []
    real = E.evaluate

    def spy(opts, dist, **kw):
        splits.append((kw["split"], sorted(opts)))
        return real(opts, dist, **kw)

    monkeypatch.setattr(E, "evaluate", spy)
    cfg = _cfg(tmp_path, gens=2)
    cfg = replace(cfg, gen=replace(cfg.gen, search_candidates=3, search_budget=1, search_tasks=2))
    logs = []
    GenerationRunner(cfg, cfg.out_dir, progress=False, log=logs.append).run()
    lineage = Lineage(cfg.out_dir)
    entries = lineage.verify()
    gen0, gen1 = entries
    assert "search" not in gen0  # generation 0 has no incumbent to search a successor with
    rec = gen1["search"]
    assert rec["split"] == SELECTION and rec["outer"] == "gen-0" and rec["selection_tasks"] == 2
    assert sum(p["in_bounds"] for p in rec["proposals"]) == 3
    assert [r["budget"] for r in rec["rungs"]] == [1, 2]
    assert gen1["lo_config"] == rec["winner_lo_config"]
    assert search_record_problem(rec, gen1["lo_config"]) is None
    # every proposal the search scored was scored on the selection split; the governor on held_out
    search_calls = [s for s, names in splits if any(n.startswith("proposal-") for n in names)]
    assert search_calls and set(search_calls) == {SELECTION}
    assert SELECTION not in {s for s, names in splits if "candidate" in names}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Successor search" in report and "**winner**" in report
    # a restart reuses the cached search; an edited cache is not trusted (searched again)
    import meta.generations as G

    runner = GenerationRunner(cfg, cfg.out_dir, progress=False, log=logs.append)
    base = G.lo_config_for(cfg, 1)
    again = []
    monkeypatch.setattr(G, "search", lambda *a, **k: again.append(1))  # a new search would call this
    assert runner.search_successor(1, base, None, None) == rec and not again
    path = gen_dir(cfg.out_dir, 1) / "search.json"
    cached = json.loads(path.read_text())
    cached["record"]["winner_lo_config"]["hidden_width"] += 1
    path.write_text(json.dumps(cached))
    assert runner.search_successor(1, base, None, None) is None and again == [1]
    # an edited lineage entry (the winner said to come from the decision split) is refused
    path = lineage.entries_dir / "000001.json"
    bad = json.loads(path.read_text())
    bad["search"]["split"] = "held_out"
    from meta.lineage import canonical_hash

    bad["hash"] = canonical_hash(bad)
    path.write_text(json.dumps(bad))
    (lineage.root / "HEAD.json").write_text(json.dumps({"count": 2, "hash": bad["hash"]}))
    with pytest.raises(LineageError, match="selection split"):
        lineage.verify(check_weights=False)


def test_a_run_directory_from_before_the_search_continues_with_the_search_off(tmp_path):
    from meta.generations import GenerationRunner
    from tests.test_generations import _cfg

    cfg = _cfg(tmp_path)
    old = cfg.to_dict()
    for key in ("search_candidates", "search_budget", "search_tasks"):
        del old["gen"][key]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    GenerationRunner(cfg, cfg.out_dir, progress=False, log=lambda s: None).check_config()  # same run: accepted
    on = replace(cfg, gen=replace(cfg.gen, search_candidates=2))
    with pytest.raises(ConfigError, match="gen.search_candidates"):
        GenerationRunner(on, on.out_dir, progress=False, log=lambda s: None).check_config()
