"""A differentiable learned-optimizer step: ``torch.autograd.Function`` around the fused forward.

:func:`lo_step_autograd` has the interface and results of ``BoundLearnedOptimizer.update`` /
:func:`kernels.lo_step_reference.lo_step_reference`, and gradients w.r.t. theta (MLP weights and biases,
``nominal_log_lr``, ``nominal_time_w``, ``vector_log_lr``, ``mix``) and the incoming parameters, gradients
and accumulators.

Forward: the Triton step (:func:`kernels.lo_step_triton.lo_step`, ``forward="triton"``) or the PyTorch
reference (``forward="reference"``). Saved: the inputs and, for factored (rank >= 2) tensors, the new
row / column accumulators (outputs, O(rows + cols)); no activations.

Backward, two implementations of the same gradients:

* ``backward="triton"``: :func:`kernels.lo_step_backward.lo_step_backward`, the fused Triton backward
  (recomputes features and MLP activations per element block; see that module for what runs in PyTorch).
* ``backward="reference"``: **the reference backward** -- it recomputes the step with the PyTorch
  reference under ``enable_grad`` and calls ``torch.autograd.grad`` (memory: one reference step's graph,
  built only during backward). Correct for either forward; slow; the reference the kernels are tested
  against.

``backward="auto"`` (default) picks the Triton backward when the forward is Triton and the backward
kernels support the configuration (:func:`kernels.lo_step_backward.unsupported_backward`; they refuse
``design="normalized"``), else the reference. ``state["horizon"]`` (``time_features="fraction"``) is
passed through and gets no gradient. Marked ``once_differentiable`` (no double backward). The step
counter gets no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels.lo_step_reference import RUN_KEYS, lo_step_reference
from optimizers.lo_spec import LOConfig

STATE_KEYS = ("m", "v", "row", "col")


class _Layout:
    """How the dict arguments are flattened into the Function's positional tensors."""

    def __init__(self, params: dict, state: dict, theta: dict):
        self.pkeys = list(params)
        self.skeys = [(key, k) for key in STATE_KEYS for k in self.pkeys if k in state[key]]
        self.tkeys = list(theta)
        self.col_keys = {k for k in self.pkeys if k in state["col"]}

    def flatten(self, params, grads, state, theta) -> list[Tensor]:
        return ([params[k] for k in self.pkeys] + [grads[k] for k in self.pkeys]
                + [state[key][k] for key, k in self.skeys] + [theta[k] for k in self.tkeys])

    def unflatten(self, flat, step: Tensor, run: dict | None = None):
        n = len(self.pkeys)
        params = dict(zip(self.pkeys, flat[:n]))
        grads = dict(zip(self.pkeys, flat[n:2 * n]))
        state: dict = {"step": step, **{key: {} for key in STATE_KEYS}}
        state.update(run or {})  # horizon (T of the fraction features), loss_stats: no gradient
        for (key, k), t in zip(self.skeys, flat[2 * n:2 * n + len(self.skeys)]):
            state[key][k] = t
        theta = dict(zip(self.tkeys, flat[2 * n + len(self.skeys):]))
        return params, grads, state, theta

    def outputs(self, new_params, new_state) -> tuple[Tensor, ...]:
        return tuple([new_params[k] for k in self.pkeys] + [new_state[key][k] for key, k in self.skeys])


