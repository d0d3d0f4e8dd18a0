"""Fused learned-optimizer step: Triton kernels (CPU interpreter) == PyTorch reference == optimizers.

The Triton kernels run under Triton's interpreter (``tests/triton_interpreter.py``): the kernel modules
are imported with ``TRITON_INTERPRET=1`` set around that import only, and every test of this module
(and of ``tests/test_kernels_backward.py`` / ``tests/test_kernels_designs.py``, which reuse its setup)
carries the ``triton_interpreter`` marker, which sets the variable for the test's duration and restores
it afterwards; no other test of the run sees it. The CUDA checks of the compiled kernels,
``tests/test_kernels_cuda.py``, run in a subprocess.

Tile sizes are tiny so that chunk loops, masked tails, several chunks per tensor and several reduction
segments per line all occur on tensors of a few dozen elements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from triton_interpreter import load_kernels  # noqa: E402

_KERNELS, _SKIP, _LOAD_ERROR = load_kernels()
lt = _KERNELS.get("triton")  # kernels.lo_step_triton, interpreted (None when the kernel tests skip)
common = _KERNELS.get("common")  # kernels.lo_step_common

import kernels  # noqa: E402
from kernels.lo_step_reference import bytes_per_element, lo_step_reference  # noqa: E402
from optimizers.learned import LearnedOptimizer, LOConfig  # noqa: E402
from optimizers.tree import flatten  # noqa: E402

needs_triton = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
# TRITON_INTERPRET=1 for each test (tests/conftest.py); masked tail lanes of the interpreted kernels may
# compute 0/0 (never stored)
pytestmark = [pytest.mark.triton_interpreter,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture(autouse=True)
def _kernel_module_loaded(request):
    if request.node.get_closest_marker("skipif") and _LOAD_ERROR is not None:
        pytest.fail(f"the kernel modules failed to load under the interpreter: {_LOAD_ERROR!r}")


# tiny tiles so loops, masked tails and several chunks occur on a few dozen elements (None when skipped)
TINY = None if lt is None else lt.Blocks(block=16, chunk_iters=2, red_lines=4, red_len=4, red_seg=8,
                                         fin_block=4, fin_groups=2, fin_len=4, scale_rows=2, num_warps=1)

# 0-d, 1-d (odd, one chunk tail; several chunks), 2-d (a < b, a > b, a size-1 dim, several chunks
# and several reduction segments per line), 3-d with the largest dims not adjacent, 4-d
SHAPES = {
    "scalar": (), "bias": (7,), "long": (37,), "w": (5, 7), "tall": (40, 3), "row1": (1, 9),
    "w3": (6, 2, 5), "conv": (3, 4, 5, 2), "big": (9, 21),
}
# the original design (LOConfig's defaults before design / time_features / step_scale existed)
LEGACY = dict(design="additive", time_features="absolute", step_scale="none")
LEARNED = dict(**LEGACY, nominal="none", output_init_scale=1.0)  # the MLP term dominates the update
HORIZON = 20  # T of the fraction-of-training time features (time_features="fraction", the default)


def make_problem(cfg: LOConfig, shapes=SHAPES, seed=0, pdtype=torch.float32, steps=0, horizon=HORIZON):
    """theta, params, state after ``steps`` reference steps (non-zero accumulators), a grad maker.
    The state has ``horizon`` (``T``) where the config needs it; theta's schedule weights, the
    vectors' log lr and the normalized design's mix are randomised (they are constants at init)."""
    lo = LearnedOptimizer(cfg)
    theta = lo.init_theta(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    if "nominal_time_w" in theta:  # a learned nominal-lr schedule (zero at init)
        theta["nominal_time_w"] = torch.randn(theta["nominal_time_w"].shape, generator=gen) * 0.3
    if "vector_log_lr" in theta:  # step_scale="rms": vectors' step relative to the nominal lr (0 at init)
        theta["vector_log_lr"] = torch.randn((), generator=gen) * 0.5
    if "mix" in theta:  # design="normalized"
        theta["mix"] = theta["mix"] + torch.randn((), generator=gen).abs()

    def rand(shape, scale):
        return (torch.randn(shape, generator=gen) * scale).to(pdtype)

    params = {k: rand(s, 0.05) for k, s in shapes.items()}  # small: rounding of p << the step
    state = lo.bind(theta).init(params, total_steps=horizon if cfg.needs_total_steps else None)
    if "loss_stats" in state:  # loss_features="ema": a run that has seen losses (zeros would hide the features)
        state["loss_stats"] = torch.tensor([2.0 + seed, 0.4, 0.9, 1.5, 0.1 * seed], dtype=state["loss_stats"].dtype)

    def grads():
        out = {k: rand(s, 2.0) for k, s in shapes.items()}
        if "bias" in out:  # sanitising: NaN -> 0, +-inf and huge -> +-grad_clip
            out["bias"][0], out["bias"][1], out["bias"][2] = float("nan"), float("inf"), -3e3
        if "w" in out:
            out["w"][0, 0], out["w"][1, 2] = float("nan"), float("-inf")
        return out

    for _ in range(steps):
        params, state = lo_step_reference(params, grads(), state, theta, cfg)
    return theta, params, state, grads


def assert_same_step(ref, got, params, *, rtol=1e-5, ulps=1):
    """Updates agree to ``rtol`` of the tensor's largest update plus ``ulps`` units in the last place of
    the parameter dtype of ``p`` and of ``delta`` (the reference rounds ``delta`` to p's dtype, then
    ``p - delta``); the state agrees elementwise."""
    (p_ref, s_ref), (p_got, s_got) = ref, got
    assert p_ref.keys() == p_got.keys()
    for k in p_ref:
        assert p_got[k].shape == p_ref[k].shape and p_got[k].dtype == p_ref[k].dtype, k
        step = (p_ref[k].double() - params[k].double())
        tol = rtol * step.abs().amax().item() if step.numel() else 0.0
        tol = tol + ulps * torch.finfo(p_ref[k].dtype).eps * (p_ref[k].double().abs() + step.abs())
        err = (p_got[k].double() - p_ref[k].double()).abs()
        assert bool((err <= tol).all()), f"{k}: max err {err.amax().item():.3g} vs step {step.abs().amax():.3g}"
    f_ref, f_got = flatten(s_ref), flatten(s_got)
    assert f_ref.keys() == f_got.keys()
    for k in f_ref:
        torch.testing.assert_close(f_got[k], f_ref[k], rtol=1e-5, atol=1e-30, msg=k)


# ---- reference == optimizers.learned ---------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    LOConfig(),
    LOConfig(**LEGACY),
    LOConfig(**LEARNED),
    LOConfig(**LEARNED, features=("momentum", "grad", "fac_mom", "rsqrt_col", "row"),
             momentum_decays=(0.5, 0.9), adafactor_decays=(0.99,), hidden_layers=1, hidden_width=16),
], ids=["default", "legacy", "learned-term", "subset"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_equals_learned_optimizer(cfg, pdtype):
    theta, params, state, grads = make_problem(cfg, pdtype=pdtype)
    bound = LearnedOptimizer(cfg).bind(theta)
    for _ in range(3):
        g = grads()
        ref = lo_step_reference(params, g, state, theta, cfg)
        assert_same_step(bound.update(g, state, params), ref, params)
        params, state = ref


def test_reference_is_pure_and_handles_empty():
    cfg = LOConfig()
    theta, params, state, grads = make_problem(cfg, shapes={"w": (3, 4), "b": (4,)})
    before = {k: v.clone() for k, v in flatten({"p": params, "s": state}).items()}
    lo_step_reference(params, grads(), state, theta, cfg)
    for k, v in flatten({"p": params, "s": state}).items():
        assert torch.equal(v, before[k]), k
    new_p, new_s = lo_step_reference({}, {}, state, theta, cfg)
    assert new_p == {} and float(new_s["step"]) == float(state["step"]) + 1


# ---- Triton (interpreter) == reference --------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("cfg", [
    LOConfig(),
    LOConfig(**LEARNED),
    LOConfig(**LEARNED, features=("fac_mom", "momentum", "grad", "rsqrt_col", "row", "param"),
             momentum_decays=(0.5, 0.9), adafactor_decays=(0.99,), hidden_layers=1, hidden_width=16),
    LOConfig(**LEARNED, hidden_layers=3, rms_decay=0.95, time_taus=(10.0, 100.0)),
], ids=["default", "learned-term", "subset-1layer", "3layers"])
def test_kernel_equals_reference(cfg):
    theta, params, state, grads = make_problem(cfg, steps=1)
    for _ in range(2):
        g = grads()
        ref = lo_step_reference(params, g, state, theta, cfg)
        got = lt.lo_step(params, g, state, theta, cfg, blocks=TINY)
        assert_same_step(ref, got, params)
        params, state = ref


@needs_triton
def test_kernel_noncontiguous_inplace():
    """Transposed / strided parameters, gradients and state; in place and functional."""
    cfg = LOConfig(**LEARNED)
    shapes = {"w": (5, 7), "v": (11,), "c": (3, 4, 5, 2)}
    theta, params, state, grads = make_problem(cfg, shapes=shapes, steps=1)
    g = grads()
    ref = lo_step_reference(params, g, state, theta, cfg)

    def noncontig(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t.clone()
        if t.dim() == 1:  # every other element of a buffer twice as long
            buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
            out = buf[::2]
        else:  # a permuted copy
            out = t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
        out.copy_(t)
        assert not out.is_contiguous()
        return out

    p_nc = {k: noncontig(v) for k, v in params.items()}
    g_nc = {k: noncontig(v) for k, v in g.items()}
    s_nc = {"step": state["step"].clone(),
            **{key: {k: noncontig(v) for k, v in state[key].items()} for key in ("m", "v", "row", "col")}}
    snapshot = {k: v.clone() for k, v in flatten({"p": p_nc, "s": s_nc}).items()}
    got = lt.lo_step(p_nc, g_nc, s_nc, theta, cfg, blocks=TINY)  # functional: inputs untouched
    assert_same_step(ref, got, params)
    for k, v in flatten({"p": p_nc, "s": s_nc}).items():
        assert torch.equal(v, snapshot[k]), k
    got = lt.lo_step(p_nc, g_nc, s_nc, theta, cfg, blocks=TINY, inplace=True)
    assert_same_step(ref, got, params)
    for k in params:  # the caller's (non-contiguous) tensors now hold the new values
        assert got[0][k] is p_nc[k] and torch.equal(p_nc[k], got[0][k])
        assert got[1]["m"][k] is s_nc["m"][k]
    assert_same_step(ref, ({k: v.clone() for k, v in p_nc.items()}, got[1]), params)


@needs_triton
def test_kernel_bf16_params_and_grads():
    cfg = LOConfig(**LEARNED)
    shapes = {"w": (5, 7), "v": (11,), "s": ()}
    theta, params, state, grads = make_problem(cfg, shapes=shapes, pdtype=torch.bfloat16, steps=1)
    g = grads()
    ref = lo_step_reference(params, g, state, theta, cfg)
    got = lt.lo_step(params, g, state, theta, cfg, blocks=TINY)
    assert_same_step(ref, got, params, ulps=1)  # p - bf16(delta) may round the other way (1 bf16 ulp)


@needs_triton
def test_kernel_tf32_option_and_edge_cases():
    cfg = LOConfig()
    theta, params, state, grads = make_problem(cfg, shapes={"w": (4, 6), "b": (6,)}, steps=1)
    params["empty"] = torch.zeros(0, 3)  # skipped: unchanged, state unchanged
    state["m"]["empty"], state["v"]["empty"] = torch.zeros(3, 0, 3), torch.zeros(0, 3)
    state["row"]["empty"], state["col"]["empty"] = torch.zeros(3, 0, 1), torch.zeros(3, 1, 3)
    g = grads()
    g["empty"] = torch.zeros(0, 3)
    ref = lo_step_reference(params, g, state, theta, cfg)
    # the interpreter computes tl.dot exactly whatever the precision; on a GPU tf32 needs ~1e-3
    got = lt.lo_step(params, g, state, theta, cfg, blocks=TINY, precision="tf32")
    assert_same_step(ref, got, params, rtol=1e-3)
    assert got[0]["empty"].shape == (0, 3)
    new_p, new_s = lt.lo_step({}, {}, state, theta, cfg)
    assert new_p == {} and float(new_s["step"]) == float(state["step"]) + 1
    with pytest.raises(ValueError, match="precision"):
        lt.lo_step(params, g, state, theta, cfg, precision="bf16")
    with pytest.raises(NotImplementedError, match="decays"):
        lt.lo_step(params, g, state, theta, LOConfig(momentum_decays=(0.1, 0.5, 0.9, 0.99)))
    assert lt.unsupported(LOConfig(hidden_width=24), params) is not None


def test_feature_slots_follow_the_specification_table():
    """The kernels' canonical slots and ``LOConfig.num_inputs`` both come from ``group_channels``: every
    config's channels land on distinct slots of the 28, one per input channel, in the config's order."""
    from kernels.lo_step_reference import NUM_SLOTS, feature_slots
    from optimizers.lo_spec import FEATURE_GROUPS, ConfigError, group_channels

    assert NUM_SLOTS == sum(group_channels(g, 3, 3) for g in FEATURE_GROUPS) == 28
    full = feature_slots(LOConfig())
    assert full == list(range(NUM_SLOTS))  # the default: every group at 3 decays, slots in order
    for cfg in (LOConfig(momentum_decays=(0.9,), adafactor_decays=(0.5, 0.9)),
                LOConfig(features=("fac_mom", "grad", "row"), momentum_decays=(0.9, 0.99)),
                LOConfig(time_features="none", loss_features="ema")):
        slots = feature_slots(cfg)
        assert len(slots) == len(set(slots)) == cfg.num_element_features
        assert cfg.num_inputs == cfg.num_element_features + cfg.num_step_features
        assert all(0 <= s < NUM_SLOTS for s in slots)
    with pytest.raises(ConfigError, match="unknown feature group"):
        group_channels("momentun", 3, 3)


@needs_triton
def test_feature_tile_layout():
    """Column j of the joined tile is slot bitreverse5(j) (the host folds this into w0's rows)."""
    assert sorted(common.slot_column(s) for s in range(32)) == list(range(32))
    assert [common.slot_column(s) for s in (0, 1, 2, 3, 16)] == [0, 16, 8, 24, 1]


# ---- dispatch and benchmark script -------------------------------------------------------------------
def test_use_kernels_env(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.use_kernels("cpu") is False
    assert kernels.use_kernels(None) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # interpreted CUDA launches: never by default
    assert kernels.use_kernels("cuda") is False
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.use_kernels("cuda") is False  # no recorded passing GPU check for this machine's device
    monkeypatch.setenv(kernels.ENV, "0")
    assert kernels.use_kernels("cuda") is False
    monkeypatch.setenv(kernels.ENV, "1")
    assert kernels.use_kernels("cpu") is kernels.triton_available()
    monkeypatch.setenv(kernels.ENV, "maybe")
    with pytest.raises(ValueError):
        kernels.use_kernels("cpu")


def test_bench_script_parses_and_needs_cuda(tmp_path):
    from bench import bench_lo_step

    args = bench_lo_step.parse_args(["--sizes", "1e6,4e6", "--repeats", "5", "--out", str(tmp_path)])
    assert args.sizes == [1_000_000, 4_000_000] and args.repeats == 5
    assert bytes_per_element(LOConfig())["minimum"] == 44
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the no-CUDA exit path is not reachable here")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_lo_step.py"), "--sizes", "1e6"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CUDA" in proc.stderr


def test_bench_roofline_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import bench_lo_step

    m = {"median_s": 0.02, "TFLOP_per_s": 23.0, "bytes": 4.4e9}
    result = {"device": "test", "copy_bandwidth_GB_per_s": 3000.0,
              "sizes": [{"params": 1e8, "methods": {"triton_tf32": m, "adamw_fused": {**m, "TFLOP_per_s": 0.0},
                                                    "reference": {"skipped": "out of memory"}}}]}
    bench_lo_step.roofline_png(result, tmp_path / "roof.png", 495.0, 67.0)
    assert (tmp_path / "roof.png").stat().st_size > 1000


def _timing(ms: float, frac: float = 0.5) -> dict:
    return {"median_s": ms * 1e-3, "steps_per_s": 1e3 / ms, "GB_per_s": 1.0, "fraction_of_copy_bw": frac,
            "TFLOP_per_s": 0.1, "bytes": 4.4e9}


def test_bench_targets_table():
    """Each target's status follows from the timings, and a target with no measurement says so."""
    from bench import bench_lo_step as b

    fwd = {"params": 31_000_000, "methods": {
        "reference": _timing(100.0), "reference_compiled": _timing(9.0), "triton_ieee": _timing(2.0, 0.9),
        "triton_tf32": _timing(4.0, 0.72), "adamw_fused": _timing(1.0)}}
    small = {"params": 1_000_000, "methods": {"reference": _timing(1.0), "triton_tf32": _timing(1.0, 0.01)}}
    result = {"device": "test", "sizes": [small, fwd],
              "backward": [{"params": 100_000, "methods": {"reference_autograd": _timing(6.0),
                                                           "triton_autograd_tf32": _timing(1.0)}},
                           {"params": 1_000_000, "methods": {"reference_autograd": _timing(4.0),
                                                             "triton_autograd_tf32": _timing(1.0)}}],
              "population": [{"members": 32, "params_per_member": 10_000, "params": 320_000, "methods": {
                  "triton_population_tf32": _timing(1.0), "triton_loop_tf32": _timing(12.0)}},
                  {"members": 32, "params_per_member": 500_000, "params": 16_000_000, "methods": {
                      "triton_population_tf32": _timing(5.0, 0.68), "triton_loop_tf32": _timing(6.0)}}]}
    got = {t["target"].split(": ", 1)[-1]: t for t in b.targets(result)}
    status = {k: t["status"] for k, t in got.items()}
    # tf32 (the default) decides, not the faster ieee row; the 1M row is below the forward targets' size
    assert status["forward step >= 70% of the measured copy bandwidth"] == "met"
    assert got["forward step >= 70% of the measured copy bandwidth"]["measured"] == [("31M triton_tf32", "72.0%", True)]
    assert status["forward step >= 20x faster than the eager reference"] == "met"  # 25x
    assert status["forward step >= 2x faster than the compiled reference"] == "met"  # 2.25x
    assert status["forward step <= 3x the time of AdamW(fused=True)"] == "not met"  # 4x
    assert [t["status"] for t in b.targets(result) if "inner step" in t["target"]] == ["not met"]  # 6x, 4x
    loop, pbw = [t for t in b.targets(result) if t["target"].startswith("population")]
    assert loop["status"] == "met" and len(loop["measured"]) == 1  # only the small members count
    assert pbw["status"] == "met"  # 68% vs the forward kernel's 72% at 31M: within 5 points
    result["population"][1]["methods"]["triton_population_tf32"]["fraction_of_copy_bw"] = 0.5
    assert [t["status"] for t in b.targets(result)][-1] == "not met"
    empty = b.targets({"sizes": [small]})
    assert {t["status"] for t in empty} == {"unmeasured"} and len(empty) == 7
    md = b.markdown(result)
    assert "| >= 16M parameters: forward step <= 3x the time of AdamW(fused=True) | **not met** |" in md
    assert "| 31,000,000 | triton_tf32 | 4.000 |" in md


def test_bench_main_writes_json_table_and_plot_after_every_row(monkeypatch, tmp_path):
    """``main``'s bookkeeping on a pretend device (the timed functions are stubbed): every mode's rows
    land in the JSON and the Markdown table as they finish, so a run cut off by a time limit keeps them."""
    pytest.importorskip("matplotlib")
    from bench import bench_lo_step as b

    monkeypatch.setattr(b.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(b.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(b.torch.cuda, "get_device_name", lambda device=None: "Pretend GPU 80GB")
    monkeypatch.setattr(b, "copy_bandwidth", lambda device: 3e12)
    monkeypatch.setattr(b, "_free", lambda device: None)
    monkeypatch.setattr(b, "bench_size", lambda n, *a: {"params": n, "methods": {
        "reference": _timing(30.0), "triton_tf32": _timing(2.0, 0.8), "adamw_fused": _timing(1.0)}})  # 15x
    monkeypatch.setattr(b, "bench_backward", lambda n, *a: {"params": n, "methods": {
        "reference_autograd": _timing(10.0), "triton_autograd_tf32": _timing(1.0)}})
    seen = []

    def population(n, *a):
        saved = json.loads((tmp_path / "lo_step_pretend_gpu_80gb.json").read_text())
        seen.append(len(saved["backward"]))  # the backward rows were saved before this one started
        return {"members": 32, "params_per_member": n, "params": 32 * n, "methods": {
            "triton_population_tf32": _timing(1.0, 0.8), "triton_loop_tf32": _timing(20.0)}}

    monkeypatch.setattr(b, "bench_population", population)
    assert b.main(["--sizes", "2e7", "--backward-sizes", "1e5,1e6", "--no-check", "--out", str(tmp_path)]) == 0
    assert seen == [2, 2]
    result = json.loads((tmp_path / "lo_step_pretend_gpu_80gb.json").read_text())
    assert [r["params"] for r in result["sizes"]] == [20_000_000] and len(result["population"]) == 2
    md = (tmp_path / "lo_step_pretend_gpu_80gb.md").read_text()
    assert "| >= 16M parameters: forward step >= 20x faster than the eager reference | **not met** |" in md
    assert "| meta-training inner step (forward + backward) >= 5x the reference autograd path's throughput | " \
           "**met** |" in md
    assert (tmp_path / "lo_step_roofline_pretend_gpu_80gb.png").stat().st_size > 1000


@needs_triton
def test_kernels_compile_for_sm90():
    """The real compiler (no GPU needed) accepts every kernel variant the interpreter runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py"), "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no ahead-of-time compilation with this triton: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"


# ---- dispatch: optimizers.learned / optimizers.torch_optim -> kernels ---------------------------------
DISPATCH_SHAPES = {"w": (6, 5), "b": (5,), "s": (), "c": (2, 3, 4)}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the dispatcher's ``kernels.lo_step_triton.lo_step`` (interpreted in this process)."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    import kernels.lo_step_triton as klt

    calls = []
    real = klt.lo_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("inplace"))
        return real(*args, **kwargs)

    monkeypatch.setattr(klt, "lo_step", spy)
    return calls


@needs_triton
def test_dispatch_functional_update(kernel_calls):
    cfg = LOConfig(**{**LEARNED, "nominal": "adam"})
    theta, params, state, grads = make_problem(cfg, shapes=DISPATCH_SHAPES, steps=1)
    lo = LearnedOptimizer(cfg)
    on, off, auto = lo.bind(theta, kernels=True), lo.bind(theta, kernels=False), lo.bind(theta)
    assert auto.kernel_reason(grads(), state, params) is not None  # CPU: the auto path stays on PyTorch
    assert on.kernel_reason(grads(), state, params) is None
    snapshot = {k: v.clone() for k, v in flatten({"p": params, "s": state}).items()}
    for _ in range(2):
        g = grads()
        ref = off.update(g, state, params)
        assert not kernel_calls
        got = on.update(g, state, params)
        assert kernel_calls == [False]
        kernel_calls.clear()
        assert_same_step(ref, got, params)
        if not snapshot:
            continue
        for k, v in flatten({"p": params, "s": state}).items():  # functional: inputs untouched
            assert torch.equal(v, snapshot[k]), k
        snapshot = {}
        params, state = ref
    # unsupported configuration / dtype: PyTorch, silently
    lo24 = LearnedOptimizer(LOConfig(**LEGACY, hidden_width=24))
    assert "hidden_width" in lo24.bind(lo24.init_theta(0), kernels=True).kernel_reason(grads(), state, params)
    s64 = LearnedOptimizer(cfg).bind(theta).init({k: v.double() for k, v in params.items()}, total_steps=HORIZON)
    assert "fp32" in on.kernel_reason(grads(), s64, params)
    with pytest.raises(ValueError, match="precision"):
        lo.bind(theta, precision="bf16")


@needs_triton
def test_dispatch_under_autograd_and_functorch(kernel_calls, monkeypatch):
    """Plain autograd (truncated backprop) runs the differentiable kernel step; torch.func.grad and vmap
    stay on PyTorch (and give PyTorch's results)."""
    cfg = LOConfig(nominal="adam")
    theta, params, state, grads = make_problem(cfg, shapes={"w": (4, 3), "b": (3,)}, steps=1)
    g = grads()
    g["w"][0, 0], g["b"][1] = 0.3, -0.2  # finite
    lo = LearnedOptimizer(cfg)

    def meta_loss(th, kernels_flag):
        new_p, _ = lo.bind(th, kernels=kernels_flag).update(g, state, params)
        return sum((v ** 2).sum() for v in new_p.values())

    # plain autograd through theta: kernel forward + kernel backward (kernels.lo_step_autograd)
    th = {k: v.clone().requires_grad_() for k, v in theta.items()}
    on = torch.autograd.grad(meta_loss(th, True), list(th.values()))
    assert kernel_calls == [False]
    kernel_calls.clear()
    off = torch.autograd.grad(meta_loss(th, False), list(th.values()))
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # torch.func.grad
    fg = torch.func.grad(lambda t: meta_loss(t, True))(theta)
    fg_off = torch.func.grad(lambda t: meta_loss(t, False))(theta)
    for k in theta:
        torch.testing.assert_close(fg[k], fg_off[k], rtol=0, atol=0)
        assert fg[k].abs().sum() > 0 or k == "nominal_time_w"
    # vmap over a population of thetas (no autograd involved: grad mode off)
    pop = {k: torch.stack([v, v * 1.1]) for k, v in theta.items()}
    with torch.no_grad():
        vm = torch.func.vmap(lambda t: lo.bind(t, kernels=True).update(g, state, params)[0])(pop)
        for j in range(2):
            one = lo.bind({k: v[j] for k, v in pop.items()}, kernels=False).update(g, state, params)[0]
            for k in params:
                torch.testing.assert_close(vm[k][j], one[k])
    assert not kernel_calls
    # requires_grad parameters with grad mode on: not the plain (in-place) step, but the differentiable
    # one; under no_grad the plain kernels may run
    p_rg = {k: v.clone().requires_grad_() for k, v in params.items()}
    assert "autograd" in lo.bind(theta, kernels=True).kernel_reason(g, state, p_rg)
    assert lo.bind(theta, kernels=True).kernel_reason(g, state, p_rg, differentiable=True) is None
    with torch.no_grad():
        assert lo.bind(theta, kernels=True).kernel_reason(g, state, p_rg) is None
    monkeypatch.setenv(kernels.ENV, "0")  # the kill switch beats kernels=True
    assert kernels.ENV in lo.bind(theta, kernels=True).kernel_reason(g, state, params)


@needs_triton
@pytest.mark.parametrize("design", ["legacy", "default"])
def test_dispatch_torch_optim_trains_like_pytorch(kernel_calls, design):
    import copy

    from optimizers.torch_optim import LearnedOptimizerTorch

    if design == "legacy":
        cfg, extra = LOConfig(**{**LEARNED, "nominal": "adam", "output_init_scale": 0.1}), {}
    else:  # controller, fraction of training (T = total_steps), rms step scale
        cfg, extra = LOConfig(hidden_width=16, output_init_scale=0.1), {"total_steps": 8}
    theta = LearnedOptimizer(cfg).init_theta(3)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)

    def train(m, opt, steps):
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    m_ref, m_k = model(), model()
    o_ref = LearnedOptimizerTorch(m_ref.parameters(), lopt=cfg, theta=theta, kernels=False, **extra)
    o_k = LearnedOptimizerTorch(m_k.parameters(), lopt=cfg, theta=theta, kernels=True,
                                kernel_precision="ieee", **extra)
    l_ref, l_k = train(m_ref, o_ref, 3), train(m_k, o_k, 3)
    assert kernel_calls == [True] * 3  # in place, one bucket per step
    torch.testing.assert_close(torch.tensor(l_k), torch.tensor(l_ref), rtol=1e-5, atol=1e-7)
    for a, b in zip(m_k.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(o_k.state.values(), o_ref.state.values()):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-30)
    # state_dict round trip: a restored kernel optimizer continues like the original
    sd = copy.deepcopy(o_k.state_dict())  # torch's state_dict aliases the live state
    saved = {k: v.clone() for k, v in flatten({str(i): s for i, s in sd["state"].items()}).items()}
    m_2 = model()
    m_2.load_state_dict(m_k.state_dict())
    o_2 = LearnedOptimizerTorch(m_2.parameters(), lopt=cfg, theta=theta, kernels=True, kernel_precision="ieee",
                                **extra)
    o_2.load_state_dict(sd)
    l_2 = train(m_2, o_2, 2)
    for k, v in flatten({str(i): s for i, s in sd["state"].items()}).items():
        assert torch.equal(v, saved[k]), k  # the fused in-place step never wrote into the loaded dict
    assert l_2 == train(m_k, o_k, 2)
    for a, b in zip(m_2.parameters(), m_k.parameters()):
        assert torch.equal(a, b)
    assert o_2.global_step == o_k.global_step == 5
    # lr != 1: the functional kernel step (not in place) plus the group arithmetic
    kernel_calls.clear()
    for g in o_k.param_groups:
        g["lr"] = 0.5
    train(m_k, o_k, 1)
    assert kernel_calls == [False]


# ---- differentiable step (kernels.lo_step_autograd: reference backward) ---------------------------------
# the default design (controller, fraction-of-training time features), small; the step scale "width"
# (a constant per matrix, exp(vector_log_lr) for vectors): the default "rms" scale is a function of p
# that deliberately passes no gradient to p, which finite differences would see
AUTOGRAD_CFG = {"nominal": "adam", "output_init_scale": 1.0, "hidden_width": 16, "hidden_layers": 1,
                "time_fractions": (0.1, 0.5, 0.9), "step_scale": "width", "width_ref": 2, "scale_power": 0.7}


def _autograd_problem(dtype):
    cfg = LOConfig(**AUTOGRAD_CFG)
    theta, params, state, grads = make_problem(cfg, shapes={"w": (3, 4), "b": (3,), "s": ()}, steps=1)
    # smooth: no NaN / clip kinks, and no g == 0 (v == 0: safe_sqrt's derivative there is a convention)
    g = {k: v.clamp(-5, 5).nan_to_num(0.7) for k, v in grads().items()}
    cast = lambda d: {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
    state = {"step": state["step"], "horizon": state["horizon"],
             **{key: cast(state[key]) for key in ("m", "v", "row", "col")}}
    return cfg, cast(theta), cast(params), state, cast(g)


def test_lo_step_autograd_reference_backward_gradcheck():
    """Finite differences (float64) of the reference backward: theta, params, grads and state."""
    from kernels.lo_step_autograd import lo_step_autograd

    cfg, theta, params, state, g = _autograd_problem(torch.float64)
    names = ([("theta", k) for k in theta] + [("params", k) for k in params] + [("grads", k) for k in g]
             + [(key, k) for key in ("m", "v", "row", "col") for k in state[key]])
    pools = {"theta": theta, "params": params, "grads": g, **{key: state[key] for key in ("m", "v", "row", "col")}}

    def fn(*leaves):
        d = {n: {**pools[n]} for n in pools}
        for (where, k), t in zip(names, leaves):
            d[where][k] = t
        st = {"step": state["step"], "horizon": state["horizon"], **{key: d[key] for key in ("m", "v", "row", "col")}}
        new_p, new_s = lo_step_autograd(d["params"], d["grads"], st, d["theta"], cfg)
        return (*new_p.values(), *(t for key in ("m", "v", "row", "col") for t in new_s[key].values()))

    leaves = [pools[w][k].detach().clone().requires_grad_() for w, k in names]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@needs_triton
def test_lo_step_autograd_triton_forward_matches_plain_autograd():
    from kernels.lo_step_autograd import lo_step_autograd

    cfg, theta, params, state, g = _autograd_problem(torch.float32)
    lo = LearnedOptimizer(cfg)

    def run(fn):
        th = {k: v.clone().requires_grad_() for k, v in theta.items()}
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        gg = {k: v.clone().requires_grad_() for k, v in g.items()}
        m = {k: v.clone().requires_grad_() for k, v in state["m"].items()}
        st = {**state, "m": m}
        new_p, new_s = fn(th, p, gg, st)
        loss = sum((v * (i + 1)).sum() for i, v in enumerate(new_p.values())) + sum(
            (t ** 2).sum() for t in new_s["m"].values())
        leaves = [*th.values(), *p.values(), *gg.values(), *m.values()]
        return (new_p, new_s), torch.autograd.grad(loss, leaves, allow_unused=True)

    ref, g_ref = run(lambda th, p, gg, st: lo.bind(th).update(gg, st, p))
    got, g_got = run(lambda th, p, gg, st: lo_step_autograd(p, gg, st, th, cfg, forward="triton"))
    assert_same_step(tuple({k: v.detach() for k, v in d.items()} if i == 0 else d for i, d in enumerate(ref)),
                     tuple({k: v.detach() for k, v in d.items()} if i == 0 else d for i, d in enumerate(got)),
                     params)
    for a, b in zip(g_got, g_ref):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_automatic_dispatch_trusts_only_recorded_gpu_checks(monkeypatch, tmp_path):
    """On CUDA the kernels are used by default only for a device class with a recorded passing check;
    the reason is said in one line; OUROBOROS_KERNELS=1 still forces them."""
    import json as _json

    import kernels as K
    from bench.check_lo_step import record_pass

    monkeypatch.delenv(K.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(K, "triton_available", lambda: True)
    monkeypatch.setattr(K, "triton_interpreted", lambda: False)  # a compiled triton, as on a GPU machine
    monkeypatch.setattr(K.torch.cuda, "get_device_name", lambda device=None: "Pretend GPU 80GB")
    record = tmp_path / "gpu_checks.json"
    monkeypatch.setattr(K, "GPU_CHECKS", record)
    use, why = K.kernel_decision("cuda:0")
    assert not use and "no recorded passing GPU check for 'Pretend GPU 80GB'" in why
    assert "PyTorch" in K.describe_step_path("cuda:0")
    record_pass(record, "Pretend GPU 80GB")
    K._read_checks.cache_clear()
    assert _json.loads(record.read_text())["devices"]["Pretend GPU 80GB"]["passed"] is True
    use, why = K.kernel_decision("cuda:0")
    assert use and "passed the GPU check" in why
    assert not K.kernel_decision("cpu")[0]
    monkeypatch.setattr(K.torch.cuda, "get_device_name", lambda device=None: "Another GPU")
    assert not K.kernel_decision("cuda:0")[0]
    monkeypatch.setenv(K.ENV, "1")
    assert K.kernel_decision("cuda:0")[0]
