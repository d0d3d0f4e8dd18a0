"""Benchmark of one learned-optimizer step on a CUDA device.

Compares, for transformer-like parameter sets of 1M .. 1B elements (as many as fit in memory):

* ``reference``         :func:`kernels.lo_step_reference.lo_step_reference`, eager PyTorch
* ``reference_compiled`` the same under ``torch.compile``
* ``triton_<precision>`` :func:`kernels.lo_step_triton.lo_step` (in place), per ``tl.dot`` precision
* ``adamw_fused``        ``torch.optim.AdamW(fused=True)``: the floor a learned step is measured against

Two more groups (``--modes``):

* ``backward``: one *meta-training inner step*, forward + backward of the step w.r.t. theta and every
  input (what truncated backprop runs per LO step), at ``--backward-sizes``:
  ``reference_autograd`` (the PyTorch reference differentiated by autograd) against
  ``triton_autograd_<precision>`` (:func:`kernels.lo_step_autograd.lo_step_autograd`: Triton forward +
  Triton backward); reported as inner steps per second, GB/s of the bytes forward + backward must move
  (forward 44 B/element plus backward: read g, p, m, v and the output gradients, write the input
  gradients: 68 B/element) and MLP TFLOP/s (3x the forward FLOPs).
* ``population``: P members (``--population``, default 32) under P different weight sets:
  ``triton_population`` (:func:`kernels.lo_step_population.population_lo_step`, one set of launches)
  against ``triton_loop`` (a Python loop of P single :func:`kernels.lo_step_triton.lo_step` calls) and the
  eager ``reference_loop``, at ``--population-sizes`` parameters per member (default 1e4, and 5e5 so
  that the population totals >= 16M parameters).

Each timing is the median over ``--repeats`` steps (CUDA events, after ``--warmup`` steps). Throughput is
reported as GB/s of the bytes the step must move (read g, p, momenta, rms; write p, momenta, rms:
44 B/element for fp32; AdamW: 28 B/element) and as a fraction of the measured device-to-device copy
bandwidth; ``kernel_bytes`` is what the two-pass Triton design actually moves. Speed-ups compare every
Triton method with every non-Triton one of the same row (and population one launch vs the loop).
Results go to ``<out>/lo_step_<device>.json``, a roofline plot ``<out>/lo_step_roofline_<device>.png``
and ``<out>/lo_step_<device>.md``: the kernels' performance targets, each *met* / *not met* / *unmeasured*
with the numbers behind it (:func:`targets`; the default ``tf32`` precision decides), then every row.

    python bench/bench_lo_step.py --sizes 1e6,1e7,1e8,1e9 --repeats 50
    python train.py bench-kernels --modes backward,population       # the same script

Needs a CUDA device: without one it prints a message and measures nothing (exit status 2 from
``python bench/bench_lo_step.py``, 0 from ``python train.py bench-kernels``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.lo_step_reference import bytes_per_element, lo_step_reference  # noqa: E402
from optimizers.learned import LearnedOptimizer, LOConfig  # noqa: E402

METHODS = ("reference", "reference_compiled", "triton", "adamw_fused")
MODES = ("forward", "backward", "population")


def _count(text: str) -> int:
    return int(float(text))


def parse_args(argv: list[str] | None = None, prog: str = "python bench/bench_lo_step.py",
               no_cuda_status: int = 2) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Exit status: 0 when the benchmark ran; {no_cuda_status} without a CUDA device (a message "
               f"is printed and nothing is measured); 2 on bad arguments.")
    ap.add_argument("--modes", default=",".join(MODES), type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    help=f"which groups to run, a subset of {','.join(MODES)}")
    ap.add_argument("--sizes", default="1e6,1e7,3e7,1e8,1e9",
                    type=lambda s: [_count(x) for x in s.split(",") if x.strip()],
                    help="parameter counts (comma separated, 1e6 notation); sizes that do not fit are skipped")
    ap.add_argument("--methods", default=",".join(METHODS), type=lambda s: [x.strip() for x in s.split(",")],
                    help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--precisions", default="ieee,tf32", type=lambda s: [x.strip() for x in s.split(",")],
                    help="tl.dot input precisions for the Triton step (ieee, tf32, tf32x3)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="parameter/gradient dtype")
    ap.add_argument("--repeats", type=int, default=50, help="timed steps per method and size (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--ref-max", type=_count, default=int(5e7),
                    help="largest size for the eager / compiled reference (temporaries ~0.6 kB/element)")
    ap.add_argument("--block", type=int, default=64, help="Triton elements per MLP tile")
    ap.add_argument("--chunk-iters", type=int, default=8, help="Triton element blocks per program")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--tune", action="store_true",
                    help="first sweep Triton tile configs (block x warps x chunk x reload) at --tune-size, "
                         "then use the fastest for every size")
    ap.add_argument("--tune-size", type=_count, default=int(1e8))
    ap.add_argument("--tune-precision", default="tf32")
    ap.add_argument("--peak-tflops", type=float, default=495.0,
                    help="tensor-core (TF32) compute roof for the plot, TFLOP/s (default: nominal H100 SXM dense)")
    ap.add_argument("--peak-fp32-tflops", type=float, default=67.0,
                    help="CUDA-core FP32 roof for the plot (ieee tl.dot), TFLOP/s (default: nominal H100 SXM)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare the Triton step with the reference at the smallest size first")
    ap.add_argument("--backward-sizes", default="1e5,1e6,1e7",
                    type=lambda s: [_count(x) for x in s.split(",") if x.strip()],
                    help="parameter counts for the backward (meta-training inner step) benchmark")
    ap.add_argument("--backward-ref-max", type=_count, default=int(2e7),
                    help="largest size for the autograd reference (its graph holds ~2 kB/element)")
    ap.add_argument("--population", type=int, default=32, help="members P of the population benchmark")
    ap.add_argument("--population-sizes", default="1e4,5e5",
                    type=lambda s: [_count(x) for x in s.split(",") if x.strip()],
                    help="parameters per member for the population benchmark")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="output folder (JSON + PNG)")
    args = ap.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    if args.population < 1:
        ap.error("--population must be >= 1")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


# ---- problem -------------------------------------------------------------------------------------------
def transformer_shapes(n_target: int) -> list[tuple[int, ...]]:
    """Shapes of a GPT-like stack with about ``n_target`` parameters (matrices, biases, norms)."""
    d = 256 if n_target <= 4e6 else 512 if n_target <= 4e7 else 1024 if n_target <= 3e8 else 2048
    block = [(d, 3 * d), (3 * d,), (d, d), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,), (d,), (d,), (d,), (d,)]
    per = sum(math.prod(s) for s in block)
    n_blocks = max(1, round(n_target / per))
    return [s for _ in range(n_blocks) for s in block]


BENCH_HORIZON = 1000  # T for configs with fraction-of-training time features (the default)


def make_problem(shapes, dtype, device, cfg: LOConfig, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = {f"t{i}": (torch.randn(s, generator=gen, device=device) * 0.02).to(dtype) for i, s in enumerate(shapes)}
    grads = {k: (torch.randn(p.shape, generator=gen, device=device) * 1e-2).to(dtype) for k, p in params.items()}
    lo = LearnedOptimizer(cfg)
    theta = {k: v.to(device) for k, v in lo.init_theta(seed).items()}
    state = lo.bind(theta).init(params, total_steps=BENCH_HORIZON if cfg.needs_total_steps else None)
    return params, grads, state, theta


# ---- timing --------------------------------------------------------------------------------------------
def time_cuda(fn, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "p90_s": sorted(times)[int(0.9 * (len(times) - 1))], "repeats": repeats}


def copy_bandwidth(device, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    free = torch.cuda.mem_get_info(device)[0]
    nbytes = int(min(nbytes, free // 4))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), repeats, 3)["median_s"]
    del src, dst
    return 2 * nbytes / t


def _free(device):
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def bench_size(n_target: int, args, cfg: LOConfig, device, copy_bw: float, lt) -> dict:
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    shapes = transformer_shapes(n_target)
    n = sum(math.prod(s) for s in shapes)
    pbytes = torch.finfo(dtype).bits // 8
    bpe = bytes_per_element(cfg, pbytes, pbytes)
    row: dict = {"target": n_target, "params": n, "tensors": len(shapes), "methods": {},
                 "triton_blocks": None}
    try:
        params, grads, state, theta = make_problem(shapes, dtype, device, cfg)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory allocating parameters, gradients and state"
        _free(device)
        return row
    lo = LearnedOptimizer(cfg)
    flops = lo.flops_per_element() * n
    blocks = None
    if lt is not None:
        blocks = lt.Blocks(block=args.block, chunk_iters=args.chunk_iters, num_warps=args.num_warps,
                           reload_vectors=getattr(args, "reload_vectors", True))
        row["triton_blocks"] = dataclasses.asdict(blocks)

    row["_bw"] = copy_bw

    def record(name, fn, moved_bytes, ref_bytes=None):
        mlp_flops = 0 if name.startswith("adamw") else flops  # AdamW runs no MLP
        _measure(row, name, fn, args, n, moved_bytes, mlp_flops, device)
        m = row["methods"][name]
        if ref_bytes is not None and "median_s" in m:  # kernel bytes: what the two-pass design moves
            m["kernel_bytes"] = ref_bytes
            m["kernel_GB_per_s"] = ref_bytes / m["median_s"] / 1e9

    must = bpe["minimum"] * n
    if "reference" in args.methods and n <= args.ref_max:
        record("reference", lambda: lo_step_reference(params, grads, state, theta, cfg), must)
        _free(device)
    if "reference_compiled" in args.methods and n <= args.ref_max:
        compiled = torch.compile(lo_step_reference, dynamic=False)
        t0 = time.perf_counter()
        try:
            compiled(params, grads, state, theta, cfg)
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t0
            record("reference_compiled", lambda: compiled(params, grads, state, theta, cfg), must)
        except Exception as e:
            row["methods"]["reference_compiled"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        del compiled
        torch._dynamo.reset()
        _free(device)
    if "triton" in args.methods and lt is not None:
        n_fac = sum(math.prod(s) for s in shapes if len(s) >= 2)
        moved = bpe["kernels"] * (n - n_fac) + bpe["kernels_factored"] * n_fac
        for prec in args.precisions:
            record(f"triton_{prec}", lambda prec=prec: lt.lo_step(params, grads, state, theta, cfg, precision=prec,
                                                                  inplace=True, blocks=blocks),
                   must, moved)
    if "adamw_fused" in args.methods:
        try:
            plist = [torch.nn.Parameter(p) for p in params.values()]
            for p, g in zip(plist, grads.values()):
                p.grad = g
            opt = torch.optim.AdamW(plist, lr=1e-3, fused=True)
            record("adamw_fused", opt.step, 7 * pbytes * n)  # read g, p, m, v; write p, m, v
            del opt, plist
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            row["methods"]["adamw_fused"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        _free(device)
    _speedups(row)
    del params, grads, state
    _free(device)
    return row


def tune(lt, args, cfg: LOConfig, device, dtype) -> dict:
    """Median step time of each tile config at ``--tune-size``; returns the table and the fastest."""
    params, grads, state, theta = make_problem(transformer_shapes(args.tune_size), dtype, device, cfg)
    table = []
    for block in (64, 128, 256):
        for num_warps in (4, 8):
            for chunk_iters in (4, 8, 16):
                for reload_vectors in (True, False):
                    b = lt.Blocks(block=block, num_warps=num_warps, chunk_iters=chunk_iters,
                                  reload_vectors=reload_vectors)
                    entry = {"block": block, "num_warps": num_warps, "chunk_iters": chunk_iters,
                             "reload_vectors": reload_vectors}
                    try:
                        t = time_cuda(lambda: lt.lo_step(params, grads, state, theta, cfg, inplace=True, blocks=b,
                                                         precision=args.tune_precision), 10, 2)
                        entry["median_s"] = t["median_s"]
                    except Exception as e:  # e.g. out of registers / shared memory for a config
                        entry["error"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"  tune {entry}", flush=True)
                    table.append(entry)
    del params, grads, state
    _free(device)
    best = min((e for e in table if "median_s" in e), key=lambda e: e["median_s"])
    return {"size": args.tune_size, "precision": args.tune_precision, "table": table, "best": best}


def check_correctness(lt, cfg: LOConfig, device, dtype) -> dict:
    """Triton (ieee and tf32) against the reference on a small problem; max errors relative to the step."""
    shapes = transformer_shapes(int(1e6))[:12] + [(), (7,), (3, 4, 5, 2)]
    params, grads, state, theta = make_problem(shapes, dtype, device, cfg, seed=1)
    ref_p, ref_s = lo_step_reference(params, grads, state, theta, cfg)
    out = {}
    for prec in ("ieee", "tf32"):
        got_p, got_s = lt.lo_step(params, grads, state, theta, cfg, precision=prec)
        worst = 0.0
        for k in params:
            step = (ref_p[k].double() - params[k].double()).abs().max().item()
            worst = max(worst, (got_p[k].double() - ref_p[k].double()).abs().max().item() / max(step, 1e-30))
        sworst = max(((got_s[key][k] - ref_s[key][k]).abs() / (ref_s[key][k].abs() + 1e-30)).max().item()
                     for key in ("m", "v", "row", "col") for k in ref_s[key])
        out[prec] = {"max_param_err_rel_to_step": worst, "max_state_rel_err": sworst}
    return out


# ---- backward (meta-training inner step) and population -------------------------------------------------
BACKWARD_BYTES = 68  # fp32: read g, p, m (3), v, dp, dm (3), dv; write dp, dg, dm (3), dv (+ forward's 44)


def _measure(row: dict, name: str, fn, args, n: int, moved: float, flops: float, device, count: int = 1):
    """Time ``fn`` into ``row["methods"][name]`` (``count`` steps per call, for steps/s)."""
    try:
        t = time_cuda(fn, args.repeats, args.warmup)
    except torch.cuda.OutOfMemoryError:
        row["methods"][name] = {"skipped": "out of memory"}
        _free(device)
        return
    except Exception as e:  # a failing method must not lose the other measurements
        row["methods"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        _free(device)
        return
    gbs = moved / t["median_s"] / 1e9
    row["methods"][name] = {**t, "bytes": moved, "GB_per_s": gbs, "fraction_of_copy_bw": gbs * 1e9 / row["_bw"],
                            "steps_per_s": count / t["median_s"], "params_per_s": n / t["median_s"],
                            "TFLOP_per_s": flops / t["median_s"] / 1e12}
    print(f"  {name:28s} {t['median_s'] * 1e3:9.3f} ms  {count / t['median_s']:10.1f} steps/s  {gbs:8.1f} GB/s  "
          f"({gbs * 1e9 / row['_bw']:5.1%} of copy)", flush=True)


def _speedups(row: dict, fast_prefix: str = "triton") -> None:
    base = {k: v["median_s"] for k, v in row["methods"].items() if "median_s" in v}
    row["speedups"] = {f"{a}_over_{b}": base[b] / base[a] for a in base for b in base
                       if a.startswith(fast_prefix) and not b.startswith(fast_prefix)}
    row.pop("_bw", None)


def bench_backward(n_target: int, args, cfg: LOConfig, device, copy_bw: float) -> dict:
    """Forward + backward of one step w.r.t. theta and every input: reference autograd vs Triton."""
    from kernels.lo_step_autograd import lo_step_autograd

    shapes = transformer_shapes(n_target) if n_target >= 1e6 else population_shapes(n_target)
    n = sum(math.prod(s) for s in shapes)
    row: dict = {"target": n_target, "params": n, "tensors": len(shapes), "methods": {}, "_bw": copy_bw}
    try:
        params, grads, state, theta = make_problem(shapes, torch.float32, device, cfg)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory"
        _free(device)
        return row
    leaves = [*params.values(), *grads.values(), *theta.values(),
              *(t for key in ("m", "v", "row", "col") for t in state[key].values())]
    for t in leaves:
        t.requires_grad_()
    gen = torch.Generator(device=device).manual_seed(3)
    w = {k: torch.randn(p.shape, generator=gen, device=device) for k, p in params.items()}
    moved = (bytes_per_element(cfg)["minimum"] + BACKWARD_BYTES) * n
    flops = 3 * LearnedOptimizer(cfg).flops_per_element() * n

    def step(fn):
        def run():
            new_p, _ = fn()
            loss = sum((new_p[k] * w[k]).sum() for k in new_p)
            torch.autograd.grad(loss, leaves, allow_unused=True)
        return run

    if n <= args.backward_ref_max:
        _measure(row, "reference_autograd", step(lambda: lo_step_reference(params, grads, state, theta, cfg)),
                 args, n, moved, flops, device)
        _free(device)
    for prec in args.precisions:
        _measure(row, f"triton_autograd_{prec}",
                 step(lambda prec=prec: lo_step_autograd(params, grads, state, theta, cfg, forward="triton",
                                                         backward="triton", precision=prec)),
                 args, n, moved, flops, device)
    _speedups(row)
    return row  # the caller frees the memory (_free) once these locals are gone


def population_shapes(n_target: int) -> list[tuple[int, ...]]:
    """A small MLP (matrices and biases) of about ``n_target`` parameters; transformer shapes above 1e5."""
    if n_target > 1e5:
        return transformer_shapes(n_target)
    h = max(8, round(math.sqrt(n_target / 1.75)))  # h/2 x h + h x h + h x h/4 weights
    return [(h // 2, h), (h,), (h, h), (h,), (h, h // 4), (h // 4,)]


def bench_population(n_member: int, args, cfg: LOConfig, device, copy_bw: float) -> dict:
    from kernels import lo_step_triton as lt
    from kernels.lo_step_population import population_lo_step, population_lo_step_reference

    pop = args.population
    shapes = population_shapes(n_member)
    n1 = sum(math.prod(s) for s in shapes)
    n = pop * n1
    row: dict = {"members": pop, "params_per_member": n1, "params": n, "tensors_per_member": len(shapes),
                 "methods": {}, "_bw": copy_bw}
    try:
        probs = [make_problem(shapes, torch.float32, device, cfg, seed=j) for j in range(pop)]
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory"
        _free(device)
        return row

    def stack(ds):
        return {k: torch.stack([d[k] for d in ds]) for k in ds[0]}

    params = stack([p[0] for p in probs])
    grads = stack([p[1] for p in probs])
    thetas = stack([p[3] for p in probs])
    state = {"step": torch.zeros(pop, device=device), **{key: stack([p[2][key] for p in probs])
                                                          for key in ("m", "v", "row", "col")}}
    if "horizon" in probs[0][2]:  # members of different run lengths
        state["horizon"] = torch.tensor([float(BENCH_HORIZON * (1 + j % 3)) for j in range(pop)], device=device)
    del probs
    members = [({k: v[j] for k, v in params.items()}, {k: v[j] for k, v in grads.items()},
                {"step": state["step"][j], **({"horizon": state["horizon"][j]} if "horizon" in state else {}),
                 **{key: {k: v[j] for k, v in state[key].items()} for key in ("m", "v", "row", "col")}},
                {k: v[j] for k, v in thetas.items()}) for j in range(pop)]
    moved = bytes_per_element(cfg)["minimum"] * n
    flops = LearnedOptimizer(cfg).flops_per_element() * n
    prec = args.tune_precision
    _measure(row, f"triton_population_{prec}",
             lambda: population_lo_step(params, grads, state, thetas, cfg, precision=prec, inplace=True),
             args, n, moved, flops, device, count=pop)

    def loop():
        for p, g, st, th in members:
            lt.lo_step(p, g, st, th, cfg, precision=prec, inplace=True)

    _measure(row, f"triton_loop_{prec}", loop, args, n, moved, flops, device, count=pop)
    if n <= args.ref_max:
        _measure(row, "reference_loop", lambda: population_lo_step_reference(params, grads, state, thetas, cfg),
                 args, n, moved, flops, device, count=pop)
    _speedups(row, fast_prefix="triton_population")
    return row  # the caller frees the memory (_free) once these locals are gone


# ---- the kernels' performance targets ----------------------------------------------------------------
TARGET_MIN_PARAMS = 16_000_000  # forward targets and the population's bandwidth target hold from here up
SMALL_MEMBER = 20_000  # "a small task (about 10K parameters each)"
DEFAULT_PRECISION = "tf32"  # what dispatch uses (LearnedOptimizer.bind): its numbers decide the targets


def _timed(methods: dict, name: str | None) -> bool:
    return name is not None and "median_s" in methods.get(name, {})


def _triton(methods: dict, prefix: str) -> str | None:
    """The Triton method that decides: the default precision's, else the fastest one measured."""
    if _timed(methods, prefix + DEFAULT_PRECISION):
        return prefix + DEFAULT_PRECISION
    timed = [k for k in methods if k.startswith(prefix) and _timed(methods, k)]
    return min(timed, key=lambda k: methods[k]["median_s"]) if timed else None


