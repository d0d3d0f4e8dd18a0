"""The learned optimizer's no-grad step with reused buffers (``optimizers.workspace``): the same floats
as the allocating step (``reuse_buffers=False``), outputs that never alias the buffers, correct across
parameter dicts and dtypes, unused under autograd, and (glibc) far fewer page faults per step."""

from __future__ import annotations

import ctypes.util
import json
import pickle
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimizers.learned as learned
from optimizers.learned import CHUNK_ELEMENTS, LearnedOptimizer, LOConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def reuse_for_every_group(monkeypatch):
    """Every group takes the buffer-reusing step (by default small groups allocate), so the tests
    cover groups of many small tensors too."""
    monkeypatch.setattr(learned, "REUSE_MIN_ELEMENTS", 0)

CONFIGS = {
    "controller": LOConfig(),
    "normalized": LOConfig(design="normalized"),
    "additive": LOConfig(design="additive", time_features="absolute", step_scale="none"),
    "additive_no_nominal": LOConfig(design="additive", time_features="none", step_scale="none", nominal="none"),
    "loss_ema_rms_scale": LOConfig(loss_features="ema", step_scale="rms"),
    "few_features": LOConfig(features=("grad", "momentum", "rsqrt_rms", "fac_grad", "rsqrt_col", "fac_mom"),
                             momentum_decays=(0.5, 0.9), adafactor_decays=(0.99,), hidden_layers=1,
                             hidden_width=8),
}


def _theta(lo: LearnedOptimizer, seed: int = 0) -> dict:
    """Weights large enough that the MLP's output matters in every op of the step."""
    gen = torch.Generator().manual_seed(seed)
    return {k: t + 0.3 * torch.randn(t.shape, generator=gen) for k, t in lo.init_theta(seed).items()}


