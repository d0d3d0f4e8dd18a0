"""Meta-training a tiny learned optimizer as a task (family ``learned_optimizer``): the outer job in the
distribution.

Why: in the recursion, a learned optimizer's next job is to be the *outer* optimizer that meta-trains
its successor. That job looks like no inner task: its parameters are another learned optimizer's
weights (input, hidden and output matrices, 2-element biases, scalars such as a log learning rate and
schedule weights), its gradients are meta-gradients of short unrolls, noisy and heavy-tailed. VeLO put
"train a small learned optimizer" tasks into its meta-training distribution for exactly this reason;
this family does the same, at CPU cost.

A task's parameters are the weights ``theta`` of a learned optimizer (:class:`LOConfig`, the project's
default architecture unless ``lo`` overrides fields), initialised as the meta-trainer initialises them.
Its loss on a batch is the meta-loss of one short unroll: ``theta`` bound as the optimizer of a small
image MLP on the embedded digits (``inner``: hidden width, activation, batch size), run ``inner_steps``
steps from the inner task's initialisation, the loss being the mean over steps ``1..K`` of the inner
task's normalised training loss (so 1.0-ish for an optimizer that does nothing useful, lower for one
that trains fast; positive, so log meta-losses apply). The batch holds the unroll's ``K + 1`` inner
minibatches, stacked, and the inner initialisation, drawn with them, so successive batches see
different starts (as the outer job's unroll episodes do).

The loss is a pure function written with ``torch.func.grad_and_value`` for the inner gradients, so it
can itself be differentiated (the task gradient is the exact meta-gradient through the unroll) and
vmapped (evaluation's learning-rate grids). Under plain autograd (truncated backprop through the
optimizer being meta-trained) its gradient is handed over as a constant (:class:`_FirstOrderLoss`), so
meta-training does not differentiate through it a third time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import grad_and_value

from optimizers.tree import Params, under_func_transform
from tasks.base import Batch, Task, TaskConfig, TaskConfigError, TaskFamily, choice, log_int, register_family, seeded
from tasks.image_mlp import ImageMLPTask
from tasks.validation import cfg_int


def _lo_config(overrides: dict):
    from optimizers.lo_spec import LOConfig  # the specification only: tasks do not need the step's module

    try:  # fields not given keep today's defaults (from_dict would read them as an old checkpoint's)
        return LOConfig.from_dict({**LOConfig().to_dict(), **overrides})
    except (TypeError, ValueError) as e:
        raise TaskConfigError(f"learned_optimizer task: bad 'lo' settings {overrides}: {e}") from e


class LearnedOptimizerTask(Task):
    """See the module docstring."""

    def __init__(self, config: TaskConfig):
        from optimizers.learned import LearnedOptimizer

        self.config = dict(config)
        self.inner_steps = cfg_int(config, "inner_steps", 8, lo=1, hi=200)
        inner = config.get("inner", {})
        if not isinstance(inner, dict):
            raise TaskConfigError(f"learned_optimizer task: 'inner' must be a JSON object, got {inner!r}")
        self.inner = ImageMLPTask({"dataset": "digits", "hidden": [8], "batch_size": 32, **inner,
                                   "seed": self.seed})
        lo = config.get("lo", {})
        if not isinstance(lo, dict):
            raise TaskConfigError(f"learned_optimizer task: 'lo' must be a JSON object, got {lo!r}")
        self.lopt = LearnedOptimizer(_lo_config(lo))
        self.inner_names = list(self.inner.init(seeded("names")).keys())

    @property
    def max_loss(self) -> float:
        return self.inner.max_loss

    def init(self, generator: torch.Generator) -> Params:
        return self.lopt.init_theta(generator)

    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        """``K + 1`` inner minibatches stacked (x: ``(K+1, B, ...)``, y: ``(K+1, B)``), then the inner
        MLP's initial parameters (in its parameter order), all drawn from ``generator``: the loss is
        then a deterministic function of ``(params, batch)``, so ``vmap`` over batches needs no
        randomness inside it."""
        xs, ys = zip(*(self.inner.sample_batch(split, generator) for _ in range(self.inner_steps + 1)))
        init = self.inner.init(generator)
        return (torch.stack(xs), torch.stack(ys), *init.values())

    def full_batch(self, split: str) -> Batch:
        return self.sample_batch(split, seeded("full", self.seed, split))

    def loss(self, params: Params, batch: Batch) -> Tensor:
        if _plain_autograd(params):
            names = list(params)
            return _FirstOrderLoss.apply(self, batch, names, *(params[k] for k in names))
        return self.meta_loss(params, batch)

    def meta_loss(self, params: Params, batch: Batch) -> Tensor:
        """The unroll's meta-loss, a pure function (differentiable to any order, vmappable)."""
        x, y = batch[0], batch[1]
        opt = self.lopt.bind(params, total_steps=self.inner_steps)
        p = dict(zip(self.inner_names, batch[2:]))
        state = opt.init(p)
        loss_grad = grad_and_value(self.inner.loss)
        terms = []
        for k in range(self.inner_steps + 1):
            if k < self.inner_steps:
                g, loss = loss_grad(p, (x[k], y[k]))
            else:
                loss = self.inner.loss(p, (x[k], y[k]))
            if k > 0:
                terms.append(self.inner.normalizer(loss) / math.log(self.inner.data.num_classes))
            if k < self.inner_steps:
                p, state = opt.update(g, state, p, loss=loss)
        return torch.stack(terms).mean()


