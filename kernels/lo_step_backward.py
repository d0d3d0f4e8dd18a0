"""Triton backward of the fused learned-optimizer step (truncated backprop through an unroll).

:func:`lo_step_backward` returns the gradients of one step ``(params, grads, state, theta) ->
(new_params, new_state)`` (:func:`kernels.lo_step_reference.lo_step_reference`) with respect to theta
(every MLP weight and bias, ``nominal_log_lr``, ``nominal_time_w``, ``vector_log_lr``) and to the incoming parameters,
gradients and accumulators, given the gradients of the outputs. :class:`kernels.lo_step_autograd.LOStepFunction`
calls it (``backward="triton"``); the PyTorch reference backward stays beside it as the reference.

Launches (all tensors of a dtype group at once, the forward's multi-tensor tables):

B0 ``stats_kernel`` + ``scale_kernel`` (the forward's, :mod:`kernels.lo_step_common`)  the per-tensor
                          feature scales, recomputed.
B1 ``_bwd_theta_kernel``  per element block: features, the MLP forward (activations recomputed, never
                          stored), the update's derivative, the MLP backward with ``tl.dot``; per program
                          the partial sums of every theta gradient and of ``sum_i dL/dxn_ic * x_ic``
                          (the normalisation statistics' gradient), written to per-program rows
                          (deterministic: no atomics), summed afterwards (``partials.sum(0)``).
B2 ``_dscale_kernel``     per tensor: the normalisation's backward coefficient
                          ``kc = -0.5 * scale^3 * sum(dxn * x) / n`` (so ``dx = dxn * scale + 2 x kc``).
B3 ``_bwd_elem_kernel``   per element block: features and the MLP forward + backward again (cheaper than
                          storing 28 feature gradients per element), then the features' and accumulators'
                          backward; writes the gradients of p, g, the momenta, the rms and (rank < 2) the
                          full second moments; for factored (rank >= 2) tensors it writes the gradients of
                          the broadcast row / column accumulators and of the row factor per element into a
                          scratch buffer ``[3, na, n]``.

PyTorch does what is left, all of it small or a plain reduction:

* theta: the sum of the per-program partials, the bit-reversed feature rows of ``w0`` mapped back, and
  the time-feature rows of ``w0``, ``b0``, ``nominal_log_lr``, ``nominal_time_w`` and ``vector_log_lr``
  (the rank < 2 tensors' step scale; its partial is ``sum(dL/d delta * delta_unscaled)`` over them)
  through :func:`kernels.lo_step_reference.step_constants` with autograd (a handful of scalars). The rank
  >= 2 tensors' step scale (``rms`` of ``p``, or ``width``) passes no gradient, as in ``optimizers.learned``.
* factored tensors: the scratch summed over the broadcast dims (``sum(dim)``, deterministic), then the
  Adafactor row / column update and row factor differentiated by autograd on the reference's own
  :func:`~kernels.lo_step_reference.factored_update` (O(rows + cols) outputs; it re-reads ``g`` once for
  the ``g^2`` means' backward). Fusing this would need row / column scatter-adds inside B3 (atomics, not
  deterministic) or a third element pass; it is the documented cost of the factored path: 36 bytes per
  element written to the scratch and read back for the default 3 adafactor decays, and ``3 * na * 4``
  bytes per element of scratch memory, allocated per call.

Traffic per element (fp32, default config): B0 reads g, p, m (3), v; B1 the same plus dp; B3 the same
plus dp, dm (3), dv and writes dp, dg, dm (3), dv. Compute: the MLP forward twice and its backward twice.

Registers (``python bench/compile_check.py --ptxas-info --full``, sm_90, Triton 3.9, block 64, 4 warps,
H = 32): B1 ``tf32`` 255 registers and ~480 bytes of spills (it keeps the [32, H] and [H, H] gradient
accumulators live across the chunk loop), B3 ``tf32`` 255 and ~200 bytes; 8 warps or block 32 roughly
halve the spills but do not remove them; ``ieee`` spills more. Tile sizes for the backward are still to
be tuned on a GPU (no GPU timing of these kernels exists).

Semantics: the gradients of the reference's autograd graph (``tests/test_kernels_backward.py`` compares
them on odd shapes, 0-d to 4-d, non-contiguous inputs and empty lists), including the sanitised-gradient
mask (NaN / inf / |g| > grad_clip get a zero gradient, times NaN as in autograd), the clamp on the update and on the nominal log lr,
and ReLU's zero gradient at 0, and the nominal term's ``safe_sqrt(v / bc2)`` (derivative 0 at ``v = 0``,
so a parameter that never had a gradient gives finite gradients). Designs: "additive" and "controller"
(``lr * exp(bound * tanh(d)) * adam``), every time-feature and step-scale option. Limits beyond the
forward's: ``hidden_layers <= 3`` (the activations of at most three hidden layers are kept in registers),
``design="normalized"`` (the per-tensor rms of ``d`` couples every element of a tensor: its backward
would need two more MLP passes, for ``sum(d^2)`` and ``sum(dL/dd * d)``; :func:`unsupported_backward`
refuses it and :func:`kernels.lo_step_autograd.lo_step_autograd` runs the reference backward instead),
single weight set (no population axis). Not differentiable itself (``once_differentiable``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lo_step_reference import (
    factored_update,
    feature_slots,
    sanitize_grad,
    step_constants,
)
from kernels.lo_step_common import (
    DEFAULT_BLOCKS, DESIGN_CODE, DTYPE_CODE, KPAD, PRECISIONS, SCALE_CODE, Blocks, chunk_sums, coefficients,
    feature_tile, fp32_scalar, get_plan, pack_theta, scale_args, scale_kernel, slot_column,
    step_constant_table, stats_kernel, tanh_stable, tensor_ptrs, unsupported,
)
from optimizers.lo_spec import LOConfig, factored_dims

GPTR_COLS = 10  # per tensor: dp_out, dm_out, dv_out, drow_out, dp_in, dg_in, dm_in, dv_in, drow_in, scratch
MAX_HIDDEN_LAYERS = 3


# ============================================================================================ kernels
@triton.jit
def _split32(x, BLOCK: tl.constexpr):
    """Inverse of ``cat32``: a ``[BLOCK, 32]`` tile -> 32 vectors in canonical slot order."""
    e = tl.reshape(x, (BLOCK, 2, 2, 2, 2, 2))
    d0, d1 = tl.split(e)
    c0, c1 = tl.split(d0)
    c2, c3 = tl.split(d1)
    b0, b1 = tl.split(c0)
    b2, b3 = tl.split(c1)
    b4, b5 = tl.split(c2)
    b6, b7 = tl.split(c3)
    a0, a1 = tl.split(b0)
    a2, a3 = tl.split(b1)
    a4, a5 = tl.split(b2)
    a6, a7 = tl.split(b3)
    a8, a9 = tl.split(b4)
    a10, a11 = tl.split(b5)
    a12, a13 = tl.split(b6)
    _a14, _a15 = tl.split(b7)  # slots 28..31: the zero padding
    f0, f1 = tl.split(a0)
    f2, f3 = tl.split(a1)
    f4, f5 = tl.split(a2)
    f6, f7 = tl.split(a3)
    f8, f9 = tl.split(a4)
    f10, f11 = tl.split(a5)
    f12, f13 = tl.split(a6)
    f14, f15 = tl.split(a7)
    f16, f17 = tl.split(a8)
    f18, f19 = tl.split(a9)
    f20, f21 = tl.split(a10)
    f22, f23 = tl.split(a11)
    f24, f25 = tl.split(a12)
    f26, f27 = tl.split(a13)
    return (f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15, f16, f17, f18, f19,
            f20, f21, f22, f23, f24, f25, f26, f27)


@triton.jit
def _mlp_bwd(x, scale, m0, v, dpo, w0, b0, w1, b1, w2, b2, wd, wm, bd, bm, bc1, bc2, lr, ss, is_vec,
             exp_mult, step_mult, max_update, cbound,
             NUM_MID: tl.constexpr, NOMINAL: tl.constexpr, PREC: tl.constexpr, DESIGN: tl.constexpr,
             SCALED: tl.constexpr):
    """MLP forward (recomputed) and backward for one element block, from ``dp_out``.

    Returns dxs (the gradient of the normalised features, [BLOCK, 32]), ``gadam`` (the gradient of the
    nominal Adam direction), every theta contribution of the block, ``c_lr`` (of the nominal lr) and
    ``c_ss`` (of the tensor's step scale, for rank < 2 tensors: ``is_vec``; exp(vector_log_lr))."""
    xs = x * scale[None, :]
    z0 = tl.dot(xs, w0, input_precision=PREC) + b0[None, :]
    a0 = tl.maximum(z0, 0.0)
    a_last = a0
    z1 = z0
    a1 = a0
    z2 = z0
    if NUM_MID >= 1:
        z1 = tl.dot(a0, w1, input_precision=PREC) + b1[None, :]
        a1 = tl.maximum(z1, 0.0)
        a_last = a1
    if NUM_MID >= 2:
        z2 = tl.dot(a1, w2, input_precision=PREC) + b2[None, :]
        a_last = tl.maximum(z2, 0.0)
    d = tl.sum(a_last * wd[None, :], axis=1) + bd
    adam = tl.zeros_like(d)
    if NOMINAL:
        adam = (m0 / bc1) / (tl.sqrt(v / bc2) + 1e-8)
    if DESIGN == 0:  # additive: d * exp(exp_mult * mag) * step_mult [+ lr * adam]
        mag = tl.sum(a_last * wm[None, :], axis=1) + bm
        e = tl.exp(exp_mult * mag)
        delta0 = d * e * step_mult
        if NOMINAL:
            delta0 = delta0 + lr * adam
    else:  # controller: lr * exp(cbound * tanh(d)) * adam
        th = tanh_stable(d)
        e = tl.exp(cbound * th)
        delta0 = lr * e * adam
    delta = delta0
    if SCALED:
        delta = delta0 * ss
    # clamp(delta, -max, max): gradient where -max <= delta <= max; p_new = p - delta
    gdel = tl.where((delta >= -max_update) & (delta <= max_update), -dpo, 0.0)
    gdel0 = gdel  # the gradient of the unscaled update
    c_ss = 0.0
    if SCALED:
        gdel0 = gdel * ss
        c_ss = tl.sum(gdel * delta0, axis=0) * is_vec
    if DESIGN == 0:
        gde = gdel0 * step_mult
        gd = gde * e
        gmag = gde * d * e * exp_mult
        gadam = gdel0 * lr
        c_lr = tl.sum(gdel0 * adam, axis=0)
    else:
        gadam = gdel0 * (lr * e)
        gd = gdel0 * adam * lr * e * cbound * (1.0 - th * th)
        gmag = tl.zeros_like(gd)
        c_lr = tl.sum(gdel0 * e * adam, axis=0)
    c_wd = tl.sum(a_last * gd[:, None], axis=0)
    c_wm = tl.sum(a_last * gmag[:, None], axis=0)
    c_bd = tl.sum(gd, axis=0)
    c_bm = tl.sum(gmag, axis=0)
    da = gd[:, None] * wd[None, :] + gmag[:, None] * wm[None, :]
    c_w2 = 0.0
    c_b2 = 0.0
    c_w1 = 0.0
    c_b1 = 0.0
    if NUM_MID >= 2:
        dz2 = tl.where(z2 > 0, da, 0.0)
        c_w2 = tl.dot(tl.trans(a1), dz2, input_precision=PREC)
        c_b2 = tl.sum(dz2, axis=0)
        da = tl.dot(dz2, tl.trans(w2), input_precision=PREC)
    if NUM_MID >= 1:
        dz1 = tl.where(z1 > 0, da, 0.0)
        c_w1 = tl.dot(tl.trans(a0), dz1, input_precision=PREC)
        c_b1 = tl.sum(dz1, axis=0)
        da = tl.dot(dz1, tl.trans(w1), input_precision=PREC)
    dz0 = tl.where(z0 > 0, da, 0.0)
    c_w0 = tl.dot(tl.trans(xs), dz0, input_precision=PREC)
    c_b0 = tl.sum(dz0, axis=0)
    dxs = tl.dot(dz0, tl.trans(w0), input_precision=PREC)
    return dxs, gadam, c_w0, c_b0, c_w1, c_b1, c_w2, c_b2, c_wd, c_wm, c_bd, c_bm, c_lr, c_ss


@triton.jit
def _load_weights(w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr, H: tl.constexpr, NUM_MID: tl.constexpr):
    kk = tl.arange(0, 32)
    hh = tl.arange(0, H)
    w0 = tl.load(w0_ptr + kk[:, None] * H + hh[None, :])
    b0 = tl.load(b0_ptr + hh)
    w1 = tl.load(wm_ptr + hh[:, None] * H + hh[None, :])
    b1 = tl.load(bm_ptr + hh)
    w2 = w1
    b2 = b1
    if NUM_MID >= 2:
        w2 = tl.load(wm_ptr + H * H + hh[:, None] * H + hh[None, :])
        b2 = tl.load(bm_ptr + H + hh)
    wd = tl.load(wo_ptr + hh * 2)
    wm = tl.load(wo_ptr + hh * 2 + 1)
    bd = tl.load(bo_ptr)
    bm = tl.load(bo_ptr + 1)
    return w0, b0, w1, b1, w2, b2, wd, wm, bd, bm


@triton.jit
def _bwd_theta_kernel(chunk_tab, ptr_tab, meta_tab, gptr_tab, scale_ptr, sc_ptr, ss_ptr, w0_ptr, b0_ptr,
                      wm_ptr, bm_ptr, wo_ptr, bo_ptr, tpart_ptr, spart_ptr, grad_clip, exp_mult, step_mult,
                      max_update, cbound, md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2,
                      oad2, H: tl.constexpr, NUM_MID: tl.constexpr, NOMINAL: tl.constexpr, PREC: tl.constexpr,
                      NM: tl.constexpr, NA: tl.constexpr, P_KIND: tl.constexpr, G_KIND: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr, TP: tl.constexpr, DESIGN: tl.constexpr,
                      SCALED: tl.constexpr):
    """B1: per program (one chunk of one tensor) the partial theta gradients and sum(dxn * x)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tab + 2 * pid)
    start = tl.load(chunk_tab + 2 * pid + 1)
    (g_ptr, p_ptr, m_ptr, v_ptr, r_ptr, c_ptr, f_ptr, n, rsize, csize, sbn, sb, san, sa,
     is_fac) = tensor_ptrs(ptr_tab, meta_tab, t, P_KIND, G_KIND, False)
    dpo_ptr = tl.load(gptr_tab + t * 10 + 0).to(tl.pointer_type(tl.float32))
    w0, b0, w1, b1, w2, b2, wd, wm, bd, bm = _load_weights(w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr,
                                                           H, NUM_MID)
    kk = tl.arange(0, 32)
    hh = tl.arange(0, H)
    scale = tl.load(scale_ptr + t * 32 + kk)
    bc1 = tl.load(sc_ptr)
    bc2 = tl.load(sc_ptr + 1)
    lr = tl.load(sc_ptr + 2)
    ss = 1.0
    if SCALED:
        ss = tl.load(ss_ptr + t)
    is_vec = (is_fac == 0).to(tl.float32)
    acc_w0 = tl.zeros([32, H], dtype=tl.float32)
    acc_b0 = tl.zeros([H], dtype=tl.float32)
    acc_w1 = tl.zeros([H, H], dtype=tl.float32)
    acc_b1 = tl.zeros([H], dtype=tl.float32)
    acc_w2 = tl.zeros([H, H], dtype=tl.float32)
    acc_b2 = tl.zeros([H], dtype=tl.float32)
    acc_wd = tl.zeros([H], dtype=tl.float32)
    acc_wm = tl.zeros([H], dtype=tl.float32)
    acc_s = tl.zeros([32], dtype=tl.float32)
    acc_bd = tl.sum(acc_wd, axis=0)
    acc_bm = acc_bd
    acc_lr = acc_bd
    acc_ss = acc_bd
    end = tl.minimum(start + CHUNK, n.to(tl.int32))
    offs = tl.arange(0, BLOCK)
    for b in range(start, end, BLOCK):
        i = b + offs
        mask = i < end
        x, _p, m0, _m1, _m2, v, _r0, _r1, _r2 = feature_tile(
            i, mask, True, g_ptr, p_ptr, m_ptr, m_ptr + n, m_ptr + 2 * n, v_ptr,
            r_ptr, r_ptr + rsize, r_ptr + 2 * rsize, c_ptr, c_ptr + csize, c_ptr + 2 * csize,
            f_ptr, f_ptr + rsize, f_ptr + 2 * rsize, sbn, sb, san, sa, is_fac, grad_clip,
            md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2, NM, NA, BLOCK)
        dpo = tl.load(dpo_ptr + i, mask=mask, other=0.0)
        dxs, _gadam, c_w0, c_b0, c_w1, c_b1, c_w2, c_b2, c_wd, c_wm, c_bd, c_bm, c_lr, c_ss = _mlp_bwd(
            x, scale, m0, v, dpo, w0, b0, w1, b1, w2, b2, wd, wm, bd, bm, bc1, bc2, lr, ss, is_vec,
            exp_mult, step_mult, max_update, cbound, NUM_MID, NOMINAL, PREC, DESIGN, SCALED)
        acc_w0 += c_w0
        acc_b0 += c_b0
        if NUM_MID >= 1:
            acc_w1 += c_w1
            acc_b1 += c_b1
        if NUM_MID >= 2:
            acc_w2 += c_w2
            acc_b2 += c_b2
        acc_wd += c_wd
        acc_wm += c_wm
        acc_bd += c_bd
        acc_bm += c_bm
        acc_lr += c_lr
        if SCALED:
            acc_ss += c_ss
        acc_s += tl.sum(tl.where(mask[:, None], dxs * x, 0.0), axis=0)
    out = tpart_ptr + pid.to(tl.int64) * TP
    tl.store(out + kk[:, None] * H + hh[None, :], acc_w0)
    out += 32 * H
    tl.store(out + hh, acc_b0)
    out += H
    if NUM_MID >= 1:
        tl.store(out + hh[:, None] * H + hh[None, :], acc_w1)
        tl.store(out + H * H + hh, acc_b1)
        out += H * H + H
    if NUM_MID >= 2:
        tl.store(out + hh[:, None] * H + hh[None, :], acc_w2)
        tl.store(out + H * H + hh, acc_b2)
        out += H * H + H
    tl.store(out + hh, acc_wd)
    tl.store(out + H + hh, acc_wm)
    tl.store(out + 2 * H, acc_bd)
    tl.store(out + 2 * H + 1, acc_bm)
    tl.store(out + 2 * H + 2, acc_lr)
    tl.store(out + 2 * H + 3, acc_ss)
    tl.store(spart_ptr + pid * 32 + kk, acc_s)


@triton.jit
def _dscale_kernel(meta_tab, part_ptr, scale_ptr, kc_ptr, RB: tl.constexpr):
    """B2, per tensor: kc = -0.5 * scale^3 * (sum of its chunks' sum(dxn * x)) / n."""
    t = tl.program_id(0)
    acc, n = chunk_sums(meta_tab, part_ptr, t, RB)
    cols = tl.arange(0, 32)
    s = tl.load(scale_ptr + t * 32 + cols)
    tl.store(kc_ptr + t * 32 + cols, (-0.5 * acc * (s * s * s)) / n)


@triton.jit
def _decay_bwd(i, i_row, i_col, mask, fac, g, mk, r, dfg, drow, dcol, drrow, drcol, dfmom, ad, oad,
               c_ptr, f_ptr, drowo_ptr, drowi_ptr, sr_ptr, sf_ptr, sc_ptr):
    """Backward of one adafactor decay's features (fac_grad, row, col, rsqrt_row, rsqrt_col, fac_mom).

    rank < 2: the full second moment ``r`` (col = r, fac = rsqrt(r + 1e-9)) -> its old value's gradient
    (stored) and ``G2``, the gradient reaching ``g^2``. Factored: the per-element gradients of the
    broadcast row / column accumulators and of the row factor go to the scratch rows (reduced later)."""
    fv = i * 0 + fac  # the per-tensor flag as a vector (scalar & vector masks: not everywhere)
    full = mask & (fv == 0)
    part = mask & (fv != 0)
    cl = tl.load(c_ptr + i_col, mask=part, other=1.0)
    rf = tl.load(f_ptr + i_row, mask=part, other=1.0)
    ic = tl.rsqrt(tl.maximum(cl, 1e-9))
    q = tl.where(fac != 0, rf * ic, tl.rsqrt(r + 1e-9))
    c = tl.where(fac != 0, cl, r)
    rr = tl.rsqrt(r + 1e-8)
    rc = tl.rsqrt(c + 1e-8)
    gq = dfg * g + dfmom * mk
    gr = drow + drrow * (-0.5 * (rr * rr * rr))
    gc = dcol + drcol * (-0.5 * (rc * rc * rc))
    # factored
    tl.store(sr_ptr + i, gr, mask=part)
    tl.store(sf_ptr + i, gq * ic, mask=part)
    tl.store(sc_ptr + i, gc + (gq * rf) * tl.where(cl >= 1e-9, -0.5 * (ic * ic * ic), 0.0), mask=part)
    # rank < 2
    gtot = gr + gc + gq * (-0.5 * (q * q * q)) + tl.load(drowo_ptr + i, mask=full, other=0.0)
    tl.store(drowi_ptr + i, ad * gtot, mask=full)
    g2 = tl.where(fac != 0, 0.0, oad * gtot)
    return dfg * q, dfmom * q, g2


@triton.jit
def _bwd_elem_kernel(chunk_tab, ptr_tab, meta_tab, gptr_tab, scale_ptr, kc_ptr, sc_ptr, ss_ptr, w0_ptr,
                     b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr, grad_clip, exp_mult, step_mult, max_update, cbound,
                     md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2,
                     H: tl.constexpr, NUM_MID: tl.constexpr, NOMINAL: tl.constexpr, PREC: tl.constexpr,
                     NM: tl.constexpr, NA: tl.constexpr, P_KIND: tl.constexpr, G_KIND: tl.constexpr,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr, DESIGN: tl.constexpr, SCALED: tl.constexpr):
    """B3: per element the gradients of p, g, momenta, rms, second moments (scratch for factored)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tab + 2 * pid)
    start = tl.load(chunk_tab + 2 * pid + 1)
    (g_ptr, p_ptr, m_ptr, v_ptr, r_ptr, c_ptr, f_ptr, n, rsize, csize, sbn, sb, san, sa,
     is_fac) = tensor_ptrs(ptr_tab, meta_tab, t, P_KIND, G_KIND, False)
    gt = gptr_tab + t * 10
    dpo_ptr = tl.load(gt + 0).to(tl.pointer_type(tl.float32))
    dmo_ptr = tl.load(gt + 1).to(tl.pointer_type(tl.float32))
    dvo_ptr = tl.load(gt + 2).to(tl.pointer_type(tl.float32))
    drowo_ptr = tl.load(gt + 3).to(tl.pointer_type(tl.float32))
    dpi_ptr = tl.load(gt + 4).to(tl.pointer_type(tl.float32))
    dgi_ptr = tl.load(gt + 5).to(tl.pointer_type(tl.float32))
    dmi_ptr = tl.load(gt + 6).to(tl.pointer_type(tl.float32))
    dvi_ptr = tl.load(gt + 7).to(tl.pointer_type(tl.float32))
    drowi_ptr = tl.load(gt + 8).to(tl.pointer_type(tl.float32))
    scr_ptr = tl.load(gt + 9).to(tl.pointer_type(tl.float32))
    w0, b0, w1, b1, w2, b2, wd, wm, bd, bm = _load_weights(w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr,
                                                           H, NUM_MID)
    kk = tl.arange(0, 32)
    scale = tl.load(scale_ptr + t * 32 + kk)
    kc = tl.load(kc_ptr + t * 32 + kk)
    bc1 = tl.load(sc_ptr)
    bc2 = tl.load(sc_ptr + 1)
    lr = tl.load(sc_ptr + 2)
    ss = 1.0
    if SCALED:
        ss = tl.load(ss_ptr + t)
    end = tl.minimum(start + CHUNK, n.to(tl.int32))
    offs = tl.arange(0, BLOCK)
    for b in range(start, end, BLOCK):
        i = b + offs
        mask = i < end
        x, _p, m0, m1, m2, v, r0, r1, r2 = feature_tile(
            i, mask, True, g_ptr, p_ptr, m_ptr, m_ptr + n, m_ptr + 2 * n, v_ptr,
            r_ptr, r_ptr + rsize, r_ptr + 2 * rsize, c_ptr, c_ptr + csize, c_ptr + 2 * csize,
            f_ptr, f_ptr + rsize, f_ptr + 2 * rsize, sbn, sb, san, sa, is_fac, grad_clip,
            md0, omd0, md1, omd1, md2, omd2, rd, ord_, ad0, oad0, ad1, oad1, ad2, oad2, NM, NA, BLOCK)
        dpo = tl.load(dpo_ptr + i, mask=mask, other=0.0)
        # (the theta contributions are not needed here; the compiler drops them)
        dxs, gadam, _w0, _b0, _w1, _b1, _w2, _b2, _wd, _wm, _bd, _bm, _lr, _ss = _mlp_bwd(
            x, scale, m0, v, dpo, w0, b0, w1, b1, w2, b2, wd, wm, bd, bm, bc1, bc2, lr, ss, 0.0,
            exp_mult, step_mult, max_update, cbound, NUM_MID, NOMINAL, PREC, DESIGN, SCALED)
        dx = dxs * scale[None, :] + 2.0 * x * kc[None, :]
        (x_g, x_p, x_m0, x_m1, x_m2, x_v, x_ad0, x_ad1, x_ad2, x_rv, x_fg0, x_fg1, x_fg2,
         x_r0, x_r1, x_r2, x_c0, x_c1, x_c2, x_rr0, x_rr1, x_rr2, x_rc0, x_rc1, x_rc2,
         x_fm0, x_fm1, x_fm2) = _split32(dx, BLOCK)
        graw = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        keep = (graw == graw) & (graw >= -grad_clip) & (graw <= grad_clip)  # noqa: PLR0124 (NaN test)
        g = tl.where(graw != graw, 0.0, graw)  # noqa: PLR0124
        g = tl.minimum(tl.maximum(g, -grad_clip), grad_clip)
        rv = tl.rsqrt(v + 1e-6)
        i_row = (i // sbn) * sb + i % sb
        i_col = (i // san) * sa + i % sa
        scr = scr_ptr + 0 * n
        gg0, gm0q, g2 = _decay_bwd(i, i_row, i_col, mask, is_fac, g, m0, r0, x_fg0, x_r0, x_c0, x_rr0,
                                   x_rc0, x_fm0, ad0, oad0, c_ptr, f_ptr, drowo_ptr, drowi_ptr,
                                   scr, scr + NA * n, scr + 2 * NA * n)
        gsum = x_g + gg0
        gm1q = tl.zeros_like(gm0q)
        gm2q = gm1q
        if NA > 1:
            gg1, gm1q, g2b = _decay_bwd(i, i_row, i_col, mask, is_fac, g, m1, r1, x_fg1, x_r1, x_c1, x_rr1,
                                        x_rc1, x_fm1, ad1, oad1, c_ptr + csize, f_ptr + rsize,
                                        drowo_ptr + n, drowi_ptr + n, scr + n, scr + (NA + 1) * n,
                                        scr + (2 * NA + 1) * n)
            gsum += gg1
            g2 += g2b
        if NA > 2:
            gg2, gm2q, g2c = _decay_bwd(i, i_row, i_col, mask, is_fac, g, m2, r2, x_fg2, x_r2, x_c2, x_rr2,
                                        x_rc2, x_fm2, ad2, oad2, c_ptr + 2 * csize, f_ptr + 2 * rsize,
                                        drowo_ptr + 2 * n, drowi_ptr + 2 * n, scr + 2 * n,
                                        scr + (NA + 2) * n, scr + (2 * NA + 2) * n)
            gsum += gg2
            g2 += g2c
        # rms: features v, m_k * rv, rv (rv = rsqrt(v + 1e-6)), the nominal term, the output v
        drv = x_rv + x_ad0 * m0
        if NM > 1:
            drv += x_ad1 * m1
        if NM > 2:
            drv += x_ad2 * m2
        gv = x_v + drv * (-0.5 * (rv * rv * rv)) + tl.load(dvo_ptr + i, mask=mask, other=0.0)
        gm0 = x_m0 + x_ad0 * rv + gm0q + tl.load(dmo_ptr + i, mask=mask, other=0.0)
        if NOMINAL:  # adam = (m0 / bc1) / (safe_sqrt(v / bc2) + 1e-8): derivative 0 at v = 0
            vb = v / bc2
            pos = vb > 0
            s = tl.sqrt(vb)
            den = s + 1e-8
            gm0 += (gadam / den) / bc1
            gv += tl.where(pos, ((-gadam * (m0 / bc1) / (den * den)) / (2.0 * tl.where(pos, s, 1.0))) / bc2, 0.0)
        tl.store(dmi_ptr + i, md0 * gm0, mask=mask)
        gsum += omd0 * gm0
        if NM > 1:
            gm1 = x_m1 + x_ad1 * rv + gm1q + tl.load(dmo_ptr + n + i, mask=mask, other=0.0)
            tl.store(dmi_ptr + n + i, md1 * gm1, mask=mask)
            gsum += omd1 * gm1
        if NM > 2:
            gm2 = x_m2 + x_ad2 * rv + gm2q + tl.load(dmo_ptr + 2 * n + i, mask=mask, other=0.0)
            tl.store(dmi_ptr + 2 * n + i, md2 * gm2, mask=mask)
            gsum += omd2 * gm2
        tl.store(dvi_ptr + i, rd * gv, mask=mask)
        gsum += 2.0 * g * (ord_ * gv + g2)
        tl.store(dgi_ptr + i, gsum * keep.to(tl.float32), mask=mask)  # as autograd: NaN * 0 stays NaN
        tl.store(dpi_ptr + i, dpo + x_p, mask=mask)


# ============================================================================================== host
def unsupported_backward(cfg: LOConfig, params: dict[str, Tensor], grads=None, state=None) -> str | None:
    """Why :func:`lo_step_backward` cannot differentiate this step (None when it can)."""
    reason = unsupported(cfg, params, grads, state)
    if reason:
        return reason
    if cfg.hidden_layers > MAX_HIDDEN_LAYERS:
        return f"hidden_layers > {MAX_HIDDEN_LAYERS} (backward kernel keeps at most 3 activations)"
    if cfg.design == "normalized":  # d's per-tensor rms couples all elements: two more MLP passes
        return "design='normalized' (per-tensor rms of the MLP output) has no backward kernel"
    return None


def theta_partial_size(cfg: LOConfig) -> int:
    h = cfg.hidden_width
    return 32 * h + h + (cfg.hidden_layers - 1) * (h * h + h) + 2 * h + 4


def _f32c(t: Tensor | None, like: Tensor, device) -> Tensor:
    """A contiguous fp32 copy (zeros for a missing output gradient)."""
    if t is None:
        return torch.zeros(like.shape, dtype=torch.float32, device=device)
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def lo_step_backward(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict, theta: dict[str, Tensor],
                     cfg: LOConfig, new_rowcol: dict, d_params: dict, d_state: dict, *, precision: str = "ieee",
                     blocks: Blocks = DEFAULT_BLOCKS) -> dict:
    """Gradients of one step w.r.t. its inputs (see the module docstring).

    ``new_rowcol``: ``{"row": {k: ...}, "col": {k: ...}}``, the step's *outputs* for the factored
    (rank >= 2) tensors (the forward saves them; O(rows + cols)). ``d_params`` / ``d_state[key]``: the
    gradients of ``new_params`` / ``new_state[key]`` (``None`` or a missing key: zero). Returns
    ``{"params": {...}, "grads": {...}, "m": {...}, "v": {...}, "row": {...}, "col": {...},
    "theta": {...}}`` in the inputs' dtypes and devices.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    reason = unsupported_backward(cfg, params, grads, state)
    if reason:
        raise NotImplementedError(f"lo_step_backward (Triton) cannot run this step: {reason}")
    with torch.no_grad():
        return _backward(params, grads, state, theta, cfg, new_rowcol, d_params, d_state, precision, blocks)


def _backward(params, grads, state, theta, cfg: LOConfig, new_rowcol, d_params, d_state, precision, blocks):
    out: dict = {"params": {}, "grads": {}, "m": {}, "v": {}, "row": {}, "col": {}, "theta": {}}
    dsg = {key: d_state.get(key, {}) or {} for key in ("m", "v", "row", "col")}
    if not params:
        out["theta"] = {k: torch.zeros_like(v) for k, v in theta.items()}
        return out
    device = next(iter(params.values())).device
    na = len(cfg.adafactor_decays)
    f32 = {"dtype": torch.float32, "device": device}
    horizon, loss_stats = state.get("horizon"), state.get("loss_stats")
    k0 = step_constants(state["step"], theta, cfg, device=device, horizon=horizon, loss_stats=loss_stats)
    sc = step_constant_table(k0)
    w0, wm, bm, wo, bo = pack_theta(theta, cfg, device)
    b0 = k0.b0.float().contiguous()
    coef = coefficients(cfg)
    grad_clip = fp32_scalar(cfg.grad_clip)
    tp = theta_partial_size(cfg)
    theta_parts: list[Tensor] = []
    keep_alive: list[Tensor] = []
    factored_post = []

    groups: dict[tuple, list] = {}
    for k, p in params.items():
        if p.numel() == 0:  # the step leaves it and its state unchanged: identity
            out["params"][k] = _like_or_zero(d_params.get(k), p)
            out["grads"][k] = torch.zeros_like(grads[k])
            for key in ("m", "v", "row", "col"):
                if k in state[key]:
                    out[key][k] = _like_or_zero(dsg[key].get(k), state[key][k])
            continue
        g = grads[k].detach().contiguous()
        pc = p.detach().contiguous()
        m = state["m"][k].detach().contiguous()
        v = state["v"][k].detach().contiguous()
        n = p.numel()
        fac = factored_dims(p.shape) is not None
        dpo = _f32c(d_params.get(k), p, device)
        dmo = _f32c(dsg["m"].get(k), m, device)
        dvo = _f32c(dsg["v"].get(k), v, device)
        dpi = torch.empty(p.shape, **f32)
        dgi = torch.empty(p.shape, **f32)
        dmi = torch.empty(m.shape, **f32)
        dvi = torch.empty(v.shape, **f32)
        if fac:
            a, _ = factored_dims(p.shape)
            row = new_rowcol["row"][k].detach().to(**f32).contiguous()
            col = new_rowcol["col"][k].detach().to(**f32).contiguous()
            rf = torch.rsqrt(torch.clamp(row / row.mean(dim=a + 1, keepdim=True), min=1e-9)).contiguous()
            scratch = torch.empty((3, na, n), **f32)
            drowo = drowi = dpi  # unused (never dereferenced for factored tensors)
            ptrs = (g, pc, m, v, row, col, rf)
            factored_post.append((k, scratch, dgi))
        else:
            row = state["row"][k].detach().contiguous()
            drowo = _f32c(dsg["row"].get(k), row, device)
            drowi = torch.empty(row.shape, **f32)
            scratch = dpi  # unused
            ptrs = (g, pc, m, v, row, row, row)
            out["row"][k] = drowi
        keep_alive.extend([*ptrs, dpo, dmo, dvo, drowo])
        out["params"][k], out["grads"][k], out["m"][k], out["v"][k] = dpi, dgi, dmi, dvi
        item = (ptrs, (dpo, dmo, dvo, drowo, dpi, dgi, dmi, dvi, drowi, scratch))
        groups.setdefault((DTYPE_CODE[p.dtype], DTYPE_CODE[g.dtype]), []).append(item)

    for (p_kind, g_kind), items in groups.items():
        shapes = [tuple(it[0][1].shape) for it in items]
        plan = get_plan(shapes, cfg, device, blocks)
        ptr_tab = torch.tensor([[t.data_ptr() for t in it[0]] for it in items], dtype=torch.int64).to(device)
        gptr_tab = torch.tensor([[t.data_ptr() for t in it[1]] for it in items], dtype=torch.int64).to(device)
        ck = {"NM": len(cfg.momentum_decays), "NA": na, "P_KIND": p_kind, "G_KIND": g_kind, "BLOCK": blocks.block,
              "CHUNK": blocks.chunk}
        nw = blocks.num_warps
        stats_kernel[(plan.n_chunks,)](plan.chunks, ptr_tab, plan.meta, plan.stats, grad_clip, **coef, **ck,
                                       ALIGNED=False, num_warps=nw)
        scale = torch.empty((plan.n_tensors, 32), **f32)
        sscale = torch.empty((plan.n_tensors,), **f32)
        scaled = cfg.step_scale != "none"
        scale_kernel[(plan.n_tensors,)](plan.meta, plan.stats, scale, sc, sscale, *scale_args(cfg),
                                        RB=blocks.scale_rows, SCALE=SCALE_CODE[cfg.step_scale], num_warps=nw)
        tpart = torch.empty((plan.n_chunks, tp), **f32)
        spart = torch.empty((plan.n_chunks, 32), **f32)
        mlp = {"H": cfg.hidden_width, "NUM_MID": cfg.hidden_layers - 1, "NOMINAL": cfg.nominal == "adam",
               "PREC": precision, "DESIGN": DESIGN_CODE[cfg.design], "SCALED": scaled}
        scal = (grad_clip, fp32_scalar(cfg.exp_mult), fp32_scalar(cfg.step_mult), fp32_scalar(cfg.max_update),
                fp32_scalar(cfg.controller_bound))
        _bwd_theta_kernel[(plan.n_chunks,)](
            plan.chunks, ptr_tab, plan.meta, gptr_tab, scale, sc, sscale, w0, b0, wm, bm, wo, bo, tpart, spart,
            *scal, **coef, **mlp, **ck, TP=tp, num_warps=nw)
        kc = torch.empty((plan.n_tensors, 32), **f32)
        _dscale_kernel[(plan.n_tensors,)](plan.meta, spart, scale, kc, RB=blocks.scale_rows, num_warps=nw)
        _bwd_elem_kernel[(plan.n_chunks,)](
            plan.chunks, ptr_tab, plan.meta, gptr_tab, scale, kc, sc, sscale, w0, b0, wm, bm, wo, bo, *scal,
            **coef, **mlp, **ck, num_warps=nw)
        theta_parts.append(tpart.sum(dim=0))

    # factored tensors: reduce the scratch over the broadcast dims, differentiate the Adafactor update
    for k, scratch, dgi in factored_post:
        p = params[k]
        a, b = factored_dims(p.shape)
        shape = (na, *p.shape)
        r_sum = scratch[0].view(shape).sum(dim=b + 1, keepdim=True)
        f_sum = scratch[1].view(shape).sum(dim=b + 1, keepdim=True)
        c_sum = scratch[2].view(shape).sum(dim=a + 1, keepdim=True)
        drow_o = dsg["row"].get(k)
        dcol_o = dsg["col"].get(k)
        with torch.enable_grad():
            g_leaf = grads[k].detach().requires_grad_()
            row_leaf = state["row"][k].detach().requires_grad_()
            col_leaf = state["col"][k].detach().requires_grad_()
            gs = sanitize_grad(g_leaf, cfg, state["v"][k].dtype)
            row_new, col_new, rf = factored_update(gs, row_leaf, col_leaf, cfg)
            outs = [row_new, col_new, rf]
            gouts = [r_sum.to(row_new.dtype) + (0 if drow_o is None else drow_o),
                     c_sum.to(col_new.dtype) + (0 if dcol_o is None else dcol_o), f_sum.to(rf.dtype)]
            dg_f, drow_in, dcol_in = torch.autograd.grad(outs, [g_leaf, row_leaf, col_leaf], gouts)
        dgi.add_(dg_f.to(dgi.dtype))
        out["row"][k], out["col"][k] = drow_in, dcol_in

    # cast to the inputs' dtypes
    for k in out["params"]:
        out["params"][k] = out["params"][k].to(params[k].dtype)
        out["grads"][k] = out["grads"][k].to(grads[k].dtype)
        for key in ("m", "v", "row", "col"):
            if k in out[key]:
                out[key][k] = out[key][k].to(state[key][k].dtype)
    out["theta"] = _theta_grads(theta, cfg, state["step"], theta_parts, device, horizon, loss_stats)
    del keep_alive
    return out


def _like_or_zero(d: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if d is None else d.to(like.dtype)


def _theta_grads(theta: dict[str, Tensor], cfg: LOConfig, step: Tensor, parts: list[Tensor], device,
                 horizon: Tensor | None = None, loss_stats: Tensor | None = None) -> dict:
    """Unpack the summed per-program partials into theta's layout, plus the step constants' backward."""
    h = cfg.hidden_width
    out = {k: torch.zeros(v.shape, dtype=torch.float32, device=device) for k, v in theta.items()}
    if not parts:
        return {k: v.to(theta[k]) for k, v in out.items()}
    total = torch.stack(parts).sum(dim=0) if len(parts) > 1 else parts[0]
    o = 0

    def take(size, shape):
        nonlocal o
        v = total[o:o + size].view(shape)
        o += size
        return v

    dw0k = take(KPAD * h, (KPAD, h))
    db0k = take(h, (h,))
    for layer in range(1, cfg.hidden_layers):
        out[f"w{layer}"] += take(h * h, (h, h))
        out[f"b{layer}"] += take(h, (h,))
    last = cfg.hidden_layers
    dwd, dwm = take(h, (h,)), take(h, (h,))
    out[f"w{last}"] += torch.stack([dwd, dwm], dim=1)
    out[f"b{last}"] += take(2, (2,))
    dlr = take(1, ())
    dvs = take(1, ())
    slots = feature_slots(cfg)
    cols = torch.tensor([slot_column(s) for s in slots], device=device)
    out["w0"][: len(slots)] += dw0k[cols]
    # b0 (with the time features folded in), the nominal lr and the vectors' step scale
    # exp(vector_log_lr): autograd through step_constants
    with torch.enable_grad():
        names = [k for k in ("w0", "b0", "nominal_log_lr", "nominal_time_w", "vector_log_lr") if k in theta]
        leaves = {k: theta[k].detach().to(device=device, dtype=torch.float32).requires_grad_() for k in names}
        k0 = step_constants(step, {**theta, **leaves}, cfg, device=device, horizon=horizon,
                            loss_stats=loss_stats)
        outs, gouts = [k0.b0], [db0k]
        if k0.lr.requires_grad:
            outs.append(k0.lr)
            gouts.append(dlr)
        if k0.vscale.requires_grad:
            outs.append(k0.vscale)
            gouts.append(dvs)
        got = torch.autograd.grad(outs, list(leaves.values()), gouts, allow_unused=True)
    for k, gk in zip(names, got):
        if gk is not None:
            out[k] += gk
    return {k: v.to(theta[k]) for k, v in out.items()}


__all__ = ["MAX_HIDDEN_LAYERS", "lo_step_backward", "theta_partial_size", "unsupported_backward"]
