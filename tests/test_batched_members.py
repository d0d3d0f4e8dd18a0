"""Truncated backprop over members unrolled together (``torch.func.vmap`` over members whose tasks share
a :meth:`~tasks.base.Task.batch_key`): the same meta-gradient, metrics and member states as one member at
a time (up to float rounding), non-finite members dropped exactly as they are alone, and only tasks that
are the same function of ``(params, batch)`` grouped."""

import pytest
import torch

from meta.config import MetaConfig
from meta.estimators import ConstantSchedule, LogUniformSchedule, TruncatedBackprop
from meta.trainer import make_estimator
from optimizers import LearnedOptimizer, LOConfig
from optimizers.tree import flatten
from tasks import TaskDistribution
from tasks.base import build_task


def _dist(**fam):
    base = {"dataset": "digits", "min_width": 8, "max_width": 8, "min_depth": 1, "max_depth": 1,
            "activations": ("tanh",), "batch_sizes": (16,), "init_scale": (0.5, 2.0)}
    return TaskDistribution("same8", [("image_mlp", {**base, **fam}, 1.0)], seed=0)


def _pair(dist, lo_cfg=None, **kw):
    lo = LearnedOptimizer(lo_cfg or LOConfig(hidden_width=8, hidden_layers=1))
    theta = lo.init_theta(0)
    kw = {"population": 4, "truncation": 3, "schedule": ConstantSchedule(7), **kw}
    return theta, [TruncatedBackprop(lo, dist, batch_members=b, **kw) for b in (False, True)]


def _close_trees(a, b, rtol=1e-4, atol=1e-6):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("desync", [False, True])
def test_grouped_members_match_one_at_a_time(desync):
    """Three outer steps (episodes end mid-run: groups change with the members' steps left)."""
    theta, (loop, grouped) = _pair(_dist(), desync=desync)
    s_loop, s_grp = loop.init(theta), grouped.init(theta)
    assert grouped.member_groups(s_grp, [0, 1, 2, 3]), "identical tasks must form at least one group"
    for step in range(3):
        g_loop, _, m_loop = loop.estimate(theta, s_loop, step)
        g_grp, _, m_grp = grouped.estimate(theta, s_grp, step)
        _close_trees(g_loop, g_grp)
        for k in ("members_used", "nonfinite", "nonfinite_loss", "nonfinite_grad", "episodes_done"):
            assert m_loop[k] == m_grp[k], k
        assert m_loop["meta_loss"] == pytest.approx(m_grp["meta_loss"], rel=1e-5)
        assert m_loop["inner_loss"] == pytest.approx(m_grp["inner_loss"], rel=1e-5)
        for a, b in zip(s_loop.members, s_grp.members):
            assert (a.episode, a.t, a.length, a.task_config) == (b.episode, b.t, b.length, b.task_config)
            _close_trees(a.params, b.params)
            _close_trees(a.opt_state, b.opt_state)
        theta = {k: v - 0.01 * g_loop[k] for k, v in theta.items()}


def test_validation_meta_loss_is_grouped_too():
    theta, (loop, grouped) = _pair(_dist(), meta_loss="log_train_valid", desync=False)
    g_loop, _, m_loop = loop.estimate(theta, loop.init(theta), 0)
    g_grp, _, m_grp = grouped.estimate(theta, grouped.init(theta), 0)
    _close_trees(g_loop, g_grp)
    assert m_loop["meta_loss"] == pytest.approx(m_grp["meta_loss"], rel=1e-5)


def test_member_with_nonfinite_loss_is_dropped_from_its_group():
    theta, (loop, grouped) = _pair(_dist(), desync=False)
    states = [loop.init(theta), grouped.init(theta)]
    for s in states:  # member 2 starts from NaN weights: its losses are NaN, the others are fine
        s.members[2].params = {k: torch.full_like(v, float("nan")) for k, v in s.members[2].params.items()}
    (g_loop, s_loop, m_loop), (g_grp, s_grp, m_grp) = (e.estimate(theta, s, 0) for e, s in zip((loop, grouped), states))
    assert (m_grp["members_used"], m_grp["nonfinite_loss"], m_grp["nonfinite_grad"]) == (3, 1, 0)
    assert (m_loop["members_used"], m_loop["nonfinite_loss"]) == (3, 1)
    _close_trees(g_loop, g_grp)
    assert s_grp.members[2].episode == 1 and s_grp.nonfinite == 1  # restarted, as alone


def test_group_with_nonfinite_gradient_is_redone_one_member_at_a_time():
    """Finite losses whose meta-gradient overflows: each member counted as a gradient failure, as alone."""
    exploding = LOConfig(hidden_width=8, hidden_layers=1, output_init_scale=1e6, design="additive",
                         time_features="absolute", step_scale="none")
    theta, (loop, grouped) = _pair(_dist(), lo_cfg=exploding, desync=False)
    _, _, m_loop = loop.estimate(theta, loop.init(theta), 0)
    _, s_grp, m_grp = grouped.estimate(theta, grouped.init(theta), 0)
    assert m_loop["nonfinite_grad"] == 4 and m_loop["members_used"] == 0  # the case this test is about
    for k in ("members_used", "nonfinite_loss", "nonfinite_grad"):
        assert m_grp[k] == m_loop[k], k
    assert all(mb.episode == 1 and mb.t == 0 for mb in s_grp.members)


