"""The estimator / trainer contract: the estimator returns sums and counts, the trainer reduces.

* theta after N outer steps is bit-identical to a reference loop written here (sum of member
  gradients in member order, divided by the count, clipped, one outer update), for every estimator;
* the outer optimizer is one spec (kind, path, scale) whatever way it is given, and checkpoints name it;
* the per-step callbacks run after the step's checkpoint (how tests plant faults), and the library
  itself never reads the test-only fault variable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meta.config import RunConfig, apply_overrides
from meta.estimators import clip_meta_grad
from meta.trainer import MetaTrainer, OuterSpec, make_outer_optimizer
from optimizers import checkpoint as ckpt
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **over):
    base = {"meta.population": 3, "meta.truncation": 3, "meta.horizon": 7, "lo.hidden_width": 8,
            "lo.hidden_layers": 1, "meta.outer_steps": 4, "meta.distribution": "quadratics",
            "out_dir": str(tmp_path / "run"), "wandb": "disabled"}
    return apply_overrides(RunConfig(), {**base, **over})


def _reference_steps(tr: MetaTrainer, n: int) -> None:
    """The meta-gradient as it was computed before the contract: members in order, summed, averaged."""
    for _ in range(n):
        total, count = None, 0
        for i in range(len(tr.est_state.members)):
            g, _ = tr.estimator.member_estimate(tr.theta, tr.est_state, i, tr.step)
            if g is not None:
                total = g if total is None else {k: total[k] + g[k] for k in total}
                count += 1
        if count:
            grad = {k: v / count for k, v in total.items()}
            grad, _ = clip_meta_grad(grad, tr.cfg.meta.grad_clip_value or None, tr.cfg.meta.grad_clip_norm or None)
            tr.theta, tr.outer_state = tr.outer.update(grad, tr.outer_state, tr.theta)
            tr.theta = {k: v.detach() for k, v in tr.theta.items()}
        tr.step += 1


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_meta_gradients_are_bit_identical_to_the_reference_reduction(tmp_path, estimator):
    cfg = _cfg(tmp_path, **{"meta.estimator": estimator})
    trainer, reference = MetaTrainer(cfg), MetaTrainer(cfg)
    for _ in range(4):
        trainer.train_step()
    _reference_steps(reference, 4)
    moved = False
    for k in trainer.theta:
        assert torch.equal(trainer.theta[k], reference.theta[k]), k
        moved |= not torch.equal(trainer.theta[k], trainer.theta0[k])
    assert moved  # the comparison is not between two untouched starts


def test_estimate_returns_sums_and_counts(tmp_path):
    """``accumulate`` gives unreduced sums; ``mean`` divides them by the member count."""
    tr = MetaTrainer(_cfg(tmp_path))
    sums = tr.estimator.accumulate(tr.theta, tr.est_state, 0)
    assert sums.count == 3 and sums.meta_loss_count == 3
    grad, metrics = sums.mean()
    for k in grad:
        assert torch.equal(grad[k], sums.grad_sum[k] / 3)
    assert metrics["meta_loss"] == pytest.approx(sums.meta_loss_sum / 3) and metrics["members_used"] == 3
    assert not hasattr(tr.estimator, "reduce")  # the trainer reduces, the estimator offers no hook


def _saved_outer(tmp_path, nominal_lr=0.05):
    lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1, nominal_lr=nominal_lr))
    path = tmp_path / "outer"
    ckpt.save_learned_optimizer(path, lo, lo.init_theta(3))
    return lo, path


def test_the_outer_optimizer_is_one_spec_however_it_is_given(tmp_path):
    from meta.generations import outer_scale

    lo, path = _saved_outer(tmp_path)
    cfg = _cfg(tmp_path, **{"meta.outer_optimizer": str(path), "meta.outer_lr": 1e-3})
    from_path = MetaTrainer(cfg)  # as --meta.outer_optimizer PATH gives it
    want = OuterSpec("learned", str(path), outer_scale(cfg, lo.config))  # as generations scales it
    assert from_path.outer_spec == want and want.scale == pytest.approx(1e-3 / 0.05)
    assert from_path.outer_label == str(path)
    from_path.save()
    _, meta = ckpt.load(from_path.checkpoint_path)
    assert meta["outer_optimizer"] == want.to_dict()  # the checkpoint names it by the spec
    resumed = MetaTrainer.load(from_path.checkpoint_path)
    assert resumed.outer_spec == want
    given = MetaTrainer(cfg, outer=want)  # a spec passed in builds the same optimizer
    theta = from_path.theta
    grads = {k: torch.full_like(v, 0.1) for k, v in theta.items()}
    outs = [t.outer.update(grads, t.outer.init(theta), theta)[0] for t in (from_path, resumed, given)]
    for k in theta:
        assert torch.equal(outs[0][k], outs[1][k]) and torch.equal(outs[0][k], outs[2][k])
    # gen.outer_scale overrides the derived scale, everywhere the spec is made
    cfg2 = _cfg(tmp_path, **{"meta.outer_optimizer": str(path), "gen.outer_scale": 0.5})
    assert MetaTrainer(cfg2).outer_spec.scale == 0.5 == outer_scale(cfg2, lo.config)


def test_adam_spec_and_bad_specs(tmp_path):
    tr = MetaTrainer(_cfg(tmp_path, **{"meta.outer_lr": 2e-3}))
    assert tr.outer_spec == OuterSpec("adam", "", 2e-3) and tr.outer_label == "adam"
    assert make_outer_optimizer(tr.outer_spec).lr == 2e-3
    with pytest.raises(ConfigError):
        OuterSpec("sgd")
    with pytest.raises(ConfigError):
        OuterSpec("learned")  # no path
    with pytest.raises(ConfigError):
        OuterSpec("adam", "", 0.0)


def test_step_callbacks_run_after_each_step_and_its_checkpoint(tmp_path):
    seen = []

    def record(trainer, metrics):
        saved = ckpt.load(trainer.checkpoint_path)[1]["step"] if ckpt.exists(trainer.checkpoint_path) else None
        seen.append((trainer.step, saved, "meta_loss" in metrics))

    cfg = _cfg(tmp_path, **{"checkpoint_every": 2})
    MetaTrainer(cfg, step_callbacks=[record]).train(4, progress=False)
    assert seen == [(1, None, True), (2, 2, True), (3, 2, True), (4, 4, True)]


def test_the_library_never_reads_the_test_fault_variable():
    for folder in ("meta", "optimizers", "kernels", "tasks"):
        for f in (ROOT / folder).rglob("*.py"):
            assert "OUROBOROS_TEST_FAULT" not in f.read_text(), f
    assert "OUROBOROS_TEST_FAULT" not in (ROOT / "train.py").read_text()
