"""What the fused forward, backward and population steps share: layouts, Triton building blocks, host tables.

:mod:`kernels.lo_step_triton` (forward), :mod:`kernels.lo_step_backward` (backward) and
:mod:`kernels.lo_step_population` (P weight sets) run over the same multi-tensor tables and rebuild the
same features in registers, so they share, from here:

* the layouts: the ``[BLOCK, 32]`` feature tile (:data:`KPAD` columns, canonical slot ``s`` in column
  :func:`slot_column` ``(s)``), the per-tensor table widths (:data:`META_COLS`, :data:`PTR_COLS`,
  :data:`DESC_COLS`), the per-step constants (:data:`SC_COLS`, :func:`step_constant_table`) and the
  codes passed as ``tl.constexpr`` (:data:`DESIGN_CODE`, :data:`SCALE_CODE`, :data:`DTYPE_CODE`);
* the Triton building blocks: :func:`feature_tile` (load one element block, update the accumulators in
  registers, build the tile), :func:`tensor_ptrs`, the statistics and scale kernels (:func:`stats_kernel`,
  :func:`scale_kernel`, K3 / K4 of the forward, B0 of the backward), :func:`chunk_sums`,
  :func:`tanh_stable`;
* the host side: tile sizes (:class:`Blocks`), the cached tables of a list of shapes (:func:`get_plan`),
  the weights in the kernels' layout (:func:`pack_theta`), scalars rounded as the reference rounds them
  (:func:`fp32_scalar`, :func:`coefficients`, :func:`scale_args`) and what the kernels support
  (:func:`unsupported`).

Imports triton (unlike :mod:`kernels.lo_step_reference`); the specification comes from
:mod:`optimizers.lo_spec` only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lo_step_reference import NUM_SLOTS, feature_slots, unsupported_reason
from optimizers.lo_spec import LOConfig, factored_dims

KPAD = 32  # columns of the feature tile (28 canonical slots + 4 zero columns)
assert NUM_SLOTS + 4 == KPAD
META_COLS = 12  # per-tensor int64 metadata
PTR_COLS = 7  # per-tensor pointers: g, p, m, v, row, col, row factor
DESC_COLS = 12  # per factored reduction (tensor, kind) int64 metadata
SC_COLS = 8  # per-step constants per weight set: bc1, bc2, lr, exp(vector_log_lr), mix, 0, 0, 0
DESIGN_CODE = {"additive": 0, "controller": 1, "normalized": 2}
SCALE_CODE = {"none": 0, "rms": 1, "width": 2}
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
PRECISIONS = ("ieee", "tf32", "tf32x3")


def slot_column(slot: int) -> int:
    """Column of canonical feature ``slot`` in the kernel's ``[BLOCK, 32]`` tile (5-bit reversal)."""
    return int(f"{slot:05b}"[::-1], 2)


# ============================================================================================ kernels
@triton.jit
def cat32(f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15,
          f16, f17, f18, f19, f20, f21, f22, f23, f24, f25, f26, f27, f28, f29, f30, f31,
          BLOCK: tl.constexpr):
    """32 vectors [BLOCK] -> one [BLOCK, 32] tile; vector j lands in column bitreverse5(j)."""
    a0 = tl.join(f0, f1)
    a1 = tl.join(f2, f3)
    a2 = tl.join(f4, f5)
    a3 = tl.join(f6, f7)
    a4 = tl.join(f8, f9)
    a5 = tl.join(f10, f11)
    a6 = tl.join(f12, f13)
    a7 = tl.join(f14, f15)
    a8 = tl.join(f16, f17)
    a9 = tl.join(f18, f19)
    a10 = tl.join(f20, f21)
    a11 = tl.join(f22, f23)
    a12 = tl.join(f24, f25)
    a13 = tl.join(f26, f27)
    a14 = tl.join(f28, f29)
    a15 = tl.join(f30, f31)
    b0 = tl.join(a0, a1)
    b1 = tl.join(a2, a3)
    b2 = tl.join(a4, a5)
    b3 = tl.join(a6, a7)
    b4 = tl.join(a8, a9)
    b5 = tl.join(a10, a11)
    b6 = tl.join(a12, a13)
    b7 = tl.join(a14, a15)
    c0 = tl.join(b0, b1)
    c1 = tl.join(b2, b3)
    c2 = tl.join(b4, b5)
    c3 = tl.join(b6, b7)
    d0 = tl.join(c0, c1)
    d1 = tl.join(c2, c3)
    e = tl.join(d0, d1)
    return tl.reshape(e, (BLOCK, 32))


