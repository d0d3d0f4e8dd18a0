"""higher interop: meta-gradients through higher.innerloop_ctx equal the torch.func path."""

from __future__ import annotations

import math


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

higher = pytest.importorskip("higher")

from optimizers import LearnedOptimizer, LearnedOptimizerTorch, LOConfig  # noqa: E402
from optimizers import higher_interop  # noqa: E402

K = 5
T = 8  # total_steps of the inner runs (the default design sees t/T)

# the default design (fraction-of-training time features) and the original one
DESIGNS = {
    "default": LOConfig(hidden_width=8, time_features="fraction"),
    "legacy": LOConfig(hidden_width=8, design="additive", time_features="absolute", step_scale="none"),
}


def make_model(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_batches(dtype=torch.float64, n=K + 1, bs=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (bs,), generator=g)
        out.append((x, y))
    return out


def make_theta(lopt: LearnedOptimizer, dtype=torch.float64, seed=3, scale=1.0):
    theta = lopt.init_theta(seed)
    # a larger output layer than the default init makes the learned term matter in the meta-gradient
    last = f"w{lopt.config.hidden_layers}"
    theta[last] = theta[last] * scale
    return {k: v.to(dtype).requires_grad_() for k, v in theta.items()}


def torch_opt(params, lopt, theta, **kw):
    if lopt.config.needs_total_steps:
        kw.setdefault("total_steps", T)
    return LearnedOptimizerTorch(params, lopt=lopt, theta=theta, **kw)


def higher_meta_loss(model, lopt, theta, batches, **ctx_kw):
    opt = torch_opt(model.parameters(), lopt, theta)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True, **ctx_kw) as (fmodel, diffopt):
        for x, y in batches[:-1]:
            diffopt.step(F.cross_entropy(fmodel(x), y))
        xv, yv = batches[-1]
        return F.cross_entropy(fmodel(xv), yv), [p.detach().clone() for p in fmodel.parameters()]


def func_meta_loss(model, lopt, theta, batches):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    bound = lopt.bind(theta, total_steps=T)
    state = bound.init(params)
    for x, y in batches[:-1]:
        grads = torch.func.grad(lambda ps: F.cross_entropy(functional_call(model, ps, (x,)), y))(params)
        params, state = bound.update(grads, state, params)
    xv, yv = batches[-1]
    return F.cross_entropy(functional_call(model, params, (xv,)), yv), params


def test_register_is_idempotent_and_mapped():
    cls = higher_interop.register()
    assert higher_interop.register() is cls
    assert higher_interop.DifferentiableLearnedOptimizer is cls
    assert issubclass(cls, higher.optim.DifferentiableOptimizer)
    assert higher.optim._opt_mapping[LearnedOptimizerTorch] is cls


@pytest.mark.parametrize("design", DESIGNS)
def test_meta_gradient_matches_torch_func(design):
    higher_interop.register()
    lopt = LearnedOptimizer(DESIGNS[design])
    model = make_model()
    batches = make_batches()
    theta = make_theta(lopt, scale=30.0)

    loss_h, _ = higher_meta_loss(model, lopt, theta, batches)
    names = list(theta)
    grads_h = torch.autograd.grad(loss_h, [theta[k] for k in names])

    loss_f, _ = func_meta_loss(model, lopt, theta, batches)
    grads_f = torch.autograd.grad(loss_f, [theta[k] for k in names])
    torch.testing.assert_close(loss_h, loss_f, rtol=1e-10, atol=1e-12)
    for k, gh, gf in zip(names, grads_h, grads_f):
        assert gh.abs().sum() > 0 or gf.abs().sum() == 0, k
        torch.testing.assert_close(gh, gf, rtol=1e-7, atol=1e-12, msg=f"meta-gradient mismatch for {k}")

    # and the fully functional torch.func.grad over theta agrees as well
    detached = {k: v.detach() for k, v in theta.items()}
    grads_ff = torch.func.grad(lambda th: func_meta_loss(model, lopt, th, batches)[0])(detached)
    for k, gh in zip(names, grads_h):
        torch.testing.assert_close(gh, grads_ff[k], rtol=1e-7, atol=1e-12)
    # the meta-gradient reaches the learned MLP, not only the nominal Adam term
    assert grads_h[names.index("w0")].abs().max() > 0
    assert grads_h[names.index("nominal_log_lr")].abs() > 0