def _params(kind: str, dtype=torch.float32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    if kind == "small":  # many small tensors in one group: 0-dim, 1-element, empty, 3-D, mixed dtypes
        return {"w": r(7, 5), "b": r(5), "s": r(()), "one": r(1), "e": r(0, 3), "c": r(2, 3, 4),
                "d": r(4, 6, dt=torch.float64), "u": r(1, 9)}
    if kind == "large":  # one tensor over CHUNK_ELEMENTS (its own group) among smaller groups
        return {"a": r(CHUNK_ELEMENTS // 2 + 3), "big": r(300, 300) * 0.02, "tail": r(40, 17), "v": r(11)}
    raise ValueError(kind)


def _grads(params: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, p in params.items():
        g = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
        if g.numel() > 3:
            g.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=p.dtype)
        out[k] = g
    if "w" in out:  # a non-contiguous gradient
        out["w"] = out["w"].t().contiguous().t()
    return out


def _pair(cfg: LOConfig, total_steps: int = 20):
    lo = LearnedOptimizer(cfg)
    theta = _theta(lo)
    return (lo.bind(theta, kernels=False, total_steps=total_steps),
            lo.bind(theta, kernels=False, total_steps=total_steps, reuse_buffers=False))


def _flat_state(state: dict) -> dict:
    out = {}
    for key, val in state.items():
        if isinstance(val, dict):
            out.update({f"{key}/{k}": t for k, t in val.items()})
        else:
            out[key] = val
    return out


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaNs included: an empty tensor's Adafactor column mean is NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype])) if a.dtype in _BITS else torch.equal(a, b)


def _assert_same(a: tuple, b: tuple) -> None:
    (pa, sa), (pb, sb) = a, b
    fa, fb = _flat_state(sa), _flat_state(sb)
    assert pa.keys() == pb.keys() and fa.keys() == fb.keys()
    for k in pa:
        assert _bitwise_equal(pa[k], pb[k]), k
    for k in fa:
        assert _bitwise_equal(fa[k], fb[k]), k


def _run(opt, params: dict, steps: int, loss: bool = False) -> list:
    state = opt.init(params)
    out = []
    for i in range(steps):
        with torch.no_grad():
            params, state = opt.update(_grads(params, i), state, params,
                                       loss=torch.tensor(2.0 / (i + 1)) if loss else None)
        out.append(({k: t.clone() for k, t in params.items()}, {k: t.clone() for k, t in _flat_state(state).items()}))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["small", "large"])
def test_reused_buffers_give_the_same_floats(name, kind):
    reuse, alloc = _pair(CONFIGS[name])
    for dtype in (torch.float32, torch.float64):
        params = _params(kind, dtype)
        got, want = _run(reuse, params, 3, loss=True), _run(alloc, params, 3, loss=True)
        for (pa, sa), (pb, sb) in zip(got, want):
            assert pa.keys() == pb.keys() and sa.keys() == sb.keys()
            for k in pa:
                assert _bitwise_equal(pa[k], pb[k]), (name, kind, dtype, k)
            for k in sa:
                assert _bitwise_equal(sa[k], sb[k]), (name, kind, dtype, k)
    assert reuse._workspace.nbytes() > 0 and alloc._workspace.nbytes() == 0


def test_outputs_never_alias_the_buffers_or_each_other_across_steps():
    reuse, _ = _pair(CONFIGS["controller"])
    params = _params("large")
    grads = _grads(params, 0)
    inputs = {k: t.clone() for k, t in params.items()}
    state0 = reuse.init(params)
    with torch.no_grad():
        p1, s1 = reuse.update(grads, state0, params)
    kept = ({k: t.clone() for k, t in p1.items()}, {k: t.clone() for k, t in _flat_state(s1).items()})
    with torch.no_grad():
        p2, s2 = reuse.update(_grads(p1, 1), s1, p1)
        reuse.update(_grads(params, 2), reuse.init(params), params)  # a third step, other inputs
    for k in p1:
        assert torch.equal(p1[k], kept[0][k]), k
        assert torch.equal(params[k], inputs[k]), k  # inputs untouched
    for k, t in _flat_state(s1).items():
        assert torch.equal(t, kept[1][k]), k
    buffers = [b for slots in reuse._workspace._slots.values() for b in slots.values()]
    spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers]
    for t in [*p1.values(), *p2.values(), *_flat_state(s1).values(), *_flat_state(s2).values()]:
        if t.numel():
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            assert all(hi <= a or lo >= b for a, b in spans)


def test_alternating_parameter_dicts_and_dtypes():
    reuse, alloc = _pair(CONFIGS["controller"])
    dicts = [_params("large"), _params("small", seed=1), _params("small", torch.float64, seed=2),
             _params("large", torch.float64, seed=3)]
    states = {"r": [reuse.init(p) for p in dicts], "a": [alloc.init(p) for p in dicts]}
    cur = {"r": list(dicts), "a": list(dicts)}
    for rnd in range(2):
        for i in range(len(dicts)):
            grads = _grads(dicts[i], 10 * rnd + i)
            with torch.no_grad():
                got = reuse.update(grads, states["r"][i], cur["r"][i])
                want = alloc.update(grads, states["a"][i], cur["a"][i])
            _assert_same(got, want)
            (cur["r"][i], states["r"][i]), (cur["a"][i], states["a"][i]) = got, want
    assert len(reuse._workspace._slots) <= reuse._workspace.max_keys


def test_autograd_and_func_transforms_take_the_allocating_step():
    reuse, alloc = _pair(CONFIGS["controller"])
    params = _params("small")
    grads = _grads(params, 0)
    theta = {k: t.clone().requires_grad_(True) for k, t in reuse.theta.items()}
    reuse.theta = theta
    new, _ = reuse.update(grads, reuse.init(params), params)  # grad mode on, theta requires grad
    loss = sum(t.sum() for t in new.values())
    loss.backward()
    assert theta["w0"].grad is not None and reuse._workspace.nbytes() == 0
    with torch.no_grad():  # a tensor requiring grad under no_grad is fine: no graph is recorded
        _assert_same(reuse.update(grads, reuse.init(params), params), alloc.update(grads, alloc.init(params), params))


def test_inference_mode_then_no_grad():
    reuse, alloc = _pair(CONFIGS["controller"])
    params = _params("small")
    grads = _grads(params, 0)
    with torch.inference_mode():
        got = reuse.update(grads, reuse.init(params), params)
    with torch.no_grad():
        _assert_same(reuse.update(grads, reuse.init(params), params), alloc.update(grads, alloc.init(params), params))
        want = alloc.update(grads, alloc.init(params), params)
    _assert_same(got, want)


def test_pickled_without_buffers():
    reuse, _ = _pair(CONFIGS["controller"])
    params = _params("large")
    with torch.no_grad():
        reuse.update(_grads(params, 0), reuse.init(params), params)
    assert reuse._workspace.nbytes() > 4 * CHUNK_ELEMENTS
    copy = pickle.loads(pickle.dumps(reuse))
    assert copy._workspace.nbytes() == 0 and copy.reuse_buffers
    assert len(pickle.dumps(reuse)) < reuse._workspace.nbytes() / 4
    assert reuse.with_total_steps(7).reuse_buffers and not _pair(LOConfig())[1].with_total_steps(7).reuse_buffers


def test_small_groups_allocate_by_default(monkeypatch):
    monkeypatch.setattr(learned, "REUSE_MIN_ELEMENTS", 4096)
    reuse, alloc = _pair(CONFIGS["controller"])
    small = _params("small")
    with torch.no_grad():
        _assert_same(reuse.update(_grads(small, 0), reuse.init(small), small),
                     alloc.update(_grads(small, 0), alloc.init(small), small))
        assert reuse._workspace.nbytes() == 0
        large = _params("large")
        _assert_same(reuse.update(_grads(large, 0), reuse.init(large), large),
                     alloc.update(_grads(large, 0), alloc.init(large), large))
    assert reuse._workspace.nbytes() > 0


PROBE = r"""
import json, resource, sys
import torch
from optimizers.learned import LearnedOptimizer
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
params = {f"w{i}": torch.randn(256, 256, generator=g) * 0.02 for i in range(8)}
grads = {k: torch.randn(p.shape, generator=g) * 1e-2 for k, p in params.items()}
lo = LearnedOptimizer()
opt = lo.bind(lo.init_theta(0), kernels=False, reuse_buffers=sys.argv[1] == "reuse")
state = opt.init(params, total_steps=100)
def step():
    global params, state
    with torch.no_grad():
        params, state = opt.update(grads, state, params)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> int:
    # glibc's starting mmap threshold, made fixed: with its dynamic threshold whether freed buffers are
    # unmapped depends on the heap's layout (about 1 process in 5 kept them), so the probe would not
    # always see the faults this test is about
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
                         and ctypes.util.find_library("c")), reason="glibc only")
def test_reused_buffers_fault_far_fewer_pages_with_default_malloc():
    alloc, reuse = _faults("alloc"), _faults("reuse")
    assert alloc > 10_000, alloc  # the allocating step faults its temporaries in every step
    # what is left is the step's outputs (new parameters and accumulators: 5 floats per element)
    assert reuse < alloc / 5, (alloc, reuse)