def _plain_autograd(params: Params) -> bool:
    """True when the loss is taken under plain autograd (truncated backprop's ``create_graph`` inner
    gradients), not under ``torch.func`` transforms (which need the pure function)."""
    if any(under_func_transform(p) for p in params.values()):
        return False
    return torch.is_grad_enabled() and any(p.requires_grad for p in params.values())


class _FirstOrderLoss(torch.autograd.Function):
    """The meta-loss whose gradient is the exact meta-gradient *as a constant*: its backward does not
    depend on ``params``, so differentiating through the task gradient (truncated backprop of the
    optimizer meta-trained on this task) drops its Hessian term instead of going to third order
    through the unroll. Measured: the exact third-order path more than doubled a default outer step
    with one member in eight on this family. (The outer job's own meta-gradients are estimates too.)"""

    @staticmethod
    def forward(ctx, task: "LearnedOptimizerTask", batch: Batch, names: list[str], *values: Tensor) -> Tensor:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in zip(names, values)}
            loss = task.meta_loss(leaves, batch)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        ctx.save_for_backward(*(torch.zeros_like(v) if g is None else g for v, g in zip(values, grads)))
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (None, None, None, *(grad_out * g for g in ctx.saved_tensors))


@register_family("learned_optimizer")
class LearnedOptimizerFamily(TaskFamily):
    """Inner MLP hidden width log-int in [min_width, max_width], ``inner_steps`` from ``steps``."""

    def __init__(self, min_width: int = 4, max_width: int = 8, steps=(2, 4), batch_sizes=(16, 32),
                 activations=("relu", "tanh"), lo: dict | None = None):
        self.width = (min_width, max_width)
        self.steps = tuple(steps)
        self.batch_sizes = tuple(batch_sizes)
        self.activations = tuple(activations)
        self.lo = dict(lo or {})

    def sample(self, g: torch.Generator) -> TaskConfig:
        cfg: TaskConfig = {
            "inner_steps": int(choice(g, self.steps)),
            "inner": {"hidden": [log_int(g, *self.width)], "activation": choice(g, self.activations),
                      "batch_size": int(choice(g, self.batch_sizes))},
        }
        if self.lo:
            cfg["lo"] = dict(self.lo)
        return cfg

    def build(self, config: TaskConfig) -> Task:
        return LearnedOptimizerTask(config)