@pytest.mark.parametrize("design", DESIGNS)
def test_meta_gradient_float32_close(design):
    higher_interop.register()
    lopt = LearnedOptimizer(DESIGNS[design])
    model = make_model(torch.float32)
    batches = make_batches(torch.float32)
    theta = make_theta(lopt, torch.float32, scale=30.0)
    loss_h, _ = higher_meta_loss(model, lopt, theta, batches)
    gh = torch.autograd.grad(loss_h, list(theta.values()))
    loss_f, _ = func_meta_loss(model, lopt, theta, batches)
    gf = torch.autograd.grad(loss_f, list(theta.values()))
    for a, b in zip(gh, gf):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("design", DESIGNS)
def test_forward_trajectory_matches_torch_optimizer_with_groups(design):
    """With theta fixed, diffopt.step follows the same trajectory as LearnedOptimizerTorch.step,
    including per-group lr (absolute units), weight decay, total_steps (the run steps past T=4) and
    continuing from an existing state."""
    higher_interop.register()
    lopt = LearnedOptimizer(DESIGNS[design])
    theta = {k: v.detach() for k, v in make_theta(lopt, scale=10.0).items()}
    batches = make_batches(n=8)

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 3e-3, "weight_decay": 1e-1},
                {"params": m[2].parameters()}]

    ref = make_model()
    model = make_model()
    opt_ref = torch_opt(groups(ref), lopt, theta, total_steps=4)
    opt = torch_opt(groups(model), lopt, theta, total_steps=4)
    # two warm-up steps with the torch optimizer on both, then higher continues on one of them
    for x, y in batches[:2]:
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for x, y in batches[2:]:
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt_ref.step()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        assert diffopt.global_step == 2
        assert diffopt.total_steps == opt.total_steps and diffopt.lr_unit == opt.lr_unit
        for x, y in batches[2:]:
            diffopt.step(F.cross_entropy(fmodel(x), y))
        for a, b in zip(fmodel.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert diffopt.global_step == opt_ref.global_step


def test_track_higher_grads_false_builds_no_graph_to_theta():
    higher_interop.register()
    lopt = LearnedOptimizer(DESIGNS["default"])
    model = make_model()
    theta = make_theta(lopt)
    opt = torch_opt(model.parameters(), lopt, theta)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True, track_higher_grads=False) as (fm, dopt):
        for x, y in make_batches(n=3)[:-1]:
            dopt.step(F.cross_entropy(fm(x), y))
        assert all(p.grad_fn is None for p in fm.parameters())
        assert all(v.grad_fn is None for st in dopt.state for s in st.values() for v in s.values())


def test_theta_keyword_overrides_optimizer_theta():
    higher_interop.register()
    lopt = LearnedOptimizer(DESIGNS["default"])
    model = make_model()
    theta_opt = {k: v.detach() for k, v in make_theta(lopt, seed=0).items()}
    theta = make_theta(lopt, seed=5, scale=10.0)
    opt = torch_opt(model.parameters(), lopt, theta_opt)
    fmodel = higher.patch.monkeypatch(model, copy_initial_weights=True)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel, theta=theta)
    batches = make_batches(n=3)
    for x, y in batches[:-1]:
        diffopt.step(F.cross_entropy(fmodel(x), y))
    loss = F.cross_entropy(fmodel(batches[-1][0]), batches[-1][1])
    g = torch.autograd.grad(loss, theta["w0"])[0]
    loss_f, _ = func_meta_loss(model, lopt, theta, batches)
    torch.testing.assert_close(loss, loss_f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, torch.autograd.grad(loss_f, theta["w0"])[0], rtol=1e-7, atol=1e-12)


def test_lr_override_is_differentiable():
    """A group lr given through higher's ``override`` is a differentiable hyperparameter. (The legacy
    design: step_scale="rms" scales steps by RMS(p.detach()), so autograd and finite differences differ
    by that stop-gradient.)"""
    higher_interop.register()
    lopt = LearnedOptimizer(DESIGNS["legacy"])
    theta = {k: v.detach() for k, v in make_theta(lopt, scale=10.0).items()}
    batches = make_batches(n=4)
    model = make_model()

    def meta_loss(lr):
        opt = torch_opt(model.parameters(), lopt, theta)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override={"lr": [lr]}) as (fm, dopt):
            for x, y in batches[:-1]:
                dopt.step(F.cross_entropy(fm(x), y))
            return F.cross_entropy(fm(batches[-1][0]), batches[-1][1])

    lr0 = 2.0 * math.exp(float(theta["nominal_log_lr"]))  # twice the learned lr
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(meta_loss(lr), lr)
    eps = 1e-6 * lr0
    fd = (meta_loss(torch.tensor(lr0 + eps, dtype=torch.float64))
          - meta_loss(torch.tensor(lr0 - eps, dtype=torch.float64))) / (2 * eps)
    assert abs(float(g)) > 1e-8
    torch.testing.assert_close(g, fd.detach(), rtol=1e-5, atol=1e-10)
