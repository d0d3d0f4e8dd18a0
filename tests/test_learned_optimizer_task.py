"""The ``learned_optimizer`` task family (meta-training a tiny learned optimizer as a task) and the
meta-training-only families of a distribution (``train_families``)."""

from __future__ import annotations

import pytest
import torch

from meta.unroll import autograd_grad_and_value
from optimizers.hand import Adam
from tasks import get_distribution
from tasks.base import TaskConfigError, TaskDistribution, build_task, seeded

CFG = {"family": "learned_optimizer", "seed": 5, "inner_steps": 3,
       "inner": {"hidden": [6], "activation": "tanh", "batch_size": 16}}


def _task_and_theta():
    task = build_task(dict(CFG))
    return task, task.init(seeded("theta", 0)), task.sample_batch("train", seeded("batch", 1))


def test_first_order_gradient_equals_exact_meta_gradient_and_is_constant():
    """Under plain autograd (``create_graph``, as truncated backprop takes task gradients) the gradient
    is the exact meta-gradient through the unroll (``torch.func`` on the pure function), and it has no
    graph back to the parameters (no third-order differentiation)."""
    task, theta, batch = _task_and_theta()
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    g_auto, loss_auto = autograd_grad_and_value(task.loss)(leaves, batch)
    g_func, loss_func = torch.func.grad_and_value(task.meta_loss)(theta, batch)
    assert torch.allclose(loss_auto, loss_func)
    for k in theta:
        assert torch.allclose(g_auto[k], g_func[k], rtol=1e-5, atol=1e-9), k
    assert all(g.grad_fn is None for g in g_auto.values())
    assert float(g_func["nominal_log_lr"].abs()) > 0  # the learning rate matters to an unroll


def test_meta_gradient_matches_finite_differences_on_the_log_learning_rate():
    task, theta, batch = _task_and_theta()
    theta = {k: v.double() for k, v in theta.items()}
    g, _ = torch.func.grad_and_value(task.meta_loss)(theta, batch)
    eps = 1e-4

    def at(delta):
        return float(task.meta_loss({**theta, "nominal_log_lr": theta["nominal_log_lr"] + delta}, batch))

    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert abs(fd - float(g["nominal_log_lr"])) <= 1e-3 * max(1.0, abs(fd))


def test_adam_on_the_tiny_optimizer_lowers_its_meta_loss():
    task, theta, batch = _task_and_theta()
    opt = Adam(lr=0.05)
    state = opt.init(theta)
    first = float(task.meta_loss(theta, batch))
    for _ in range(15):
        g, _ = torch.func.grad_and_value(task.meta_loss)(theta, batch)
        theta, state = opt.update(g, state, theta)
    assert float(task.meta_loss(theta, batch)) < first - 0.01


@pytest.mark.parametrize("bad", [{"inner": [3]}, {"lo": {"hidden_width": "x"}}, {"lo": {"no_such": 1}},
                                 {"inner_steps": 0}])
def test_bad_configs_raise_clear_errors(bad):
    with pytest.raises(TaskConfigError):
        build_task({**CFG, **bad})


def test_train_families_change_only_some_meta_train_tasks():
    base, outer = get_distribution("digits_mlp"), get_distribution("digits_mlp_outer")
    for split in ("held_out", "test", "selection"):
        assert all(base.config(split, i) == outer.config(split, i) for i in range(60)), split
    fams = [outer.config("meta_train", i)["family"] for i in range(400)]
    swapped = fams.count("learned_optimizer")
    assert 20 <= swapped <= 80  # train_prob 0.125 of 400
    unchanged = sum(base.config("meta_train", i) == outer.config("meta_train", i) for i in range(400))
    assert unchanged == 400 - swapped
    assert base.digest() != outer.digest()


@pytest.mark.parametrize("prob, fams", [(0.5, []), (0.0, [("learned_optimizer", {}, 1.0)]), (1.5, [("quadratic", {}, 1.0)])])
def test_train_families_validated(prob, fams):
    with pytest.raises(TaskConfigError):
        TaskDistribution("x", [("quadratic", {}, 1.0)], train_families=fams, train_prob=prob)
