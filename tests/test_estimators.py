"""Meta-gradient estimators: ES / PES against exact backprop on a small quadratic meta-problem."""

import math

import pytest
import torch
import torch.nn.functional as F

from meta.estimators import PES, ConstantSchedule, TruncatedBackprop, TruncatedES, clip_meta_grad
from meta.unroll import unroll
from optimizers import LearnedOptimizer, LOConfig
from optimizers.tree import tree_map
from tasks import TaskDistribution
from tasks.base import FAMILIES, Task, TaskFamily, register_family

# A small learned optimizer (87 weights) on 8-d noisy quadratics: enough dimensions that a wrong
# estimator cannot pass by luck, small enough that thousands of antithetic pairs run in seconds.
LO = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1, features=("grad", "momentum", "adam_dir"),
                               output_init_scale=1.0, nominal_lr=0.05))
DIST = TaskDistribution("q", [("quadratic", {"min_dim": 8, "max_dim": 8, "condition": (10.0, 10.0),
                                             "noise": (0.1, 0.1), "batch_sizes": (8,)}, 1.0)], seed=3)


def _theta():
    return LO.init_theta(1)


def _cos(a: dict, b: dict) -> float:
    va = torch.cat([a[k].reshape(-1) for k in sorted(a)]).double()
    vb = torch.cat([b[k].reshape(-1) for k in sorted(b)]).double()
    return float(F.cosine_similarity(va, vb, dim=0))


def _kw(**extra):
    return dict(population=1, truncation=4, schedule=ConstantSchedule(100), desync=False, seed=7, **extra)


def test_es_agrees_with_truncated_backprop():
    theta = _theta()
    exact_est = TruncatedBackprop(LO, DIST, **_kw())
    g_exact, _, _ = exact_est.estimate(theta, exact_est.init(theta), 0)
    es = TruncatedES(LO, DIST, **_kw(sigma=1e-3, pairs=4000))
    g_es, _, _ = es.estimate(theta, es.init(theta), 0)
    assert _cos(g_es, g_exact) >= 0.9


def test_pes_agrees_with_full_unroll_gradient():
    """Summed over truncations, PES estimates the gradient of the summed truncation losses through
    the whole unroll (where truncated backprop would cut the graph at each truncation)."""
    theta = _theta()
    n_trunc = 3
    tb = TruncatedBackprop(LO, DIST, **_kw())
    state = tb.init(theta)
    m = state.members[0]
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    params, opt_state, total = m.params, m.opt_state, 0.0
    for _ in range(n_trunc):
        train, _ = tb.batches(0, m, 4)
        ml, (params, opt_state, _) = unroll(LO, tb.task_of(m), leaves, params, opt_state, train)
        total = total + ml
        m.t += 4
    exact = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))

    pes = PES(LO, DIST, **_kw(sigma=1e-3, pairs=6000))
    pstate = pes.init(theta)
    summed = None
    for step in range(n_trunc):
        g, pstate, _ = pes.estimate(theta, pstate, step)
        summed = g if summed is None else tree_map(torch.add, summed, g)
    assert _cos(summed, exact) >= 0.9
    # truncated backprop ignores the dependence through earlier truncations: PES should be closer
    tb_sum, tstate = None, tb.init(theta)
    for step in range(n_trunc):
        g, tstate, _ = tb.estimate(theta, tstate, step)
        tb_sum = g if tb_sum is None else tree_map(torch.add, tb_sum, g)
    assert _cos(summed, exact) > _cos(tb_sum, exact) - 0.05


def test_tbptt_engines_agree():
    theta = _theta()
    ga = TruncatedBackprop(LO, DIST, engine="autograd", **_kw())
    gf = TruncatedBackprop(LO, DIST, engine="func", **_kw())
    a, _, ma = ga.estimate(theta, ga.init(theta), 0)
    f, _, mf = gf.estimate(theta, gf.init(theta), 0)
    for k in a:
        torch.testing.assert_close(a[k], f[k], rtol=1e-5, atol=1e-7)
    assert ma["meta_loss"] == pytest.approx(mf["meta_loss"])


def test_members_persist_and_restart_when_episode_ends():
    theta = _theta()
    est = TruncatedBackprop(LO, DIST, population=2, truncation=4, schedule=ConstantSchedule(8), desync=False)
    st = est.init(theta)
    first = [m.task_config["seed"] for m in st.members]
    _, st, _ = est.estimate(theta, st, 0)
    assert [m.t for m in st.members] == [4, 4]
    _, st, metrics = est.estimate(theta, st, 1)
    assert [m.t for m in st.members] == [0, 0] and [m.episode for m in st.members] == [1, 1]
    assert metrics["episodes_done"] == 2
    assert [m.task_config["seed"] for m in st.members] != first  # a fresh task
    assert all(DIST.split_of_seed(m.task_config["seed"]) == "meta_train" for m in st.members)


