"""Population learned-optimizer step: P tasks under P different weight sets in one set of launches.

ES / PES evaluate many perturbed weight sets (antithetic pairs ``theta +- sigma * eps``), each on its own
copy of a task. :func:`population_lo_step` steps all of them with the launches of the single step
(:mod:`kernels.lo_step_triton`): every member's slice of every tensor is one entry of the multi-tensor
tables, tagged with its member index (meta column 11), and the kernels read that member's MLP weights and
per-step constants (its own step and run length T: time features folded into the first bias, nominal lr,
exp(vector_log_lr), mix) from stacked buffers. The launches do not grow with P; only the host tables do
(P x tensors rows).

Layout (a leading population axis everywhere):

* ``params[k]``, ``grads[k]``: ``(P, *shape)``; ``state["m"][k]``: ``(P, nm, *shape)``, ``state["v"][k]``:
  ``(P, *shape)``, ``state["row"][k]`` / ``state["col"][k]``: ``(P, na, ...)``, i.e. what
  ``torch.func.vmap(lopt.bind(theta).init)`` gives; ``state["step"]``: ``()`` (shared) or ``(P,)``;
  ``state["horizon"]`` (the run length T of ``time_features="fraction"``): ``()`` (shared) or ``(P,)``,
  so members may run for different lengths.
* ``thetas[k]``: ``(P, *theta_shape)``.

:func:`population_lo_step_reference` is the PyTorch reference: the single-member reference
(:func:`kernels.lo_step_reference.lo_step_reference`) per member, stacked. Forward only (not
differentiable; ES / PES need no backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.lo_step_reference import feature_slots, lo_step_reference, step_constants
from optimizers.lo_spec import LOConfig, factored_dims

STATE_KEYS = ("m", "v", "row", "col")


def _member(d: dict, j: int) -> dict:
    return {k: v[j] for k, v in d.items()}


def _steps(state: dict, pop: int, key: str = "step") -> Tensor:
    step = state[key]
    return step.expand(pop) if step.dim() == 0 else step


def _horizons(state: dict, pop: int) -> Tensor | None:
    return _steps(state, pop, "horizon") if "horizon" in state else None


def _loss_stats(state: dict, pop: int) -> Tensor | None:
    """The members' loss statistics ``(P, 5)`` (shared ``(5,)`` ones expanded), or None."""
    if "loss_stats" not in state:
        return None
    ls = state["loss_stats"]
    return ls.expand(pop, *ls.shape) if ls.dim() == 1 else ls


def population_size(thetas: dict[str, Tensor]) -> int:
    sizes = {v.shape[0] if v.dim() else None for v in thetas.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"thetas must share a leading population axis, got leading sizes {sizes}")
    return sizes.pop()


def population_lo_step_reference(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
                                 thetas: dict[str, Tensor], cfg: LOConfig):
    """PyTorch reference of :func:`population_lo_step`: the single reference step per member, stacked."""
    pop = population_size(thetas)
    steps = _steps(state, pop)
    horizons = _horizons(state, pop)
    loss_stats = _loss_stats(state, pop)
    outs = []
    for j in range(pop):
        st = {"step": steps[j], **{key: _member(state[key], j) for key in STATE_KEYS}}
        if horizons is not None:
            st["horizon"] = horizons[j]
        if loss_stats is not None:
            st["loss_stats"] = loss_stats[j]
        outs.append(lo_step_reference(_member(params, j), _member(grads, j), st, _member(thetas, j), cfg))
    new_params = {k: torch.stack([o[0][k] for o in outs]) for k in params}
    new_state: dict = {"step": state["step"] + 1}
    for key in ("horizon", "loss_stats"):
        if key in state:
            new_state[key] = state[key]
    for key in STATE_KEYS:
        new_state[key] = {k: torch.stack([o[1][key][k] for o in outs]) for k in state[key]}
    return new_params, new_state


def _population_constants(steps: Tensor, thetas: dict[str, Tensor], cfg: LOConfig, device,
                          horizons: Tensor | None = None, loss_stats: Tensor | None = None):
    """Per member: the step constants ``sc`` ``(P, SC_COLS)`` (bc1, bc2, lr, exp(vector_log_lr), mix) and
    the folded first bias ``(P, H)`` -- the single step's :func:`step_constants` with the member's step,
    horizon and weights, vmapped (a few launches whatever P)."""
    from kernels.lo_step_common import step_constant_table

    def one(step, theta, horizon=None, stats=None):
        k = step_constants(step, theta, cfg, device=device, horizon=horizon, loss_stats=stats)
        return step_constant_table(k), k.b0

    th = {k: v.to(device) for k, v in thetas.items()}
    extra = [x.to(device) for x in (horizons, loss_stats) if x is not None]
    if horizons is None and loss_stats is not None:
        sc, b0 = torch.func.vmap(lambda s, t, ls: one(s, t, None, ls))(steps.to(device), th, *extra)
    else:
        sc, b0 = torch.func.vmap(one)(steps.to(device), th, *extra)
    return sc.float().contiguous(), b0.float().contiguous()


