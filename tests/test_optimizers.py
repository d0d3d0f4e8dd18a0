"""Functional optimizers: hand-designed ones against torch.optim, hyperparameter gradients, and the
learned optimizer's bounds, vmap and meta-gradients."""

from __future__ import annotations



import pytest  # noqa: E402
import torch  # noqa: E402

from optimizers import (SGD, Adam, ConfigError, LearnedOptimizer, LOConfig, Optimizer, adamw,  # noqa: E402
                        sgd_momentum)
from optimizers.learned import tensor_step_scale  # noqa: E402
from optimizers.tree import all_finite, stack, tree_map, unstack  # noqa: E402

SHAPES = {"scalar": (), "vec": (5,), "mat": (4, 3), "conv": (3, 2, 3, 3)}


def make_params(seed=0, dtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def grad_seq(n, seed=1, dtype=torch.float32, shapes=SHAPES):
    return [make_params(seed * 1000 + i, dtype, shapes) for i in range(n)]


# ---- hand-designed optimizers vs torch.optim --------------------------------------------------
CASES = [
    ("adam", lambda: Adam(lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    ("adam_betas", lambda: Adam(lr=3e-3, b1=0.8, b2=0.95, eps=1e-6),
     lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.95), eps=1e-6)),
    ("adamw", lambda: adamw(lr=1e-2, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    ("sgd", lambda: SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("sgd_wd", lambda: SGD(lr=0.1, weight_decay=0.01), lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01)),
    ("sgd_momentum", lambda: sgd_momentum(lr=0.05, momentum=0.9),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ("sgd_nesterov", lambda: SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
]


@pytest.mark.parametrize("name,functional,reference", CASES, ids=[c[0] for c in CASES])
def test_hand_optimizers_match_torch(name, functional, reference):
    params = make_params()
    torch_params = {k: v.clone().requires_grad_() for k, v in params.items()}
    ref = reference(list(torch_params.values()))
    opt = functional()
    assert isinstance(opt, Optimizer)
    state = opt.init(params)
    for grads in grad_seq(6):
        params, state = opt.update(grads, state, params)
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        ref.step()
    for k, p in torch_params.items():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-5, atol=1e-6)


_QG = torch.Generator().manual_seed(0)
QUAD_A = torch.rand(6, generator=_QG, dtype=torch.float64) + 0.5
QUAD_TARGET = torch.randn(6, generator=_QG, dtype=torch.float64)


def _quadratic_unroll(make_opt, steps=5):
    """Loss after ``steps`` updates on a fixed float64 quadratic; differentiable in the hyperparameters."""

    def loss_fn(p):
        return 0.5 * (QUAD_A * (p["x"] - QUAD_TARGET) ** 2).sum()

    params = {"x": torch.zeros(6, dtype=torch.float64)}
    opt = make_opt()
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params)
        params, state = opt.update(grads, state, params)
    return loss_fn(params)


HYPER_CASES = [
    ("adam_lr", 0.1, lambda h: Adam(lr=h)),
    ("adam_b1", 0.9, lambda h: Adam(lr=0.1, b1=h)),
    ("adamw_wd", 0.05, lambda h: Adam(lr=0.1, weight_decay=h)),
    ("sgdm_lr", 0.2, lambda h: SGD(lr=h, momentum=0.5)),
    ("sgdm_momentum", 0.5, lambda h: SGD(lr=0.2, momentum=h)),
]


@pytest.mark.parametrize("name,value,build", HYPER_CASES, ids=[c[0] for c in HYPER_CASES])
def test_hyperparameter_gradients_match_finite_differences(name, value, build):
    h = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_quadratic_unroll(lambda: build(h)), h)
    eps = 1e-6
    with torch.no_grad():
        plus = _quadratic_unroll(lambda: build(torch.tensor(value + eps, dtype=torch.float64)))
        minus = _quadratic_unroll(lambda: build(torch.tensor(value - eps, dtype=torch.float64)))
    fd = (plus - minus) / (2 * eps)
    assert abs(float(grad)) > 1e-6
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    # torch.func.grad gives the same number
    fgrad = torch.func.grad(lambda t: _quadratic_unroll(lambda: build(t)))(h.detach())
    torch.testing.assert_close(fgrad, grad, rtol=1e-12, atol=0)


def test_learning_rate_grid_vmaps():
    lrs = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)
    vm = torch.func.vmap(lambda lr: _quadratic_unroll(lambda: Adam(lr=lr)))(lrs)
    loop = torch.stack([_quadratic_unroll(lambda: Adam(lr=lr)) for lr in lrs])
    torch.testing.assert_close(vm, loop, rtol=1e-12, atol=1e-12)


# ---- learned optimizer: bounds -----------------------------------------------------------------
GRAD_KINDS = {
    "random": None,
    "huge": 1e30,
    "huge_neg": -1e30,
    "tiny": 1e-30,
    "zero": 0.0,
    "nan": float("nan"),
    "inf": float("inf"),
    "neg_inf": float("-inf"),
}


def _grads(kind, params, seed):
    if GRAD_KINDS[kind] is None:
        return make_params(seed, shapes={k: v.shape for k, v in params.items()})
    return {k: torch.full_like(v, GRAD_KINDS[kind]) for k, v in params.items()}


# the default design (controller, fraction-of-training time features, rms step scale) and the original
LEGACY = dict(design="additive", time_features="absolute", step_scale="none")
DESIGNS = {"default": {}, "legacy": LEGACY}


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("kind", list(GRAD_KINDS))
def test_learned_update_finite_and_bounded(kind, design):
    lopt = LearnedOptimizer(LOConfig(**DESIGNS[design]))
    c = lopt.config
    opt = lopt.bind(lopt.init_theta(0), total_steps=10)
    params = make_params()
    state = opt.init(params)
    for step in range(3):
        grads = _grads(kind, params, step)
        if kind != "random" and step == 1:  # mix: one tensor gets ordinary gradients
            grads["mat"] = torch.randn(4, 3)
        new_params, state = opt.update(grads, state, params)
        assert all_finite(new_params) and all_finite(state)
        for k, p in params.items():
            delta = (new_params[k] - p).abs().max()
            assert delta <= c.max_update
            # in practice (untrained weights): about the nominal Adam step (times the tensor's step scale)
            # plus a small learned term
            scale = float(tensor_step_scale(p, c)) if c.step_scale != "none" and p.dim() >= 2 else 1.0
            assert delta <= 3 * c.nominal_lr * scale + 5 * c.step_mult, (k, float(delta))
        params = new_params


@pytest.mark.parametrize("design", DESIGNS)
def test_learned_update_respects_max_update(design):
    lopt = LearnedOptimizer(LOConfig(max_update=1e-4, nominal_lr=1.0, **DESIGNS[design]))
    theta = lopt.init_theta(0)
    theta["w2"] = theta["w2"] * 1e4  # a wild learned term
    opt = lopt.bind(theta, total_steps=10)
    params = make_params(dtype=torch.float64)
    state = opt.init(params)
    for step in range(2):
        new_params, state = opt.update(make_params(10 + step, torch.float64), state, params)
        for k in params:
            delta = (new_params[k] - params[k]).abs().max()
            assert 0.9e-4 < delta <= 1e-4 * (1 + 1e-9)
        params = new_params


def test_feature_subset_and_no_nominal():
    lopt = LearnedOptimizer(LOConfig(features=("grad", "momentum", "fac_grad"), nominal="none",
                                     hidden_width=4, hidden_layers=1, time_taus=(1.0, 10.0), **LEGACY))
    assert lopt.config.num_inputs == 1 + 3 + 3 + 2
    theta = lopt.init_theta(1)
    assert "nominal_log_lr" not in theta and theta["w0"].shape == (9, 4)
    opt = lopt.bind(theta)
    params = make_params()
    new_params, _ = opt.update(make_params(3), opt.init(params), params)
    assert all_finite(new_params)


@pytest.mark.parametrize("design", DESIGNS)
def test_learned_update_zero_element_tensor(design):
    lopt = LearnedOptimizer(LOConfig(**DESIGNS[design]))
    opt = lopt.bind(lopt.init_theta(0), total_steps=10)
    params = {"empty": torch.zeros(0, 3), "w": torch.randn(3)}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    new_params, _ = opt.update(grads, opt.init(params), params)
    assert new_params["empty"].shape == (0, 3)


# ---- learned optimizer: vmap over a population ---------------------------------------------------
@pytest.mark.parametrize("design", DESIGNS)
def test_learned_update_vmap_equals_loop(design):
    lopt = LearnedOptimizer(LOConfig(hidden_width=8, **DESIGNS[design]))
    n = 3
    thetas = []
    for i in range(n):
        th = lopt.init_theta(i)
        th["w2"] = th["w2"] * 20  # make the learned term differ visibly between members
        th["nominal_log_lr"] = th["nominal_log_lr"] + 0.3 * i
        thetas.append(th)
    params = [make_params(10 + i) for i in range(n)]
    grads = [[make_params(100 + 10 * i + s) for s in range(2)] for i in range(n)]

    def run(theta, p, gs):
        opt = lopt.bind(theta, total_steps=10)
        state = opt.init(p)
        for g in gs:
            p, state = opt.update(g, state, p)
        return p, state

    loop = [run(thetas[i], params[i], grads[i]) for i in range(n)]
    vm_p, vm_s = torch.func.vmap(lambda th, p, g0, g1: run(th, p, [g0, g1]))(
        stack(thetas), stack(params), stack([g[0] for g in grads]), stack([g[1] for g in grads])
    )
    for i, (p_i, s_i) in enumerate(zip(unstack(vm_p, n), unstack(vm_s, n))):
        tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7), p_i, loop[i][0])
        tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7), s_i, loop[i][1])
    # members really differ (the test would be vacuous otherwise)
    assert not torch.allclose(vm_p["mat"][0], vm_p["mat"][1])


