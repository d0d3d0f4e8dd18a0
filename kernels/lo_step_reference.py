"""PyTorch reference of the fused learned-optimizer step, structured the way the Triton kernels work.

This computes exactly what ``LearnedOptimizer(cfg).bind(theta).update(grads, state, params)`` in
:mod:`optimizers.learned` computes (see ``tests/test_kernels.py``), but in the phases of
:mod:`kernels.lo_step_triton`:

phase 1a (factored tensors, rank >= 2; kernels ``_fac_partial_kernel`` + ``_fac_finalize_kernel``)
    sanitise ``g``, reduce ``g^2 + 1e-30`` over the largest dim (row accumulator) and the second
    largest dim (column accumulator), update both accumulators in place, and compute the row factor
    ``rsqrt(max(row / mean_a(row), 1e-9))`` into a scratch buffer of the row accumulator's shape.
phase 1b (every tensor; ``stats_kernel`` + ``scale_kernel``)
    per element: new momenta, rms, (rank < 2) full second moments and the 28 canonical features,
    then per tensor and channel ``scale = rsqrt(1e-5 + sum(x^2) / n)``. Nothing is written here
    except the statistics.
phase 2 (every tensor; ``_main_kernel``)
    per element: the same features again (the kernel recomputes them instead of storing 28 floats per
    element), ``x * scale``, the MLP (the time features are the same for every element, so their
    contribution ``time_features(t) @ W0[time rows]`` is folded into the first bias), the step of the
    config's ``design``, the per-tensor step scale (``step_scale``), the clamp, and the writes of
    ``p``, ``m``, ``v`` (and the rank < 2 full second moments).

Designs (``LOConfig.design``): ``additive`` ``d * exp(exp_mult * m) * step_mult + lr * adam``;
``controller`` ``lr * exp(controller_bound * tanh(d)) * adam``; ``normalized``
``lr * (adam + mix * d * rsqrt(mean_tensor(d^2) + 1e-12))``, whose per-tensor mean of ``d^2`` needs one
more pass (the kernels run the MLP once more before phase 2, ``_main_kernel`` with ``MODE=1``).
Time features (``time_features``: ``absolute``, ``fraction`` with ``T = state["horizon"]``, ``none``) and
the nominal learning rate are per-step constants (:func:`step_constants`). Step scale (per tensor, applied
before the clamp): ``rms``: rank >= 2 tensors ``((sqrt(mean(p^2) + rms_floor^2)) / rms_ref) ** scale_power``
(the kernels take ``sum(p^2)`` from phase 1b's statistics of the ``param`` channel); ``width``: rank >= 2
tensors ``min(1, width_ref / max(shape)) ** scale_power``; both: rank < 2 tensors ``exp(vector_log_lr)``.
The nominal Adam term's ``sqrt(v / bc2)`` has derivative 0 at ``v = 0`` (:func:`optimizers.learned.safe_sqrt`).

The mathematical function equals ``optimizers.learned``; the order of floating-point operations
differs in places (sum-of-squares divided by ``n`` instead of ``mean``, time features folded into
the bias), so results agree to rounding (``allclose``), not bit for bit.

Tensors with zero elements are skipped (parameter and state unchanged); ``optimizers.learned`` would
write NaN accumulators for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.lo_spec import (
    FEATURE_GROUPS, LOConfig, element_features, factored_dims, group_channels, loss_features, safe_sqrt,
    tensor_step_scale, time_features,
)

# per-run state that is not per tensor: the run length T (fraction features) and the loss statistics
# (loss features); carried through a step unchanged by the kernels (no gradient)
RUN_KEYS = ("horizon", "loss_stats")

# ---- canonical feature layout (shared with the Triton kernels) --------------------------------------
# The kernels always build the same 28 channels for up to 3 momentum / 3 adafactor decays; a config's
# feature list (any subset, any order, fewer decays) maps onto these slots, unused slots get zero
# weight rows. Slot order: grad, param, m0..2, rms, adam_dir0..2, rsqrt_rms, fac_grad0..2, row0..2,
# col0..2, rsqrt_row0..2, rsqrt_col0..2, fac_mom0..2.
NM_MAX = 3
NA_MAX = 3


def _slot_table() -> dict[str, tuple[int, int]]:
    """``{group: (first slot, slots)}``: the groups in :data:`FEATURE_GROUPS` order, each with its
    channel count at the kernels' maximum decays (:func:`optimizers.lo_spec.group_channels`)."""
    out, first = {}, 0
    for name in FEATURE_GROUPS:
        n = group_channels(name, NM_MAX, NA_MAX)
        out[name] = (first, n)
        first += n
    return out