def _pack_population(thetas: dict[str, Tensor], cfg: LOConfig, device):
    """Stacked kernel-layout weights: w0 ``(P, 32, H)`` (rows at the feature-tile columns), hidden layers
    ``(P, max(L-1, 1), H, H)`` / ``(P, max(L-1, 1), H)``, output ``(P, H, 2)`` / ``(P, 2)``."""
    from kernels.lo_step_common import KPAD, slot_column

    pop = population_size(thetas)
    h = cfg.hidden_width
    f32 = {"dtype": torch.float32, "device": device}
    slots = feature_slots(cfg)
    cols = torch.tensor([slot_column(s) for s in slots], device=device)
    w0 = torch.zeros((pop, KPAD, h), **f32)
    w0[:, cols] = thetas["w0"][:, : len(slots)].to(**f32)
    n_mid = cfg.hidden_layers - 1
    if n_mid > 0:
        wm = torch.stack([thetas[f"w{i}"].to(**f32) for i in range(1, n_mid + 1)], dim=1).contiguous()
        bm = torch.stack([thetas[f"b{i}"].to(**f32) for i in range(1, n_mid + 1)], dim=1).contiguous()
    else:
        wm, bm = torch.zeros((pop, 1, h, h), **f32), torch.zeros((pop, 1, h), **f32)
    last = cfg.hidden_layers
    wo = thetas[f"w{last}"].to(**f32).contiguous()
    bo = thetas[f"b{last}"].to(**f32).contiguous()
    return w0.contiguous(), wm, bm, wo, bo


def population_unsupported(cfg: LOConfig, params: dict[str, Tensor], grads=None, state=None) -> str | None:
    """Why :func:`population_lo_step` cannot run this step (None when it can)."""
    from kernels.lo_step_common import unsupported

    if any(p.dim() == 0 for p in params.values()):
        return "parameters need a leading population axis"
    one = {k: p[0] for k, p in params.items()}
    g1 = None if grads is None else {k: g[0] for k, g in grads.items()}
    s1 = None if state is None else {key: {k: t[0] for k, t in state[key].items()} for key in STATE_KEYS}
    return unsupported(cfg, one, g1, s1)


def population_lo_step(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
                       thetas: dict[str, Tensor], cfg: LOConfig, *, precision: str = "ieee",
                       inplace: bool = False, blocks=None):
    """Step P members, member ``j`` with weights ``{k: thetas[k][j]}``; see the module docstring.

    Returns ``(new_params, new_state)`` stacked like the inputs; equal (to rounding) to
    :func:`population_lo_step_reference`. ``inplace=True`` writes the caller's tensors (copied back
    where they are not contiguous); ``False`` leaves them untouched. Not differentiable.
    """
    from kernels import lo_step_common as common
    from kernels.lo_step_triton import launch_group

    if precision not in common.PRECISIONS:
        raise ValueError(f"precision must be one of {common.PRECISIONS}, got {precision!r}")
    blocks = blocks or common.DEFAULT_BLOCKS
    pop = population_size(thetas)
    for k, p in params.items():
        if p.dim() == 0 or p.shape[0] != pop or grads[k].shape != p.shape:
            raise ValueError(f"params[{k!r}] / grads[{k!r}] need the leading population axis {pop}, got "
                             f"{tuple(p.shape)} / {tuple(grads[k].shape)}")
    if not params:
        return {}, {**state, "step": state["step"] + 1}
    reason = population_unsupported(cfg, params, grads, state)
    if reason:
        raise NotImplementedError(f"population_lo_step (Triton) cannot run this step: {reason}")
    with torch.no_grad():
        device = next(iter(params.values())).device
        writeback: list[tuple[Tensor, Tensor]] = []

        def work(t: Tensor) -> Tensor:  # a contiguous tensor the kernels may write
            if inplace and t.is_contiguous():
                return t
            c = t.detach().clone(memory_format=torch.contiguous_format)
            if inplace:
                writeback.append((t, c))
            return c

        new_params = {k: work(p) for k, p in params.items()}
        new_state: dict = {"step": state["step"] + 1}
        for key in STATE_KEYS:
            new_state[key] = {k: work(t) for k, t in state[key].items()}
        sc, b0 = _population_constants(_steps(state, pop), thetas, cfg, device, _horizons(state, pop),
                                       _loss_stats(state, pop))
        packed = _pack_population(thetas, cfg, device)
        nm = len(cfg.momentum_decays)
        items, members = [], []
        gc = {k: g.contiguous() for k, g in grads.items()}
        for j in range(pop):
            for k, p in new_params.items():
                if p[j].numel() == 0:
                    continue
                row = new_state["row"][k][j]
                col = new_state["col"][k][j] if factored_dims(p.shape[1:]) is not None else row
                items.append((gc[k][j], p[j], new_state["m"][k][j], new_state["v"][k][j], row, col))
                members.append(j)
        groups: dict[tuple, tuple[list, list]] = {}  # one launch set per (param, grad) dtype pair
        for it, j in zip(items, members):
            its, mems = groups.setdefault((common.DTYPE_CODE[it[1].dtype], common.DTYPE_CODE[it[0].dtype]), ([], []))
            its.append(it)
            mems.append(j)
        for (p_kind, g_kind), (its, mems) in groups.items():
            aligned = all(common.is_aligned(it[0]) and common.is_aligned(it[1]) and common.is_aligned(it[2], nm)
                          and common.is_aligned(it[3]) for it in its)
            launch_group(its, cfg, (sc, b0), packed, precision, blocks, p_kind, g_kind, aligned,
                             tuple(mems))
        for orig, c in writeback:
            orig.copy_(c)
        if inplace:
            new_params = dict(params)
            new_state = {"step": new_state["step"], **{key: dict(state[key]) for key in STATE_KEYS}}
        for key in ("horizon", "loss_stats"):
            if key in state:
                new_state[key] = state[key]
    return new_params, new_state


__all__ = ["population_lo_step", "population_lo_step_reference", "population_size", "population_unsupported"]
