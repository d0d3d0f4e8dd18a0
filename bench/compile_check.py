"""Compile every Triton kernel of the fused step for an NVIDIA target, without a GPU.

    python bench/compile_check.py [--arch 90] [--ptxas-info] [--full]

The CPU interpreter (``tests/test_kernels.py``) checks the kernels' numbers but not that they compile:
the real compiler rejects things the interpreter accepts. ``triton.compile`` runs the whole pipeline
(frontend, TTIR/TTGIR passes, LLVM, ptxas from the triton wheel) for a ``GPUTarget`` with no device
present. ``--ptxas-info`` additionally reports registers and spills of each variant (needs a ptxas
that accepts the PTX version triton emits; the wheel ships one or two).

Exit status 0 when every variant compiled, 1 when one failed, 3 when this triton's ahead-of-time API
is not the one used here (nothing was checked). Must run in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POINTERS = {
    "chunk_tab": "*i32", "task_tab": "*i32", "ptr_tab": "*i64", "meta_tab": "*i64", "desc_tab": "*i64",
    "part_ptr": "*fp32", "scale_ptr": "*fp32", "sc_ptr": "*fp32", "w0_ptr": "*fp32", "b0_ptr": "*fp32",
    "wm_ptr": "*fp32", "bm_ptr": "*fp32", "wo_ptr": "*fp32", "bo_ptr": "*fp32", "rf_ptr": "*fp32",
    "gptr_tab": "*i64", "tpart_ptr": "*fp32", "spart_ptr": "*fp32", "kc_ptr": "*fp32",
    "ss_ptr": "*fp32", "rn_ptr": "*fp32", "dpart_ptr": "*fp32",
}


def variants(lt, lb=None, full: bool = False):
    """(name, kernel, constexprs, num_warps) for the launches ``lo_step`` (and, given the backward module
    ``lb``, ``lo_step_backward``) makes, default and edge. The population step launches the forward
    kernels (the member index is data), so it adds no variant."""
    from kernels import lo_step_common as common

    b = common.DEFAULT_BLOCKS
    elem = dict(NM=3, NA=3, P_KIND=0, G_KIND=0, ALIGNED=True, BLOCK=b.block, CHUNK=b.chunk)
    # the default LOConfig: design "controller", step_scale "rms" (time features are host constants)
    mlp = dict(H=32, NUM_MID=1, NOMINAL=True, RELOAD=b.reload_vectors, DESIGN=1, SCALED=True, MODE=0)
    legacy = dict(DESIGN=0, SCALED=False, MODE=0)
    odd = dict(NM=2, NA=1, P_KIND=1, G_KIND=1, ALIGNED=False, BLOCK=32, CHUNK=64)
    out = []
    for prec in common.PRECISIONS:
        out.append((f"main[{prec}]", lt._main_kernel, {**elem, **mlp, "PREC": prec}, b.num_warps))
    out += [
        ("main[normalized,d^2 pass]", lt._main_kernel, {**elem, **mlp, "DESIGN": 2, "MODE": 1, "PREC": "tf32"},
         b.num_warps),
        ("main[normalized]", lt._main_kernel, {**elem, **mlp, "DESIGN": 2, "PREC": "tf32"}, b.num_warps),
        ("main[bf16,NM2,NA1,3 layers,h16,no nominal]", lt._main_kernel,
         {**odd, "H": 16, "NUM_MID": 2, "NOMINAL": False, "RELOAD": True, "PREC": "tf32", **legacy,
          "SCALED": True}, 4),
        ("main[fp16,1 layer,h64,no reload]", lt._main_kernel,
         {**elem, "P_KIND": 2, "G_KIND": 2, "H": 64, "NUM_MID": 0, "NOMINAL": True, "RELOAD": False,
          "PREC": "tf32", **legacy}, 4),
        ("stats", common.stats_kernel, elem, b.num_warps),
        ("stats[bf16,NM2,NA1]", common.stats_kernel, odd, 4),
        ("scale[rms]", common.scale_kernel, dict(RB=b.scale_rows, SCALE=1), b.num_warps),
        ("scale[width]", common.scale_kernel, dict(RB=b.scale_rows, SCALE=2), b.num_warps),
        ("scale", common.scale_kernel, dict(RB=b.scale_rows, SCALE=0), b.num_warps),
        ("dnorm", lt._dnorm_kernel, dict(RB=b.scale_rows), b.num_warps),
        ("fac_partial", lt._fac_partial_kernel,
         dict(G_KIND=0, BL=b.red_lines, BLEN=b.red_len, SEG=b.red_seg), b.num_warps),
        ("fac_partial[bf16]", lt._fac_partial_kernel, dict(G_KIND=1, BL=8, BLEN=16, SEG=64), 4),
        ("fac_finalize", lt._fac_finalize_kernel, dict(BLK=b.fin_block, BG=b.fin_groups, BA=b.fin_len),
         b.num_warps),
    ]
    if lb is not None:
        from optimizers.lo_spec import LOConfig

        def tp(h, layers):
            return lb.theta_partial_size(LOConfig(hidden_width=h, hidden_layers=layers))

        belem = dict(NM=3, NA=3, P_KIND=0, G_KIND=0, BLOCK=b.block, CHUNK=b.chunk)
        bodd = dict(NM=2, NA=1, P_KIND=1, G_KIND=1, BLOCK=32, CHUNK=64)
        for prec in ("ieee", "tf32") if full else ("tf32",):  # same code paths; ieee only with --full
            bm = dict(H=32, NUM_MID=1, NOMINAL=True, PREC=prec, DESIGN=1, SCALED=True)  # the default config
            out.append((f"bwd_theta[{prec}]", lb._bwd_theta_kernel, {**belem, **bm, "TP": tp(32, 2)}, b.num_warps))
            out.append((f"bwd_elem[{prec}]", lb._bwd_elem_kernel, {**belem, **bm}, b.num_warps))
        odd_mlp = dict(H=16, NUM_MID=2, NOMINAL=False, PREC="tf32", DESIGN=0, SCALED=False)
        out += [
            ("bwd_theta[bf16,NM2,NA1,3 layers,h16]", lb._bwd_theta_kernel,
             {**bodd, **odd_mlp, "TP": tp(16, 3)}, 4),
            ("bwd_elem[bf16,NM2,NA1,3 layers,h16]", lb._bwd_elem_kernel, {**bodd, **odd_mlp}, 4),
            ("dscale", lb._dscale_kernel, dict(RB=b.scale_rows), b.num_warps),
        ]
        if full:
            out.append(("bwd_elem[1 layer,h64]", lb._bwd_elem_kernel,
                        {**belem, "H": 64, "NUM_MID": 0, "NOMINAL": True, "PREC": "tf32", "DESIGN": 0,
                         "SCALED": True}, 4))
    return out


def ptxas_info(ptx: str) -> str:
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")), "sm_90a")
        for exe in ("ptxas", "ptxas-blackwell"):
            if not (bindir / exe).exists():
                continue
            r = subprocess.run([str(bindir / exe), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return "; ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                                 if "Used" in line or "spill" in line)
    return "(no ptxas accepted this PTX)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    ap.add_argument("--ptxas-info", action="store_true", help="report registers / spills per variant")
    ap.add_argument("--full", action="store_true",
                    help="also the backward kernels' ieee and 1-layer/h64 variants (slow to compile)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 3
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:
        print(f"compile_check: triton's ahead-of-time API is not available here ({e!r})", file=sys.stderr)
        return 3
    from kernels import lo_step_backward as lb
    from kernels import lo_step_triton as lt

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, consts, nw in variants(lt, lb, full=args.full):
        try:
            sig = {a: ("constexpr" if a in consts else POINTERS.get(a, "fp32")) for a in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        except Exception as e:  # a different ASTSource signature: not our kernels' fault
            print(f"compile_check: cannot describe {name} to this triton's ASTSource ({e!r})", file=sys.stderr)
            return 3
        try:
            k = triton.compile(src, target=target, options={"num_warps": nw})
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=3)}", flush=True)
            continue
        info = ptxas_info(k.asm["ptx"]) if args.ptxas_info else ""
        print(f"ok   {name} (num_warps={nw}) {info}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