_GROUP_SLOTS = _slot_table()
NUM_SLOTS = sum(n for _, n in _GROUP_SLOTS.values())
assert NUM_SLOTS == 28, "the kernels' feature tile (cat32 / _split32) is written for 28 slots"


def feature_slots(cfg: LOConfig) -> list[int]:
    """For every per-element input channel of ``cfg`` (in the config's order), its canonical slot."""
    out = []
    for name in cfg.features:
        first, _ = _GROUP_SLOTS[name]
        out.extend(first + k for k in range(group_channels(name, len(cfg.momentum_decays),
                                                           len(cfg.adafactor_decays))))
    return out


# the step options the kernels implement (a value optimizers.learned adds later is refused, not misread)
KERNEL_OPTIONS = {"design": ("additive", "controller", "normalized"),
                  "time_features": ("absolute", "fraction", "none"),
                  "step_scale": ("none", "rms", "width"),
                  "loss_features": ("none", "ema")}


def unsupported_reason(cfg: LOConfig) -> str | None:
    """Why the fused step cannot run ``cfg`` (None when it can)."""
    for name, supported in KERNEL_OPTIONS.items():
        if getattr(cfg, name) not in supported:
            return f"{name}={getattr(cfg, name)!r} is not implemented in the kernels"
    if len(cfg.momentum_decays) > NM_MAX or len(cfg.adafactor_decays) > NA_MAX:
        return f"more than {NM_MAX} momentum or {NA_MAX} adafactor decays"
    if cfg.hidden_layers < 1:
        return "hidden_layers == 0 (a linear model)"
    h = cfg.hidden_width
    if h < 16 or h > 256 or h & (h - 1):
        return "hidden_width must be a power of two in [16, 256] (tl.dot tile)"
    return None


# ---- per-step constants --------------------------------------------------------------------------
@dataclass
class StepConstants:
    step: Tensor  # the new step (state["step"] + 1)
    bc1: Tensor  # 1 - momentum_decays[0] ** step
    bc2: Tensor  # 1 - rms_decay ** step
    lr: Tensor  # exp(clamp(nominal_log_lr [+ w . time features], -20, 2)), 0 without a nominal term
    b0: Tensor  # first-layer bias with the time features folded in, shape (hidden_width,)
    vscale: Tensor  # step scale of rank < 2 tensors: exp(vector_log_lr) (step_scale "rms" / "width"), else 1
    mix: Tensor  # weight of the normalised learned direction (design="normalized"), else 0


def step_constants(step: Tensor, theta: dict[str, Tensor], cfg: LOConfig, dtype=torch.float32,
                   device=None, horizon: Tensor | None = None,
                   loss_stats: Tensor | None = None) -> StepConstants:
    """Everything that is the same for all elements of a step (device tensors, no host sync).

    ``step`` is the *old* step counter (``state["step"]``); ``loss_stats`` (``loss_features="ema"``) the
    run's loss statistics *after* this step's loss (``BoundLearnedOptimizer.update`` updates them before it
    dispatches, so every path sees the same); ``horizon`` the run's length T
    (``state["horizon"]``), needed by ``time_features="fraction"`` only."""
    device = step.device if device is None else device
    step = (step + 1).to(device)
    c = len(feature_slots(cfg))
    w0 = theta["w0"].to(device=device, dtype=dtype)
    if horizon is not None:
        horizon = horizon.to(device)
    tfeat = time_features(step.to(dtype), horizon, cfg)  # optimizers.learned's own (0 features: empty)
    if cfg.loss_features != "none":  # the run's loss statistics, already updated with this step's loss
        if loss_stats is None:
            raise ValueError("loss_features needs state['loss_stats'] (BoundLearnedOptimizer.init makes it)")
        tfeat = torch.cat([tfeat, loss_features(loss_stats.to(device=device, dtype=tfeat.dtype))])
    b0 = theta["b0"].to(device=device, dtype=dtype) + tfeat @ w0[c:]
    bc1 = 1 - cfg.momentum_decays[0] ** step
    bc2 = 1 - cfg.rms_decay ** step
    if cfg.nominal == "adam":
        log_lr = theta["nominal_log_lr"].to(device=device, dtype=dtype)
        if "nominal_time_w" in theta:  # learned schedule over the time features
            log_lr = log_lr + (tfeat * theta["nominal_time_w"].to(device=device, dtype=dtype)).sum()
        lr = torch.exp(torch.clamp(log_lr, -20.0, 2.0))
    else:
        lr = torch.zeros((), dtype=dtype, device=device)
    if cfg.step_scale != "none":  # as optimizers.learned: exp in theta's dtype, then cast
        vscale = torch.exp(theta["vector_log_lr"].to(device)).to(dtype)
    else:
        vscale = torch.ones((), dtype=dtype, device=device)
    if cfg.design == "normalized":
        mix = theta["mix"].to(device=device, dtype=dtype)
    else:
        mix = torch.zeros((), dtype=dtype, device=device)
    return StepConstants(step=step, bc1=bc1.to(dtype), bc2=bc2.to(dtype), lr=lr, b0=b0, vscale=vscale, mix=mix)