def targets(result: dict) -> list[dict]:
    """Each performance target of the fused kernels with what the benchmark measured for it: ``status`` is ``met``
    (at every size measured), ``not met`` (at one or more) or ``unmeasured``; ``measured`` lists
    ``(where, value, passed)``."""
    rows: list[dict] = []

    def add(goal: str, measured: list[tuple[str, str, bool]]) -> None:
        status = "unmeasured" if not measured else "met" if all(ok for *_, ok in measured) else "not met"
        rows.append({"target": goal, "status": status, "measured": measured})

    big = [r for r in result.get("sizes", []) if r.get("params", 0) >= TARGET_MIN_PARAMS]
    bw, eager, comp, adamw = [], [], [], []
    fwd_fraction = {}
    for r in big:
        m, where = r.get("methods", {}), f"{r['params'] / 1e6:.0f}M"
        t = _triton(m, "triton_")
        if t is None:
            continue
        tm = m[t]
        fwd_fraction[r["params"]] = tm["fraction_of_copy_bw"]
        bw.append((f"{where} {t}", f"{tm['fraction_of_copy_bw']:.1%}", tm["fraction_of_copy_bw"] >= 0.70))
        for out, base, goal in ((eager, "reference", 20.0), (comp, "reference_compiled", 2.0)):
            if _timed(m, base):
                x = m[base]["median_s"] / tm["median_s"]
                out.append((f"{where} {t}", f"{x:.1f}x", x >= goal))
        if _timed(m, "adamw_fused"):
            x = tm["median_s"] / m["adamw_fused"]["median_s"]
            adamw.append((f"{where} {t}", f"{x:.2f}x AdamW's time", x <= 3.0))
    add(">= 16M parameters: forward step >= 70% of the measured copy bandwidth", bw)
    add(">= 16M parameters: forward step >= 20x faster than the eager reference", eager)
    add(">= 16M parameters: forward step >= 2x faster than the compiled reference", comp)
    add(">= 16M parameters: forward step <= 3x the time of AdamW(fused=True)", adamw)

    back = []
    for r in result.get("backward", []):
        m = r.get("methods", {})
        t = _triton(m, "triton_autograd_")
        if t is not None and _timed(m, "reference_autograd"):
            x = m["reference_autograd"]["median_s"] / m[t]["median_s"]
            back.append((f"{r['params'] / 1e6:.3g}M {t}", f"{x:.1f}x", x >= 5.0))
    add("meta-training inner step (forward + backward) >= 5x the reference autograd path's throughput", back)

    loop, pbw = [], []
    for r in result.get("population", []):
        m = r.get("methods", {})
        t = _triton(m, "triton_population_")
        if t is None:
            continue
        where = f"{r['members']} x {r['params_per_member'] / 1e3:.3g}K"
        single = t.replace("triton_population_", "triton_loop_")
        if r["params_per_member"] <= SMALL_MEMBER and _timed(m, single):
            x = m[single]["median_s"] / m[t]["median_s"]
            loop.append((where, f"{x:.1f}x", x >= 10.0))
        if r["params"] >= TARGET_MIN_PARAMS and fwd_fraction:
            near = min(fwd_fraction, key=lambda n: abs(math.log(n / r["params"])))
            got, ref = m[t]["fraction_of_copy_bw"], fwd_fraction[near]
            pbw.append((f"{where} ({r['params'] / 1e6:.0f}M)",
                        f"{got:.1%} vs forward {ref:.1%} at {near / 1e6:.0f}M", got >= ref - 0.05))
    add("population, P = 32 small members: one launch >= 10x faster than a loop of 32 single steps", loop)
    add("population >= 16M parameters in total: the forward kernel's bandwidth fraction (within 5 points)", pbw)
    return rows


