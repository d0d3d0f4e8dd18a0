"""Non-finite members: finite meta-gradients at zero gradients, losses counted apart from gradients,
and steps (runs) with no usable member logged as missing and stopped, not silently "finished"."""

import json
from dataclasses import replace

import pytest
import torch

from meta.config import MetaConfig, RunConfig, apply_overrides
from meta.estimators import PES, ConstantSchedule, TruncatedBackprop, TruncatedES
from meta.logging import MetricsLogger
from meta.trainer import MetaTrainer, MetaTrainingError
from optimizers import LearnedOptimizer, LOConfig
from optimizers import checkpoint as ckpt
from optimizers.learned import ConfigError
from optimizers.tree import flatten
from tasks import TaskDistribution
from tasks.base import FAMILIES, Task, TaskFamily, register_family

# every truncation of this learned optimizer explodes (finite, astronomically large losses whose
# meta-gradient overflows): no member is ever usable
EXPLODING = {"lo.output_init_scale": 1e6, "lo.design": "additive", "lo.time_features": "absolute",
             "lo.step_scale": "none"}


def _cfg(tmp_path, **over):
    base = {"meta.population": 2, "meta.truncation": 4, "meta.horizon": 10, "lo.hidden_width": 8,
            "lo.hidden_layers": 1, "meta.outer_steps": 8, "out_dir": str(tmp_path / "run"), "wandb": "disabled"}
    return apply_overrides(RunConfig(), {**base, **over})


class _ZeroGradFamily(TaskFamily):
    """loss = |x - 1|^2 + |0 * u|^2: u's gradient is exactly 0 at every step, so its second-moment
    accumulator stays 0 (where d sqrt(v) / dv is infinite), yet it is a function of u, which the learned
    optimizer moves: the meta-gradient reaches theta through it (as through a dead ReLU unit)."""

    def sample(self, g):
        return {}

    def build(self, config):
        class _T(Task):
            def __init__(self):
                self.config = dict(config)

            def init(self, generator):
                return {"x": torch.zeros(4), "unused": torch.zeros(3)}

            def loss(self, params, batch):
                return ((params["x"] - 1.0) ** 2).sum() + ((0.0 * params["unused"]) ** 2).sum()

            def sample_batch(self, split, generator):
                return (torch.zeros(1),)

        return _T()


class _NanFamily(_ZeroGradFamily):
    def build(self, config):
        task = super().build(config)
        task.loss = lambda params, batch: (params["x"] ** 2).sum() * torch.tensor(float("nan"))
        return task


@pytest.fixture
def families():
    register_family("test_zero_grad")(_ZeroGradFamily)
    register_family("test_all_nan")(_NanFamily)
    yield
    FAMILIES.pop("test_zero_grad", None)
    FAMILIES.pop("test_all_nan", None)


# ---- item 4: the learned optimizer's own derivative; loss vs gradient counts -------------------------
@pytest.mark.parametrize("engine", ["autograd", "func"])
def test_parameter_with_zero_gradient_gives_finite_tbptt_meta_gradient(families, engine):
    lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1))
    dist = TaskDistribution("zg", [("test_zero_grad", {}, 1.0)])
    theta = lo.init_theta(0)
    est = TruncatedBackprop(lo, dist, population=2, truncation=5, schedule=ConstantSchedule(20), desync=False,
                            engine=engine)
    g, _, metrics = est.estimate(theta, est.init(theta), 0)
    assert metrics["nonfinite_grad"] == 0 and metrics["nonfinite_loss"] == 0 and metrics["nonfinite"] == 0
    assert metrics["members_used"] == 2
    assert all(torch.isfinite(v).all() for v in g.values())
    assert any(bool(v.abs().sum() > 0) for v in g.values())


def test_smoke_preset_uses_every_member():
    """With torch.sqrt's infinite derivative at v = 0 the smoke preset lost members to NaN meta-gradients
    in its first steps (1 of 2 at step 0, 2 of 2 at step 3) although every loss was finite."""
    from train import presets

    cfg = presets()["smoke"]
    trainer = MetaTrainer(replace(cfg, meta=replace(cfg.meta, outer_steps=4)))
    for _ in range(4):
        m = trainer.train_step()
        assert m["nonfinite_grad"] == 0 and m["nonfinite_loss"] == 0, m
        assert m["members_used"] == cfg.meta.population and m["meta_loss"] is not None


@pytest.mark.parametrize("cls", [TruncatedBackprop, TruncatedES, PES])
def test_nonfinite_losses_are_counted_apart_from_gradients(families, cls):
    lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1))
    dist = TaskDistribution("nan", [("test_all_nan", {}, 1.0)])
    theta = lo.init_theta(0)
    kw = dict(sigma=0.01, pairs=2) if cls is not TruncatedBackprop else {}
    est = cls(lo, dist, population=2, truncation=3, schedule=ConstantSchedule(10), desync=False, **kw)
    g, st, m = est.estimate(theta, est.init(theta), 0)
    assert (m["nonfinite_loss"], m["nonfinite_grad"], m["nonfinite"], st.nonfinite) == (2, 0, 2, 2)
    # every unroll NaN from its first loss: nothing to learn from (ES: all signed unrolls score the same)
    assert m["members_used"] == 0 and m["meta_loss"] is None and m["inner_loss"] is None
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_nonfinite_meta_gradient_of_finite_truncation_is_counted_as_grad(tmp_path):
    trainer = MetaTrainer(_cfg(tmp_path, **EXPLODING))
    est = trainer.estimator
    _, st, m = est.estimate(trainer.theta, trainer.est_state, 0)
    assert (m["nonfinite_loss"], m["nonfinite_grad"], m["nonfinite"], m["members_used"]) == (0, 2, 2, 0)
    assert all(mb.episode == 1 and mb.t == 0 for mb in st.members)  # dropped members start a new episode