# ---- learned optimizer: meta-gradients -----------------------------------------------------------
def _meta_loss(lopt, theta, steps=3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)

    def loss_fn(p):
        return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()

    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5,
              "b": torch.zeros(3, dtype=torch.float64)}
    opt = lopt.bind(theta, total_steps=steps + 1)
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params)
        params, state = opt.update(grads, state, params)
    return loss_fn(params)


# step_scale="rms" is left out: it scales steps by RMS(p.detach()), a stop-gradient that finite
# differences see and autograd does not (optimizers.learned.tensor_step_scale)
@pytest.mark.parametrize("fields", [LEGACY, dict(design="controller", time_features="fraction", step_scale="none"),
                                    dict(design="normalized", time_features="fraction", step_scale="none")],
                         ids=["legacy", "controller", "normalized"])
def test_learned_meta_gradient_matches_finite_differences(fields):
    lopt = LearnedOptimizer(LOConfig(hidden_width=8, nominal_lr=0.05, step_mult=0.05, **fields))
    theta = {k: v.double() for k, v in lopt.init_theta(2).items()}
    theta["w2"] = theta["w2"] * 50
    assert all(v.dtype == torch.float64 for v in theta.values())
    meta_grad = torch.func.grad(lambda th: _meta_loss(lopt, th))(theta)
    assert all_finite(meta_grad)
    eps = 1e-6
    checks = [("w0", (0, 0)), ("w0", (20, 3)), ("b1", (2,)), ("w2", (5, 0)), ("b2", (0,)), ("nominal_log_lr", ())]
    if lopt.config.design == "additive":
        checks.append(("b2", (1,)))  # the magnitude output (unused by the other designs)
    if "mix" in theta:
        checks.append(("mix", ()))
    if "nominal_time_w" in theta:
        checks.append(("nominal_time_w", (1,)))
    for name, index in checks:
        plus = {k: v.clone() for k, v in theta.items()}
        minus = {k: v.clone() for k, v in theta.items()}
        plus[name][index] += eps
        minus[name][index] -= eps
        fd = (_meta_loss(lopt, plus) - _meta_loss(lopt, minus)) / (2 * eps)
        g = meta_grad[name][index]
        assert abs(float(fd)) > 1e-9, (name, index)
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-10, msg=f"{name}{index}: {float(g)} vs {float(fd)}")


