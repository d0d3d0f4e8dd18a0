"""The kernels (forward, backward, population) for the step's designs, time features and step scales.

``LOConfig.design`` ("additive", "controller" -- the default --, "normalized"), ``time_features``
("absolute", "fraction" -- the default, T = ``state["horizon"]`` --, "none") and ``step_scale`` ("none",
"rms" -- the default --, "width"): the Triton kernels under the interpreter against the PyTorch path of
``optimizers.learned`` (``bind(theta, kernels=False).update``), which is the specification; gradients
against autograd through that path; the population step with a different run length T per member; and
finite meta-gradients where a parameter's gradient is exactly zero (``v = 0``: ``safe_sqrt``).

Setup and helpers come from ``tests/test_kernels.py`` (importing it imports the kernels under the
interpreter; the ``triton_interpreter`` marker sets ``TRITON_INTERPRET=1`` for each test only). Shapes: 0-d to 4-d, odd sizes, tiny tiles (loops, masked tails, several chunks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels import HORIZON, LEGACY, TINY, assert_same_step, lt, make_problem, needs_triton
from test_kernels_backward import STATE_KEYS, _population, _weighted_loss, assert_grads_close

from kernels.lo_step_autograd import lo_step_autograd
from kernels.lo_step_reference import lo_step_reference
from optimizers.learned import LearnedOptimizer, LOConfig

pytestmark = [pytest.mark.triton_interpreter,  # TRITON_INTERPRET=1 for each test (tests/conftest.py)
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

# 0-d, 1-d odd, 2-d (a < b; a size-1 dim), 3-d with non-adjacent largest dims, 4-d
SHAPES = {"scalar": (), "bias": (7,), "w": (5, 7), "row1": (1, 9), "w3": (6, 2, 5), "conv": (3, 4, 5, 2)}
SMALL = {"hidden_width": 16, "hidden_layers": 1}

CONFIGS = {
    "default": LOConfig(),  # controller, fraction of training, rms step scale
    "controller-absolute": LOConfig(time_features="absolute", step_scale="none", controller_bound=1.0, **SMALL),
    "normalized": LOConfig(design="normalized", mix_init=1.0, **SMALL),
    "additive-fraction-rms": LOConfig(design="additive", output_init_scale=1.0, scale_power=0.5, rms_ref=0.03,
                                      **SMALL),
    "additive-none-width": LOConfig(design="additive", time_features="none", step_scale="width", width_ref=4,
                                    nominal="none", output_init_scale=1.0, **SMALL),
    "controller-width-fixed-lr": LOConfig(step_scale="width", width_ref=3, scale_power=2.0, nominal_schedule=False,
                                          hidden_width=16, hidden_layers=3),
    # the default preset's learned optimizer: horizon-free loss features on top of the default
    "loss-ema": LOConfig(loss_features="ema", **SMALL),
}


def _learned(cfg, theta, **kw):
    """The specification: optimizers.learned's PyTorch path."""
    return LearnedOptimizer(cfg).bind(theta, kernels=False, **kw)


def _with_state(state, **st):
    return {**state, **st}


# ---- forward ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_equals_learned_optimizer(name):
    """kernels.lo_step_reference (the kernels' phases in PyTorch) == optimizers.learned, 3 steps."""
    cfg = CONFIGS[name]
    theta, params, state, grads = make_problem(cfg, shapes=SHAPES)
    assert ("horizon" in state) == cfg.needs_total_steps
    for _ in range(3):
        g = grads()
        ref = lo_step_reference(params, g, state, theta, cfg)
        assert_same_step(_learned(cfg, theta).update(g, state, params), ref, params)
        assert ref[1].get("horizon") is state.get("horizon")
        params, state = ref


@needs_triton
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_equals_learned_optimizer(name):
    """The Triton step (interpreter) == optimizers.learned's PyTorch path, from non-zero accumulators."""
    cfg = CONFIGS[name]
    theta, params, state, grads = make_problem(cfg, shapes=SHAPES, steps=2)
    g = grads()
    ref = _learned(cfg, theta).update(g, state, params)
    got = lt.lo_step(params, g, state, theta, cfg, blocks=TINY)
    assert_same_step(ref, got, params)
    assert got[1].get("horizon") is state.get("horizon")


