"""The learned-optimizer designs of LOConfig (controller, normalized, legacy additive), their time and
step-scale options, and task augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from optimizers.hand import Adam
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig, time_features
from tasks import build_task, get_distribution, seeded

LEGACY = dict(design="additive", time_features="absolute", step_scale="none")


def _params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.3,
            "b": torch.zeros(5, dtype=torch.float64)}


def _grads(seed: int) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return {"w": torch.randn(6, 5, generator=g, dtype=torch.float64),
            "b": torch.randn(5, generator=g, dtype=torch.float64)}


def test_old_configs_load_as_the_legacy_design():
    cfg = LOConfig.from_dict({"hidden_width": 16, "hidden_layers": 1})
    assert (cfg.design, cfg.time_features, cfg.step_scale) == ("additive", "absolute", "none")
    assert LOConfig.from_dict(LOConfig().to_dict()) == LOConfig()  # new configs round-trip


@pytest.mark.parametrize("bad", [dict(design="magic"), dict(time_features="clock"), dict(step_scale="big"),
                                 dict(design="controller", nominal="none"), dict(controller_bound=0.0),
                                 dict(rms_ref=float("nan")), dict(width_ref=0)])
def test_bad_design_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        LOConfig(**bad)


def test_fraction_design_needs_total_steps():
    lopt = LearnedOptimizer(LOConfig())
    with pytest.raises(ValueError, match="total_steps"):
        lopt.bind(lopt.init_theta(0)).init(_params())
    state = lopt.bind(lopt.init_theta(0), total_steps=50).init(_params())
    assert float(state["horizon"]) == 50.0


def test_fraction_features_depend_only_on_the_fraction():
    cfg = LOConfig()
    a = time_features(torch.tensor(20.0), torch.tensor(200.0), cfg)
    b = time_features(torch.tensor(200.0), torch.tensor(2000.0), cfg)
    assert torch.allclose(a, b)
    assert a.shape == (len(cfg.time_fractions),)


@pytest.mark.parametrize("design", ["controller", "normalized"])
def test_untrained_designs_start_as_adam_on_the_nominal_schedule(design):
    """With the MLP's output layer at zero (controller: exp(0) = 1; normalized: mix = 0) the step is
    Adam's with the nominal learning rate, for step_scale none."""
    cfg = LOConfig(design=design, step_scale="none", time_features="none")
    lopt = LearnedOptimizer(cfg)
    theta = lopt.init_theta(0)
    theta = {k: torch.zeros_like(v) if k.startswith("w") else v for k, v in theta.items()}
    if design == "normalized":
        theta["mix"] = torch.zeros(())
    opt, adam = lopt.bind(theta), Adam(lr=cfg.nominal_lr)
    p, q = _params(), _params()
    s, sa = opt.init(p), adam.init(q)
    for t in range(4):
        p, s = opt.update(_grads(t), s, p)
        q, sa = adam.update(_grads(t), sa, q)
    for k in p:
        torch.testing.assert_close(p[k], q[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_width_scale_gives_wider_layers_smaller_steps(power):
    cfg = LOConfig(step_scale="width", time_features="none", output_init_scale=0.0, scale_power=power)
    lopt = LearnedOptimizer(cfg)
    opt = lopt.bind(lopt.init_theta(0))
    narrow, wide = torch.zeros(64, 10), torch.zeros(512, 10)
    g = torch.ones(512, 10)
    (pn,), (pw,) = (opt.update({"w": g[:64]}, opt.init({"w": narrow}), {"w": narrow})[0].values(),
                    opt.update({"w": g}, opt.init({"w": wide}), {"w": wide})[0].values())
    ratio = float(pw.abs().mean() / pn.abs().mean())
    assert ratio == pytest.approx((64 / 512) ** power, rel=1e-5)


@pytest.mark.parametrize("design", ["additive", "controller", "normalized"])
@pytest.mark.parametrize("scale", ["none", "rms", "width"])
def test_meta_gradient_is_finite_with_a_parameter_that_never_has_a_gradient(design, scale):
    """v = 0 for a parameter whose gradient is always 0: sqrt's infinite derivative gave NaN here."""
    cfg = LOConfig(design=design, step_scale=scale, hidden_width=8)
    lopt = LearnedOptimizer(cfg)
    theta = {k: v.double().requires_grad_() for k, v in lopt.init_theta(0).items()}
    opt = lopt.bind(theta, total_steps=10)
    p = _params()
    s = opt.init(p)
    for t in range(3):
        g = _grads(t)
        g["b"] = torch.zeros_like(g["b"])
        p, s = opt.update(g, s, p)
    loss = (p["w"] ** 2).sum() + p["b"].sum()
    grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
    assert all(gr is None or bool(torch.isfinite(gr).all()) for gr in grads)


@pytest.mark.parametrize("design", ["controller", "normalized"])
def test_designs_meta_gradient_matches_finite_differences(design):
    # width_ref 4 < the 6x5 matrix's largest dim: the width scale acts (the rms scale is detached from p
    # by design, so finite differences would see a dependence the meta-gradient leaves out)
    cfg = LOConfig(design=design, hidden_width=4, hidden_layers=1, output_init_scale=1.0, step_scale="width",
                   width_ref=4)
    lopt = LearnedOptimizer(cfg)
    theta = {k: v.double() for k, v in lopt.init_theta(3).items()}

    def run(th):
        opt = lopt.bind(th, total_steps=6)
        p = _params(1)
        s = opt.init(p)
        for t in range(3):
            p, s = opt.update(_grads(t), s, p)
        return (p["w"] ** 2).sum() + (p["b"] ** 2).sum()

    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    grads = dict(zip(leaves, torch.autograd.grad(run(leaves), list(leaves.values()))))
    for name in ("nominal_log_lr", "w1", "vector_log_lr"):
        direction = torch.randn(theta[name].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        eps = 1e-6
        plus = {**theta, name: theta[name] + eps * direction}
        minus = {**theta, name: theta[name] - eps * direction}
        fd = float((run(plus) - run(minus)) / (2 * eps))
        assert float((grads[name] * direction).sum()) == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_evaluate_runs_horizon_aware_optimizers_once_per_horizon():
    """At each horizon the result is that of a run whose T is that horizon."""
    from meta.eval_protocol import run_task
    from torch.func import grad_and_value

    lopt = LearnedOptimizer(LOConfig(hidden_width=8))
    opt = lopt.bind(lopt.init_theta(0))
    dist = get_distribution("digits_mlp")
    task = dist.task("held_out", 0)
    rec, _ = run_task(task, {"lo": opt}, {"adam": [1e-3]}, {"H": 4, "3H": 12}, [0, 4, 12], seed=0, ema=0.9)
    for label, T in (("H", 4), ("3H", 12)):
        gen = seeded("evaluate", 0, task.seed)
        run = opt.with_total_steps(T)
        p = task.init_default()
        s = run.init(p)
        gv = grad_and_value(task.loss)
        for t in range(T):
            g, _ = gv(p, task.sample_batch("train", gen))
            p, s = run.update(g, s, p)
        with torch.no_grad():
            want = float(task.normalizer(task.loss(p, task.full_batch("train"))))
        assert rec["lo"][label].train_loss == pytest.approx(want, rel=1e-5)


# ---- augmentation ---------------------------------------------------------------------------------
def _mlp_config(**augment) -> dict:
    cfg = get_distribution("digits_mlp").config("meta_train", 0)
    return {**cfg, "augment": augment} if augment else cfg


@pytest.mark.parametrize("reparam", [10.0, [0.1, 3.0, 7.0, 0.5]])
def test_reparameterised_task_is_the_same_function_with_scaled_gradients(reparam):
    plain, aug = build_task(_mlp_config()), build_task(_mlp_config(reparam=reparam))
    p = plain.init_default()
    q = aug.init_default()
    scales = aug.scales
    for k in p:
        torch.testing.assert_close(q[k] * scales[k], p[k])
    batch = plain.full_batch("train")
    gp = torch.func.grad(plain.loss)(p, batch)
    gq = torch.func.grad(aug.loss)(q, batch)
    torch.testing.assert_close(aug.loss(q, batch), plain.loss(p, batch))
    for k in p:
        torch.testing.assert_close(gq[k], gp[k] * scales[k], rtol=1e-4, atol=1e-7)


def test_gradient_noise_is_additive_and_absent_from_evaluation_batches():
    sigma = 0.05
    plain, aug = build_task(_mlp_config()), build_task(_mlp_config(grad_noise=sigma))
    p = plain.init_default()
    batch = aug.sample_batch("train", torch.Generator().manual_seed(0))
    inner, noise = batch[: len(batch) - len(aug.names)], batch[len(batch) - len(aug.names):]
    g_aug = torch.func.grad(aug.loss)(p, batch)
    g_plain = torch.func.grad(plain.loss)(p, inner)
    for k, e in zip(aug.names, noise):
        torch.testing.assert_close(g_aug[k], g_plain[k] + sigma * e)
    full = aug.full_batch("train")
    torch.testing.assert_close(aug.loss(p, full), plain.loss(p, full))
    assert len(aug.sample_batch("valid", torch.Generator().manual_seed(0))) == len(inner)


def test_augmented_distribution_is_deterministic_and_old_digests_are_unchanged():
    broad = get_distribution("broad")
    cfgs = [broad.config("meta_train", i) for i in range(40)]
    assert cfgs == [broad.config("meta_train", i) for i in range(40)]
    assert any("augment" in c for c in cfgs) and any("augment" not in c for c in cfgs)
    for c in cfgs[:10]:
        task = build_task(c)
        loss = task.loss(task.init_default(), task.full_batch("train"))
        assert math.isfinite(float(loss))
    # a distribution without augmentation hashes as before augmentation existed
    assert get_distribution("digits_mlp").digest() == _digest_without_augment(get_distribution("digits_mlp"))


def _digest_without_augment(dist) -> str:
    import hashlib
    import json

    blob = json.dumps({"name": dist.name, "families": dist.families, "seed": dist.seed,
                       "overrides": dist.overrides}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_train_only_augmentation_leaves_the_evaluation_splits_alone():
    base, noisy = get_distribution("digits_mlp"), get_distribution("digits_mlp_noisy")
    for split in ("held_out", "test", "selection"):
        assert all(base.config(split, i) == noisy.config(split, i) for i in range(60)), split
    cfgs = [noisy.config("meta_train", i) for i in range(400)]
    noised = [c for c in cfgs if "augment" in c]
    assert 60 <= len(noised) <= 140  # grad_noise_prob 0.25 of 400
    assert all(set(c["augment"]) == {"grad_noise"} and 1e-2 <= c["augment"]["grad_noise"] <= 1.0 for c in noised)
    # the augmented tasks are the same tasks, only noisier
    assert all({k: v for k, v in c.items() if k != "augment"} == base.config("meta_train", i) for i, c in enumerate(cfgs))
    assert base.digest() != noisy.digest()


def test_bad_augment_entries_are_task_config_errors():
    from tasks.base import TaskConfigError

    for bad in ({"reparam": -1.0}, {"reparam": "x"}, {"grad_noise": float("inf")}, {"warp": 1}):
        with pytest.raises(TaskConfigError):
            build_task(_mlp_config(**bad))


# ---- loss features (horizon-free) ---------------------------------------------------------------
def test_loss_stats_follow_the_log_loss_and_skip_missing_or_bad_losses():
    from optimizers.learned import loss_features, update_loss_stats

    s = torch.zeros(5, dtype=torch.float64)
    assert torch.equal(loss_features(s), torch.zeros(3, dtype=torch.float64))  # nothing seen yet
    s = update_loss_stats(s, torch.tensor(math.e))
    assert s.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0])  # first loss: every EMA starts there
    s2 = update_loss_stats(s, torch.tensor(1.0))  # log 1 = 0
    assert s2.tolist() == pytest.approx([2.0, 0.9, 0.99, 1.0, 0.0])
    f = loss_features(s2)
    assert f.tolist() == pytest.approx([math.tanh(0.9 - 0.99), math.tanh(2 * (0.0 - 0.9)), math.tanh((0.9 - 1.0) / 3)])
    assert torch.equal(update_loss_stats(s2, None), s2)
    assert torch.equal(update_loss_stats(s2, torch.tensor(float("nan"))), s2)
    # scale-free: multiplying every loss by a constant changes no feature
    a, b = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for x in (3.0, 2.0, 2.5, 1.0):
        a, b = update_loss_stats(a, torch.tensor(x)), update_loss_stats(b, torch.tensor(1000 * x))
    torch.testing.assert_close(loss_features(a), loss_features(b))


def test_loss_features_reach_the_step_and_carry_meta_gradients():
    """With loss_features="ema" the step depends on the losses passed (the first layer's last rows and
    the schedule's loss weights get gradients); without a loss the features stay zero; the kernels
    decline the config (reference path)."""
    cfg = LOConfig(hidden_width=4, hidden_layers=1, output_init_scale=1.0, loss_features="ema")
    lopt = LearnedOptimizer(cfg)
    assert cfg.num_inputs == LOConfig(hidden_width=4, hidden_layers=1).num_inputs + 3
    theta = {k: v.double() for k, v in lopt.init_theta(3).items()}
    theta["nominal_time_w"] = torch.linspace(-0.5, 0.5, cfg.num_step_features, dtype=torch.float64)

    def run(th, losses):
        opt = lopt.bind(th, total_steps=6)
        p = _params(1)
        s = opt.init(p)
        for t, loss in enumerate(losses):
            p, s = opt.update(_grads(t), s, p, loss=loss)
        return (p["w"] ** 2).sum() + (p["b"] ** 2).sum(), s

    falling = [torch.tensor(x, dtype=torch.float64) for x in (2.0, 1.0, 0.5)]
    rising = [torch.tensor(x, dtype=torch.float64) for x in (0.5, 1.0, 2.0)]
    a, sa = run(theta, falling)
    b, _ = run(theta, rising)
    c, sc = run(theta, [None, None, None])
    assert float(a) != pytest.approx(float(b)) and float(sa["loss_stats"][0]) == 3
    assert torch.equal(sc["loss_stats"], torch.zeros(5, dtype=torch.float64))
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    g = dict(zip(leaves, torch.autograd.grad(run(leaves, falling)[0], list(leaves.values()))))
    n = cfg.num_inputs
    assert float(g["w0"][n - 3:].abs().sum()) > 0 and float(g["nominal_time_w"][-3:].abs().sum()) > 0


def test_kernel_reference_matches_the_step_with_loss_features():
    """The kernels' PyTorch reference (the semantics the Triton kernels are checked against) gives the
    same step as BoundLearnedOptimizer.update when it gets the loss statistics already updated."""
    from kernels.lo_step_reference import lo_step_reference, unsupported_reason
    from optimizers.learned import update_loss_stats

    cfg = LOConfig(hidden_width=16, hidden_layers=2, output_init_scale=1.0, loss_features="ema")
    assert unsupported_reason(cfg) is None
    lopt = LearnedOptimizer(cfg)
    theta = lopt.init_theta(4)
    theta["nominal_time_w"] = torch.linspace(-0.5, 0.5, cfg.num_step_features)
    opt = lopt.bind(theta, total_steps=10, kernels=False)
    p = {k: v.float() for k, v in _params(2).items()}
    s = opt.init(p)
    for t, loss in enumerate((3.0, 2.0, 2.5)):
        g = {k: v.float() for k, v in _grads(t).items()}
        loss = torch.tensor(loss)
        want_p, want_s = opt.update(g, s, p, loss=loss)
        got_p, got_s = lo_step_reference(p, g, {**s, "loss_stats": update_loss_stats(s["loss_stats"], loss)},
                                         theta, cfg)
        for k in p:
            torch.testing.assert_close(got_p[k], want_p[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got_s["loss_stats"], want_s["loss_stats"])
        p, s = want_p, want_s


def test_drop_in_keeps_the_loss_statistics_of_the_run():
    """LearnedOptimizerTorch with loss features: step(closure) feeds the loss; the run's statistics
    survive a state_dict round trip; the steps equal the functional optimizer's."""
    from optimizers.torch_optim import LearnedOptimizerTorch

    cfg = LOConfig(hidden_width=4, hidden_layers=1, output_init_scale=1.0, loss_features="ema")
    lopt = LearnedOptimizer(cfg)
    theta = lopt.init_theta(2)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = LearnedOptimizerTorch(model.parameters(), lopt, theta, total_steps=8, kernels=False)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    stats = opt.state[model.weight]["loss_stats"]
    assert float(stats[0]) == 3
    # the functional optimizer on the same losses gives the same parameters
    f = lopt.bind(theta, total_steps=8, kernels=False)
    p, s = p0, f.init(p0)
    for _ in range(3):
        loss, grads = None, None
        with torch.enable_grad():
            leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
            loss = ((torch.func.functional_call(model, leaves, (x,)) - y) ** 2).mean()
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        p, s = f.update(grads, s, p, loss=loss.detach())
    torch.testing.assert_close(model.weight.detach(), p["weight"])
    torch.testing.assert_close(s["loss_stats"], stats.to(s["loss_stats"].dtype))
    again = LearnedOptimizerTorch(model.parameters(), lopt, theta, total_steps=8, kernels=False)
    again.load_state_dict(opt.state_dict())
    torch.testing.assert_close(again.state[model.bias]["loss_stats"], stats)


def test_drop_in_takes_the_loss_without_a_closure():
    """``step(loss=...)`` after ``loss.backward()`` is the same step as ``step(closure)``."""
    from optimizers.torch_optim import LearnedOptimizerTorch

    cfg = LOConfig(hidden_width=4, hidden_layers=1, output_init_scale=1.0, loss_features="ema")
    lopt = LearnedOptimizer(cfg)
    theta = lopt.init_theta(5)
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), torch.randn(16, 3)
    models = []
    for mode in ("closure", "loss", "none"):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        opt = LearnedOptimizerTorch(model.parameters(), lopt, theta, total_steps=8, kernels=False)
        for _ in range(3):
            if mode == "closure":
                def closure():
                    opt.zero_grad()
                    loss = ((model(x) - y) ** 2).mean()
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                opt.step(loss=loss) if mode == "loss" else opt.step()
        models.append(model)
    torch.testing.assert_close(models[0].weight, models[1].weight)
    assert not torch.allclose(models[0].weight, models[2].weight)  # the loss inputs matter
    with pytest.raises(ValueError, match="not both"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)