def test_only_tasks_with_equal_keys_are_grouped():
    theta, (_, grouped) = _pair(_dist(activations=("tanh", "relu"), batch_sizes=(16, 32)), population=8,
                                schedule=LogUniformSchedule(5, 50))
    st = grouped.init(theta)
    groups = grouped.member_groups(st, list(range(8)))
    seen = [i for g in groups for i in g]
    assert len(seen) == len(set(seen))
    for g in groups:
        ms = [st.members[i] for i in g]
        keys = {(grouped.task_of(m).batch_key(), grouped.steps_this_truncation(m)) for m in ms}
        assert len(keys) == 1 and len(g) > 1
    ungrouped = [i for i in range(8) if i not in seen]
    for i in ungrouped:  # nothing left out that had a partner
        key = (grouped.task_of(st.members[i]).batch_key(), grouped.steps_this_truncation(st.members[i]))
        assert all(key != (grouped.task_of(st.members[j]).batch_key(), grouped.steps_this_truncation(st.members[j]))
                   for j in range(8) if j != i)


def test_batch_keys_of_tasks():
    cfg = {"family": "image_mlp", "dataset": "digits", "hidden": [8], "activation": "tanh", "batch_size": 16,
           "init_scale": 1.0, "seed": 1}
    a, b = build_task(cfg), build_task({**cfg, "seed": 2, "init_scale": 0.5})
    assert a.batch_key() == b.batch_key()  # data and initialisation only
    for change in ({"activation": "relu"}, {"hidden": [9]}, {"batch_size": 17}, {"hidden": [8, 8]}):
        assert build_task({**cfg, **change}).batch_key() != a.batch_key(), change
    assert build_task({**cfg, "augment": {"reparam": 2.0}}).batch_key() is None  # reads its scales: never grouped


def test_meta_config_switch_reaches_the_estimator():
    lo = LearnedOptimizer(LOConfig(hidden_width=8, hidden_layers=1))
    assert make_estimator(MetaConfig(), lo, _dist()).batch_members is True
    assert make_estimator(MetaConfig(batch_members=False), lo, _dist()).batch_members is False


@pytest.mark.parametrize("family,fam", [
    ("image_conv", {"min_channels": 3, "max_channels": 3, "min_depth": 1, "max_depth": 1, "activations": ("relu",),
                    "downsample": ("stride",), "batch_sizes": (8,)}),
])
def test_other_families_group_and_match(family, fam):
    dist = TaskDistribution(family, [(family, fam, 1.0)], seed=0)
    theta, (loop, grouped) = _pair(dist, population=3, truncation=2, desync=False)
    s_grp = grouped.init(theta)
    assert grouped.member_groups(s_grp, [0, 1, 2]) == [[0, 1, 2]]
    g_loop, _, m_loop = loop.estimate(theta, loop.init(theta), 0)
    g_grp, _, m_grp = grouped.estimate(theta, s_grp, 0)
    _close_trees(g_loop, g_grp)
    assert m_loop["meta_loss"] == pytest.approx(m_grp["meta_loss"], rel=1e-5)


def test_layer_norm_tasks_are_never_grouped():
    """vmap gets second derivatives through layer_norm's weight wrong (pytorch/functorch#534): the
    transformer, whose unrolls would be differentiated through them, keeps one member at a time."""
    cfg = {"family": "tiny_transformer", "seq_task": "copy", "vocab": 5, "length": 3, "d_model": 8, "heads": 2,
           "layers": 1, "activation": "gelu", "batch_size": 8, "init_scale": 1.0, "seed": 0}
    assert build_task(cfg).batch_key() is None


def test_curating_sampler_sees_the_same_episodes():
    """A curating task sampler reads each episode's progress: grouped members report it as alone."""
    from meta.curation import make_sampler

    dist = _dist()
    lo = LearnedOptimizer(LOConfig(hidden_width=8, hidden_layers=1))
    theta = lo.init_theta(0)
    records = []
    for batch in (False, True):
        sampler = make_sampler("trailing", dist, seed=0, num_train_tasks=6, floor=0.2, every=1)
        est = TruncatedBackprop(lo, dist, population=4, truncation=3, schedule=ConstantSchedule(6), desync=False,
                                num_train_tasks=6, sampler=sampler, batch_members=batch)
        st = est.init(theta)
        assert bool(est.member_groups(st, [0, 1, 2, 3])) == batch
        eps = [r for step in range(4) for r in est.accumulate(theta, st, step).episodes]
        records.append(eps)
    assert [(r.member, r.episode, r.region, r.next_index) for r in records[0]] == \
        [(r.member, r.episode, r.region, r.next_index) for r in records[1]]
    assert len(records[0]) >= 4
    for a, b in zip(*records):
        assert a.progress == pytest.approx(b.progress, rel=1e-4, abs=1e-6)


def test_groups_are_capped_by_their_parameter_count(monkeypatch):
    import meta.estimators as E

    theta, (_, grouped) = _pair(_dist(), population=5, desync=False)
    st = grouped.init(theta)
    n = sum(t.numel() for t in st.members[0].params.values())
    assert grouped.member_groups(st, [0, 1, 2, 3, 4]) == [[0, 1, 2, 3, 4]]
    monkeypatch.setattr(E, "GROUP_ELEMENTS", 2 * n)
    assert grouped.member_groups(st, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]  # member 4 alone: not a group
    monkeypatch.setattr(E, "GROUP_ELEMENTS", n)
    assert grouped.member_groups(st, [0, 1, 2, 3, 4]) == []