# ---- configuration -------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="feature"):
        LOConfig(features=("grad", "bogus"))
    with pytest.raises(ConfigError, match="bogus_key"):
        LOConfig.from_dict({"hidden_width": 8, "bogus_key": 1})
    with pytest.raises(ConfigError):
        LOConfig(nominal="sgd")
    with pytest.raises(ConfigError):
        LOConfig(momentum_decays=(0.9, 1.0))
    with pytest.raises(ConfigError):
        LOConfig(max_update=0.0)
    assert issubclass(ConfigError, ValueError)


def test_config_round_trip():
    cfg = LOConfig(hidden_width=8, features=("grad", "param", "momentum"), momentum_decays=(0.5, 0.9))
    again = LOConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert LearnedOptimizer(again).num_theta() == LearnedOptimizer(cfg).num_theta()


# ---- transforms -----------------------------------------------------------------------------------
def test_warm_down_scales_the_last_fraction_of_updates_to_zero():
    from optimizers.hand import SGD
    from optimizers.transforms import WarmDown

    opt = WarmDown(SGD(lr=1.0), total_steps=8, fraction=0.5)
    assert [opt.factor(s) for s in range(9)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    p = {"x": torch.zeros(2)}
    st = opt.init(p)
    steps = []
    for _ in range(8):
        new, st = opt.update({"x": -torch.ones(2)}, st, p)  # SGD step +1, scaled
        steps.append(float((new["x"] - p["x"])[0]))
        p = new
    assert steps == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25] and int(st["step"]) == 8
    with pytest.raises(ValueError):
        WarmDown(SGD(), total_steps=8, fraction=0.0)


def test_time_features_folded_into_the_first_bias_match_concatenation():
    from optimizers.learned import LearnedOptimizer, LOConfig

    lopt = LearnedOptimizer(LOConfig())
    bound = lopt.bind(lopt.init_theta(0), total_steps=100)
    torch.manual_seed(0)
    n_time = lopt.config.num_time_features
    x = torch.randn(50, lopt.config.num_inputs - n_time)
    t = torch.randn(n_time)
    folded = bound._mlp(x, t)
    concat = bound._mlp(torch.cat([x, t.expand(50, -1)], dim=1))
    torch.testing.assert_close(folded, concat, rtol=1e-5, atol=1e-6)