class _NanFamily(TaskFamily):
    """loss = |x|^2 + sqrt(x0 - 0.5): finite at init (x0 = 1), NaN once training pushes x0 below 0.5."""

    def sample(self, g):
        return {}

    def build(self, config):


        class _T(Task):
            def __init__(self):
                self.config = dict(config)

            def init(self, generator):
                return {"x": torch.ones(4)}

            def loss(self, params, batch):
                return (params["x"] ** 2).sum() + torch.sqrt(params["x"][0] - 0.5)

            def sample_batch(self, split, generator):
                return (torch.zeros(1),)

        return _T()


@pytest.fixture
def nan_family():
    """Register the planted family for one test only (the registry is global)."""
    register_family("test_goes_nan")(_NanFamily)
    yield
    FAMILIES.pop("test_goes_nan", None)


@pytest.mark.parametrize("cls", [TruncatedBackprop, TruncatedES, PES])
def test_nonfinite_inner_loss_is_caught_counted_and_restarted(cls, nan_family):
    lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1, nominal_lr=0.2))
    dist = TaskDistribution("nan", [("test_goes_nan", {}, 1.0)])
    theta = lo.init_theta(0)
    kw = dict(sigma=0.01, pairs=2) if cls is not TruncatedBackprop else {}
    est = cls(lo, dist, population=2, truncation=10, schedule=ConstantSchedule(100), desync=False, **kw)
    st = est.init(theta)
    g, st, metrics = est.estimate(theta, st, 0)
    assert metrics["nonfinite"] == 2 and st.nonfinite == 2
    assert metrics["nonfinite_loss"] == 2 and metrics["nonfinite_grad"] == 0  # the losses, not the gradient
    assert all(m.t == 0 and m.episode == 1 for m in st.members)  # restarted with a fresh episode
    assert all(torch.isfinite(v).all() for v in g.values())


def test_member_randomness_does_not_depend_on_which_members_run():
    """Sharding-readiness: member i's contribution is the same whether run alone or with others."""
    theta = _theta()
    est = TruncatedBackprop(LO, DIST, population=3, truncation=3, schedule=ConstantSchedule(9))
    full, _, _ = est.estimate(theta, est.init(theta), 0)
    parts = []
    for i in range(3):
        g, _, _ = est.estimate(theta, est.init(theta), 0, member_ids=[i])
        parts.append(g)
    mean = {k: sum(p[k] for p in parts) / 3 for k in full}
    for k in full:
        torch.testing.assert_close(mean[k], full[k], rtol=1e-5, atol=1e-8)


def test_clip_meta_grad():
    g = {"a": torch.tensor([10.0, -0.5]), "b": torch.tensor([0.0])}
    clipped, norm = clip_meta_grad(g, value=3.0)
    assert norm == pytest.approx(math.sqrt(100.25))
    assert clipped["a"].tolist() == [3.0, -0.5]
    clipped, _ = clip_meta_grad(g, value=None, norm=1.0)
    assert float(torch.cat([v for v in clipped.values()]).norm()) == pytest.approx(1.0)


def test_bad_estimator_settings_raise():
    with pytest.raises(ValueError, match="meta_loss"):
        TruncatedBackprop(LO, DIST, meta_loss="accuracy")
    with pytest.raises(ValueError, match="sigma"):
        TruncatedES(LO, DIST, sigma=0.0)


def test_log_train_valid_meta_loss_is_the_mean_of_the_log_train_and_log_valid_ones():
    theta = _theta()
    tb = TruncatedBackprop(LO, DIST, **_kw(meta_loss="log_train_valid"))
    m = tb.init(theta).members[0]
    train, valid = tb.batches(0, m, 4)
    assert valid is not None and len(valid) == len(train)
    task = tb.task_of(m)
    mix = unroll(LO, task, theta, m.params, m.opt_state, train, "log_train_valid", valid)[0]
    log_train = unroll(LO, task, theta, m.params, m.opt_state, train, "log_train")[0]
    log_valid = unroll(LO, task, theta, m.params, m.opt_state, train, "log_valid", valid)[0]
    torch.testing.assert_close(mix, 0.5 * (log_train + log_valid))
    assert not torch.allclose(log_train, log_valid)  # the two terms differ, so the test can fail