def markdown(result: dict) -> str:
    """The tables a reader wants: targets first, then every row of every mode."""
    dev = f"{result.get('device', '?')} (torch {result.get('torch')}, triton {result.get('triton')}, " \
          f"copy {result.get('copy_bandwidth_GB_per_s', 0):.0f} GB/s, {result.get('dtype', 'fp32')})"
    out = [f"# Learned-optimizer step kernels on {dev}", "", "## Targets", "",
           "| target | status | measured |", "|---|---|---|"]
    for t in targets(result):
        meas = "; ".join(f"{w}: {v}{'' if ok else ' (miss)'}" for w, v, ok in t["measured"]) or "-"
        out.append(f"| {t['target']} | **{t['status']}** | {meas} |")
    for key, title in (("sizes", "Forward step"), ("backward", "Meta-training inner step (forward + backward)"),
                       ("population", f"Population ({result.get('args', {}).get('population', '?')} members)")):
        if not result.get(key):
            continue
        out += ["", f"## {title}", "", "| parameters | method | median ms | steps/s | GB/s | of copy bw | TFLOP/s |",
                "|---|---|---|---|---|---|---|"]
        for r in result[key]:
            for name, m in r.get("methods", {}).items():
                if "median_s" not in m:
                    out.append(f"| {r.get('params', 0):,} | {name} | {m.get('skipped') or m.get('error', '')[:80]} "
                               f"| | | | |")
                    continue
                out.append(f"| {r.get('params', 0):,} | {name} | {m['median_s'] * 1e3:.3f} | {m['steps_per_s']:.1f} "
                           f"| {m['GB_per_s']:.0f} | {m['fraction_of_copy_bw']:.1%} | {m['TFLOP_per_s']:.2f} |")
    return "\n".join(out) + "\n"


