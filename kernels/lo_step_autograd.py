"""A differentiable learned-optimizer step: ``torch.autograd.Function`` around the fused forward.

:func:`lo_step_autograd` has the interface and results of ``BoundLearnedOptimizer.update`` /
:func:`kernels.lo_step_reference.lo_step_reference`, and gradients w.r.t. theta (MLP weights and biases,
``nominal_log_lr``, ``nominal_time_w``) and the incoming parameters, gradients and accumulators.

Forward: the Triton step (:func:`kernels.lo_step_triton.lo_step`, ``forward="triton"``) or the PyTorch
reference (``forward="reference"``). Nothing but the inputs is saved.

Backward: **the reference backward** -- it recomputes the step with the PyTorch reference under
``enable_grad`` and calls ``torch.autograd.grad`` (memory: one reference step's graph, built only during
backward). It is correct for either forward (the forward kernels compute the reference function), but
it is not fast; a fused Triton backward can later replace :func:`_reference_backward` behind the same
Function. Marked ``once_differentiable`` (no double backward). The step counter gets no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels.lo_step_reference import lo_step_reference
from optimizers.learned import LOConfig

STATE_KEYS = ("m", "v", "row", "col")


class _Layout:
    """How the dict arguments are flattened into the Function's positional tensors."""

    def __init__(self, params: dict, state: dict, theta: dict):
        self.pkeys = list(params)
        self.skeys = [(key, k) for key in STATE_KEYS for k in self.pkeys if k in state[key]]
        self.tkeys = list(theta)

    def flatten(self, params, grads, state, theta) -> list[Tensor]:
        return ([params[k] for k in self.pkeys] + [grads[k] for k in self.pkeys]
                + [state[key][k] for key, k in self.skeys] + [theta[k] for k in self.tkeys])

    def unflatten(self, flat, step: Tensor):
        n = len(self.pkeys)
        params = dict(zip(self.pkeys, flat[:n]))
        grads = dict(zip(self.pkeys, flat[n:2 * n]))
        state: dict = {"step": step, **{key: {} for key in STATE_KEYS}}
        for (key, k), t in zip(self.skeys, flat[2 * n:2 * n + len(self.skeys)]):
            state[key][k] = t
        theta = dict(zip(self.tkeys, flat[2 * n + len(self.skeys):]))
        return params, grads, state, theta

    def outputs(self, new_params, new_state) -> tuple[Tensor, ...]:
        return tuple([new_params[k] for k in self.pkeys] + [new_state[key][k] for key, k in self.skeys])


def _reference_backward(layout: _Layout, cfg: LOConfig, step: Tensor, inputs, grad_outputs):
    """The reference backward: recompute the reference step with autograd and differentiate it."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        params, grads, state, theta = layout.unflatten(leaves, step)
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
    def forward(layout: _Layout, cfg: LOConfig, step: Tensor, use_triton: bool, precision: str, *flat):
        params, grads, state, theta = layout.unflatten([t.detach() for t in flat], step)
        if use_triton:
            from kernels.lo_step_triton import lo_step

            new_params, new_state = lo_step(params, grads, state, theta, cfg, precision=precision,
                                            inplace=False)
        else:
            new_params, new_state = lo_step_reference(params, grads, state, theta, cfg)
        return layout.outputs(new_params, new_state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        layout, cfg, step, _, _, *flat = inputs
        ctx.layout, ctx.cfg, ctx.step = layout, cfg, step
        ctx.save_for_backward(*flat)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        grads = _reference_backward(ctx.layout, ctx.cfg, ctx.step, ctx.saved_tensors, grad_outputs)
        return (None, None, None, None, None, *grads)


def lo_step_autograd(params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
                     theta: dict[str, Tensor], cfg: LOConfig, *, forward: str = "reference",
                     precision: str = "ieee"):
    """One differentiable learned-optimizer step, ``(new_params, new_state)``.

    ``forward``: ``"triton"`` (fused kernels; fp32 state, CUDA or ``TRITON_INTERPRET=1``) or
    ``"reference"`` (PyTorch; any dtype). The backward is the reference backward either way.
    """
    if forward not in ("triton", "reference"):
        raise ValueError(f"forward must be 'triton' or 'reference', got {forward!r}")
    if not params:
        return {}, {**state, "step": state["step"] + 1}
    layout = _Layout(params, state, theta)
    step = state["step"].detach()
    outs = LOStepFunction.apply(layout, cfg, step, forward == "triton", precision,
                                *layout.flatten(params, grads, state, theta))
    n = len(layout.pkeys)
    new_params = dict(zip(layout.pkeys, outs[:n]))
    new_state: dict = {"step": state["step"] + 1, **{key: {} for key in STATE_KEYS}}
    for (key, k), t in zip(layout.skeys, outs[n:]):
        new_state[key][k] = t
    return new_params, new_state


__all__ = ["LOStepFunction", "lo_step_autograd"]
