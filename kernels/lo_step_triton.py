"""Fused Triton kernels for the learned-optimizer step (forward only).

Semantics: :mod:`kernels.lo_step_reference` (which equals ``optimizers.learned``). One call updates
many tensors with a fixed number of launches, independent of the number of tensors (multi-tensor
apply: a per-tensor table of pointers and geometry plus a per-chunk ``(tensor, start)`` table):

K1 ``_fac_partial_kernel``   factored (rank >= 2) tensors: partial sums of ``g^2 + 1e-30`` along the
                             largest dim (row) and the second largest dim (column), in line segments
                             (deterministic, no atomics).
K2 ``_fac_finalize_kernel``  sums the segments, updates the row / column accumulators in place and
                             writes the row factor ``rsqrt(max(row / mean_a(row), 1e-9))`` to scratch.
K3 ``stats_kernel``          per element: new momenta / rms / (rank < 2) second moments and the 28
                             canonical features built in registers; per chunk the sum of squares of
                             every channel (nothing else is written).
K4 ``scale_kernel``          per tensor: ``scale = rsqrt(1e-5 + sum(x^2) / n)`` per channel, and the
                             tensor's step scale (``step_scale`` "rms": from the ``param`` channel's
                             ``sum(p^2)``; "width": from the largest dim; rank < 2: exp(vector_log_lr)).
K5 ``_main_kernel``          per element block: features again, ``x * scale``, the MLP with ``tl.dot``
                             on ``[BLOCK, 32] x [32, H]`` and ``[BLOCK, H] x [H, H]`` tiles (weight
                             matrices loaded once per program), output layer on CUDA cores, the step of
                             the config's design (``DESIGN`` 0 additive, 1 controller, 2 normalized)
                             times the step scale, clamp, and in-place writes of ``p``, ``m``, ``v`` (and
                             rank < 2 second moments).
design "normalized" only: K5 with ``MODE=1`` first (features and MLP; per chunk ``sum(d^2)``, nothing
written) and ``_dnorm_kernel`` (per tensor ``rsqrt(mean(d^2) + 1e-12)``): one more pass and MLP.

Population (:mod:`kernels.lo_step_population`): meta column 11 holds each table entry's member index;
K5 reads that member's weights and step constants from stacked buffers (0 for a single weight set).
The backward kernels live in :mod:`kernels.lo_step_backward`; K3, K4 and the building blocks the
backward reuses (features, table pointers, host tables) in :mod:`kernels.lo_step_common`.

The 28 features are assembled into one ``[BLOCK, 32]`` register tile by a tree of ``tl.join``; the
tree's column order is the bit reversal of the canonical slot, which the host folds into the row
order of the first weight matrix (no data movement in the kernel). The time features (``absolute``
``tanh(t / tau - 1)``, ``fraction`` ``tanh(10 (t / T - c))`` with ``T = state["horizon"]``, or none) are
equal for all elements: their product with their weight rows is folded into the first bias on the host,
as is the nominal learning rate's schedule (:func:`kernels.lo_step_reference.step_constants`; per-step
constants ``[bc1, bc2, lr, exp(vector_log_lr), mix, 0, 0, 0]`` per weight set).

Traffic per element (fp32): K3 reads g, p, m (3), v; K5 reads them again and writes p, m, v: 68 bytes
against the 44 a single pass would need (features cannot be kept: 28 floats per element). K1 reads
the gradient of a factored tensor twice more (row and column sums): 76 bytes for matrices.

Registers (``python bench/compile_check.py --ptxas-info``, sm_90, Triton 3.9): main kernel with
``tf32`` / block 64 / 4 warps, default config (controller, rms step scale): 127, no spills (the legacy
additive design: 126; the normalized design's ``MODE=1`` pass: 140); ``ieee`` (fp32 FMA dot) spills at every tile size
tried: it is the exact mode for tests, ``tf32`` the fast one. No GPU timings exist yet: tune with
``python bench/bench_lo_step.py --tune``.

Limits (checked by :func:`unsupported`): fp32 state, fp32/bf16/fp16 parameters and gradients, at most
3 momentum / 3 adafactor decays, hidden_width a power of two in [16, 256], hidden_layers >= 1, fewer
than 2**31 - 2**20 elements per tensor. Set ``TRITON_INTERPRET=1`` before importing triton to run on
CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lo_step_common import (
    DEFAULT_BLOCKS, DESIGN_CODE, DTYPE_CODE, PRECISIONS, SCALE_CODE, Blocks, coefficients, feature_tile,
    fp32_scalar, get_plan, is_aligned, pack_theta, scale_args, scale_kernel, stats_kernel,
    step_constant_table, tanh_stable, tensor_ptrs, unsupported,
)
from kernels.lo_step_reference import RUN_KEYS, step_constants
from optimizers.lo_spec import LOConfig


# ============================================================================================ kernels
@triton.jit
def _dnorm_kernel(meta_tab, dpart_ptr, rn_ptr, RB: tl.constexpr):
    """design="normalized", per tensor: ``rn = rsqrt(sum(d^2) / n + 1e-12)`` from the chunk partials
    of the main kernel's ``MODE=1`` pass."""
    t = tl.program_id(0)
    mt = meta_tab + t * 12
    n = tl.load(mt + 0).to(tl.float32)
    c_lo = tl.load(mt + 9).to(tl.int32)
    c_hi = tl.load(mt + 10).to(tl.int32)
    acc = tl.zeros([RB], dtype=tl.float32)
    for c in range(c_lo, c_hi, RB):
        rows = c + tl.arange(0, RB)
        acc += tl.load(dpart_ptr + rows, mask=rows < c_hi, other=0.0)
    tl.store(rn_ptr + t, tl.rsqrt(tl.sum(acc, axis=0) / n + 1e-12))