def _reference_backward(layout: _Layout, cfg: LOConfig, step: Tensor, run: dict, inputs,
                        grad_outputs):
    """The reference backward: recompute the reference step with autograd and differentiate it."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        params, grads, state, theta = layout.unflatten(leaves, step, run)
        new_params, new_state = lo_step_reference(params, grads, state, theta, cfg)
        outs = layout.outputs(new_params, new_state)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True) \
            if pairs and wrt else [None] * len(wrt)
    it = iter(got)
    return [next(it) if t.requires_grad else None for t in leaves]


class LOStepFunction(torch.autograd.Function):
    """Positional form; use :func:`lo_step_autograd`."""

    @staticmethod
    def forward(layout: _Layout, cfg: LOConfig, step: Tensor, run: dict, use_triton: bool,
                precision: str, opts: dict, *flat):
        params, grads, state, theta = layout.unflatten([t.detach() for t in flat], step, run)
        if use_triton:
            from kernels.lo_step_triton import lo_step

            extra = {"blocks": opts["blocks"]} if opts.get("blocks") is not None else {}
            new_params, new_state = lo_step(params, grads, state, theta, cfg, precision=precision,
                                            inplace=False, **extra)
        else:
            new_params, new_state = lo_step_reference(params, grads, state, theta, cfg)
        return layout.outputs(new_params, new_state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        layout, cfg, step, run, _, precision, opts, *flat = inputs
        ctx.layout, ctx.cfg, ctx.step, ctx.precision, ctx.opts = layout, cfg, step, precision, opts
        ctx.run = run
        # factored tensors' new row / col accumulators (outputs; the Triton backward needs them)
        n = len(layout.pkeys)
        ctx.fac_keys = [(key, k, n + j) for j, (key, k) in enumerate(layout.skeys)
                        if key == "col" or (key == "row" and k in layout.col_keys)]
        ctx.save_for_backward(*flat, *(output[j] for _, _, j in ctx.fac_keys))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        saved = ctx.saved_tensors
        n_in = len(saved) - len(ctx.fac_keys)
        if ctx.opts["backward"] == "triton":
            grads = _triton_backward(ctx, saved[:n_in], saved[n_in:], grad_outputs)
        else:
            grads = _reference_backward(ctx.layout, ctx.cfg, ctx.step, ctx.run, saved[:n_in], grad_outputs)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[7:])]
        return (None, None, None, None, None, None, None, *grads)


def _triton_backward(ctx, inputs, fac_outputs, grad_outputs):
    """The fused Triton backward (:func:`kernels.lo_step_backward.lo_step_backward`) in positional form."""
    from kernels.lo_step_backward import lo_step_backward

    layout: _Layout = ctx.layout
    params, grads, state, theta = layout.unflatten(list(inputs), ctx.step, ctx.run)
    new_rowcol: dict = {"row": {}, "col": {}}
    for (key, k, _), t in zip(ctx.fac_keys, fac_outputs):
        new_rowcol[key][k] = t
    n = len(layout.pkeys)
    d_params = dict(zip(layout.pkeys, grad_outputs[:n]))
    d_state: dict = {key: {} for key in STATE_KEYS}
    for (key, k), gt in zip(layout.skeys, grad_outputs[n:]):
        d_state[key][k] = gt
    extra = {"blocks": ctx.opts["blocks"]} if ctx.opts.get("blocks") is not None else {}
    got = lo_step_backward(params, grads, state, theta, ctx.cfg, new_rowcol, d_params, d_state,
                           precision=ctx.precision, **extra)
    return ([got["params"][k] for k in layout.pkeys] + [got["grads"][k] for k in layout.pkeys]
            + [got[key][k] for key, k in layout.skeys] + [got["theta"][k] for k in layout.tkeys])


def lo_step_autograd(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
                     theta: dict[str, Tensor], cfg: LOConfig, *, forward: str = "reference",
                     backward: str = "auto", precision: str = "ieee", blocks=None):
    """One differentiable learned-optimizer step, ``(new_params, new_state)``.

    ``forward``: ``"triton"`` (fused kernels; fp32 state, CUDA or ``TRITON_INTERPRET=1``) or
    ``"reference"`` (PyTorch; any dtype). ``backward``: ``"triton"`` (fused backward kernels; same
    requirements), ``"reference"`` (recompute + autograd) or ``"auto"`` (Triton when the forward is
    Triton and the backward kernels support the step, else the reference). ``precision``: ``tl.dot``
    input precision of forward and backward kernels. ``blocks``: kernel tile sizes
    (:class:`kernels.lo_step_triton.Blocks`; tests use tiny ones).
    """
    if forward not in ("triton", "reference"):
        raise ValueError(f"forward must be 'triton' or 'reference', got {forward!r}")
    if backward not in ("triton", "reference", "auto"):
        raise ValueError(f"backward must be 'triton', 'reference' or 'auto', got {backward!r}")
    if not params:
        return {}, {**state, "step": state["step"] + 1}
    if backward == "auto":
        backward = "reference"
        if forward == "triton":
            from kernels.lo_step_backward import unsupported_backward

            if unsupported_backward(cfg, params, grads, state) is None:
                backward = "triton"
    layout = _Layout(params, state, theta)
    step = state["step"].detach()
    run = {key: state[key].detach() for key in RUN_KEYS if key in state}
    opts = {"backward": backward, "blocks": blocks}
    outs = LOStepFunction.apply(layout, cfg, step, run, forward == "triton", precision, opts,
                                *layout.flatten(params, grads, state, theta))
    n = len(layout.pkeys)
    new_params = dict(zip(layout.pkeys, outs[:n]))
    new_state: dict = {"step": state["step"] + 1, **{key: {} for key in STATE_KEYS}}
    for key in RUN_KEYS:
        if key in state:
            new_state[key] = state[key]
    for (key, k), t in zip(layout.skeys, outs[n:]):
        new_state[key][k] = t
    return new_params, new_state


__all__ = ["LOStepFunction", "lo_step_autograd"]