def adam_direction(m0: Tensor, v: Tensor, bc1: Tensor, bc2: Tensor) -> Tensor:
    """The nominal Adam direction ``(m / bc1) / (sqrt(v / bc2) + 1e-8)``, with ``safe_sqrt`` (finite
    derivative at ``v = 0``, as ``optimizers.learned``)."""
    return (m0 / bc1) / (safe_sqrt(v / bc2) + 1e-8)


def step_scale(p: Tensor, k0: StepConstants, cfg: LOConfig, dtype) -> Tensor | None:
    """The per-tensor step scale (``step_scale`` ``"rms"`` / ``"width"``), None without one."""
    if cfg.step_scale == "none":
        return None
    return tensor_step_scale(p, cfg).to(dtype) if p.dim() >= 2 else k0.vscale.to(dtype)


def sanitize_grad(g: Tensor, cfg: LOConfig, dtype: torch.dtype) -> Tensor:
    g = g.to(dtype)
    return torch.clamp(torch.nan_to_num(g, nan=0.0, posinf=cfg.grad_clip, neginf=-cfg.grad_clip),
                       -cfg.grad_clip, cfg.grad_clip)


def _decays(values, like: Tensor, ndim: int) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *[1] * ndim)


# ---- phase 1a: factored accumulators ------------------------------------------------------------
def factored_update(g: Tensor, row: Tensor, col: Tensor, cfg: LOConfig):
    """New row/column accumulators and the row factor of a rank >= 2 tensor (kernels K1+K2)."""
    a, b = factored_dims(g.shape)
    ad = _decays(cfg.adafactor_decays, g, g.dim())
    g2 = g * g + 1e-30
    row_new = ad * row + (1 - ad) * g2.mean(dim=b, keepdim=True)
    col_new = ad * col + (1 - ad) * g2.mean(dim=a, keepdim=True)
    row_factor = torch.rsqrt(torch.clamp(row_new / row_new.mean(dim=a + 1, keepdim=True), min=1e-9))
    return row_new, col_new, row_factor


# ---- per-element accumulators and features (phase 1b and, recomputed, phase 2) --------------------
def element_accumulators(g: Tensor, m: Tensor, v: Tensor, row: Tensor, col: Tensor | None,
                         row_factor: Tensor | None, cfg: LOConfig):
    """New momenta and rms; broadcast row/col accumulators and the factored preconditioner.

    For rank >= 2, ``row``/``col``/``row_factor`` are phase 1a's outputs; for rank < 2 ``row`` is the
    *old* full second moment and is updated here (``col`` and ``row_factor`` are None).
    """
    md = _decays(cfg.momentum_decays, g, g.dim())
    m_new = md * m + (1 - md) * g
    v_new = cfg.rms_decay * v + (1 - cfg.rms_decay) * g * g
    na = len(cfg.adafactor_decays)
    if col is None:
        ad = _decays(cfg.adafactor_decays, g, g.dim())
        row_new = ad * row + (1 - ad) * (g * g + 1e-30)
        row_b = col_b = row_new
        fac = torch.rsqrt(row_new + 1e-9)
    else:
        row_new = row
        row_b = row.expand(na, *g.shape)
        col_b = col.expand(na, *g.shape)
        fac = row_factor * torch.rsqrt(torch.clamp(col, min=1e-9))
    return m_new, v_new, row_new, row_b, col_b, fac


def mlp(x: Tensor, theta: dict[str, Tensor], cfg: LOConfig, b0: Tensor) -> Tensor:
    """The MLP on normalised features, first bias ``b0`` already holding the time features."""
    c = x.shape[1]
    n_layers = cfg.hidden_layers + 1
    h = x @ theta["w0"][:c].to(x.dtype) + b0
    for i in range(1, n_layers):
        h = F.relu(h)
        h = h @ theta[f"w{i}"].to(x.dtype) + theta[f"b{i}"].to(x.dtype)
    return h


