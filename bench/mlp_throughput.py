#!/usr/bin/env python
"""CPU benchmark (not a test): the learned-optimizer step's per-element MLP against this CPU's measured
fp32 matmul throughput.

The step's MLP costs a known number of FLOPs per parameter element
(:meth:`optimizers.learned.LearnedOptimizer.flops_per_element`, ``2 * sum(fan_in * fan_out)`` over the
layers of :meth:`~optimizers.learned.LearnedOptimizer.layer_sizes`), so its speed can be stated as a
fraction of what this CPU's matmuls reach. Everything runs in this one process, pinned to ``--threads``
CPUs (default 1) with ``torch.set_num_threads`` to match (``bench/cpu_speed.py``'s ``pin_threads``):

1. **Peak**: large square ``torch.mm`` (``--square``, default 1024 and 2048; best of ``--peak-repeats``):
   the CPU's fp32 matmul ceiling. Then ``torch.addmm`` (bias + matmul, the call the MLP makes) on the
   learned optimizer's own layer shapes at ``--rows`` rows (default ``CHUNK_ELEMENTS``, the largest group
   the step concatenates): ``(rows x num_inputs) @ (num_inputs x hidden)``, ``(rows x hidden) @ (hidden
   x hidden)``, ``(rows x hidden) @ (hidden x 2)`` for ``LOConfig()``. The step folds the time features
   into the first layer's bias (:meth:`~optimizers.learned.BoundLearnedOptimizer._mlp`), so its first
   matmul is ``(rows x num_element_features) @ (num_element_features x hidden)``; that shape is timed
   too, and the layers the MLP actually runs, timed back to back, are its *same-shape* reference
   (``addmm.chain_executed``). Best of ``--addmm-repeats``: a ceiling, like the peak.
2. **The MLP in place**: ``BoundLearnedOptimizer._mlp`` alone on a feature matrix captured from a real
   step of a ``rows``-element matrix (the normalised element features and the time features exactly as
   :meth:`~optimizers.learned.BoundLearnedOptimizer.update` passes them), median of ``--mlp-repeats``
   after warm-up; then the whole ``update`` (no autograd, ``kernels=False``: the PyTorch path) at
   ``--sizes`` parameters (default 1M and 10M, ``bench/cpu_speed.py``'s ``shapes_for`` problem), median
   of ``--step-repeats`` after ``--step-warmup``; then the same steps again with the bound optimizer's
   ``_mlp`` wrapped by a timer, which gives the MLP's time inside the step (all its calls, one per group
   of tensors) and its share of the step.

FLOPs and fractions (JSON ``mlp`` and ``steps``):

* ``flops = flops_per_element() * elements`` (the stated cost, time features counted as MLP inputs);
  ``gflops`` on it; ``frac_of_peak_square = gflops / peak``: the number the project's CPU-speed goal asks
  for.
* ``executed_flops``: the matmul FLOPs the folded MLP really runs (first layer ``num_element_features``
  wide); ``frac_of_same_shape_addmm = executed_gflops / chain_executed gflops`` (= the chain's time over
  the MLP's): how close the MLP comes to its own matmuls run back to back; the rest is its bias fold,
  ReLUs and dtype casts. Inside the step the MLP runs on groups of other row counts (up to one whole
  large tensor, down to one bias vector): ``frac_of_same_rows_addmm`` compares it with the chain timed
  at exactly the row counts of the step's MLP calls (``addmm_same_rows``), which separates what the MLP
  loses from what matmuls of those shapes lose anyway (large operands out of cache, tiny calls' overhead).
* ``mlp_share_of_step``: median over the instrumented steps of (MLP time / step time).

    python bench/mlp_throughput.py                  # full measurement, 1 thread -> bench/results/mlp_throughput.{json,md}
    python bench/mlp_throughput.py --threads 2      # at 2 threads (pinned to 2 CPUs)
    python bench/mlp_throughput.py --smoke          # < 30 s sanity check, tiny sizes, temp output

Run the full measurement on a quiet machine: anything else running on the pinned CPUs distorts it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.cpu_speed import (  # noqa: E402
    STEP_HORIZON, _torch_problem, machine_description, numel, pin_threads, shapes_for,
)
from optimizers.learned import CHUNK_ELEMENTS, BoundLearnedOptimizer, LearnedOptimizer, LOConfig  # noqa: E402


# ================================================================================================
# timing
# ================================================================================================
def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1, min_s: float = 0.02) -> list[float]:
    """Seconds per call of ``fn``, one entry per repeat. Short calls are looped (``number`` calls per
    repeat, calibrated so a repeat lasts ``min_s``) so the timer's resolution and Python's call overhead
    do not dominate a sub-millisecond matmul."""
    for _ in range(max(warmup, 1)):
        fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-9)
    number = max(1, int(math.ceil(min_s / once)))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t) / number)
    return out


def _gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


# ================================================================================================
# 1. peak: square torch.mm and addmm on the learned optimizer's layer shapes
# ================================================================================================
def square_peak(sizes: list[int], repeats: int) -> dict:
    """fp32 ``torch.mm`` of two ``n x n`` matrices into a preallocated output, best of ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        best = min(time_calls(lambda: torch.mm(a, b, out=out), repeats, warmup=2))
        rows.append({"n": n, "flops": 2 * n**3, "best_s": best, "gflops": _gflops(2 * n**3, best)})
    return {"square": rows, "gflops": max(r["gflops"] for r in rows)}