@triton.jit
def _step_delta(d, mag, m0, v, bc1, bc2, lr, mix, rn, ss, exp_mult, step_mult, cbound,
                NOMINAL: tl.constexpr, DESIGN: tl.constexpr, SCALED: tl.constexpr):
    """The per-element update before the clamp, ``design`` 0 additive / 1 controller / 2 normalized,
    times the tensor's step scale ``ss`` when ``SCALED``."""
    if DESIGN == 0:
        delta = d * tl.exp(exp_mult * mag) * step_mult
        if NOMINAL:
            delta = delta + lr * ((m0 / bc1) / (tl.sqrt(v / bc2) + 1e-8))
    elif DESIGN == 1:
        delta = lr * tl.exp(cbound * tanh_stable(d)) * ((m0 / bc1) / (tl.sqrt(v / bc2) + 1e-8))
    else:
        delta = lr * (((m0 / bc1) / (tl.sqrt(v / bc2) + 1e-8)) + mix * (d * rn))
    if SCALED:
        delta = delta * ss
    return delta


@triton.jit
def _main_block(i, mask, MASKED: tl.constexpr,
                g_ptr, p_ptr, m_ptr0, m_ptr1, m_ptr2, v_ptr,
                r_ptr0, r_ptr1, r_ptr2, c_ptr0, c_ptr1, c_ptr2, f_ptr0, f_ptr1, f_ptr2,
                sbn, sb, san, sa, is_fac, grad_clip,
                md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                scale, w0, b0, w1, b1, wm_ptr, bm_ptr, wd, wm, bd, bm, bc1, bc2, lr, mix, rn, ss,
                exp_mult, step_mult, max_update, cbound, scale_t_ptr, b0_ptr, wo_ptr,
                H: tl.constexpr, NUM_MID: tl.constexpr, NOMINAL: tl.constexpr, PREC: tl.constexpr,
                NM: tl.constexpr, NA: tl.constexpr, BLOCK: tl.constexpr, RELOAD: tl.constexpr,
                DESIGN: tl.constexpr, SCALED: tl.constexpr, MODE: tl.constexpr):
    """One element block. ``MODE`` 0: the update and the writes; 1 (design="normalized"'s extra pass):
    only the MLP, returns the block's ``sum(d^2)`` (nothing is written)."""
    x, p, m0, m1, m2, v, r0, r1, r2 = feature_tile(
        i, mask, MASKED, g_ptr, p_ptr, m_ptr0, m_ptr1, m_ptr2, v_ptr,
        r_ptr0, r_ptr1, r_ptr2, c_ptr0, c_ptr1, c_ptr2, f_ptr0, f_ptr1, f_ptr2,
        sbn, sb, san, sa, is_fac, grad_clip,
        md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2, NM, NA, BLOCK)
    if RELOAD:  # per-block (L1) loads of the [32] / [H] vectors, after the features: far fewer
        hh = tl.arange(0, H)  # live registers than holding them across the chunk loop
        scale = tl.load(scale_t_ptr + tl.arange(0, 32))
        b0 = tl.load(b0_ptr + hh)
        b1 = tl.load(bm_ptr + hh)
        wd = tl.load(wo_ptr + hh * 2)
        wm = tl.load(wo_ptr + hh * 2 + 1)
    x = x * scale[None, :]
    h = tl.dot(x, w0, input_precision=PREC) + b0[None, :]
    if NUM_MID > 0:
        h = tl.maximum(h, 0.0)
        h = tl.dot(h, w1, input_precision=PREC) + b1[None, :]
    hh = tl.arange(0, H)
    for layer in tl.static_range(1, NUM_MID):
        h = tl.maximum(h, 0.0)
        wl = tl.load(wm_ptr + layer * H * H + hh[:, None] * H + hh[None, :])
        bl = tl.load(bm_ptr + layer * H + hh)
        h = tl.dot(h, wl, input_precision=PREC) + bl[None, :]
    h = tl.maximum(h, 0.0)
    d = tl.sum(h * wd[None, :], axis=1) + bd
    dsq = 0.0
    if MODE == 1:
        if MASKED:
            dsq = tl.sum(tl.where(mask, d * d, 0.0), axis=0)
        else:
            dsq = tl.sum(d * d, axis=0)
    else:
        mag = d
        if DESIGN == 0:
            mag = tl.sum(h * wm[None, :], axis=1) + bm
        delta = _step_delta(d, mag, m0, v, bc1, bc2, lr, mix, rn, ss, exp_mult, step_mult, cbound,
                            NOMINAL, DESIGN, SCALED)
        delta = tl.minimum(tl.maximum(delta, -max_update), max_update)
        dq = delta.to(p_ptr.dtype.element_ty).to(tl.float32)  # the reference casts the update first
        p_new = (p - dq).to(p_ptr.dtype.element_ty)
        if MASKED:
            tl.store(p_ptr + i, p_new, mask=mask)
            tl.store(m_ptr0 + i, m0, mask=mask)
            if NM > 1:
                tl.store(m_ptr1 + i, m1, mask=mask)
            if NM > 2:
                tl.store(m_ptr2 + i, m2, mask=mask)
            tl.store(v_ptr + i, v, mask=mask)
            if is_fac == 0:
                tl.store(r_ptr0 + i, r0, mask=mask)
                if NA > 1:
                    tl.store(r_ptr1 + i, r1, mask=mask)
                if NA > 2:
                    tl.store(r_ptr2 + i, r2, mask=mask)
        else:
            tl.store(p_ptr + i, p_new)
            tl.store(m_ptr0 + i, m0)
            if NM > 1:
                tl.store(m_ptr1 + i, m1)
            if NM > 2:
                tl.store(m_ptr2 + i, m2)
            tl.store(v_ptr + i, v)
            if is_fac == 0:
                tl.store(r_ptr0 + i, r0)
                if NA > 1:
                    tl.store(r_ptr1 + i, r1)
                if NA > 2:
                    tl.store(r_ptr2 + i, r2)
    return dsq