# ---- plot ----------------------------------------------------------------------------------------------
def roofline_png(result: dict, path: Path, peak_tflops: float, peak_fp32_tflops: float | None = None) -> None:
    """Achieved MLP TFLOP/s against FLOP per byte the step must move, under the measured copy bandwidth
    and nominal compute roofs (methods without MLP FLOPs, AdamW, are not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = result["copy_bandwidth_GB_per_s"] * 1e9
    fig, ax = plt.subplots(figsize=(7, 5))
    ai = [10 ** (x / 10) for x in range(0, 31)]
    ax.plot(ai, [min(a * bw, peak_tflops * 1e12) / 1e12 for a in ai], "k-", lw=1,
            label=f"roof: copy {bw / 1e9:.0f} GB/s, TF32 {peak_tflops:g} TFLOP/s")
    if peak_fp32_tflops:
        ax.plot(ai, [min(a * bw, peak_fp32_tflops * 1e12) / 1e12 for a in ai], "k--", lw=1,
                label=f"roof: FP32 CUDA cores {peak_fp32_tflops:g} TFLOP/s")
    markers = {"reference": "s", "reference_compiled": "D", "adamw_fused": "^"}
    rows = [(r, "") for r in result.get("sizes", [])] + [(r, "bwd ") for r in result.get("backward", [])] + [
        (r, "pop ") for r in result.get("population", [])]
    for row, tag in rows:
        for name, m in row.get("methods", {}).items():
            if "median_s" not in m:
                continue
            flop = m["TFLOP_per_s"] * 1e12 * m["median_s"]
            intensity = flop / m["bytes"] if flop > 0 else None
            if intensity is None:
                continue
            ax.scatter(intensity, m["TFLOP_per_s"], marker=markers.get(name, "o"), s=18 + 6 * math.log10(row["params"]),
                       label=f"{tag}{name} ({row['params'] / 1e6:.3g}M)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (model FLOP / byte the step must move)")
    ax.set_ylabel("TFLOP/s (MLP FLOPs)")
    ax.set_title(f"learned-optimizer step on {result['device']}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None, *, prog: str = "python bench/bench_lo_step.py",
         no_cuda_status: int = 2) -> int:
    args = parse_args(argv, prog=prog, no_cuda_status=no_cuda_status)
    if not torch.cuda.is_available():
        print(f"{prog}: no CUDA device (torch.cuda.is_available() is False); this benchmark only measures "
              "GPUs, so nothing was measured.", file=sys.stderr)
        return no_cuda_status
    lt = None
    if "triton" in args.methods:
        try:
            from kernels import lo_step_triton as lt
        except ImportError as e:
            print(f"bench_lo_step: triton unavailable ({e}); skipping the Triton step", file=sys.stderr)
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = LOConfig()
    name = torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    copy_bw = copy_bandwidth(device)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s", flush=True)
    result = {
        "device": name, "torch": torch.__version__, "python": platform.python_version(),
        "triton": getattr(sys.modules.get("triton"), "__version__", None), "config": cfg.to_dict(),
        "dtype": args.dtype, "copy_bandwidth_GB_per_s": copy_bw / 1e9,
        "bytes_per_element": bytes_per_element(cfg), "flops_per_element": LearnedOptimizer(cfg).flops_per_element(),
        "args": {k: v for k, v in vars(args).items()}, "sizes": [],
    }
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if lt is not None and args.check:
        result["correctness"] = check_correctness(lt, cfg, device, dtype)
        print(f"correctness (Triton vs reference): {result['correctness']}", flush=True)
    if lt is not None and args.tune:
        result["tuning"] = tune(lt, args, cfg, device, dtype)
        best = result["tuning"]["best"]
        args.block, args.num_warps, args.chunk_iters = best["block"], best["num_warps"], best["chunk_iters"]
        args.reload_vectors = best["reload_vectors"]
        print(f"tuned: {best}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
    json_path, md = out / f"lo_step_{tag}.json", out / f"lo_step_{tag}.md"

    def save() -> None:  # after every row: a run stopped at a time limit keeps what it measured
        json_path.write_text(json.dumps(result, indent=2))
        md.write_text(markdown(result))

    groups = (("forward", "sizes", args.sizes, "size {n:.3g}",
               lambda n: bench_size(n, args, cfg, device, copy_bw, lt)),
              ("backward", "backward", args.backward_sizes, "backward (inner step: forward + backward), size {n:.3g}",
               lambda n: bench_backward(n, args, cfg, device, copy_bw)),
              ("population", "population", args.population_sizes,
               f"population: {args.population} members of {{n:.3g}} parameters",
               lambda n: bench_population(n, args, cfg, device, copy_bw)))
    for mode, key, sizes, title, bench in groups:
        if mode not in args.modes or (lt is None and mode != "forward"):
            continue
        result[key] = []
        for n in sizes:
            print(title.format(n=n), flush=True)
            result[key].append(bench(n))
            _free(device)
            save()
    save()
    png = out / f"lo_step_roofline_{tag}.png"
    roofline_png(result, png, args.peak_tflops, args.peak_fp32_tflops)
    print(md.read_text())
    print(f"wrote {json_path}, {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
