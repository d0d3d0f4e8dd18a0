"""Benchmark of one learned-optimizer step on a CUDA device.

Compares, for transformer-like parameter sets of 1M .. 1B elements (as many as fit in memory):

* ``reference``         :func:`kernels.lo_step_reference.lo_step_reference`, eager PyTorch
* ``reference_compiled`` the same under ``torch.compile``
* ``triton_<precision>`` :func:`kernels.lo_step_triton.lo_step` (in place), per ``tl.dot`` precision
* ``adamw_fused``        ``torch.optim.AdamW(fused=True)``: the floor a learned step is measured against

Each timing is the median over ``--repeats`` steps (CUDA events, after ``--warmup`` steps). Throughput is
reported as GB/s of the bytes the step must move (read g, p, momenta, rms; write p, momenta, rms:
44 B/element for fp32; AdamW: 28 B/element) and as a fraction of the measured device-to-device copy
bandwidth; ``kernel_bytes`` is what the two-pass Triton design actually moves. Results go to
``<out>/lo_step_<device>.json`` and a roofline plot ``<out>/lo_step_roofline_<device>.png``.

    python -m kernels.bench_lo_step --sizes 1e6,1e7,1e8,1e9 --repeats 50

Needs a CUDA device (exits with status 2 and a message otherwise).
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


def _count(text: str) -> int:
    return int(float(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench_lo_step", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e6,1e7,1e8,1e9",
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
    ap.add_argument("--out", default=str(ROOT / "bench"), help="output folder (JSON + PNG)")
    args = ap.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
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


def make_problem(shapes, dtype, device, cfg: LOConfig, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = {f"t{i}": (torch.randn(s, generator=gen, device=device) * 0.02).to(dtype) for i, s in enumerate(shapes)}
    grads = {k: (torch.randn(p.shape, generator=gen, device=device) * 1e-2).to(dtype) for k, p in params.items()}
    lo = LearnedOptimizer(cfg)
    theta = {k: v.to(device) for k, v in lo.init_theta(seed).items()}
    state = lo.bind(theta).init(params)
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

    def record(name, fn, moved_bytes, ref_bytes=None):
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
        gbs = moved_bytes / t["median_s"] / 1e9
        mlp_flops = 0 if name.startswith("adamw") else flops  # AdamW runs no MLP
        row["methods"][name] = {
            **t, "bytes": moved_bytes, "GB_per_s": gbs, "fraction_of_copy_bw": gbs * 1e9 / copy_bw,
            "params_per_s": n / t["median_s"], "TFLOP_per_s": mlp_flops / t["median_s"] / 1e12,
        }
        if ref_bytes is not None:
            row["methods"][name]["kernel_bytes"] = ref_bytes
            row["methods"][name]["kernel_GB_per_s"] = ref_bytes / t["median_s"] / 1e9
        print(f"  {name:24s} {t['median_s'] * 1e3:9.3f} ms  {gbs:8.1f} GB/s  "
              f"({gbs * 1e9 / copy_bw:5.1%} of copy)", flush=True)

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
    ms = row["methods"]
    base = {k: v["median_s"] for k, v in ms.items() if "median_s" in v}
    row["speedups"] = {
        f"{a}_over_{b}": base[b] / base[a] for a in base for b in base
        if a.startswith("triton") and not b.startswith("triton")
    }
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
    for row in result["sizes"]:
        for name, m in row.get("methods", {}).items():
            if "median_s" not in m:
                continue
            flop = m["TFLOP_per_s"] * 1e12 * m["median_s"]
            intensity = flop / m["bytes"] if flop > 0 else None
            if intensity is None:
                continue
            ax.scatter(intensity, m["TFLOP_per_s"], marker=markers.get(name, "o"), s=18 + 6 * math.log10(row["params"]),
                       label=f"{name} ({row['params'] / 1e6:.0f}M)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (model FLOP / byte the step must move)")
    ax.set_ylabel("TFLOP/s (MLP FLOPs)")
    ax.set_title(f"learned-optimizer step on {result['device']}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lo_step: no CUDA device (torch.cuda.is_available() is False); this benchmark only measures "
              "GPUs. Nothing was run.", file=sys.stderr)
        return 2
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
    json_path = out / f"lo_step_{tag}.json"
    for n in args.sizes:
        print(f"size {n:.3g}", flush=True)
        result["sizes"].append(bench_size(n, args, cfg, device, copy_bw, lt))
        json_path.write_text(json.dumps(result, indent=2))  # partial results survive a crash
    png = out / f"lo_step_roofline_{tag}.png"
    roofline_png(result, png, args.peak_tflops, args.peak_fp32_tflops)
    print(f"wrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