@needs_triton
def test_kernel_default_bf16_and_horizon():
    """bf16 parameters and gradients under the default config; T changes the step (and the kernel
    follows: fraction-of-training features and schedule)."""
    cfg = CONFIGS["default"]
    theta, params, state, grads = make_problem(cfg, shapes={"w": (5, 7), "v": (11,), "s": ()},
                                               pdtype=torch.bfloat16, steps=1)
    g = grads()
    ref = _learned(cfg, theta).update(g, state, params)
    assert_same_step(ref, lt.lo_step(params, g, state, theta, cfg, blocks=TINY), params, ulps=1)
    fp = {k: v.float() for k, v in params.items()}
    gf = {k: v.float() for k, v in g.items()}
    steps = {}
    for T in (2, 400):
        st = _with_state(state, horizon=torch.tensor(float(T), dtype=state["step"].dtype))
        ref = _learned(cfg, theta).update(gf, st, fp)
        got = lt.lo_step(fp, gf, st, theta, cfg, blocks=TINY)
        assert_same_step(ref, got, fp)
        steps[T] = got[0]["w"]
    assert not torch.allclose(steps[2], steps[400])
    no_t = {k: v for k, v in state.items() if k != "horizon"}
    with pytest.raises(ValueError, match="total_steps"):
        lt.lo_step(fp, gf, no_t, theta, cfg, blocks=TINY)


@needs_triton
def test_normalized_design_single_element_and_edge_tensors():
    """normalized: a one-element tensor's rms-normalised direction is sign(d); tensors with zero
    elements are skipped; the extra d^2 pass runs over several chunks per tensor."""
    cfg = CONFIGS["normalized"]
    shapes = {"one": (1,), "s": (), "long": (70,), "m": (9, 8)}
    theta, params, state, grads = make_problem(cfg, shapes=shapes, steps=1)
    params["empty"] = torch.zeros(0, 3)
    state["m"]["empty"], state["v"]["empty"] = torch.zeros(3, 0, 3), torch.zeros(0, 3)
    state["row"]["empty"], state["col"]["empty"] = torch.zeros(3, 0, 1), torch.zeros(3, 1, 3)
    g = grads()
    g["empty"] = torch.zeros(0, 3)
    ref = lo_step_reference(params, g, state, theta, cfg)
    got = lt.lo_step(params, g, state, theta, cfg, blocks=TINY)
    assert_same_step(ref, got, params)
    assert got[0]["empty"].shape == (0, 3)


# ---- backward -------------------------------------------------------------------------------------------
def _leaves(theta, params, grads, state):
    def rg(d):
        return {k: v.detach().clone().requires_grad_() for k, v in d.items()}

    th, p, g = rg(theta), rg(params), rg(grads)
    st = {**state, **{key: rg(state[key]) for key in STATE_KEYS}}
    flat = {**{("theta", k): v for k, v in th.items()}, **{("params", k): v for k, v in p.items()},
            **{("grads", k): v for k, v in g.items()},
            **{(key, k): v for key in STATE_KEYS for k, v in st[key].items()}}
    return (th, p, g, st), flat


def _gradients(step_fn, theta, params, grads, state):
    """Gradients of a random linear function of every output w.r.t. every input."""
    (th, p, g, st), flat = _leaves(theta, params, grads, state)
    new_p, new_s = step_fn(th, p, g, st)
    got = torch.autograd.grad(_weighted_loss(new_p, new_s), list(flat.values()), allow_unused=True)
    return {k: (torch.zeros_like(flat[k]) if v is None else v) for k, v in zip(flat, got)}