@triton.jit
def load_f32(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def adafactor_slot(r_ptr, c_ptr, f_ptr, i_row, i_col, mask, MASKED: tl.constexpr, fac, ad, oad, g2):
    """One Adafactor decay's (row, col, preconditioner) per element: factored tensors gather the
    row/col accumulators (already updated by K2) and the row factor from scratch; rank < 2 tensors
    update their full second moment here (col = row)."""
    rl = load_f32(r_ptr + i_row, mask, MASKED)
    cl = load_f32(c_ptr + i_col, mask, MASKED)
    r = tl.where(fac, rl, ad * rl + oad * g2)
    c = tl.where(fac, cl, r)
    q = tl.where(fac, load_f32(f_ptr + i_row, mask, MASKED) * tl.rsqrt(tl.maximum(cl, 1e-9)), tl.rsqrt(r + 1e-9))
    return r, c, q


@triton.jit
def feature_tile(i, mask, MASKED: tl.constexpr,
                 g_ptr, p_ptr, m_ptr0, m_ptr1, m_ptr2, v_ptr,
                 r_ptr0, r_ptr1, r_ptr2, c_ptr0, c_ptr1, c_ptr2, f_ptr0, f_ptr1, f_ptr2,
                 sbn, sb, san, sa, is_fac, grad_clip,
                 md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                 NM: tl.constexpr, NA: tl.constexpr, BLOCK: tl.constexpr):
    """Load one element block, update the accumulators in registers and build the feature tile."""
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    fac = is_fac != 0
    g = load_f32(g_ptr + i, mask, MASKED)
    g = tl.where(g != g, 0.0, g)
    g = tl.minimum(tl.maximum(g, -grad_clip), grad_clip)
    p = load_f32(p_ptr + i, mask, MASKED)
    g2 = g * g + 1e-30
    m0 = md0 * load_f32(m_ptr0 + i, mask, MASKED) + omd0 * g
    m1 = zero
    m2 = zero
    if NM > 1:
        m1 = md1 * load_f32(m_ptr1 + i, mask, MASKED) + omd1 * g
    if NM > 2:
        m2 = md2 * load_f32(m_ptr2 + i, mask, MASKED) + omd2 * g
    v = rd * load_f32(v_ptr + i, mask, MASKED) + ord_ * g * g
    rv = tl.rsqrt(v + 1e-6)
    # Adafactor slots: row/col element indices of factored tensors (flat index -> row, col)
    i_row = (i // sbn) * sb + i % sb
    i_col = (i // san) * sa + i % sa
    r0, c0, q0 = adafactor_slot(r_ptr0, c_ptr0, f_ptr0, i_row, i_col, mask, MASKED, fac, ad0, oad0, g2)
    r1 = zero
    c1 = zero
    q1 = zero
    r2 = zero
    c2 = zero
    q2 = zero
    if NA > 1:
        r1, c1, q1 = adafactor_slot(r_ptr1, c_ptr1, f_ptr1, i_row, i_col, mask, MASKED, fac, ad1, oad1, g2)
    if NA > 2:
        r2, c2, q2 = adafactor_slot(r_ptr2, c_ptr2, f_ptr2, i_row, i_col, mask, MASKED, fac, ad2, oad2, g2)
    x = cat32(g, p, m0, m1, m2, v, m0 * rv, m1 * rv, m2 * rv, rv,
               g * q0, g * q1, g * q2, r0, r1, r2, c0, c1, c2,
               tl.rsqrt(r0 + 1e-8), tl.rsqrt(r1 + 1e-8), tl.rsqrt(r2 + 1e-8),
               tl.rsqrt(c0 + 1e-8), tl.rsqrt(c1 + 1e-8), tl.rsqrt(c2 + 1e-8),
               m0 * q0, m1 * q1, m2 * q2, zero, zero, zero, zero, BLOCK)
    return x, p, m0, m1, m2, v, r0, r1, r2


@triton.jit
def tensor_ptrs(ptr_tab, meta_tab, t, P_KIND: tl.constexpr, G_KIND: tl.constexpr,
                ALIGNED: tl.constexpr):
    """Typed pointers and geometry of tensor ``t`` from the multi-tensor tables."""
    pt = ptr_tab + t * 7
    mt = meta_tab + t * 12
    if G_KIND == 0:
        g_ptr = tl.load(pt + 0).to(tl.pointer_type(tl.float32))
    elif G_KIND == 1:
        g_ptr = tl.load(pt + 0).to(tl.pointer_type(tl.bfloat16))
    else:
        g_ptr = tl.load(pt + 0).to(tl.pointer_type(tl.float16))
    if P_KIND == 0:
        p_ptr = tl.load(pt + 1).to(tl.pointer_type(tl.float32))
    elif P_KIND == 1:
        p_ptr = tl.load(pt + 1).to(tl.pointer_type(tl.bfloat16))
    else:
        p_ptr = tl.load(pt + 1).to(tl.pointer_type(tl.float16))
    m_ptr = tl.load(pt + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(pt + 3).to(tl.pointer_type(tl.float32))
    r_ptr = tl.load(pt + 4).to(tl.pointer_type(tl.float32))
    c_ptr = tl.load(pt + 5).to(tl.pointer_type(tl.float32))
    f_ptr = tl.load(pt + 6).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # host checked: every base below is 16-byte aligned
        g_ptr = tl.multiple_of(g_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    n = tl.load(mt + 0)
    if ALIGNED:  # and n % 4 == 0, so the momentum slices m + k * n stay 16-byte aligned
        n = tl.multiple_of(n, 4)
    rsize = tl.load(mt + 1)
    csize = tl.load(mt + 2)
    sbn = tl.load(mt + 3).to(tl.int32)
    sb = tl.load(mt + 4).to(tl.int32)
    san = tl.load(mt + 5).to(tl.int32)
    sa = tl.load(mt + 6).to(tl.int32)
    is_fac = tl.load(mt + 7).to(tl.int32)
    return (g_ptr, p_ptr, m_ptr, v_ptr, r_ptr, c_ptr, f_ptr, n, rsize, csize, sbn, sb, san, sa,
            is_fac)


@triton.jit
def stats_block(acc, i, mask, MASKED: tl.constexpr,
                g_ptr, p_ptr, m_ptr0, m_ptr1, m_ptr2, v_ptr,
                r_ptr0, r_ptr1, r_ptr2, c_ptr0, c_ptr1, c_ptr2, f_ptr0, f_ptr1, f_ptr2,
                sbn, sb, san, sa, is_fac, grad_clip,
                md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                NM: tl.constexpr, NA: tl.constexpr, BLOCK: tl.constexpr):
    x, p, m0, m1, m2, v, r0, r1, r2 = feature_tile(
        i, mask, MASKED, g_ptr, p_ptr, m_ptr0, m_ptr1, m_ptr2, v_ptr,
        r_ptr0, r_ptr1, r_ptr2, c_ptr0, c_ptr1, c_ptr2, f_ptr0, f_ptr1, f_ptr2,
        sbn, sb, san, sa, is_fac, grad_clip,
        md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2, NM, NA, BLOCK)
    x2 = x * x
    if MASKED:
        x2 = tl.where(mask[:, None], x2, 0.0)
    return acc + x2  # [BLOCK, 32]: reduced over rows once, at the end of the chunk


@triton.jit
def stats_kernel(chunk_tab, ptr_tab, meta_tab, part_ptr, grad_clip,
                 md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                 NM: tl.constexpr, NA: tl.constexpr, P_KIND: tl.constexpr, G_KIND: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tab + 2 * pid)
    start = tl.load(chunk_tab + 2 * pid + 1)
    (g_ptr, p_ptr, m_ptr, v_ptr, r_ptr, c_ptr, f_ptr, n, rsize, csize, sbn, sb, san, sa,
     is_fac) = tensor_ptrs(ptr_tab, meta_tab, t, P_KIND, G_KIND, ALIGNED)
    end = tl.minimum(start + CHUNK, n.to(tl.int32))
    nfull = (end - start) // BLOCK
    acc = tl.zeros([BLOCK, 32], dtype=tl.float32)
    offs = tl.arange(0, BLOCK)
    for it in range(0, nfull):
        i = tl.multiple_of(start + it * BLOCK, BLOCK) + offs
        acc = stats_block(acc, i, i < end, False, g_ptr, p_ptr, m_ptr, m_ptr + n, m_ptr + 2 * n,
                           v_ptr, r_ptr, r_ptr + rsize, r_ptr + 2 * rsize, c_ptr, c_ptr + csize,
                           c_ptr + 2 * csize, f_ptr, f_ptr + rsize, f_ptr + 2 * rsize,
                           sbn, sb, san, sa, is_fac, grad_clip,
                           md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                           NM, NA, BLOCK)
    if start + nfull * BLOCK < end:
        i = start + nfull * BLOCK + offs
        acc = stats_block(acc, i, i < end, True, g_ptr, p_ptr, m_ptr, m_ptr + n, m_ptr + 2 * n,
                           v_ptr, r_ptr, r_ptr + rsize, r_ptr + 2 * rsize, c_ptr, c_ptr + csize,
                           c_ptr + 2 * csize, f_ptr, f_ptr + rsize, f_ptr + 2 * rsize,
                           sbn, sb, san, sa, is_fac, grad_clip,
                           md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                           NM, NA, BLOCK)
    tl.store(part_ptr + pid * 32 + tl.arange(0, 32), tl.sum(acc, axis=0))


@triton.jit
def chunk_sums(meta_tab, part_ptr, t, RB: tl.constexpr):
    """Tensor ``t``'s [32] per-feature partials summed over its chunks (deterministic order), and its
    element count as fp32."""
    mt = meta_tab + t * 12
    n = tl.load(mt + 0)
    c_lo = tl.load(mt + 9).to(tl.int32)
    c_hi = tl.load(mt + 10).to(tl.int32)
    cols = tl.arange(0, 32)
    acc = tl.zeros([32], dtype=tl.float32)
    for c in range(c_lo, c_hi, RB):
        rows = c + tl.arange(0, RB)
        x = tl.load(part_ptr + rows[:, None] * 32 + cols[None, :], mask=(rows < c_hi)[:, None], other=0.0)
        acc += tl.sum(x, axis=0)
    return acc, n.to(tl.float32)


@triton.jit
def pow_pos(x, power):
    """``x ** power`` for ``x > 0`` (exactly ``x`` for power 1, as torch)."""
    return tl.where(power == 1.0, x, tl.exp2(power * tl.log2(x)))


@triton.jit
def scale_kernel(meta_tab, part_ptr, scale_ptr, sc_ptr, ss_ptr, rms_floor2, rms_ref, power, width_ref,
                 RB: tl.constexpr, SCALE: tl.constexpr):
    """Per tensor: sum its chunks' partial sums of squares; scale = rsqrt(1e-5 + sum / n). Also the
    step scale ``ss`` (``SCALE`` 0: none, 1; 1: "rms", 2: "width"): rank >= 2 tensors
    ``(sqrt(sum(p^2) / n + floor^2) / rms_ref) ** power`` (``sum(p^2)``: the ``param`` channel's
    statistic, slot 1 = column 16) or ``min(1, width_ref / max(shape)) ** power`` (the largest dim is
    the factored tensor's row length, meta columns 3 / 4), rank < 2 the member's ``exp(vector_log_lr)``
    (step constants column 3)."""
    t = tl.program_id(0)
    acc, n = chunk_sums(meta_tab, part_ptr, t, RB)
    cols = tl.arange(0, 32)
    tl.store(scale_ptr + t * 32 + cols, tl.rsqrt(1e-5 + acc / n))
    if SCALE == 0:
        ss = 1.0
    else:
        mt = meta_tab + t * 12
        is_fac = tl.load(mt + 7)
        mem = tl.load(mt + 11)
        if SCALE == 1:
            p2 = tl.sum(tl.where(cols == 16, acc, 0.0), axis=0)
            mat = pow_pos(tl.sqrt(p2 / n + rms_floor2) / rms_ref, power)
        else:
            widest = (tl.load(mt + 3) // tl.maximum(tl.load(mt + 4), 1)).to(tl.float32)
            mat = pow_pos(tl.minimum(width_ref / widest, 1.0), power)
        ss = tl.where(is_fac != 0, mat, tl.load(sc_ptr + mem * 8 + 3))
    tl.store(ss_ptr + t, ss)


@triton.jit
def tanh_stable(x):
    """tanh without overflow: sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# ============================================================================================== host
@dataclass(frozen=True)
class Blocks:
    """Tile sizes. GPU defaults; the tests use small ones so that the interpreter exercises loops,
    tails and segments on tiny tensors. K1..K5: the forward's launches (:mod:`kernels.lo_step_triton`)."""

    block: int = 64  # elements per MLP tile (the M of tl.dot; >= 16)
    chunk_iters: int = 8  # element blocks per program of the stats/main kernels
    red_lines: int = 32  # K1: lines per program
    red_len: int = 64  # K1: elements per line per iteration
    red_seg: int = 1024  # K1: elements per line segment (one program)
    fin_block: int = 256  # K2: column lines per program
    fin_groups: int = 4  # K2: row groups per program (a matrix has one group: all its rows)
    fin_len: int = 256  # K2: row values per group per iteration
    scale_rows: int = 64  # K4: chunk partials per iteration
    num_warps: int = 4
    # main kernel: re-read the small weight vectors per block instead of keeping them live across the
    # chunk loop (sm_90, tf32, block 64, 4 warps: 126 instead of 230 registers, per ptxas -v)
    reload_vectors: bool = True

    @property
    def chunk(self) -> int:
        return self.block * self.chunk_iters


DEFAULT_BLOCKS = Blocks()


def unsupported(cfg: LOConfig, params: dict[str, Tensor], grads: dict[str, Tensor] | None = None,
                state: dict | None = None) -> str | None:
    """Why :func:`lo_step` cannot run this step (None when it can)."""
    reason = unsupported_reason(cfg)
    if reason:
        return reason
    devices = {p.device for p in params.values()}
    if len(devices) > 1:
        return "parameters on more than one device"
    for k, p in params.items():
        if p.dtype not in DTYPE_CODE:
            return f"parameter {k!r} has dtype {p.dtype}"
        if p.numel() > 2**31 - 2**20:
            return f"parameter {k!r} has too many elements for int32 indexing"
        if grads is not None and grads[k].dtype not in DTYPE_CODE:
            return f"gradient {k!r} has dtype {grads[k].dtype}"
        if state is not None and any(state[key][k].dtype != torch.float32
                                     for key in ("m", "v", "row", "col") if k in state[key]):
            return f"state of {k!r} is not fp32"
    return None


@dataclass
class Plan:
    """Device tables and scratch for one list of tensor shapes (cached; pointers are per call)."""

    n_tensors: int
    meta: Tensor  # int64 [T, 12]
    chunks: Tensor  # int32 [nchunks, 2]
    n_chunks: int
    desc: Tensor | None  # int64 [ndesc, 12]
    k1_tasks: Tensor | None  # int32 [n, 3]
    k2_tasks: Tensor | None  # int32 [n, 3]
    part1: Tensor | None  # K1 partial sums
    rowfac: Tensor | None  # row factors, per factored tensor [na, rsize]
    rf_offsets: list[int]
    stats: Tensor  # [nchunks, 32]
    scale: Tensor  # [T, 32]
    sscale: Tensor  # [T] per-tensor step scale (step_scale "rms" / "width"; 1 otherwise)
    dpart: Tensor  # [nchunks] partial sums of d^2 (design="normalized")
    rn: Tensor  # [T] rsqrt(mean(d^2) + 1e-12) per tensor (design="normalized")
    ptr_key: tuple | None = None
    ptr_tab: Tensor | None = None


_PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()
_THETA_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 16


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def build_plan(shapes: list[tuple[int, ...]], cfg: LOConfig, device, blocks: Blocks,
               members: tuple[int, ...] | None = None) -> Plan:
    na_dec = len(cfg.adafactor_decays)
    meta, chunks, desc, k1, k2, rf_offsets = [], [], [], [], [], []
    n_chunks = 0
    part_size = 0
    rf_size = 0
    for t, shape in enumerate(shapes):
        n = math.prod(shape)
        c_lo = n_chunks
        for s in range(0, n, blocks.chunk):
            chunks.append((t, s))
        n_chunks = len(chunks)
        dims = factored_dims(shape)
        if dims is None:
            meta.append([n, n, n, 1, 1, 1, 1, 0, 0, c_lo, n_chunks, members[t] if members else 0])
            rf_offsets.append(-1)
            continue
        a, b = dims
        st = _strides(shape)
        na_, nb_ = shape[a], shape[b]
        sa, sb = st[a], st[b]
        rsize, csize = n // nb_, n // na_
        sa_r = sa if a > b else sa // nb_
        meta.append([n, rsize, csize, sb * nb_, sb, sa * na_, sa, 1, rf_size, c_lo, n_chunks,
                     members[t] if members else 0])
        rf_offsets.append(rf_size)
        # kind 0: row accumulator lines (reduce dim b); kind 1: column lines (reduce dim a)
        for kind, (nlines, length, stride) in enumerate(((rsize, nb_, sb), (csize, na_, sa))):
            nseg = -(-length // blocks.red_seg)
            di = len(desc)
            ng = rsize // na_
            desc.append([t, kind, nlines, length, stride, nseg, part_size, sa_r, na_, ng, rf_size, 0])
            part_size += nseg * nlines
            for seg in range(nseg):
                for j0 in range(0, nlines, blocks.red_lines):
                    k1.append((di, j0, seg))
            for k in range(na_dec):
                if kind == 1:
                    k2.extend((di, j0, k) for j0 in range(0, nlines, blocks.fin_block))
                else:
                    k2.extend((di, g0, k) for g0 in range(0, ng, blocks.fin_groups))
        rf_size += na_dec * rsize

    def i64(rows, cols):
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, cols).to(device)

    def i32(rows, cols):
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, cols).to(device)

    f32 = dict(dtype=torch.float32, device=device)
    return Plan(
        n_tensors=len(shapes), meta=i64(meta, META_COLS), chunks=i32(chunks, 2), n_chunks=n_chunks,
        desc=i64(desc, DESC_COLS) if desc else None, k1_tasks=i32(k1, 3) if k1 else None,
        k2_tasks=i32(k2, 3) if k2 else None,
        part1=torch.empty(max(part_size, 1), **f32) if desc else None,
        rowfac=torch.empty(max(rf_size, 1), **f32) if desc else None, rf_offsets=rf_offsets,
        stats=torch.empty((max(n_chunks, 1), 32), **f32), scale=torch.empty((len(shapes), 32), **f32),
        sscale=torch.empty(max(len(shapes), 1), **f32), dpart=torch.empty(max(n_chunks, 1), **f32),
        rn=torch.empty(max(len(shapes), 1), **f32),
    )


def get_plan(shapes, cfg, device, blocks, members: tuple[int, ...] | None = None) -> Plan:
    key = (tuple(shapes), len(cfg.adafactor_decays), str(device), blocks, members)
    plan = _PLANS.get(key)
    if plan is None:
        plan = build_plan(shapes, cfg, device, blocks, members)
        _PLANS[key] = plan
        while len(_PLANS) > _CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def pack_theta(theta: dict[str, Tensor], cfg: LOConfig, device) -> tuple[Tensor, ...]:
    """Weights in the kernel's layout: w0 rows moved to the feature-tile columns (zero rows for unused
    slots), hidden layers stacked, output layer (H, 2). Cached on the tensors' identity and version."""
    key = (str(device), cfg) + tuple(
        (k, v.data_ptr(), v._version, tuple(v.shape)) for k, v in sorted(theta.items()))
    hit = _THETA_CACHE.get(key)
    if hit is not None:
        return hit
    h = cfg.hidden_width
    f32 = dict(dtype=torch.float32, device=device)
    slots = feature_slots(cfg)
    cols = torch.tensor([slot_column(s) for s in slots], device=device)
    w0 = torch.zeros((KPAD, h), **f32)
    w0[cols] = theta["w0"][: len(slots)].to(**f32)
    n_mid = cfg.hidden_layers - 1
    if n_mid > 0:
        wm = torch.stack([theta[f"w{i}"].to(**f32) for i in range(1, n_mid + 1)]).contiguous()
        bm = torch.stack([theta[f"b{i}"].to(**f32) for i in range(1, n_mid + 1)]).contiguous()
    else:
        wm, bm = torch.zeros((1, h, h), **f32), torch.zeros((1, h), **f32)
    last = cfg.hidden_layers
    wo = theta[f"w{last}"].to(**f32).contiguous()
    bo = theta[f"b{last}"].to(**f32).contiguous()
    packed = (w0, wm, bm, wo, bo)
    _THETA_CACHE[key] = packed
    while len(_THETA_CACHE) > _CACHE_SIZE:
        _THETA_CACHE.popitem(last=False)
    return packed


def fp32_scalar(x: float) -> float:
    """The fp32 value of ``x`` as a Python float (what torch uses for a scalar in fp32 arithmetic)."""
    return float(torch.tensor(x, dtype=torch.float32))


def coefficients(cfg: LOConfig) -> dict[str, float]:
    """Decays d and (1 - d) exactly as the reference rounds them (tensor decays: 1 - fp32(d);
    the Python-float rms decay: fp32(1 - d))."""
    out = {}
    for name, decays in (("md", cfg.momentum_decays), ("ad", cfg.adafactor_decays)):
        t = torch.tensor(list(decays) + [0.0] * (3 - len(decays)), dtype=torch.float32)
        for k in range(3):
            out[f"{name}{k}"] = float(t[k])
            out[f"o{name}{k}"] = float(1 - t[k])
    out["rd"] = fp32_scalar(cfg.rms_decay)
    out["ord_"] = fp32_scalar(1 - cfg.rms_decay)
    return out


def scale_args(cfg: LOConfig) -> tuple[float, float, float, float]:
    """K4's step-scale scalars as the reference rounds them (fp32): floor^2, rms_ref, scale_power, width_ref."""
    return (fp32_scalar(cfg.rms_floor**2), fp32_scalar(cfg.rms_ref), fp32_scalar(cfg.scale_power),
            fp32_scalar(cfg.width_ref))


def step_constant_table(k0) -> Tensor:
    """``[SC_COLS]`` fp32 per-step constants of one weight set (:class:`StepConstants` ``k0``)."""
    z = torch.zeros((), dtype=torch.float32, device=k0.lr.device)
    return torch.stack([k0.bc1.float(), k0.bc2.float(), k0.lr.float(), k0.vscale.float(), k0.mix.float(),
                        z, z, z]).contiguous()


def is_aligned(t: Tensor, n_slices: int = 1) -> bool:
    """Base 16-byte aligned and (for stacked state) every slice too."""
    return t.data_ptr() % 16 == 0 and (n_slices == 1 or (t.numel() // n_slices * 4) % 16 == 0)