def addmm_layer(rows: int, fan_in: int, fan_out: int, repeats: int) -> dict:
    """``torch.addmm(b, x, w)`` with ``x: rows x fan_in``, ``w: fan_in x fan_out`` (allocating its output,
    as the MLP does), best of ``repeats``."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(rows, fan_in, generator=gen), torch.randn(fan_in, fan_out, generator=gen)
    b = torch.randn(fan_out, generator=gen)
    flops = 2 * rows * fan_in * fan_out
    best = min(time_calls(lambda: torch.addmm(b, x, w), repeats))
    return {"rows": rows, "fan_in": fan_in, "fan_out": fan_out, "flops": flops, "best_s": best,
            "gflops": _gflops(flops, best)}


def _chain(layers: list[dict]) -> dict:
    """The layers run back to back: total FLOPs over total time."""
    flops, s = sum(r["flops"] for r in layers), sum(r["best_s"] for r in layers)
    return {"flops": flops, "s": s, "gflops": _gflops(flops, s)}


def addmm_shapes(layer_sizes: list[int], executed_first: int, rows: int, repeats: int) -> dict:
    """addmm on every layer shape of ``layer_sizes`` and, when the step folds the time features into
    the bias (``executed_first < layer_sizes[0]``), on the first layer as the step runs it."""
    layers = [addmm_layer(rows, a, b, repeats) for a, b in zip(layer_sizes[:-1], layer_sizes[1:])]
    out = {"rows": rows, "layers": layers, "chain_nominal": _chain(layers)}
    if executed_first != layer_sizes[0]:
        folded = addmm_layer(rows, executed_first, layer_sizes[1], repeats)
        out["first_folded"] = folded
        out["chain_executed"] = _chain([folded, *layers[1:]])
    else:
        out["chain_executed"] = out["chain_nominal"]
    return out


# ================================================================================================
# 2. the step's MLP alone and inside the step
# ================================================================================================
def bound_optimizer() -> BoundLearnedOptimizer:
    """The default learned optimizer, PyTorch path (as ``bench/cpu_speed.py`` steps it)."""
    lo = LearnedOptimizer(LOConfig())
    return lo.bind(lo.init_theta(0), kernels=False)


def matrix_shape(rows: int) -> list[int]:
    """A matrix of exactly ``rows`` elements, as square as powers of two allow (a vector otherwise):
    matrices take the factored (Adafactor) feature path that most elements of a real model take."""
    w = 2 ** int(math.floor(math.log2(max(math.sqrt(rows), 1))))
    return [rows // w, w] if rows % w == 0 and rows // w > 1 else [rows]


def capture_mlp_inputs(rows: int, steps: int = 3) -> tuple[Tensor, Tensor | None]:
    """The ``(x, tfeat)`` that ``update`` hands to ``_mlp`` at its ``steps``-th step of one
    ``rows``-element matrix (realistic features: normalised, accumulators warmed by earlier steps)."""
    opt = bound_optimizer()
    params, grads = _torch_problem([matrix_shape(rows)])
    state = opt.init(params, total_steps=STEP_HORIZON)
    seen: dict = {}
    inner, inner_into = opt._mlp, opt._mlp_into

    def keep(x, tfeat):
        seen["x"], seen["tfeat"] = x.clone(), None if tfeat is None else tfeat.clone()

    def spy(x, tfeat=None):
        keep(x, tfeat)
        return inner(x, tfeat)

    def spy_into(x, tfeat, take):  # the step that reuses its buffers (large groups, no autograd)
        keep(x, tfeat)
        return inner_into(x, tfeat, take)

    # instance attributes: update's self._mlp / self._mlp_into find them first
    opt._mlp, opt._mlp_into = spy, spy_into
    with torch.no_grad():
        for _ in range(steps):
            params, state = opt.update(grads, state, params)
    return seen["x"], seen["tfeat"]



def mlp_alone(rows: int, repeats: int, peak_gflops: float, chain_gflops: float, flops_per_element: int,
              executed_per_element: int) -> dict:
    """``_mlp`` on a captured ``rows x features`` matrix, median of ``repeats`` after warm-up."""
    opt = bound_optimizer()
    x, tfeat = capture_mlp_inputs(rows)
    with torch.no_grad():
        times = time_calls(lambda: opt._mlp(x, tfeat), repeats, warmup=3)
    med = statistics.median(times)
    elements = x.shape[0]
    flops, executed = flops_per_element * elements, executed_per_element * elements
    return {"rows": elements, "features": x.shape[1], "time_features": 0 if tfeat is None else tfeat.numel(),
            "elements": elements, "flops": flops, "executed_flops": executed, "median_s": med,
            "best_s": min(times), "all_s": times, "gflops": _gflops(flops, med),
            "executed_gflops": _gflops(executed, med),
            "frac_of_peak_square": _gflops(flops, med) / peak_gflops,
            "executed_frac_of_peak_square": _gflops(executed, med) / peak_gflops,
            "frac_of_same_shape_addmm": _gflops(executed, med) / chain_gflops}


class MLPTimer:
    """Wraps a bound optimizer's MLP (``_mlp``, and ``_mlp_into`` of the step that reuses its buffers;
    instance attributes, the class is untouched) to add up the time and rows of every call; the values
    it returns are the unwrapped methods'. A call made from inside a timed call (``_mlp_into`` falling
    back to ``_mlp``) is not counted twice."""

    def __init__(self, opt: BoundLearnedOptimizer):
        self.inner, self.inner_into = opt._mlp, opt._mlp_into
        self._depth = 0
        self.reset()
        opt._mlp, opt._mlp_into = self, self.call_into

    def reset(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self.row_counts: list[int] = []

    def __call__(self, x, tfeat=None):
        return self._timed(self.inner, x, tfeat)

    def call_into(self, x, tfeat, take):
        return self._timed(self.inner_into, x, tfeat, take)

    def _timed(self, fn, x, *args):
        if self._depth:
            return fn(x, *args)
        self._depth += 1
        t = time.perf_counter()
        try:
            out = fn(x, *args)
        finally:
            self._depth -= 1
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.rows += x.shape[0]
        self.row_counts.append(x.shape[0])
        return out


def chain_at_rows(row_counts: list[int], executed_sizes: list[int], repeats: int) -> dict:
    """The executed layers' addmm chain at the row counts of the step's MLP calls (one per group of
    tensors): the same-shape reference *inside* the step, where a group is one whole large tensor
    (rows far beyond the chunk, operands out of cache) or one small bias vector (call overhead)."""
    per_rows = {}
    for r in sorted(set(row_counts)):
        per_rows[r] = _chain([addmm_layer(r, a, b, repeats) for a, b in zip(executed_sizes[:-1], executed_sizes[1:])])
    s = sum(per_rows[r]["s"] for r in row_counts)
    flops = sum(per_rows[r]["flops"] for r in row_counts)
    return {"row_counts": {str(r): row_counts.count(r) for r in per_rows}, "flops": flops, "s": s,
            "gflops": _gflops(flops, s)}


def step_in_place(n: int, warmup: int, repeats: int, peak_gflops: float, chain_gflops: float,
                  flops_per_element: int, executed_per_element: int, executed_sizes: list[int],
                  addmm_repeats: int) -> dict:
    """The whole ``update`` on ``shapes_for(n)`` (no autograd): clean median, then instrumented steps
    for the MLP's time inside it."""
    shapes = shapes_for(n)
    elements = numel(shapes)
    params, grads = _torch_problem(shapes)
    opt = bound_optimizer()
    box = {"params": params, "state": opt.init(params, total_steps=STEP_HORIZON)}

    def step() -> None:
        with torch.no_grad():
            box["params"], box["state"] = opt.update(grads, box["state"], box["params"])

    for _ in range(warmup):
        step()
    clean = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        clean.append(time.perf_counter() - t)
    timer = MLPTimer(opt)
    step_s, mlp_s = [], []
    for _ in range(repeats):
        timer.reset()
        t = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t)
        mlp_s.append(timer.seconds)
    mlp_med = statistics.median(mlp_s)
    same_rows = chain_at_rows(timer.row_counts, executed_sizes, addmm_repeats)
    flops, executed = flops_per_element * elements, executed_per_element * elements
    return {"target": n, "numel": elements, "shapes": shapes, "step_s": statistics.median(clean),
            "all_step_s": clean, "instrumented_step_s": statistics.median(step_s), "mlp_in_step_s": mlp_med,
            "all_mlp_in_step_s": mlp_s, "mlp_calls": timer.calls, "mlp_rows": timer.rows,
            "flops": flops, "executed_flops": executed, "mlp_gflops": _gflops(flops, mlp_med),
            "mlp_executed_gflops": _gflops(executed, mlp_med),
            "frac_of_peak_square": _gflops(flops, mlp_med) / peak_gflops,
            "executed_frac_of_peak_square": _gflops(executed, mlp_med) / peak_gflops,
            "frac_of_same_shape_addmm": _gflops(executed, mlp_med) / chain_gflops,
            "addmm_same_rows": same_rows,
            "frac_of_same_rows_addmm": _gflops(executed, mlp_med) / same_rows["gflops"],
            "mlp_share_of_step": statistics.median(m / s for m, s in zip(mlp_s, step_s))}