@needs_triton
@pytest.mark.parametrize("name", ["default", "controller-absolute", "additive-none-width", "normalized", "loss-ema"])
def test_backward_equals_learned_autograd(name):
    """lo_step_autograd (Triton forward; Triton backward, or for "normalized" the reference backward)
    == autograd through optimizers.learned: theta (incl. nominal_time_w, vector_log_lr, mix), params,
    grads (NaN / inf / clipped entries) and every state tensor."""
    from kernels.lo_step_backward import unsupported_backward

    cfg = CONFIGS[name]
    theta, params, state, grads = make_problem(cfg, shapes=SHAPES, steps=1)
    g = grads()
    g["conv"][0].zero_()  # exact zeros: v stays small, adam's derivative near its kink
    backward = "auto" if name == "normalized" else "triton"
    assert (unsupported_backward(cfg, params) is None) == (name != "normalized")
    ref = _gradients(lambda th, p, gg, st: _learned(cfg, th).update(gg, st, p), theta, params, g, state)
    got = _gradients(lambda th, p, gg, st: lo_step_autograd(p, gg, st, th, cfg, forward="triton",
                                                            backward=backward, blocks=TINY),
                     theta, params, g, state)
    assert_grads_close(got, ref, rtol=5e-5)  # the MLP's rounding, and tanh / pow evaluated differently
    for k in ("vector_log_lr", "nominal_time_w", "mix"):
        if k in theta:
            assert got[("theta", k)].abs().sum() > 0, k