@triton.jit
def _main_kernel(chunk_tab, ptr_tab, meta_tab, scale_ptr, sc_ptr, ss_ptr, rn_ptr, dpart_ptr, w0_ptr, b0_ptr,
                 wm_ptr, bm_ptr, wo_ptr, bo_ptr, grad_clip, exp_mult, step_mult, max_update, cbound,
                 md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                 H: tl.constexpr, NUM_MID: tl.constexpr, NOMINAL: tl.constexpr, PREC: tl.constexpr,
                 NM: tl.constexpr, NA: tl.constexpr, P_KIND: tl.constexpr, G_KIND: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, RELOAD: tl.constexpr,
                 DESIGN: tl.constexpr, SCALED: tl.constexpr, MODE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tab + 2 * pid)
    start = tl.load(chunk_tab + 2 * pid + 1)
    (g_ptr, p_ptr, m_ptr, v_ptr, r_ptr, c_ptr, f_ptr, n, rsize, csize, sbn, sb, san, sa,
     is_fac) = tensor_ptrs(ptr_tab, meta_tab, t, P_KIND, G_KIND, ALIGNED)
    # population member of this tensor (meta column 11; 0 for a single weight set): its weight set and
    # per-step constants sit at member * (their size) in stacked buffers
    mem = tl.load(meta_tab + t * 12 + 11)
    if NUM_MID > 0:
        wm_size = NUM_MID * H * H
        bm_size = NUM_MID * H
    else:
        wm_size = H * H
        bm_size = H
    w0_ptr += mem * (32 * H)
    b0_ptr += mem * H
    wm_ptr += mem * wm_size
    bm_ptr += mem * bm_size
    wo_ptr += mem * (2 * H)
    bo_ptr += mem * 2
    sc_ptr += mem * 8
    # weights: once per program (with RELOAD the vectors are re-read per block, see _main_block)
    kk = tl.arange(0, 32)
    hh = tl.arange(0, H)
    w0 = tl.load(w0_ptr + kk[:, None] * H + hh[None, :])
    w1 = tl.load(wm_ptr + hh[:, None] * H + hh[None, :])
    if RELOAD:  # placeholders, loaded in _main_block
        scale = 0.0
        b0 = 0.0
        b1 = 0.0
        wd = 0.0
        wm = 0.0
    else:
        scale = tl.load(scale_ptr + t * 32 + kk)
        b0 = tl.load(b0_ptr + hh)
        b1 = tl.load(bm_ptr + hh)
        wd = tl.load(wo_ptr + hh * 2)
        wm = tl.load(wo_ptr + hh * 2 + 1)
    bd = tl.load(bo_ptr)
    bm = tl.load(bo_ptr + 1)
    bc1 = tl.load(sc_ptr)
    bc2 = tl.load(sc_ptr + 1)
    lr = tl.load(sc_ptr + 2)
    mix = tl.load(sc_ptr + 4)
    ss = 1.0
    if SCALED:
        ss = tl.load(ss_ptr + t)
    rn = 0.0
    if DESIGN == 2 and MODE == 0:
        rn = tl.load(rn_ptr + t)
    end = tl.minimum(start + CHUNK, n.to(tl.int32))
    nfull = (end - start) // BLOCK
    offs = tl.arange(0, BLOCK)
    dsq = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    for it in range(0, nfull):
        i = tl.multiple_of(start + it * BLOCK, BLOCK) + offs
        part = _main_block(
            i, i < end, False, g_ptr, p_ptr, m_ptr, m_ptr + n, m_ptr + 2 * n, v_ptr,
            r_ptr, r_ptr + rsize, r_ptr + 2 * rsize, c_ptr, c_ptr + csize, c_ptr + 2 * csize,
            f_ptr, f_ptr + rsize, f_ptr + 2 * rsize, sbn, sb, san, sa, is_fac, grad_clip,
            md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
            scale, w0, b0, w1, b1, wm_ptr, bm_ptr, wd, wm, bd, bm, bc1, bc2, lr, mix, rn, ss,
            exp_mult, step_mult, max_update, cbound, scale_ptr + t * 32, b0_ptr, wo_ptr,
            H, NUM_MID, NOMINAL, PREC, NM, NA, BLOCK, RELOAD, DESIGN, SCALED, MODE)
        if MODE == 1:
            dsq += part
    if start + nfull * BLOCK < end:
        i = start + nfull * BLOCK + offs
        part = _main_block(
            i, i < end, True, g_ptr, p_ptr, m_ptr, m_ptr + n, m_ptr + 2 * n, v_ptr,
            r_ptr, r_ptr + rsize, r_ptr + 2 * rsize, c_ptr, c_ptr + csize, c_ptr + 2 * csize,
            f_ptr, f_ptr + rsize, f_ptr + 2 * rsize, sbn, sb, san, sa, is_fac, grad_clip,
            md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
            scale, w0, b0, w1, b1, wm_ptr, bm_ptr, wd, wm, bd, bm, bc1, bc2, lr, mix, rn, ss,
            exp_mult, step_mult, max_update, cbound, scale_ptr + t * 32, b0_ptr, wo_ptr,
            H, NUM_MID, NOMINAL, PREC, NM, NA, BLOCK, RELOAD, DESIGN, SCALED, MODE)
        if MODE == 1:
            dsq += part
    if MODE == 1:
        tl.store(dpart_ptr + pid, dsq)