def test_es_nonfinite_estimate_is_dropped_and_counted_as_grad(monkeypatch):
    lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1))
    dist = TaskDistribution("q", [("quadratic", {"min_dim": 4, "max_dim": 4}, 1.0)], seed=0)
    theta = lo.init_theta(0)
    est = TruncatedES(lo, dist, population=2, truncation=3, schedule=ConstantSchedule(10), desync=False)
    clean = est._grad(torch.zeros(2), {k: torch.zeros((1, *v.shape)) for k, v in theta.items()})
    monkeypatch.setattr(est, "_grad", lambda ml, d: {k: torch.full_like(v, float("nan")) for k, v in clean.items()})
    g, _, m = est.estimate(theta, est.init(theta), 0)
    assert (m["nonfinite_loss"], m["nonfinite_grad"], m["members_used"]) == (0, 2, 0)
    assert all(torch.isfinite(v).all() for v in g.values())


# ---- item 5: steps with no usable member -------------------------------------------------------------
def test_step_without_usable_member_leaves_theta_and_outer_state_unchanged(tmp_path, monkeypatch):
    trainer = MetaTrainer(_cfg(tmp_path))
    trainer.train_step()  # Adam now has momentum: a zero gradient would still move theta
    theta = {k: v.clone() for k, v in trainer.theta.items()}
    outer = {k: v.clone() for k, v in flatten(trainer.outer_state).items()}
    est = trainer.estimator
    monkeypatch.setattr(est, "member_estimate", lambda theta, state, i, step: (
        None, {"meta_loss": None, "inner_loss": None, "nonfinite": "loss"}))
    m = trainer.train_step()
    assert trainer.step == 2 and trainer.bad_steps == 1
    assert m["members_used"] == 0 and m["meta_loss"] is None and m["inner_loss"] is None and m["grad_norm"] is None
    assert m["nonfinite_loss"] == 2
    assert all(torch.equal(theta[k], trainer.theta[k]) for k in theta)
    assert all(torch.equal(outer[k], v) for k, v in flatten(trainer.outer_state).items())
    monkeypatch.undo()
    trainer.train_step()
    assert trainer.bad_steps == 0  # consecutive count: a usable step resets it


def test_run_with_no_usable_member_stops_with_error_logs_null_and_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, **EXPLODING, **{"meta.max_bad_steps": 3})
    trainer = MetaTrainer(cfg)
    logger = MetricsLogger(cfg.out_dir, mode="disabled")
    with pytest.raises(MetaTrainingError, match="no usable member for 3 consecutive outer steps"):
        trainer.train(progress=False, logger=logger)
    assert trainer.step == 3
    assert all(torch.equal(trainer.theta[k], trainer.theta0[k]) for k in trainer.theta)
    rows = [json.loads(line) for line in logger.path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["meta_loss"] is None and r["inner_loss"] is None and r["grad_norm"] is None
        assert r["members_used"] == 0 and r["nonfinite"] == 2 == r["nonfinite_loss"] + r["nonfinite_grad"]
    resumed = MetaTrainer.load(trainer.checkpoint_path)  # written before the error
    assert resumed.step == 3 and resumed.bad_steps == 3


def test_cli_exits_nonzero_when_no_member_is_usable(tmp_path, capsys):
    from train import main

    out = tmp_path / "cli"
    flags = [f"--{k}={v}" for k, v in EXPLODING.items()]
    rc = main(["meta-train", "--preset", "smoke", "--quiet", "--out-dir", str(out), "--meta.max_bad_steps", "2",
               "--meta.outer_steps", "10", *flags])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "error: no usable member for 2 consecutive outer steps" in err
    assert ckpt.exists(out / "checkpoint")
    assert all(json.loads(line)["meta_loss"] is None for line in (out / "metrics.jsonl").read_text().splitlines())


def test_max_bad_steps_is_validated():
    with pytest.raises(ConfigError, match="max_bad_steps"):
        MetaConfig(max_bad_steps=0)


def test_missing_metrics_are_left_out_of_wandb(tmp_path):
    logged = []

    class _Run:
        def log(self, row, step):
            logged.append((row, step))

    logger = MetricsLogger(tmp_path, mode="disabled")
    logger.wandb_run = _Run()
    logger.log({"meta_loss": None, "members_used": 0}, 5)
    assert logged == [({"members_used": 0}, 5)]
    assert json.loads(logger.path.read_text()) == {"step": 5, "meta_loss": None, "members_used": 0}


def test_sharded_metric_reduction_keeps_missing_means_missing():
    """Reduced sums over no used member (every shard's truncations non-finite) give missing means, not 0."""
    from meta.estimators import EstimateSums

    sums = EstimateSums({"w": torch.zeros(3)}, 0, 0.0, 0, 0.0, 0, nonfinite_loss=1, nonfinite_grad=1, episodes_done=4)
    reduced = sums.all_reduce(lambda tree: tree, lambda xs, op="sum": [float(x) for x in xs])
    grad, m = reduced.mean()
    assert m["meta_loss"] is None and m["inner_loss"] is None and m["members_used"] == 0
    assert (m["nonfinite"], m["nonfinite_loss"], m["nonfinite_grad"], m["episodes_done"]) == (2, 1, 1, 4)
    assert torch.equal(grad["w"], torch.zeros(3))