def _zero_column_unroll(cfg, theta, kernels_flag, steps=3):
    """``steps`` LO steps of a tiny regression whose input has an all-zero column: the gradient of the
    weight row it multiplies is exactly zero at every step (``v = 0`` there from init) yet part of the
    graph (``create_graph=True``, as meta/unroll's truncated backprop); returns the meta-loss and its
    gradient w.r.t. theta."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen)
    x[:, 0] = 0.0
    y = torch.randn(12, 3, generator=gen)
    params = {"w": torch.randn(5, 3, generator=gen) * 0.3, "b": torch.zeros(3)}
    th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    opt = LearnedOptimizer(cfg).bind(th, kernels=kernels_flag, precision="ieee", total_steps=HORIZON)
    state = opt.init(params)

    def loss_fn(p):
        return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()

    for _ in range(steps):
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()}
        gr = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=True)
        assert not gr[0][0].any()  # the dead row's gradient: exactly zero
        params, state = opt.update(dict(zip(leaves, gr)), state, leaves)
    assert not state["v"]["w"][0].any()
    meta_loss = loss_fn(params) + (params["w"] ** 2).sum()  # the dead row's new value enters the loss
    return meta_loss, dict(zip(th, torch.autograd.grad(meta_loss, list(th.values()))))


@needs_triton
@pytest.mark.parametrize("name", ["default", "legacy-adam"])
def test_meta_gradient_finite_where_a_gradient_is_zero(name):
    """v = 0 (a parameter that never had a gradient): sqrt's infinite derivative times a zero used to
    make the whole meta-gradient NaN; safe_sqrt's derivative is 0 there, in the PyTorch path, the
    reference backward and the Triton backward alike."""
    cfg = CONFIGS["default"] if name == "default" else LOConfig(**LEGACY, output_init_scale=0.3)
    cfg = LOConfig(**{**cfg.to_dict(), **SMALL})
    theta = LearnedOptimizer(cfg).init_theta(2)
    if "nominal_time_w" in theta:
        theta["nominal_time_w"] = torch.linspace(-0.2, 0.2, cfg.num_time_features)
    ml_ref, g_ref = _zero_column_unroll(cfg, theta, False)
    ml_k, g_k = _zero_column_unroll(cfg, theta, True)  # Triton forward + Triton backward
    for k in g_ref:
        assert torch.isfinite(g_ref[k]).all() and torch.isfinite(g_k[k]).all(), k
    torch.testing.assert_close(ml_k, ml_ref, rtol=1e-5, atol=1e-7)
    assert_grads_close(g_k, g_ref, rtol=1e-4)
    # one step, v = 0 and g = 0 in the inputs: the reference backward is finite too
    params = {"w": torch.randn(4, 3) * 0.1, "b": torch.zeros(3)}
    state = LearnedOptimizer(cfg).bind(theta, total_steps=HORIZON).init(params)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    for backward in ("reference", "triton"):
        got = _gradients(lambda th, p, gg, st, b=backward: lo_step_autograd(
            p, gg, st, th, cfg, forward="triton", backward=b, blocks=TINY), theta, params, zeros, state)
        assert all(bool(v.isfinite().all()) for v in got.values()), backward


# ---- population: one weight set and one run length T per member ------------------------------------------
@needs_triton
@pytest.mark.parametrize("name,shared", [("default", False), ("normalized", True), ("loss-ema", False)])
def test_population_per_member_horizon(name, shared):
    """population_lo_step == each member's optimizers.learned step with its own weights and T
    (``state["horizon"]`` of shape (P,); () shared)."""
    from kernels.lo_step_population import population_lo_step, population_lo_step_reference

    cfg = CONFIGS[name]
    shapes = {"w": (5, 7), "b": (7,), "s": (), "c": (3, 4, 5, 2)}
    pop = 3
    thetas, params, state, grads = _population(cfg, shapes, pop, shared_step=shared)
    if cfg.needs_total_steps:
        assert state["horizon"].shape == (() if shared else (pop,))
    ref = population_lo_step_reference(params, grads, state, thetas, cfg)
    got = population_lo_step(params, grads, state, thetas, cfg, blocks=TINY)
    assert_same_step(ref, got, params)
    assert ("horizon" in got[1]) == cfg.needs_total_steps
    for j in range(pop):
        st = {"step": state["step"] if shared else state["step"][j],
              **{key: {k: v[j] for k, v in state[key].items()} for key in STATE_KEYS}}
        for key in ("horizon", "loss_stats"):
            if key in state:
                st[key] = state[key] if shared else state[key][j]
        pj = {k: v[j] for k, v in params.items()}
        one = _learned(cfg, {k: v[j] for k, v in thetas.items()}).update({k: v[j] for k, v in grads.items()}, st, pj)
        assert_same_step(one, ({k: v[j] for k, v in got[0].items()},
                               {"step": one[1]["step"], **{key: st[key] for key in ("horizon", "loss_stats") if key in st},
                                **{key: {k: v[j] for k, v in got[1][key].items()} for key in STATE_KEYS}}), pj)


@needs_triton
def test_population_members_differ_only_in_horizon():
    """Identical members (weights, parameters, state, gradients) but T = 5, 50, 500: the fraction-of-training
    features differ, so do the steps, each equal to the single step with that T."""
    from kernels.lo_step_population import population_lo_step

    cfg = LOConfig(**SMALL)
    theta, params, state, grads = make_problem(cfg, shapes={"w": (4, 6), "b": (5,)}, steps=2)
    g = grads()
    horizons = torch.tensor([5.0, 50.0, 500.0])
    stack = lambda d: {k: torch.stack([v] * 3) for k, v in d.items()}  # noqa: E731
    pstate = {"step": state["step"], "horizon": horizons, **{key: stack(state[key]) for key in STATE_KEYS}}
    got = population_lo_step(stack(params), stack(g), pstate, stack(theta), cfg, blocks=TINY)
    for j, T in enumerate(horizons):
        one = lt.lo_step(params, g, _with_state(state, horizon=T), theta, cfg, blocks=TINY)
        for k in params:
            torch.testing.assert_close(got[0][k][j], one[0][k], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(got[0]["w"][0], got[0]["w"][2])


def test_kernels_accept_every_step_option():
    """Every design / time-feature / step-scale combination runs in the kernels (forward); the backward
    kernels refuse only "normalized" (lo_step_autograd then uses the reference backward); an option the
    kernels do not know is refused, not misread."""
    import itertools

    from kernels.lo_step_reference import KERNEL_OPTIONS, unsupported_reason
    from optimizers.learned import DESIGNS, LOSS_FEATURES, STEP_SCALES, TIME_FEATURES

    assert (set(DESIGNS), set(TIME_FEATURES), set(STEP_SCALES), set(LOSS_FEATURES)) == tuple(
        set(v) for v in KERNEL_OPTIONS.values())
    for design, tf, scale in itertools.product(DESIGNS, TIME_FEATURES, STEP_SCALES):
        assert unsupported_reason(LOConfig(design=design, time_features=tf, step_scale=scale)) is None
    future = LOConfig()
    object.__setattr__(future, "design", "future")  # a frozen config with a value from a later version
    assert "design='future'" in unsupported_reason(future)
    if lt is not None:
        from kernels.lo_step_backward import unsupported_backward

        p = {"w": torch.zeros(3, 4)}
        assert unsupported_backward(LOConfig(), p) is None
        assert "normalized" in unsupported_backward(LOConfig(design="normalized"), p)