@triton.jit
def _fac_partial_kernel(task_tab, desc_tab, ptr_tab, part_ptr, grad_clip, G_KIND: tl.constexpr,
                        BL: tl.constexpr, BLEN: tl.constexpr, SEG: tl.constexpr):
    """Partial sums of g^2 + 1e-30 over one segment of BL reduction lines (row or column)."""
    pid = tl.program_id(0)
    di = tl.load(task_tab + 3 * pid)
    j0 = tl.load(task_tab + 3 * pid + 1)
    seg = tl.load(task_tab + 3 * pid + 2)
    dt = desc_tab + di * 12
    t = tl.load(dt + 0)
    nlines = tl.load(dt + 2).to(tl.int32)
    length = tl.load(dt + 3).to(tl.int32)
    s = tl.load(dt + 4).to(tl.int32)
    poff = tl.load(dt + 6).to(tl.int32)
    if G_KIND == 0:
        g_ptr = tl.load(ptr_tab + t * 7).to(tl.pointer_type(tl.float32))
    elif G_KIND == 1:
        g_ptr = tl.load(ptr_tab + t * 7).to(tl.pointer_type(tl.bfloat16))
    else:
        g_ptr = tl.load(ptr_tab + t * 7).to(tl.pointer_type(tl.float16))
    j = j0 + tl.arange(0, BL)
    jm = j < nlines
    base = (j // s) * (s * length) + j % s
    acc = tl.zeros([BL], dtype=tl.float32)
    c_lo = seg * SEG
    c_hi = tl.minimum(c_lo + SEG, length)
    for c in range(c_lo, c_hi, BLEN):
        cc = c + tl.arange(0, BLEN)
        msk = jm[:, None] & (cc < c_hi)[None, :]
        x = tl.load(g_ptr + base[:, None] + cc[None, :] * s, mask=msk, other=0.0).to(tl.float32)
        x = tl.where(x != x, 0.0, x)
        x = tl.minimum(tl.maximum(x, -grad_clip), grad_clip)
        acc += tl.sum(tl.where(msk, x * x + 1e-30, 0.0), axis=1)
    tl.store(part_ptr + poff + seg * nlines + j, acc, mask=jm)


@triton.jit
def _fac_finalize_kernel(task_tab, desc_tab, ptr_tab, part_ptr, rf_ptr, ad0, oad0, ad1, oad1, ad2,
                         oad2, BLK: tl.constexpr, BG: tl.constexpr, BA: tl.constexpr):
    """Finish the reductions, update row / column accumulators in place, write the row factor."""
    pid = tl.program_id(0)
    di = tl.load(task_tab + 3 * pid)
    start = tl.load(task_tab + 3 * pid + 1)
    k = tl.load(task_tab + 3 * pid + 2)
    dt = desc_tab + di * 12
    t = tl.load(dt + 0)
    kind = tl.load(dt + 1)
    nlines = tl.load(dt + 2).to(tl.int32)
    length = tl.load(dt + 3).to(tl.float32)
    nseg = tl.load(dt + 5).to(tl.int32)
    poff = tl.load(dt + 6).to(tl.int32)
    ad = tl.where(k == 0, ad0, tl.where(k == 1, ad1, ad2))
    oad = tl.where(k == 0, oad0, tl.where(k == 1, oad1, oad2))
    if kind == 1:  # column accumulator: one value per line
        col_ptr = tl.load(ptr_tab + t * 7 + 5).to(tl.pointer_type(tl.float32)) + k * nlines
        j = start + tl.arange(0, BLK)
        jm = j < nlines
        acc = tl.zeros([BLK], dtype=tl.float32)
        for sg in range(0, nseg):
            acc += tl.load(part_ptr + poff + sg * nlines + j, mask=jm, other=0.0)
        old = tl.load(col_ptr + j, mask=jm, other=0.0)
        tl.store(col_ptr + j, ad * old + oad * (acc / length), mask=jm)
    else:  # row accumulator: groups of na values (the row space reduced over dim a)
        sa_r = tl.load(dt + 7).to(tl.int32)
        na = tl.load(dt + 8).to(tl.int32)
        ng = tl.load(dt + 9).to(tl.int32)
        rf_off = tl.load(dt + 10).to(tl.int32)
        row_ptr = tl.load(ptr_tab + t * 7 + 4).to(tl.pointer_type(tl.float32)) + k * nlines
        rfk_ptr = rf_ptr + rf_off + k * nlines
        gi = start + tl.arange(0, BG)
        gm = gi < ng
        base = (gi // sa_r) * (sa_r * na) + gi % sa_r
        rs = tl.zeros([BG], dtype=tl.float32)
        for c in range(0, na, BA):  # pass 1: the mean over dim a of the new accumulator
            cc = c + tl.arange(0, BA)
            msk = gm[:, None] & (cc < na)[None, :]
            r = base[:, None] + cc[None, :] * sa_r
            acc = tl.zeros([BG, BA], dtype=tl.float32)
            for sg in range(0, nseg):
                acc += tl.load(part_ptr + poff + sg * nlines + r, mask=msk, other=0.0)
            new = ad * tl.load(row_ptr + r, mask=msk, other=0.0) + oad * (acc / length)
            rs += tl.sum(tl.where(msk, new, 0.0), axis=1)
        rmean = tl.where(gm, rs / na.to(tl.float32), 1.0)  # 1 on masked groups: no 0/0
        for c in range(0, na, BA):  # pass 2: recompute (nothing was written), write both
            cc = c + tl.arange(0, BA)
            msk = gm[:, None] & (cc < na)[None, :]
            r = base[:, None] + cc[None, :] * sa_r
            acc = tl.zeros([BG, BA], dtype=tl.float32)
            for sg in range(0, nseg):
                acc += tl.load(part_ptr + poff + sg * nlines + r, mask=msk, other=0.0)
            new = ad * tl.load(row_ptr + r, mask=msk, other=0.0) + oad * (acc / length)
            tl.store(row_ptr + r, new, mask=msk)
            tl.store(rfk_ptr + r, tl.rsqrt(tl.maximum(new / rmean[:, None], 1e-9)), mask=msk)


# ============================================================================================== host


def launch_group(items, cfg: LOConfig, consts, packed, precision: str, blocks: Blocks,
                 p_kind: int, g_kind: int, aligned: bool, members: tuple[int, ...] | None = None) -> None:
    """Run K1..K5 over one group of tensors sharing parameter/gradient dtypes. ``members``: per tensor,
    the index of its weight set in stacked ``consts`` / ``packed`` (population step); None: all 0."""
    device = items[0][1].device
    shapes = [tuple(it[1].shape) for it in items]
    plan = get_plan(shapes, cfg, device, blocks, members)
    ptrs = []
    for t, (g, p, m, v, row, col) in enumerate(items):
        if plan.rf_offsets[t] >= 0:
            rf = plan.rowfac.data_ptr() + 4 * plan.rf_offsets[t]
            ptrs.append((g.data_ptr(), p.data_ptr(), m.data_ptr(), v.data_ptr(), row.data_ptr(),
                         col.data_ptr(), rf))
        else:
            r = row.data_ptr()
            ptrs.append((g.data_ptr(), p.data_ptr(), m.data_ptr(), v.data_ptr(), r, r, r))
    key = tuple(ptrs)
    if plan.ptr_key != key:
        plan.ptr_tab = torch.tensor(ptrs, dtype=torch.int64).to(device)
        plan.ptr_key = key
    ptr_tab = plan.ptr_tab
    coef = coefficients(cfg)
    ad = dict(ad0=coef["ad0"], oad0=coef["oad0"], ad1=coef["ad1"], oad1=coef["oad1"],
              ad2=coef["ad2"], oad2=coef["oad2"])
    nw = blocks.num_warps
    grad_clip = fp32_scalar(cfg.grad_clip)
    if plan.k1_tasks is not None:
        _fac_partial_kernel[(plan.k1_tasks.shape[0],)](
            plan.k1_tasks, plan.desc, ptr_tab, plan.part1, grad_clip, G_KIND=g_kind,
            BL=blocks.red_lines, BLEN=blocks.red_len, SEG=blocks.red_seg, num_warps=nw)
        _fac_finalize_kernel[(plan.k2_tasks.shape[0],)](
            plan.k2_tasks, plan.desc, ptr_tab, plan.part1, plan.rowfac, **ad,
            BLK=blocks.fin_block, BG=blocks.fin_groups, BA=blocks.fin_len, num_warps=nw)
    ck = dict(NM=len(cfg.momentum_decays), NA=len(cfg.adafactor_decays), P_KIND=p_kind,
              G_KIND=g_kind, ALIGNED=aligned, BLOCK=blocks.block, CHUNK=blocks.chunk)
    stats_kernel[(plan.n_chunks,)](plan.chunks, ptr_tab, plan.meta, plan.stats, grad_clip, **coef,
                                   **ck, num_warps=nw)
    sc, b0 = consts
    scale_kernel[(plan.n_tensors,)](plan.meta, plan.stats, plan.scale, sc, plan.sscale, *scale_args(cfg),
                                    RB=blocks.scale_rows, SCALE=SCALE_CODE[cfg.step_scale], num_warps=nw)
    w0, wm, bm, wo, bo = packed
    design = DESIGN_CODE[cfg.design]
    args = (plan.chunks, ptr_tab, plan.meta, plan.scale, sc, plan.sscale, plan.rn, plan.dpart,
            w0, b0, wm, bm, wo, bo, grad_clip, fp32_scalar(cfg.exp_mult), fp32_scalar(cfg.step_mult),
            fp32_scalar(cfg.max_update), fp32_scalar(cfg.controller_bound))
    mk = dict(H=cfg.hidden_width, NUM_MID=cfg.hidden_layers - 1, NOMINAL=cfg.nominal == "adam",
              PREC=precision, RELOAD=blocks.reload_vectors, DESIGN=design, SCALED=cfg.step_scale != "none", **ck)
    if design == 2:  # normalized: the MLP once more for the per-tensor rms of d, before the update
        _main_kernel[(plan.n_chunks,)](*args, **coef, **mk, MODE=1, num_warps=nw)
        _dnorm_kernel[(plan.n_tensors,)](plan.meta, plan.dpart, plan.rn, RB=blocks.scale_rows, num_warps=nw)
    _main_kernel[(plan.n_chunks,)](*args, **coef, **mk, MODE=0, num_warps=nw)


def lo_step(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict, theta: dict[str, Tensor],
            cfg: LOConfig, *, precision: str = "ieee", inplace: bool = False,
            blocks: Blocks = DEFAULT_BLOCKS):
    """One fused learned-optimizer step; the interface and results of
    :func:`kernels.lo_step_reference.lo_step_reference` / ``BoundLearnedOptimizer.update``.

    ``precision``: ``tl.dot`` input precision, ``"ieee"`` (exact fp32), ``"tf32"`` (tensor cores) or
    ``"tf32x3"``. ``inplace=True`` updates the parameter and state tensors in place and returns them
    (the fast path for a ``torch.optim`` front end); ``inplace=False`` clones them first, so nothing
    the caller holds is mutated (the functional contract of ``optimizers``). Either way the returned
    state has a new ``step`` tensor. Non-contiguous tensors are handled through contiguous copies
    (copied back afterwards). Not differentiable.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not params:
        return {}, {**state, "step": state["step"] + 1}
    reason = unsupported(cfg, params, grads, state)
    if reason:
        raise NotImplementedError(f"lo_step (Triton) cannot run this step: {reason}")
    with torch.no_grad():
        return _lo_step(params, grads, state, theta, cfg, precision, inplace, blocks)


def _lo_step(params, grads, state, theta, cfg: LOConfig, precision: str, inplace: bool, blocks: Blocks):
    def clone(t: Tensor) -> Tensor:  # in place: the caller's very tensors (written through pointers)
        return t if inplace else t.detach().clone(memory_format=torch.contiguous_format)

    new_params = {k: clone(p) for k, p in params.items()}
    new_state: dict = {"step": state["step"] + 1,  # where the caller keeps it (optimizers.learned: CPU)
                       "m": {}, "v": {}, "row": {}, "col": {}}
    for key in RUN_KEYS:
        if key in state:
            new_state[key] = state[key]
    for key in ("m", "v", "row", "col"):
        for k, t in state[key].items():
            new_state[key][k] = clone(t)
    device = next(iter(params.values())).device
    k0 = step_constants(state["step"], theta, cfg, device=device, horizon=state.get("horizon"),
                        loss_stats=state.get("loss_stats"))
    consts = (step_constant_table(k0), k0.b0.float().contiguous())
    packed = pack_theta(theta, cfg, device)

    writeback: list[tuple[Tensor, Tensor]] = []

    def contig(t: Tensor, write: bool) -> Tensor:
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if write:  # the kernels write c; the caller's tensor gets it afterwards
            writeback.append((t, c))
        return c

    nm = len(cfg.momentum_decays)
    groups: dict[tuple, list] = {}
    for k, p in new_params.items():
        if p.numel() == 0:  # nothing to update; state left as it is
            continue
        g = contig(grads[k], False)
        if g.device != p.device or g.shape != p.shape:
            raise ValueError(f"gradient {k!r} ({tuple(g.shape)} on {g.device}) does not match its "
                             f"parameter ({tuple(p.shape)} on {p.device})")
        row = contig(new_state["row"][k], True)
        col = contig(new_state["col"][k], True) if k in new_state["col"] else row  # rank < 2: unused
        item = (g, contig(p, True), contig(new_state["m"][k], True), contig(new_state["v"][k], True), row, col)
        aligned = is_aligned(item[0]) and is_aligned(item[1]) and is_aligned(item[2], nm) and is_aligned(item[3])
        groups.setdefault((DTYPE_CODE[p.dtype], DTYPE_CODE[g.dtype], aligned), []).append(item)
    for (p_kind, g_kind, aligned), items in groups.items():
        launch_group(items, cfg, consts, packed, precision, blocks, p_kind, g_kind, aligned)
    for orig, c in writeback:
        orig.copy_(c)
    return new_params, new_state