# ================================================================================================
# report
# ================================================================================================
def markdown(r: dict) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        "# The learned-optimizer step's MLP against this CPU's matmul throughput", "",
        f"Machine: {m['cpu_model']} ({m['cores']} cores available, {m.get('memory_gib')} GiB), "
        f"torch {m['torch']}, {r['threads']} thread(s) pinned; load average before {m['load_average_before']}, "
        f"after {m.get('load_average_after')}. Command: `{r['command']}`.", "",
        f"LO layer sizes {c['layer_sizes']} ({c['flops_per_element']} FLOPs per element); the step folds the "
        f"time features into the first layer's bias, so it runs {c['executed_layer_sizes']} "
        f"({c['executed_flops_per_element']} matmul FLOPs per element).", "",
        "## Peak: fp32 matmul", "", "| op | shape | best ms | GFLOP/s |", "|---|---|---:|---:|",
    ]
    for s in r["peak"]["square"]:
        lines.append(f"| mm | {s['n']} x {s['n']} @ {s['n']} x {s['n']} | {s['best_s'] * 1e3:.3f} | {s['gflops']:.1f} |")
    a = r["addmm"]
    named = [("layer %d" % i, L) for i, L in enumerate(a["layers"])]
    if "first_folded" in a:
        named.append(("layer 0 folded (as run)", a["first_folded"]))
    for name, L in named:
        lines.append(f"| addmm {name} | {L['rows']} x {L['fan_in']} @ {L['fan_in']} x {L['fan_out']} | "
                     f"{L['best_s'] * 1e3:.3f} | {L['gflops']:.1f} |")
    for key, name in (("chain_nominal", "layer sizes"), ("chain_executed", "as run (same-shape reference)")):
        ch = a[key]
        lines.append(f"| addmm chain, {name} | {a['rows']} rows | {ch['s'] * 1e3:.3f} | {ch['gflops']:.1f} |")
    lines += ["", f"Peak square-matmul throughput: **{r['peak']['gflops']:.1f} GFLOP/s**.", "",
              "## The MLP alone and inside the step", "",
              "| measurement | elements | MLP ms | GFLOP/s (stated FLOPs) | of peak square | executed GFLOP/s "
              "| of same-shape addmm | of same-rows addmm | step ms | MLP share of step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ml = r["mlp"]
    lines.append(f"| `_mlp` alone, {ml['rows']} x {ml['features']} | {ml['elements']:,} | {ml['median_s'] * 1e3:.3f} | "
                 f"{ml['gflops']:.1f} | {ml['frac_of_peak_square']:.1%} | {ml['executed_gflops']:.1f} | "
                 f"{ml['frac_of_same_shape_addmm']:.1%} | {ml['frac_of_same_shape_addmm']:.1%} | - | - |")
    for s in r["steps"]:
        lines.append(f"| `update`, {s['numel']:,} params ({s['mlp_calls']} MLP calls) | {s['numel']:,} | "
                     f"{s['mlp_in_step_s'] * 1e3:.2f} | {s['mlp_gflops']:.1f} | {s['frac_of_peak_square']:.1%} | "
                     f"{s['mlp_executed_gflops']:.1f} | {s['frac_of_same_shape_addmm']:.1%} | "
                     f"{s['frac_of_same_rows_addmm']:.1%} | "
                     f"{s['step_s'] * 1e3:.1f} | {s['mlp_share_of_step']:.1%} |")
    lines += ["", "Times are medians (peak and addmm: best of repeats, a ceiling). \"of peak square\": "
              "GFLOP/s on `flops_per_element()` over the best square mm; \"of same-shape addmm\": the MLP's "
              "executed matmul FLOPs per second over the same layers' addmm run back to back at "
              f"{a['rows']} rows; \"of same-rows addmm\": the same, with the chain run at the row counts of "
              "the step's MLP calls (one per group of tensors). Step ms: uninstrumented `update`; the MLP "
              "share comes from a second, instrumented series.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the process is pinned to as many CPUs)")
    ap.add_argument("--square", default="1024,2048", help="square matmul sizes of the peak")
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=CHUNK_ELEMENTS, help="rows of the addmm shapes and of the MLP alone")
    ap.add_argument("--addmm-repeats", type=int, default=7)
    ap.add_argument("--mlp-repeats", type=int, default=20)
    ap.add_argument("--sizes", default="1e6,1e7", help="parameter counts of the whole step")
    ap.add_argument("--step-warmup", type=int, default=3)
    ap.add_argument("--step-repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny sanity run (< 30 s), output in a temp dir")
    ap.add_argument("--out", default=None, help="output prefix (default bench/results/mlp_throughput)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.square, args.peak_repeats, args.rows, args.addmm_repeats = "128,256", 2, 4096, 2
        args.mlp_repeats, args.sizes, args.step_warmup, args.step_repeats = 3, "1e4", 1, 3
    for name in ("threads", "peak_repeats", "rows", "addmm_repeats", "mlp_repeats", "step_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.step_warmup < 0:
        ap.error("--step-warmup must be at least 0")
    square = [int(x) for x in args.square.split(",") if x.strip()]
    sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    if not square or min(square) < 1:
        ap.error("--square needs positive sizes")
    t_start = time.perf_counter()
    machine = machine_description()  # before pinning: it reports the CPUs this process may use
    pin_threads(args.threads)
    torch.set_num_threads(args.threads)
    lo = LearnedOptimizer(LOConfig())
    c = lo.config
    sizes_nominal = lo.layer_sizes()
    executed_first = c.num_element_features  # the time features go into the first layer's bias
    sizes_executed = [executed_first, *sizes_nominal[1:]]
    executed_per_element = sum(2 * a * b for a, b in zip(sizes_executed[:-1], sizes_executed[1:]))
    fpe = lo.flops_per_element()

    peak = square_peak(square, args.peak_repeats)
    print(f"peak square mm: {peak['gflops']:.1f} GFLOP/s", flush=True)
    addmm = addmm_shapes(sizes_nominal, executed_first, args.rows, args.addmm_repeats)
    chain = addmm["chain_executed"]["gflops"]
    print(f"addmm chain at {args.rows} rows: {chain:.1f} GFLOP/s", flush=True)
    mlp = mlp_alone(args.rows, args.mlp_repeats, peak["gflops"], chain, fpe, executed_per_element)
    if mlp["features"] != executed_first:  # the step's feature count must match the spec's layout
        raise RuntimeError(f"the step passed {mlp['features']} features to the MLP, expected {executed_first}")
    print(f"_mlp alone: {mlp['gflops']:.1f} GFLOP/s ({mlp['frac_of_peak_square']:.1%} of peak)", flush=True)
    steps = []
    for n in sizes:
        s = step_in_place(n, args.step_warmup, args.step_repeats, peak["gflops"], chain, fpe, executed_per_element,
                          sizes_executed, args.addmm_repeats)
        steps.append(s)
        print(f"update {s['numel']:,} params: {s['step_s'] * 1e3:.1f} ms, MLP {s['mlp_in_step_s'] * 1e3:.1f} ms "
              f"({s['mlp_share_of_step']:.1%}), {s['mlp_gflops']:.1f} GFLOP/s", flush=True)
    machine["load_average_after"] = list(os.getloadavg())
    report = {"benchmark": "bench/mlp_throughput.py", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python " + " ".join(["bench/mlp_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
              "args": vars(args), "machine": machine, "threads": args.threads,
              "torch_threads": torch.get_num_threads(),
              "config": {"layer_sizes": sizes_nominal, "flops_per_element": fpe,
                         "executed_layer_sizes": sizes_executed, "executed_flops_per_element": executed_per_element,
                         "chunk_elements": CHUNK_ELEMENTS, "step_horizon": STEP_HORIZON},
              "peak": peak, "addmm": addmm, "mlp": mlp, "steps": steps, "wall_s": time.perf_counter() - t_start}
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="mlp_throughput_")) / "mlp_throughput"
    else:
        out = ROOT / "bench" / "results" / "mlp_throughput"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(report, indent=1) + "\n")
    Path(str(out) + ".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}.json and {out}.md ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