# ---- the step --------------------------------------------------------------------------------------
def lo_step_reference(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
                      theta: dict[str, Tensor], cfg: LOConfig):
    """One learned-optimizer step; the same interface and results as ``BoundLearnedOptimizer.update``.

    Pure: returns ``(new_params, new_state)`` and mutates nothing.
    """
    if not params:
        return {}, {**state, "step": state["step"] + 1}
    # per-tensor state dtypes (>= fp32); the MLP runs in their promotion, as in optimizers.learned
    dtype = functools.reduce(torch.promote_types, (state["v"][k].dtype for k in params))
    device = state["v"][next(iter(params))].device
    k0 = step_constants(state["step"], theta, cfg, dtype=dtype, device=device, horizon=state.get("horizon"),
                        loss_stats=state.get("loss_stats"))
    new_state: dict = {"step": state["step"] + 1, "m": {}, "v": {}, "row": {}, "col": {}}
    for key in RUN_KEYS:
        if key in state:
            new_state[key] = state[key]
    new_params: dict[str, Tensor] = {}

    # phase 1: accumulators (factored ones written first) and per-tensor feature statistics
    pieces = []
    for k, p in params.items():
        if p.numel() == 0:
            new_params[k] = p
            for key in ("m", "v", "row", "col"):
                if k in state[key]:
                    new_state[key][k] = state[key][k]
            continue
        g = sanitize_grad(grads[k], cfg, state["v"][k].dtype)
        if factored_dims(p.shape) is not None:
            row, col, row_factor = factored_update(g, state["row"][k], state["col"][k], cfg)
            new_state["col"][k] = col
        else:
            row, col, row_factor = state["row"][k], None, None
        m, v, row, row_b, col_b, fac = element_accumulators(
            g, state["m"][k], state["v"][k], row, col, row_factor, cfg)
        x = element_features(g, p, m, v, row_b, col_b, fac, cfg)
        scale = torch.rsqrt(1e-5 + (x * x).sum(dim=0, keepdim=True) / x.shape[0])
        new_state["m"][k], new_state["v"][k], new_state["row"][k] = m, v, row
        pieces.append((k, p, x * scale, m[0], v))  # phase 2 (the kernel recomputes x here)
    if not pieces:
        return new_params, new_state

    # phase 2: normalised features -> MLP -> update (one MLP call over all elements)
    x = torch.cat([pc[2] for pc in pieces], dim=0)
    out = mlp(x, theta, cfg, k0.b0)
    d, mag = out[:, 0], out[:, 1]
    sizes = [pc[1].numel() for pc in pieces]
    adam = None
    if cfg.nominal == "adam":
        adam = torch.cat([adam_direction(m0, v, k0.bc1, k0.bc2).reshape(-1) for _, _, _, m0, v in pieces])
    if cfg.design == "additive":
        delta = d * torch.exp(cfg.exp_mult * mag) * cfg.step_mult
        if adam is not None:
            delta = delta + k0.lr * adam
    elif cfg.design == "controller":
        delta = k0.lr * torch.exp(cfg.controller_bound * torch.tanh(d)) * adam
    else:  # normalized: the learned direction rms-normalised per tensor (the kernels' extra MLP pass)
        dn = torch.cat([piece * torch.rsqrt((piece * piece).sum() / piece.numel() + 1e-12)
                        for piece in torch.split(d, sizes)])
        delta = k0.lr * (adam + k0.mix * dn)
    scales = [step_scale(p, k0, cfg, delta.dtype) for _, p, *_ in pieces]
    if scales and scales[0] is not None:
        delta = delta * torch.cat([s.expand(n) for s, n in zip(scales, sizes)])
    delta = torch.clamp(delta, -cfg.max_update, cfg.max_update)
    for (k, p, *_), piece in zip(pieces, torch.split(delta, sizes)):
        new_params[k] = p - piece.reshape(p.shape).to(p.dtype)
    return {k: new_params[k] for k in params}, new_state


def bytes_per_element(cfg: LOConfig, param_bytes: int = 4, grad_bytes: int = 4) -> dict[str, int]:
    """Bytes per parameter element: the least a step must move, and what the two-pass kernels move.

    ``minimum``: read g, p, m (nm), v and write p, m, v once (factored accumulators are O(rows+cols)).
    ``kernels``: the stats pass re-reads g, p, m, v (it cannot keep 28 features per element);
    ``kernels_factored``: for rank >= 2 tensors the row and column reductions read g twice more.
    """
    nm = len(cfg.momentum_decays)
    once = grad_bytes + param_bytes + 4 * (nm + 1)
    minimum = once + param_bytes + 4 * (nm + 1)
    return {"minimum": minimum, "kernels": minimum + once, "kernels_factored": minimum + once + 2 * grad_bytes}


__all__ = [
    "lo_step_reference", "step_constants", "StepConstants", "adam_direction", "step_scale", "factored_update",
    "element_accumulators",
    "element_features", "mlp", "sanitize_grad", "feature_slots", "unsupported_reason", "NUM_SLOTS",
    "bytes_per_element",
]
