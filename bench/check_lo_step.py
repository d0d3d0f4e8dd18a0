"""Check the *compiled* Triton step against the PyTorch reference on a CUDA device.

    python bench/check_lo_step.py            # exit 0: all cases agree, 1: a mismatch, 2: no CUDA
    python bench/check_lo_step.py --record   # and, when all agree, trust this device class by default
                                             # (adds it to kernels/gpu_checks.json; commit that file)

Runs in its own process on purpose: the kernel tests import triton under its interpreter in the test
process (``tests/triton_interpreter.py``), so ``tests/test_kernels_cuda.py`` calls this script in a
subprocess. Cases: the default
config (design "controller", fraction-of-training time features, rms step scale), the legacy design with
a learned-term-dominated step, the "normalized" design and the "width" step scale without time features;
0-d / 1-d / 2-d / 3-d / 4-d and odd shapes, tensors spanning many chunks and reduction segments at the
default tile sizes, a non-contiguous tensor, bf16 parameters; ``tl.dot`` precision ``ieee`` (tight) and
``tf32`` (loose). Also the Triton backward (:mod:`kernels.lo_step_backward`, every input's gradient
against the reference autograd backward, with one tensor whose gradient is always zero so its ``v = 0``:
every gradient must be finite) for the default and the legacy design, and the population step
(:mod:`kernels.lo_step_population`, P = 4 weight sets and run lengths T against the per-member reference).
Prints one JSON line per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.lo_step_reference import lo_step_reference  # noqa: E402
from optimizers.learned import LearnedOptimizer, LOConfig  # noqa: E402

HORIZON = 50  # T of the fraction-of-training time features (members of the population: T, 2T, ...)
LEGACY = dict(design="additive", time_features="absolute", step_scale="none")  # the original design

SHAPES = {
    "scalar": (), "bias": (7,), "odd": (1001,), "w": (257, 129), "tall": (3000, 5), "row1": (1, 77),
    "w3": (6, 2, 50), "conv": (64, 32, 3, 3), "big": (1024, 1536), "vec": (70001,),
}
# relative to the tensor's largest update (beyond one ulp of p and of delta); state: elementwise relative
TOL = {"ieee": 2e-4, "tf32": 2e-2}
STATE_RTOL = 1e-4


def run_case(cfg: LOConfig, precision: str, pdtype: torch.dtype, noncontig: bool, seed: int = 0, *,
             device: str = "cuda", shapes: dict = SHAPES, lt=None, blocks=None, steps: int = 3) -> dict:
    if lt is None:
        from kernels import lo_step_triton as lt
    blocks = blocks or lt.DEFAULT_BLOCKS
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    lo = LearnedOptimizer(cfg)
    theta = {k: v.to(dev) for k, v in lo.init_theta(seed + 1).items()}
    params = {k: (torch.randn(s, generator=gen, device=dev) * 0.05).to(pdtype) for k, s in shapes.items()}
    state = lo.bind(theta, total_steps=HORIZON if cfg.needs_total_steps else None).init(params)
    worst, sworst = 0.0, 0.0
    for _ in range(steps):
        grads = {k: (torch.randn(p.shape, generator=gen, device=dev) * 2).to(pdtype) for k, p in params.items()}
        grads["bias"][0] = float("nan")
        ref_p, ref_s = lo_step_reference(params, grads, state, theta, cfg)
        p_in, g_in = params, grads
        if noncontig:
            p_in = dict(params)
            p_in["big"] = params["big"].t().contiguous().t()
            g_in = dict(grads)
            g_in["w"] = torch.empty(grads["w"].shape[::-1], device=dev, dtype=pdtype).t().copy_(grads["w"])
        got_p, got_s = lt.lo_step(p_in, g_in, state, theta, cfg, precision=precision, blocks=blocks)
        for k in params:
            step = (ref_p[k].double() - params[k].double()).abs()
            err = (got_p[k].double() - ref_p[k].double()).abs()
            # one ulp of p (rounding of p - delta) and of delta (the reference casts delta to p's dtype)
            ulp = torch.finfo(pdtype).eps * (ref_p[k].double().abs() + step)
            if step.numel():
                rel = ((err - ulp).clamp(min=0) / max(step.amax().item(), 1e-30)).amax().item()
                worst = max(worst, rel)
        for key in ("m", "v", "row", "col"):
            for k, ref in ref_s[key].items():
                if ref.numel():
                    r = ((got_s[key][k] - ref).abs() / (ref.abs() + 1e-30)).amax().item()
                    sworst = max(sworst, r)
        params, state = ref_p, ref_s
    ok = worst <= TOL[precision] and sworst <= STATE_RTOL
    return {"ok": ok, "max_update_err_rel_to_step": worst, "max_state_rel_err": sworst}


BWD_TOL = {"ieee": 1e-4, "tf32": 5e-2}  # max |err| relative to the gradient tensor's largest entry


BWD_SHAPES = {k: SHAPES[k] for k in ("scalar", "bias", "odd", "w", "w3", "conv")}
POP_SHAPES = {k: SHAPES[k] for k in ("bias", "w", "conv")}


def run_backward_case(cfg: LOConfig, precision: str, seed: int = 0, device: str = "cuda", *,
                      shapes: dict = BWD_SHAPES, blocks=None) -> dict:
    """Triton backward vs the reference backward: gradients of a random linear function of all outputs.
    The gradient of tensor ``w3`` is zero at every step (``v = 0``: the nominal term's ``sqrt(v)``), and
    every gradient must be finite."""
    from kernels.lo_step_autograd import lo_step_autograd

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    lo = LearnedOptimizer(cfg)
    theta = {k: v.to(dev) for k, v in lo.init_theta(seed + 1).items()}
    params = {k: torch.randn(s, generator=gen, device=dev) * 0.05 for k, s in shapes.items()}
    state = lo.bind(theta, total_steps=HORIZON if cfg.needs_total_steps else None).init(params)

    def grads():
        out = {k: torch.randn(p.shape, generator=gen, device=dev) for k, p in params.items()}
        if "w3" in out:
            out["w3"].zero_()
        return out

    for _ in range(2):  # non-zero accumulators
        params, state = lo_step_reference(params, grads(), state, theta, cfg)
    g = grads()
    w = None
    out = {}
    for name, bwd in (("ref", "reference"), ("tri", "triton")):
        leaves = {("theta", k): v.clone().requires_grad_() for k, v in theta.items()}
        leaves.update({("params", k): v.clone().requires_grad_() for k, v in params.items()})
        leaves.update({("grads", k): v.clone().requires_grad_() for k, v in g.items()})
        leaves.update({(key, k): v.clone().requires_grad_() for key in ("m", "v", "row", "col")
                       for k, v in state[key].items()})
        pick = lambda where, leaves=leaves: {k: v for (w_, k), v in leaves.items() if w_ == where}  # noqa: E731
        st = {**state, **{key: pick(key) for key in ("m", "v", "row", "col")}}
        new_p, new_s = lo_step_autograd(pick("params"), pick("grads"), st, pick("theta"), cfg, forward="triton",
                                        backward=bwd, precision=precision, blocks=blocks)
        outs = list(new_p.values()) + [t for key in ("m", "v", "row", "col") for t in new_s[key].values()]
        if w is None:
            w = [torch.randn(t.shape, generator=gen, device=dev) for t in outs]
        loss = sum((t * wi).sum() for t, wi in zip(outs, w))
        out[name] = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    worst, where = 0.0, None
    finite = all(bool(t.isfinite().all()) for d in out.values() for t in d.values())
    for k, ref in out["ref"].items():
        if ref.numel():
            e = ((out["tri"][k] - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
            if not e <= worst:
                worst, where = e, "/".join(k)
    return {"ok": finite and worst <= BWD_TOL[precision], "finite": finite, "max_grad_err_rel": worst,
            "worst": where}


def run_population_case(cfg: LOConfig, precision: str, pop: int = 4, device: str = "cuda", *,
                        shapes: dict = POP_SHAPES, blocks=None) -> dict:
    """P weight sets (and run lengths T, 2T, ... where the config sees t / T) in one population step vs
    the per-member reference."""
    from kernels.lo_step_population import population_lo_step, population_lo_step_reference

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    lo = LearnedOptimizer(cfg)
    thetas = [{k: v.to(dev) for k, v in lo.init_theta(j).items()} for j in range(pop)]
    stack = lambda ds: {k: torch.stack([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
    params = {k: torch.randn((pop, *s), generator=gen, device=dev) * 0.05 for k, s in shapes.items()}
    grads = {k: torch.randn(p.shape, generator=gen, device=dev) for k, p in params.items()}
    total = HORIZON if cfg.needs_total_steps else None
    state = torch.func.vmap(lambda p: lo.bind(thetas[0], total_steps=total).init(p))(params)
    state["step"] = torch.arange(pop, device=dev, dtype=torch.float32)
    if cfg.needs_total_steps:
        state["horizon"] = HORIZON * torch.arange(1, pop + 1, device=dev, dtype=torch.float32)
    th = stack(thetas)
    ref_p, _ = population_lo_step_reference(params, grads, state, th, cfg)
    got_p, _ = population_lo_step(params, grads, state, th, cfg, precision=precision, blocks=blocks)
    worst = max(((got_p[k] - ref_p[k]).abs().max() / (ref_p[k] - params[k]).abs().max()).item() for k in params)
    return {"ok": worst <= TOL[precision], "max_update_err_rel_to_step": worst}


def run_all(device: str = "cuda", *, shapes: dict = SHAPES, blocks=None, lt=None, out=print,
            steps: int = 3) -> int:
    """Every case (forward, backward, population; both precisions); ``out`` gets one JSON line per case.
    Returns the number of failed cases. ``shapes`` / ``blocks`` / ``lt`` / ``steps`` (of each forward
    case) let the CPU tests run the same cases through the interpreter on small tensors."""
    learned = LOConfig(**LEGACY, nominal="none", output_init_scale=1.0)  # the MLP term dominates the step
    cases = []
    for cname, cfg in (("default", LOConfig()), ("learned", learned)):
        for prec in ("ieee", "tf32"):
            cases.append((cname, cfg, prec, torch.float32, False))
    cases.append(("learned-noncontig", learned, "ieee", torch.float32, True))
    cases.append(("learned-bf16", learned, "ieee", torch.bfloat16, False))
    cases.append(("default-bf16", LOConfig(), "ieee", torch.bfloat16, False))
    cases.append(("normalized", LOConfig(design="normalized", mix_init=1.0), "ieee", torch.float32, False))
    cases.append(("width-no-time", LOConfig(step_scale="width", time_features="none"), "ieee", torch.float32,
                  False))
    failed = 0
    bwd_cases = [("backward", LOConfig(output_init_scale=1.0), prec) for prec in ("ieee", "tf32")]
    bwd_cases.append(("backward-legacy", LOConfig(**LEGACY, output_init_scale=1.0), "ieee"))
    pop_cases = [("population", LOConfig(output_init_scale=1.0), prec) for prec in ("ieee", "tf32")]
    for name, cfg, prec in [*bwd_cases, *pop_cases]:
        fn = run_population_case if name.startswith("population") else run_backward_case
        try:
            res = fn(cfg, prec, device=device, blocks=blocks,
                     shapes={k: shapes[k] for k in (POP_SHAPES if fn is run_population_case else BWD_SHAPES)})
        except Exception as e:  # report every case
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        failed += not res["ok"]
        out(json.dumps({"case": name, "precision": prec, **res}))
    for name, cfg, prec, dt, nc in cases:
        try:
            res = run_case(cfg, prec, dt, nc, device=device, shapes=shapes, lt=lt, blocks=blocks, steps=steps)
        except Exception as e:  # report every case
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        failed += not res["ok"]
        out(json.dumps({"case": name, "precision": prec, "dtype": str(dt), **res}))
    return failed


def record_pass(path: Path, device_name: str) -> None:
    """Add ``device_name`` to the record of passing GPU checks (what the automatic dispatch trusts)."""
    import datetime
    import subprocess

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - the check itself needs triton
        triton_version = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    data = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    data.setdefault("devices", {})[device_name] = {
        "passed": True, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "triton": triton_version, "commit": commit}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("check_lo_step: no CUDA device; nothing checked", file=sys.stderr)
        return 2
    failed = run_all("cuda", out=lambda line: print(line, flush=True))
    if not failed and "--record" in argv:
        from kernels import GPU_CHECKS

        record_pass(GPU_CHECKS, torch.cuda.get_device_name())
        print(f"check_lo_step: recorded {torch.cuda.get_device_name()!r} in {GPU_CHECKS}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
