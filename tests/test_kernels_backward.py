"""Triton backward (kernels.lo_step_backward) == the reference backward; kernel TBPTT == PyTorch TBPTT;
population step (kernels.lo_step_population) == per-member reference; ``train.py bench-kernels``.

Runs the kernels through the Triton interpreter like ``tests/test_kernels.py`` (whose setup and helpers
this module reuses: importing it imports the kernels under the interpreter; the ``triton_interpreter``
marker sets ``TRITON_INTERPRET=1`` for each test only). Tiles are tiny
so loops, masked tails and several chunks per tensor occur on tensors of a few dozen elements.

Tolerances: the interpreter computes ``tl.dot`` exactly whatever the precision, so these tests check the
``ieee`` (exact fp32) semantics: every gradient tensor within ``RTOL_IEEE`` of its largest reference
entry (float32 rounding of a differently ordered computation; measured ~1e-7). ``tf32`` on a GPU needs
~2e-2 (``python bench/check_lo_step.py`` checks the compiled kernels with those).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels import HORIZON, LEARNED, TINY, assert_same_step, make_problem, needs_triton

import kernels
from kernels.lo_step_autograd import lo_step_autograd
from optimizers.learned import LearnedOptimizer, LOConfig

ROOT = Path(__file__).resolve().parents[1]
# masked tail lanes of the interpreted kernels compute 0/0 (never stored)
pytestmark = [pytest.mark.triton_interpreter,  # TRITON_INTERPRET=1 for each test (tests/conftest.py)
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
RTOL_IEEE = 2e-5
STATE_KEYS = ("m", "v", "row", "col")


def _leaves(theta, params, grads, state):
    """Fresh leaves (requires_grad) for every floating input; returns (dicts, flat name -> leaf)."""
    def rg(d):
        return {k: v.detach().clone().requires_grad_() for k, v in d.items()}

    th, p, g = rg(theta), rg(params), rg(grads)
    st = {**state, **{key: rg(state[key]) for key in STATE_KEYS}}  # step (and horizon) as they are
    flat = {**{("theta", k): v for k, v in th.items()}, **{("params", k): v for k, v in p.items()},
            **{("grads", k): v for k, v in g.items()},
            **{(key, k): v for key in STATE_KEYS for k, v in st[key].items()}}
    return (th, p, g, st), flat


def _weighted_loss(new_p, new_s, seed=5):
    """A loss touching every output (params and all state) with random weights."""
    gen = torch.Generator().manual_seed(seed)
    outs = list(new_p.values()) + [t for key in STATE_KEYS for t in new_s[key].values()]
    return sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in outs)


def _grads_of(theta, params, grads, state, cfg, backward, transform=None, **kw):
    (th, p, g, st), flat = _leaves(theta, params, grads, state)
    if transform is not None:
        p, g, st = transform(p, g, st)
    new_p, new_s = lo_step_autograd(p, g, st, th, cfg, forward="triton", backward=backward, **kw)
    got = torch.autograd.grad(_weighted_loss(new_p, new_s), list(flat.values()), allow_unused=True)
    return dict(zip(flat, got)), (new_p, new_s)


def assert_grads_close(got: dict, ref: dict, rtol: float = RTOL_IEEE):
    assert got.keys() == ref.keys()
    for name, b in ref.items():
        a = got[name]
        if b is None or not b.numel():
            assert a is None or not a.numel() or not a.any(), name
            continue
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN pattern differs"
        a, b = a.double().nan_to_num(), b.double().nan_to_num()
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= rtol * scale + 1e-30, f"{name}: max err {err:.3g} vs max |grad| {scale:.3g}"


# 0-d, 1-d odd, 2-d (a < b, a > b, size-1 dim, several chunks), 3-d non-adjacent largest dims, 4-d
BWD_SHAPES = {"scalar": (), "bias": (7,), "long": (37,), "w": (5, 7), "tall": (40, 3), "row1": (1, 9),
              "w3": (6, 2, 5), "conv": (3, 4, 5, 2)}


@needs_triton
@pytest.mark.parametrize("cfg", [
    LOConfig(hidden_width=16, output_init_scale=1.0),
    LOConfig(**{**LEARNED, "nominal": "adam"}, hidden_width=16),
    LOConfig(**LEARNED, features=("fac_mom", "momentum", "grad", "rsqrt_col", "row", "param"),
             momentum_decays=(0.5, 0.9), adafactor_decays=(0.99,), hidden_layers=1, hidden_width=16),
    LOConfig(**LEARNED, hidden_layers=3, hidden_width=16, rms_decay=0.95, time_taus=(10.0, 100.0),
             adafactor_decays=(0.9, 0.99)),
], ids=["default", "adam-2layers", "subset-1layer", "3layers"])
def test_triton_backward_equals_reference(cfg):
    """Every gradient (theta, params, grads incl. NaN / inf / clipped entries, m, v, row, col)."""
    theta, params, state, grads = make_problem(cfg, shapes=BWD_SHAPES, steps=1)
    g = grads()
    if cfg.nominal == "adam":  # finite gradients: NaN inputs give NaN input gradients (as autograd)
        g = {k: v.nan_to_num(0.5) for k, v in g.items()}
        g["bias"][1] = 2e3  # still clipped (zero gradient), but finite
    ref, out_ref = _grads_of(theta, params, g, state, cfg, "reference")
    got, out_got = _grads_of(theta, params, g, state, cfg, "triton", blocks=TINY)
    assert_same_step(tuple({k: v.detach() for k, v in d.items()} if i == 0 else d for i, d in enumerate(out_ref)),
                     tuple({k: v.detach() for k, v in d.items()} if i == 0 else d for i, d in enumerate(out_got)),
                     params)
    assert_grads_close(got, ref)
    assert got[("theta", "w0")].abs().sum() > 0 and got[("grads", "w")].abs().sum() > 0


@needs_triton
def test_triton_backward_noncontiguous_bf16_and_partial_outputs():
    """Non-contiguous params / grads / state, bf16 params and grads, and a loss on some outputs only
    (the other outputs' gradients are None)."""
    cfg = LOConfig(**LEARNED, hidden_width=16)
    shapes = {"w": (5, 7), "v": (11,), "c": (3, 4, 5, 2)}
    theta, params, state, grads = make_problem(cfg, shapes=shapes, steps=1)
    g = grads()

    def noncontig(p, gg, st):
        def nc(t):  # strided views that stay in the autograd graph
            if t.dim() >= 2 and min(t.shape[-2:]) > 1:
                out = t.mT.contiguous().mT  # transposed
            else:  # every other element of a buffer twice as long
                out = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
            assert t.dim() == 0 or not out.is_contiguous()
            return out

        return ({k: nc(v) for k, v in p.items()}, {k: nc(v) for k, v in gg.items()},
                {"step": st["step"], **{key: {k: nc(v) for k, v in st[key].items()} for key in STATE_KEYS}})

    ref, _ = _grads_of(theta, params, g, state, cfg, "reference", transform=noncontig)
    got, _ = _grads_of(theta, params, g, state, cfg, "triton", transform=noncontig, blocks=TINY)
    assert_grads_close(got, ref)

    # bf16 parameters and gradients (fp32 state): the kernels' fp32 sums vs the reference's bf16 casts
    pb = {k: v.to(torch.bfloat16) for k, v in params.items()}
    gb = {k: v.to(torch.bfloat16) for k, v in g.items()}
    ref, _ = _grads_of(theta, pb, gb, state, cfg, "reference")
    got, _ = _grads_of(theta, pb, gb, state, cfg, "triton", blocks=TINY)
    assert_grads_close(got, ref, rtol=1e-2)  # bf16 rounding of the returned input gradients

    # only the new params enter the loss; new state unused
    (th, p, gg, st), flat = _leaves(theta, params, g, state)
    new_p, _ = lo_step_autograd(p, gg, st, th, cfg, forward="triton", backward="triton", blocks=TINY)
    loss = sum((v ** 2).sum() for v in new_p.values())
    got = dict(zip(flat, torch.autograd.grad(loss, list(flat.values()), allow_unused=True)))
    (th, p, gg, st), flat = _leaves(theta, params, g, state)
    new_p, _ = lo_step_autograd(p, gg, st, th, cfg, forward="reference", backward="reference")
    loss = sum((v ** 2).sum() for v in new_p.values())
    ref = dict(zip(flat, torch.autograd.grad(loss, list(flat.values()), allow_unused=True)))
    assert_grads_close(got, ref)


@needs_triton
def test_triton_backward_edge_cases():
    """Tiny tensors, a zero-element tensor (identity), theta-only gradients, empty parameter lists,
    the dispatch of backward="auto" and the configurations the backward kernels refuse."""
    from kernels.lo_step_backward import lo_step_backward, unsupported_backward

    cfg = LOConfig(**{**LEARNED, "nominal": "adam"}, hidden_width=16)
    theta, params, state, grads = make_problem(cfg, shapes={"one": (1,), "s": (), "m": (1, 2)}, steps=1)
    params["empty"] = torch.zeros(0, 3)
    state["m"]["empty"], state["v"]["empty"] = torch.zeros(3, 0, 3), torch.zeros(0, 3)
    state["row"]["empty"], state["col"]["empty"] = torch.zeros(3, 0, 1), torch.zeros(3, 1, 3)
    g = {k: v.nan_to_num(0.3) for k, v in grads().items()}
    g["empty"] = torch.zeros(0, 3)
    ref, _ = _grads_of(theta, params, g, state, cfg, "reference")
    got, _ = _grads_of(theta, params, g, state, cfg, "triton", blocks=TINY)
    assert_grads_close(got, ref)
    # theta alone requires grad (the meta-gradient of a first truncation step)
    th = {k: v.clone().requires_grad_() for k, v in theta.items()}
    outs = {}
    for bwd in ("reference", "triton"):
        new_p, _ = lo_step_autograd(params, g, state, th, cfg, forward="triton", backward=bwd, blocks=TINY)
        outs[bwd] = torch.autograd.grad(sum(v.sum() for v in new_p.values()), list(th.values()))
    assert_grads_close(dict(enumerate(outs["triton"])), dict(enumerate(outs["reference"])))
    # empty parameter lists
    new_p, new_s = lo_step_autograd({}, {}, state, th, cfg, forward="triton")
    assert new_p == {} and float(new_s["step"]) == float(state["step"]) + 1
    d = lo_step_backward({}, {}, state, theta, cfg, {"row": {}, "col": {}}, {}, {})
    assert all(not v.any() for v in d["theta"].values())
    # refused configurations: more hidden layers than the backward kernel keeps -> reference backward
    deep = LOConfig(hidden_layers=4, hidden_width=16)
    assert "hidden_layers" in unsupported_backward(deep, params)
    assert unsupported_backward(cfg, params) is None
    with pytest.raises(ValueError, match="backward"):
        lo_step_autograd(params, g, state, theta, cfg, backward="fast")


# ---- truncated backprop through an unroll: kernel path == PyTorch path ----------------------------------
def _tbptt_theta_grad(lopt, theta, kernels_flag, steps=3):
    """A tiny regression model, ``steps`` LO steps with inner gradients from ``create_graph=True``
    autograd (as meta/unroll.py's truncated backprop), the loss after the last step, d/d theta."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen)
    y = torch.randn(12, 3, generator=gen)
    params = {"w": torch.randn(5, 3, generator=gen) * 0.3, "b": torch.zeros(3)}
    th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    opt = lopt.bind(th, kernels=kernels_flag, precision="ieee", total_steps=HORIZON)
    state = opt.init(params)

    def loss_fn(p):
        return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()

    for _ in range(steps):
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()}
        gr = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=True)
        params, state = opt.update(dict(zip(leaves, gr)), state, leaves)
    meta_loss = loss_fn(params)
    return meta_loss, dict(zip(th, torch.autograd.grad(meta_loss, list(th.values()))))


@needs_triton
def test_tbptt_unroll_kernel_path_equals_reference(monkeypatch):
    import kernels.lo_step_backward as klb
    import kernels.lo_step_triton as klt

    monkeypatch.delenv(kernels.ENV, raising=False)
    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = klt.lo_step, klb.lo_step_backward

    def fwd(*a, **kw):
        calls["fwd"] += 1
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):
        calls["bwd"] += 1
        return real_bwd(*a, **kw)

    monkeypatch.setattr(klt, "lo_step", fwd)
    monkeypatch.setattr(klb, "lo_step_backward", bwd)
    cfg = LOConfig(hidden_width=16, output_init_scale=0.3)
    lopt = LearnedOptimizer(cfg)
    theta = lopt.init_theta(2)
    theta["nominal_time_w"] = torch.linspace(-0.2, 0.2, cfg.num_time_features)
    theta["vector_log_lr"] = torch.tensor(0.3)
    ml_ref, g_ref = _tbptt_theta_grad(lopt, theta, False)
    assert calls == {"fwd": 0, "bwd": 0}
    bound = lopt.bind({k: v.requires_grad_() for k, v in theta.items()}, kernels=True, total_steps=HORIZON)
    p = {"w": torch.zeros(5, 3), "b": torch.zeros(3)}
    assert "autograd" in bound.kernel_reason(p, bound.init(p), p)  # the in-place torch.optim question
    assert bound.kernel_reason(p, bound.init(p), p, differentiable=True) is None  # update's question
    theta = {k: v.detach() for k, v in theta.items()}
    ml_k, g_k = _tbptt_theta_grad(lopt, theta, True)
    assert calls == {"fwd": 3, "bwd": 3}
    torch.testing.assert_close(ml_k, ml_ref, rtol=1e-5, atol=1e-7)
    assert_grads_close(g_k, g_ref, rtol=1e-4)  # 3 steps of rounding differences, amplified
    assert all(g_ref[k].abs().sum() > 0 for k in g_ref)
    # the kill switch beats kernels=True (torch.func: tests/test_kernels.py::test_dispatch_under_autograd_and_functorch)
    monkeypatch.setenv(kernels.ENV, "0")
    _tbptt_theta_grad(lopt, theta, True, steps=1)
    assert calls == {"fwd": 3, "bwd": 3}


# ---- population step ---------------------------------------------------------------------------------
def _stack(ds):
    return {k: torch.stack([d[k] for d in ds]) for k in ds[0]}


def _population(cfg, shapes, pop, shared_step=False):
    """P problems; member j runs for T = HORIZON + 7 j steps where the config sees t / T (a shared T
    with ``shared_step``)."""
    probs = [make_problem(cfg, shapes=shapes, seed=j, steps=1 + j % 2, horizon=HORIZON + (0 if shared_step else 7 * j))
             for j in range(pop)]
    thetas = _stack([p[0] for p in probs])
    params = _stack([p[1] for p in probs])
    steps = torch.stack([p[2]["step"] for p in probs])
    state = {"step": steps[0] if shared_step else steps,
             **{key: _stack([p[2][key] for p in probs]) for key in STATE_KEYS}}
    for key in ("horizon", "loss_stats"):
        if key in probs[0][2]:
            stacked = torch.stack([p[2][key] for p in probs])
            state[key] = stacked[0] if shared_step else stacked
    grads = _stack([p[3]() for p in probs])
    return thetas, params, state, grads


@needs_triton
@pytest.mark.parametrize("pop,shared_step", [(1, False), (3, False), (2, True)], ids=["P1", "P3", "P2-shared-step"])
def test_population_equals_per_member_reference(pop, shared_step):
    from kernels.lo_step_population import population_lo_step, population_lo_step_reference

    cfg = LOConfig(**{**LEARNED, "nominal": "adam"}, hidden_width=16)
    shapes = {"w": (5, 7), "b": (7,), "s": (), "c": (3, 4, 5, 2), "tall": (19, 3)}
    thetas, params, state, grads = _population(cfg, shapes, pop, shared_step)
    if pop > 1:  # antithetic pair: theta +- eps, so members differ only through their weights
        eps = {k: torch.randn(v[0].shape, generator=torch.Generator().manual_seed(9)) * 0.1
               for k, v in thetas.items()}
        thetas = {k: torch.stack([thetas[k][0] + (1 - 2 * (j % 2)) * eps[k] for j in range(pop)])
                  for k in thetas}
    ref = population_lo_step_reference(params, grads, state, thetas, cfg)
    got = population_lo_step(params, grads, state, thetas, cfg, blocks=TINY)
    assert_same_step(ref, got, params)
    for j in range(pop):  # and the reference is the single step of that member
        from kernels.lo_step_reference import lo_step_reference

        st = {"step": state["step"] if shared_step else state["step"][j],
              **{key: {k: v[j] for k, v in state[key].items()} for key in STATE_KEYS}}
        if "horizon" in state:
            st["horizon"] = state["horizon"] if shared_step else state["horizon"][j]
        one = lo_step_reference({k: v[j] for k, v in params.items()}, {k: v[j] for k, v in grads.items()}, st,
                                {k: v[j] for k, v in thetas.items()}, cfg)
        for k in params:
            torch.testing.assert_close(ref[0][k][j], one[0][k], rtol=0, atol=0)
    if pop > 1:  # different weights give different steps
        assert not torch.equal(got[0]["w"][0], got[0]["w"][1])


@needs_triton
def test_population_inplace_noncontiguous_and_errors():
    from kernels.lo_step_population import population_lo_step, population_lo_step_reference

    cfg = LOConfig(**LEARNED, hidden_layers=1, hidden_width=16)
    thetas, params, state, grads = _population(cfg, {"w": (4, 6), "b": (5,)}, 2)
    ref = population_lo_step_reference(params, grads, state, thetas, cfg)
    p_nc = {k: v.transpose(0, -1).contiguous().transpose(0, -1) for k, v in params.items()}
    assert not p_nc["w"].is_contiguous()
    s_in = {"step": state["step"].clone(), **{key: {k: v.clone() for k, v in state[key].items()} for key in STATE_KEYS}}
    got = population_lo_step(p_nc, grads, s_in, thetas, cfg, blocks=TINY, inplace=True)
    assert got[0]["w"] is p_nc["w"] and got[1]["m"]["w"] is s_in["m"]["w"]
    assert_same_step(ref, ({k: v.clone() for k, v in p_nc.items()}, got[1]), params)
    with pytest.raises(ValueError, match="population axis"):
        population_lo_step({"w": params["w"][:1]}, {"w": grads["w"][:1]}, state, thetas, cfg)
    new_p, new_s = population_lo_step({}, {}, state, thetas, cfg)
    assert new_p == {} and torch.equal(new_s["step"], state["step"] + 1)


# ---- train.py bench-kernels -------------------------------------------------------------------------------
def test_train_bench_kernels_help_and_no_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "train.py", "bench-kernels", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--population" in proc.stdout and "--backward" in proc.stdout and "exit" in proc.stdout.lower()
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the no-CUDA exit path is not reachable here")
    proc = subprocess.run([sys.executable, "train.py", "bench-kernels", "--sizes", "1e6"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA" in proc.stdout + proc.stderr and "nothing was measured" in (proc.stdout + proc.stderr)


@needs_triton
def test_bench_backward_and_population_code_paths(monkeypatch, tmp_path):
    """The GPU benchmark's backward and population rows, run on CPU through the interpreter with a
    wall-clock stand-in for CUDA events (only that the code runs and reports; no timing is meaningful)."""
    import time

    from bench import bench_lo_step as b

    def fake_time(fn, repeats, warmup):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return {"median_s": dt, "min_s": dt, "p90_s": dt, "repeats": 1}

    monkeypatch.setattr(b, "time_cuda", fake_time)
    monkeypatch.setattr(b, "_free", lambda device: None)
    args = b.parse_args(["--population", "2", "--population-sizes", "200", "--backward-sizes", "150",
                         "--precisions", "ieee", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    cfg = LOConfig(hidden_width=16)
    rb = b.bench_backward(150, args, cfg, torch.device("cpu"), 1e9)
    rp = b.bench_population(200, args, cfg, torch.device("cpu"), 1e9)
    assert set(rb["methods"]) == {"reference_autograd", "triton_autograd_ieee"}
    assert all("median_s" in m for m in rb["methods"].values()), rb["methods"]
    assert "triton_autograd_ieee_over_reference_autograd" in rb["speedups"]
    assert set(rp["methods"]) == {"triton_population_tf32", "triton_loop_tf32", "reference_loop"}
    assert all("steps_per_s" in m for m in rp["methods"].values()), rp["methods"]
    assert rp["members"] == 2 and "triton_population_tf32_over_triton_loop_tf32" in rp["speedups"]
    assert 9_000 < sum(math.prod(s) for s in b.population_shapes(10_000)) < 11_000
    if pytest.importorskip("matplotlib"):
        res = {"device": "cpu", "copy_bandwidth_GB_per_s": 1.0, "sizes": [], "backward": [rb], "population": [rp]}
        b.roofline_png(res, tmp_path / "roof.png", 495.0, 67.0)
        assert (tmp_path / "roof.png").stat().st_size > 1000


@needs_triton
def test_gpu_check_script_passes_every_case_through_the_interpreter():
    """``python bench/check_lo_step.py`` is what a GPU session runs first; its every case (forward in
    both precisions, non-contiguous, bf16; backward; population) runs here on small tensors with the
    default tiles the GPU uses, so a mistake in the script itself is not first found on a GPU. ``tf32``
    is exact in the interpreter, so this checks the script, not tf32's tolerance."""
    import json

    from bench import check_lo_step as chk
    from test_kernels import lt

    small = {"scalar": (), "bias": (7,), "odd": (37,), "w": (9, 13), "tall": (30, 5), "row1": (1, 7),
             "w3": (3, 2, 5), "conv": (4, 3, 3, 3), "big": (16, 24), "vec": (101,)}
    assert set(small) == set(chk.SHAPES)
    lines: list[str] = []
    failed = chk.run_all("cpu", shapes=small, lt=lt, out=lines.append, steps=1)  # 1 step per forward case: time
    records = [json.loads(line) for line in lines]
    assert [r["case"] for r in records[:5]] == ["backward"] * 2 + ["backward-legacy"] + ["population"] * 2
    assert {r["case"] for r in records[5:]} >= {"default", "default-bf16", "normalized", "width-no-time"}
    assert len(records) == 5 + 9 and failed == 0, records
    assert all(r["finite"] for r in records[:3]), records
    assert all(r["ok"] and "error" not in r for r in records), records
