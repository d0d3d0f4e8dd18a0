"""Per-parameter MLP learned optimizer of the AdafacMLPLOpt / small_fc_lopt family.

For every parameter element the optimizer builds a feature vector from accumulators (momenta at three
decays, an rms second moment, Adafactor row/column second moments) and time features, normalises each
feature channel *per tensor* (``x * rsqrt(1e-5 + mean(x^2))``), and runs a small MLP with two outputs
``(d, m)``. The learned step is ``d * exp(exp_mult * m) * step_mult`` (Metz et al. 2022, "Practical
tradeoffs between memory, compute, and performance in learned optimizers"; google/learned_optimization's
``AdafacMLPLOpt``). An optional *nominal* Adam term with a meta-learned log learning rate is added:
Harrison et al. 2022 show such a term keeps learned optimizers stable off-distribution, and it gives
early generations a sane starting point (the untrained optimizer is Adam plus a small learned term).
Its learning rate may follow a learned schedule, ``log lr(t) = log lr + w . tanh(t / tau - 1)`` over
the same time features the MLP sees (``w = 0`` at init): a task-independent optimizer's clearest edge
over Adam tuned per task with a constant learning rate is *when* it takes large and small steps, and
11 weights learn that far faster than the MLP can.

That is the original ("additive") design. It does not generalise: the MLP term's size never anneals, so
training stalls past the meta-training horizon, and absolute time features take values there that
meta-training never saw. :class:`LOConfig` therefore selects the step's form (``design``), its time
inputs (``time_features``) and a per-tensor step scale (``step_scale``); the default is the design that
measured best (``docs/ablation.md``): the MLP as a bounded multiplicative *controller* of the nominal
Adam step, ``lr(t/T) * s * exp(2 tanh(d)) * adam_dir``, with time given as the fraction of training
``t/T`` and matrices wider than the meta-training tasks taking proportionally smaller steps.

Everything is a pure function of ``(theta, grads, state, params)`` so it can be differentiated through,
vmapped over a population axis, and used as the outer optimizer of meta-training.

Bounds that hold by construction live here (not in the governor): gradients are sanitised and clipped
before entering the accumulators, every feature is normalised, and the final per-element update is
clamped to ``max_update``.

The specification (:class:`LOConfig`, the feature table, the per-element features and accumulator
layout) lives in :mod:`optimizers.lo_spec`, shared with the fused kernels (:mod:`kernels`); this module
is the PyTorch step and the dispatch to the kernels, and re-exports the specification's names. It does
not import :mod:`kernels`: it asks the specification's :func:`optimizers.lo_spec.step_backend` for the
fused step, so ``kernels`` depends on ``optimizers`` (its specification) and not the other way round.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The specification (config, feature table, accumulator rules) lives in a leaf module shared with the
# kernels; its names are re-exported here, where callers and checkpoints have always found them.
from optimizers.lo_spec import (  # noqa: F401  (re-exports)
    DEFAULT_FRACTIONS, DEFAULT_TAUS, DESIGNS, FEATURE_GROUPS, LEGACY_FIELDS, LOSS_DECAYS, LOSS_FEATURES,
    STEP_SCALES, TIME_FEATURES, ConfigError, LOConfig, _check_keys, check_types, element_features,
    factored_dims, group_channels, loss_features, safe_sqrt, tensor_step_scale, time_features,
    update_loss_stats,
)
from optimizers.lo_spec import step_backend  # the fused step (the kernels), reached only through the spec
from optimizers.tree import Params, under_func_transform
from optimizers.workspace import Workspace


def _state_dtype(p: Tensor) -> torch.dtype:
    """State is kept in (at least) fp32, per parameter: bf16 params get fp32 state, fp64 keep fp64."""
    return torch.promote_types(p.dtype if p.is_floating_point() else torch.float32, torch.float32)


def _normalize(x: Tensor) -> Tensor:
    """Per-tensor, per-channel second-moment normalisation; x has shape (n, channels)."""
    return x * torch.rsqrt(1e-5 + (x * x).mean(dim=0, keepdim=True))


# Groups of at least this many elements take the buffer-reusing step when it may run: below it the
# allocating step's temporaries are small and its fewer ops are faster (measured on a 2-core AMD EPYC:
# 0.35 ms slower per step with reuse at 256 elements, equal at 1024, 1.5x faster at 4096).
REUSE_MIN_ELEMENTS = 4096
MLP_BLOCK_ROWS = 8192  # elements per block of the buffer-reusing step's MLP (BoundLearnedOptimizer._mlp_into)
CHUNK_ELEMENTS = 1 << 16  # largest group of tensors stepped as one concatenation (BoundLearnedOptimizer.update)


def _groups(params: Params) -> list[list[str]]:
    """Consecutive tensors grouped up to CHUNK_ELEMENTS elements; a larger tensor forms its own group."""
    out: list[list[str]] = []
    cur: list[str] = []
    n = 0
    for k, p in params.items():
        if cur and n + p.numel() > CHUNK_ELEMENTS:
            out.append(cur)
            cur, n = [], 0
        cur.append(k)
        n += p.numel()
    if cur:
        out.append(cur)
    return out


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat``, except that one tensor is returned as it is (no copy: groups of one large tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _broadcast(per_tensor: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Rows ``per_tensor[i]`` repeated ``sizes[i]`` times (an expand per tensor and one copy; its
    backward is a sum per tensor, unlike ``index_select``'s scatter, measured slower on CPU)."""
    return _cat([row.expand(n, *row.shape) for row, n in zip(per_tensor, sizes)])


_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _element_features_into(out: Tensor, g: Tensor, p_flats: list[Tensor], m: Tensor, v: Tensor, row_b: Tensor,
                           col_b: Tensor, fac: Tensor, cfg: LOConfig, rs_v: Tensor) -> None:
    """:func:`optimizers.lo_spec.element_features` written into ``out`` (channels, n), the same ops
    per channel (copies, ``out=`` products, in-place rsqrt), so the values are identical; the
    channel-major layout is that of its concatenation. ``p_flats``: the parameters, flat, in the
    step's dtype (copied, or concatenated, straight into their channel); ``rs_v``: a scratch (n,)."""
    nmf = min(len(cfg.momentum_decays), len(cfg.adafactor_decays))
    nm, na = len(cfg.momentum_decays), len(cfg.adafactor_decays)
    have_rs_v = False
    i = 0
    for name in cfg.features:
        width = group_channels(name, nm, na)
        dst = out[i:i + width]
        i += width
        if name in ("adam_dir", "rsqrt_rms") and not have_rs_v:  # rsqrt(v + eps), computed once
            torch.add(v, 1e-6, out=rs_v).rsqrt_()
            have_rs_v = True
        if name == "grad":
            dst[0].copy_(g)
        elif name == "param":
            if len(p_flats) == 1:
                dst[0].copy_(p_flats[0])
            else:
                torch.cat(p_flats, out=dst[0])
        elif name == "momentum":
            dst.copy_(m)
        elif name == "rms":
            dst[0].copy_(v)
        elif name == "adam_dir":
            torch.mul(m, rs_v, out=dst)
        elif name == "rsqrt_rms":
            dst[0].copy_(rs_v)
        elif name == "fac_grad":
            torch.mul(g, fac, out=dst)
        elif name == "row":
            dst.copy_(row_b)
        elif name == "col":
            dst.copy_(col_b)
        elif name == "rsqrt_row":
            torch.add(row_b, 1e-8, out=dst).rsqrt_()
        elif name == "rsqrt_col":
            torch.add(col_b, 1e-8, out=dst).rsqrt_()
        elif name == "fac_mom":
            torch.mul(m[:nmf], fac[:nmf], out=dst)
        else:  # a feature group this path does not know: the caller's config check should have refused
            raise ConfigError(f"feature group {name!r} has no buffer-reusing form")


def _traced_reason(tensors: list, allow_autograd: bool = False) -> str | None:
    """Why these tensors must stay on the PyTorch path: autograd (unless ``allow_autograd``: the
    differentiable kernel step handles it), torch.func transforms, tracing."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return "torch.compile tracing"
    grad_enabled = torch.is_grad_enabled()
    for t in tensors:
        if not isinstance(t, Tensor):
            return f"non-tensor {type(t).__name__}"
        if under_func_transform(t):
            return "torch.func transform (vmap / grad)"
        if type(t) not in (Tensor, torch.nn.Parameter):
            return f"tensor subclass {type(t).__name__}"
        if grad_enabled and t.requires_grad and not allow_autograd:
            return "autograd (a tensor requires grad)"
    return None


def _needs_autograd(tensors: list) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


class LearnedOptimizer:
    """The architecture. ``bind(theta)`` returns a functional :class:`~optimizers.base.Optimizer`."""

    def __init__(self, config: LOConfig | None = None):
        self.config = config or LOConfig()

    # ---- meta-parameters -------------------------------------------------------------------
    def layer_sizes(self) -> list[int]:
        c = self.config
        return [c.num_inputs] + [c.hidden_width] * c.hidden_layers + [2]

    def init_theta(self, generator: torch.Generator | int | None = None) -> Params:
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
        sizes = self.layer_sizes()
        theta: Params = {}
        n_layers = len(sizes) - 1
        for i in range(n_layers):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            w = torch.randn(fan_in, fan_out, generator=generator) / math.sqrt(fan_in)
            if i == n_layers - 1:
                w = w * self.config.output_init_scale
            theta[f"w{i}"] = w
            theta[f"b{i}"] = torch.zeros(fan_out)
        c = self.config
        if c.nominal == "adam":
            theta["nominal_log_lr"] = torch.tensor(math.log(c.nominal_lr))
            if c.nominal_schedule and c.num_step_features:
                theta["nominal_time_w"] = torch.zeros(c.num_step_features)
        if c.design == "normalized":
            theta["mix"] = torch.tensor(float(c.mix_init))
        if c.step_scale != "none":
            theta["vector_log_lr"] = torch.zeros(())  # vectors' step relative to the nominal lr
        return theta

    def num_theta(self) -> int:
        return sum(t.numel() for t in self.init_theta(0).values())

    def bind(self, theta: Params, *, kernels: bool | None = None, precision: str = "tf32",
             total_steps: int | None = None, reuse_buffers: bool = True) -> "BoundLearnedOptimizer":
        """The functional optimizer with weights ``theta``.

        ``kernels``: whether ``update`` may use the fused Triton step (:mod:`kernels`). ``None``
        (default) decides per call by :func:`kernels.use_kernels` (on for CUDA tensors when triton is
        available; ``OUROBOROS_KERNELS=0/1`` overrides); ``False`` never; ``True`` wherever the kernels
        can run (CUDA, or any device under ``TRITON_INTERPRET=1``), unless ``OUROBOROS_KERNELS=0``.
        When the step must be differentiated with plain autograd (truncated backprop through an unroll,
        meta-gradients w.r.t. theta) ``update`` runs the kernels through
        :func:`kernels.lo_step_autograd.lo_step_autograd`: Triton forward and Triton backward
        (:mod:`kernels.lo_step_backward`; the PyTorch reference backward where the backward kernels do
        not support the configuration). It falls back to PyTorch under ``torch.func`` transforms (vmap,
        grad: ES / PES, the ``func`` TBPTT engine), ``torch.compile``, or where the kernels do not
        support the configuration or tensors (see :meth:`BoundLearnedOptimizer.kernel_reason`).
        ``precision``: ``tl.dot`` input precision of the kernels (``"tf32"``, ``"ieee"``, ``"tf32x3"``).
        Neither is part of :class:`LOConfig` (checkpoints are unaffected).
        ``total_steps``: the run's length T, for designs that see the fraction of training t/T
        (``config.needs_total_steps``); ``init(params, total_steps=...)`` may give it instead.
        ``reuse_buffers``: whether the PyTorch step without autograd writes its large temporaries into
        buffers kept across steps (:mod:`optimizers.workspace`; the same floats, no page faults for
        them); ``False`` allocates them every step, as the differentiable step always does.
        """
        return BoundLearnedOptimizer(self.config, theta, kernels=kernels, precision=precision,
                                     total_steps=total_steps, reuse_buffers=reuse_buffers)

    def flops_per_element(self) -> int:
        sizes = self.layer_sizes()
        return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))

    def state_floats_per_element(self) -> int:
        c = self.config
        return len(c.momentum_decays) + 1  # factored accumulators are O(rows + cols), not O(n)


class BoundLearnedOptimizer:
    """A learned optimizer bound to weights ``theta``: the same interface as Adam."""

    def __init__(self, config: LOConfig, theta: Params, *, kernels: bool | None = None,
                 precision: str = "tf32", total_steps: int | None = None, reuse_buffers: bool = True):
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.total_steps = None if total_steps is None else int(total_steps)
        if kernels not in (None, True, False):
            raise TypeError(f"kernels must be None, True or False, got {kernels!r}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        self.config = config
        self.theta = theta
        self.kernels = kernels
        self.precision = precision
        self._constants: dict = {}  # constants built once: decays per (dtype, device, ndim), element counts
        # The no-grad PyTorch step writes its large temporaries into buffers kept here across steps
        # (same floats; see optimizers.workspace for why and the memory held). ``reuse_buffers=False``
        # runs the allocating step everywhere (the reference the reusing step is tested against).
        # Not thread-safe: one bound optimizer must not step in two threads at once.
        self.reuse_buffers = bool(reuse_buffers)
        self._workspace = Workspace()

    def __getstate__(self) -> dict:
        """Pickled (sent to worker processes, checkpointed) without the scratch buffers."""
        state = dict(self.__dict__)
        state["_workspace"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reuse_buffers = state.get("reuse_buffers", True)
        self._workspace = Workspace()

    def _decay_tensors(self, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(md, 1 - md, ad, 1 - ad)`` shaped to broadcast over a tensor like ``g`` (cached: building
        them from Python lists was ~a tenth of a small task's step)."""
        key = (g.dtype, g.device, g.dim())
        if key not in self._constants:
            c, ones = self.config, [1] * g.dim()
            md = torch.tensor(c.momentum_decays, dtype=g.dtype, device=g.device).reshape(-1, *ones)
            ad = torch.tensor(c.adafactor_decays, dtype=g.dtype, device=g.device).reshape(-1, *ones)
            self._constants[key] = (md, 1 - md, ad, 1 - ad)
        return self._constants[key]

    # ---- dispatch ---------------------------------------------------------------------------
    def kernel_reason(self, grads: Params, state: dict, params: Params, *,
                      differentiable: bool = False) -> str | None:
        """Why the fused Triton step cannot run ``(grads, state, params)``; None when it can.

        ``differentiable=False`` (what the in-place ``torch.optim`` front end asks): the plain,
        non-differentiable step :func:`kernels.lo_step_triton.lo_step`, so any tensor that requires grad
        (with grad mode on) is a reason. ``differentiable=True`` (what :meth:`update` asks): autograd is
        fine, the step then runs as :func:`kernels.lo_step_autograd.lo_step_autograd` (kernel forward and
        backward); torch.func transforms and ``torch.compile`` tracing still are reasons."""
        if self.kernels is False:
            return "kernels=False"
        if not params:
            return "no parameters"
        device = next(iter(params.values())).device
        backend = step_backend()
        reason = backend.refusal(self.kernels, device)
        if reason:
            return reason
        reason = _traced_reason(self._step_tensors(grads, state, params), allow_autograd=differentiable)
        if reason:
            return reason
        if set(grads) != set(params):
            return "gradients and parameters have different names"
        return backend.unsupported(self.config, params, grads, state)

    def fingerprint(self) -> str:
        """A hash of everything that determines this optimizer's updates (config, weights, run length,
        kernel and precision settings): equal fingerprints give equal runs, so evaluation results can
        be reused (:mod:`meta.eval_cache`)."""
        h = hashlib.sha256(json.dumps({"config": self.config.to_dict(), "total_steps": self.total_steps,
                                       "kernels": self.kernels, "precision": self.precision},
                                      sort_keys=True).encode())
        for name in sorted(self.theta):
            t = self.theta[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def observe_loss(self, state: dict, loss: Tensor | None) -> dict:
        """``state`` with the run's loss statistics updated by ``loss`` (loss features; unchanged
        otherwise). Done before any step path dispatches, so the PyTorch step and the kernels (which
        read ``state["loss_stats"]`` as given) see the same."""
        if "loss_stats" not in state:
            return state
        return {**state, "loss_stats": update_loss_stats(state["loss_stats"], loss)}

    # ---- state ------------------------------------------------------------------------------
    @property
    def horizon_aware(self) -> bool:
        """True when the updates depend on the run's total length (evaluation runs each horizon apart)."""
        return self.config.needs_total_steps

    def with_total_steps(self, total_steps: int) -> "BoundLearnedOptimizer":
        """The same optimizer for a run of ``total_steps`` steps."""
        return BoundLearnedOptimizer(self.config, self.theta, kernels=self.kernels, precision=self.precision,
                                     total_steps=total_steps, reuse_buffers=self.reuse_buffers)

    def init(self, params: Params, *, total_steps: int | None = None) -> dict:
        """Zero accumulators. Designs that see the fraction of training keep T in ``state["horizon"]``
        (from ``total_steps`` or the bound ``total_steps``), so a population can mix run lengths."""
        c = self.config
        nm, na = len(c.momentum_decays), len(c.adafactor_decays)
        dtypes = [_state_dtype(p) for p in params.values()]
        step_dtype = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
        state: dict = {"step": torch.zeros((), dtype=step_dtype), "m": {}, "v": {}, "row": {}, "col": {}}
        if c.needs_total_steps:
            T = total_steps if total_steps is not None else self.total_steps
            if T is None:
                time_features(state["step"], None, c)  # raises the explanatory error
            if isinstance(T, bool) or int(T) != T or T < 1:
                raise ValueError(f"total_steps must be a positive integer, got {T!r}")
            state["horizon"] = torch.tensor(float(T), dtype=step_dtype)
        if c.loss_features != "none":
            state["loss_stats"] = torch.zeros(5, dtype=step_dtype)
        for k, p in params.items():
            dtype = _state_dtype(p)
            state["m"][k] = torch.zeros((nm, *p.shape), dtype=dtype, device=p.device)
            state["v"][k] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            dims = factored_dims(p.shape)
            if dims is None:
                # rank < 2: a full second moment per adafactor decay plays both row and column roles
                state["row"][k] = torch.zeros((na, *p.shape), dtype=dtype, device=p.device)
            else:
                a, b = dims
                rshape = list(p.shape)
                rshape[b] = 1
                cshape = list(p.shape)
                cshape[a] = 1
                state["row"][k] = torch.zeros((na, *rshape), dtype=dtype, device=p.device)
                state["col"][k] = torch.zeros((na, *cshape), dtype=dtype, device=p.device)
        return state

    # ---- step -------------------------------------------------------------------------------
    def _factored(self, g: Tensor, g2: Tensor, st: dict, k: str,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """One tensor's Adafactor accumulators (shape-dependent, so per tensor); returns the new row
        and column accumulators and the per-element ``(adafactor decays, n)`` block ``[row_b; col_b;
        fac]`` of the features (``row_b``/``col_b``: the accumulators broadcast to the elements, ``fac``
        the factored rsqrt of the second moment). With ``out`` (3 * adafactor decays rows, elements of
        ``g`` columns; may be a column slice of a wider reused buffer) the block is written there with
        the same ops instead of concatenated (the accumulators are new tensors either way: state)."""
        c = self.config
        shape, na = g.shape, len(c.adafactor_decays)
        _, _, ad, one_ad = self._decay_tensors(g)
        dims = factored_dims(shape)
        if dims is None:
            row = ad * st["row"][k] + one_ad * g2
            rows = row.reshape(na, -1)
            if out is None:
                return row, None, torch.cat([rows, rows, torch.rsqrt(rows + 1e-9)])
            out[:na].copy_(rows)
            out[na:2 * na].copy_(rows)
            torch.add(rows, 1e-9, out=out[2 * na:]).rsqrt_()
            return row, None, out
        a, b = dims
        row = ad * st["row"][k] + one_ad * g2.mean(dim=b, keepdim=True)
        col = ad * st["col"][k] + one_ad * g2.mean(dim=a, keepdim=True)
        # +1 on every dim index: axis 0 of the accumulators is the decay axis
        row_mean = row.mean(dim=a + 1, keepdim=True)
        row_factor = torch.rsqrt(torch.clamp(row / row_mean, min=1e-9))
        col_factor = torch.rsqrt(torch.clamp(col, min=1e-9))
        if out is None:
            block = torch.cat([row.expand(na, *shape), col.expand(na, *shape), row_factor * col_factor])
            return row, col, block.reshape(3 * na, -1)
        block = out.view(3 * na, *shape)
        block[:na].copy_(row.expand(na, *shape))
        block[na:2 * na].copy_(col.expand(na, *shape))
        torch.mul(row_factor, col_factor, out=block[2 * na:])
        return row, col, out

    def _counts(self, sizes: tuple[int, ...], device: torch.device) -> Tensor:
        """Per-tensor element counts (at least 1), shape (tensors, 1), cached per list of sizes."""
        key = ("counts", sizes, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor([[max(n, 1)] for n in sizes], dtype=torch.float32, device=device)
        return self._constants[key]

    @staticmethod
    def _per_tensor_mean_sq(x: Tensor, sizes: tuple[int, ...], counts: Tensor) -> Tensor:
        """Per-tensor mean of ``x * x`` over the elements (rows) of the concatenated ``x`` (n[, c]).
        (Split-and-sum measured faster than ``index_add`` or ``segment_reduce`` on CPU.)"""
        return BoundLearnedOptimizer._per_tensor_mean(x * x, sizes, counts)

    @staticmethod
    def _per_tensor_mean(xx: Tensor, sizes: tuple[int, ...], counts: Tensor) -> Tensor:
        """Per-tensor mean of ``xx`` over the elements (rows) of the concatenation (n[, c])."""
        sums = torch.stack([piece.sum(0) for piece in torch.split(xx, sizes)])
        return sums / counts.to(xx.dtype).reshape(-1, *([1] * (xx.dim() - 1)))

    def _mlp(self, x: Tensor, tfeat: Tensor | None = None) -> Tensor:
        """The per-element MLP. ``tfeat`` (the time features, the last input rows of ``w0``) is the same
        for every element, so its share of the first layer is folded into the bias once per step:
        ``[x, t] @ w0 = x @ w0[:n] + t @ w0[n:]``. Same maths as concatenating ``t`` to every row,
        without an (elements x time-features) copy in the forward and its gradient in the backward."""
        n_layers = self.config.hidden_layers + 1
        h = x
        for i in range(n_layers):
            w, b = self.theta[f"w{i}"].to(h.dtype), self.theta[f"b{i}"].to(h.dtype)
            if i == 0 and tfeat is not None and tfeat.numel():
                n = x.shape[1]
                w, b = w[:n], b + tfeat.to(h.dtype) @ w[n:]
            h = torch.addmm(b, h, w) if h.dim() == 2 and b.dim() == 1 else h @ w + b
            if i < n_layers - 1:
                h = F.relu(h, inplace=True)  # addmm's output is not needed by its backward
        return h

    def update(self, grads: Params, state: dict, params: Params, *, loss: Tensor | None = None):
        c = self.config
        if not params:
            return {}, {**state, "step": state["step"] + 1}
        state = self.observe_loss(state, loss)  # first: every path below sees the updated statistics
        if self.kernels is not False and self.kernel_reason(grads, state, params, differentiable=True) is None:
            if _needs_autograd(self._step_tensors(grads, state, params)):  # truncated backprop: kernel forward + kernel backward
                return step_backend().step_autograd(params, grads, state, self.theta, c, forward="triton",
                                                    backward="auto", precision=self.precision)
            return step_backend().step(params, grads, state, self.theta, c, precision=self.precision,
                                       inplace=False)
        step = state["step"] + 1
        new_state: dict = {"step": step, "m": {}, "v": {}, "row": {}, "col": {}}
        for key in ("horizon", "loss_stats"):  # per run, not per tensor: carried as they are
            if key in state:
                new_state[key] = state[key]
        # Tensors are stepped in groups of at most CHUNK_ELEMENTS elements (a larger tensor alone):
        # within a group every elementwise quantity is computed once over the group's elements
        # concatenated, which removes the per-tensor op overhead that dominates small models; the
        # groups bound the concatenation copies that would otherwise slow large ones (measured at 1M
        # parameters: one group for all 1.65x slower than per tensor).
        new_params: dict = {}
        groups = [(names, sum(params[k].numel() for k in names)) for names in _groups(params)]
        reuse = any(n >= REUSE_MIN_ELEMENTS for _, n in groups) and self._may_reuse_buffers(grads, state, params)
        for names, n in groups:
            if reuse and n >= REUSE_MIN_ELEMENTS:
                self._step_group_reusing(names, grads, state, params, step, new_params, new_state, self._workspace)
            else:
                self._step_group(names, grads, state, params, step, new_params, new_state)
        return new_params, new_state

    def _may_reuse_buffers(self, grads: Params, state: dict, params: Params) -> bool:
        """Whether the step may write its temporaries into the workspace: only without autograd
        (``out=`` and in-place ops would break a graph) and outside torch.func transforms, tracing and
        tensor subclasses, where the allocating step runs unchanged."""
        if not self.reuse_buffers or torch.is_grad_enabled():
            return False
        tensors = [*self._step_tensors(grads, state, params),
                   *(state[k] for k in ("horizon", "loss_stats") if k in state)]
        return _traced_reason(tensors) is None

    def _step_tensors(self, grads: Params, state: dict, params: Params) -> list[Tensor]:
        """Every tensor a step reads (parameters, gradients, weights, step count, accumulators): what
        decides whether a faster path may run (kernels, reused buffers)."""
        return [*params.values(), *grads.values(), *self.theta.values(), state["step"],
                *(t for key in ("m", "v", "row", "col") for t in state.get(key, {}).values())]

    # ---- pieces shared by the allocating step and the one that reuses buffers ---------------------
    @staticmethod
    def _group_layout(names: list[str], params: Params, state: dict) -> tuple[tuple[int, ...], dict, torch.dtype]:
        """A group's per-tensor element counts, per-tensor state dtypes and the dtype its concatenated
        computation runs in (the promotion of the state dtypes)."""
        sizes = tuple(params[k].numel() for k in names)
        sdt = {k: state["v"][k].dtype for k in names}
        dt = sdt[names[0]]
        for k in names[1:]:
            dt = torch.promote_types(dt, sdt[k])
        return sizes, sdt, dt

    def _store_moments(self, names: list[str], params: Params, m: Tensor, v: Tensor, sizes: tuple[int, ...],
                       sdt: dict, new_state: dict) -> None:
        """The group's new momenta / second moments, per tensor, in each tensor's state dtype (fresh
        tensors: ``.to`` copies out of the concatenation or its buffer)."""
        nm = len(self.config.momentum_decays)
        for k, mk, vk in zip(names, torch.split(m, sizes, dim=1), torch.split(v, sizes)):
            shape = params[k].shape
            new_state["m"][k] = mk.reshape(nm, *shape).to(sdt[k])
            new_state["v"][k] = vk.reshape(shape).to(sdt[k])

    def _tensor_scales(self, names: list[str], params: Params, dtype: torch.dtype) -> list[Tensor]:
        """Per-tensor step scales (width rule for matrices, learned factor for vectors); [] if none."""
        c = self.config
        if c.step_scale == "none":
            return []
        return [tensor_step_scale(params[k], c).to(dtype) if params[k].dim() >= 2
                else torch.exp(self.theta["vector_log_lr"]).to(dtype).reshape(()) for k in names]

    def _time_inputs(self, step: Tensor, state: dict, x: Tensor) -> Tensor:
        """The step-constant inputs: time features, then loss features when the state tracks them."""
        tfeat = time_features(step.to(device=x.device, dtype=x.dtype), state.get("horizon"), self.config)
        if "loss_stats" in state:
            tfeat = torch.cat([tfeat, loss_features(state["loss_stats"]).to(device=x.device, dtype=x.dtype)])
        return tfeat

    def _nominal_lr(self, tfeat: Tensor) -> Tensor | None:
        """The learned schedule's nominal Adam rate at this step (None without a nominal term)."""
        if self.config.nominal != "adam":
            return None
        log_lr = self.theta["nominal_log_lr"]
        if "nominal_time_w" in self.theta:
            log_lr = log_lr + (tfeat * self.theta["nominal_time_w"].to(tfeat.dtype)).sum()
        return torch.exp(torch.clamp(log_lr, -20.0, 2.0))

    def _step_group(self, names: list[str], grads: Params, state: dict, params: Params, step: Tensor,
                    new_params: dict, new_state: dict) -> None:
        """One group's step (see :meth:`update`), written into ``new_params`` / ``new_state``."""
        c = self.config
        # Every elementwise quantity is computed once over all tensors' elements concatenated (the
        # op count, not the arithmetic, is what a small task's step costs); only the Adafactor
        # accumulators, whose shapes differ, are per tensor. Per-tensor normalisations reduce over
        # each tensor's slice. Same maths as a per-tensor loop (measured: meta-training step -20%).
        sizes, sdt, dt = self._group_layout(names, params, state)
        nm = len(c.momentum_decays)
        counts = self._counts(sizes, params[names[0]].device)
        g = _cat([grads[k].reshape(-1).to(dt) for k in names])
        # sanitise: NaN -> 0, +-inf -> clip; then clip (bounded features by construction)
        g = torch.clamp(torch.nan_to_num(g, nan=0.0, posinf=c.grad_clip, neginf=-c.grad_clip),
                        -c.grad_clip, c.grad_clip)
        md, one_md, _, _ = self._decay_tensors(g)
        m = md * _cat([state["m"][k].reshape(nm, -1).to(dt) for k in names], dim=1) + one_md * g
        v = c.rms_decay * _cat([state["v"][k].reshape(-1).to(dt) for k in names]) \
            + (1 - c.rms_decay) * g * g
        g2 = g * g + 1e-30
        blocks = []
        for k, piece, piece2 in zip(names, torch.split(g, sizes), torch.split(g2, sizes)):
            shape = params[k].shape
            row, col, block = self._factored(piece.reshape(shape), piece2.reshape(shape), state, k)
            new_state["row"][k] = row.to(sdt[k])
            if col is not None:
                new_state["col"][k] = col.to(sdt[k])
            blocks.append(block)
        na = len(c.adafactor_decays)
        fac_blocks = _cat(blocks, dim=1)  # (3 * na, n): row_b, col_b, fac
        p_flat = _cat([params[k].reshape(-1).to(dt) for k in names]) if "param" in c.features else g
        x = element_features(g, p_flat, m, v, fac_blocks[:na], fac_blocks[na:2 * na], fac_blocks[2 * na:], c)
        x = x * _broadcast(torch.rsqrt(1e-5 + self._per_tensor_mean_sq(x, sizes, counts)), sizes)
        self._store_moments(names, params, m, v, sizes, sdt, new_state)
        adam = None
        if c.nominal == "adam":
            bc1 = 1 - c.momentum_decays[0] ** step
            bc2 = 1 - c.rms_decay**step
            # safe_sqrt only matters for gradients (sqrt's infinite derivative at 0); same values
            sqrt = safe_sqrt if torch.is_grad_enabled() else torch.sqrt
            adam = (m[0] / bc1) / (sqrt(v / bc2) + 1e-8)
        scales = self._tensor_scales(names, params, x.dtype)
        tfeat = self._time_inputs(step, state, x)
        out = self._mlp(x, tfeat)
        d, mag = out[:, 0], out[:, 1]
        lr = self._nominal_lr(tfeat)
        if c.design == "additive":
            delta = d * torch.exp(c.exp_mult * mag) * c.step_mult
            if lr is not None:
                delta = delta + lr * adam
        elif c.design == "controller":
            delta = lr * torch.exp(c.controller_bound * torch.tanh(d)) * adam
        else:  # normalized: rms-normalise the learned direction per tensor
            dn = d * _broadcast(torch.rsqrt(self._per_tensor_mean_sq(d, sizes, counts) + 1e-12), sizes)
            delta = lr * (adam + self.theta["mix"].to(dn.dtype) * dn)
        if scales:
            delta = delta * _broadcast(torch.stack(scales), sizes)
        delta = torch.clamp(delta, -c.max_update, c.max_update)
        for k, piece in zip(names, torch.split(delta, sizes)):
            new_params[k] = params[k] - piece.reshape(params[k].shape).to(params[k].dtype)

    # ---- the same step, its temporaries in reused buffers -------------------------------------
    def _mlp_into(self, x: Tensor, tfeat: Tensor | None, take) -> Tensor:
        """:meth:`_mlp` with its output in the reused slot ``"mlp"``, run over blocks of
        :data:`MLP_BLOCK_ROWS` elements so the hidden activations (slots ``"h0"`` / ``"h1"``, one block
        each) stay in cache and the workspace does not hold (elements x hidden width) floats. Same ops
        per element: ``addmm`` with ``out=`` over a block of rows computes each row as the whole matrix
        product does (each output element is its own dot product over the inputs; checked bitwise by
        the tests), in-place ReLU."""
        n_layers = self.config.hidden_layers + 1
        weights = []
        for i in range(n_layers):
            w, b = self.theta[f"w{i}"].to(x.dtype), self.theta[f"b{i}"].to(x.dtype)
            if i == 0 and tfeat is not None and tfeat.numel():
                n = x.shape[1]
                w, b = w[:n], b + tfeat.to(x.dtype) @ w[n:]
            if b.dim() != 1:  # not the shapes addmm takes: the allocating MLP
                return self._mlp(x, tfeat)
            weights.append((w, b))
        rows = x.shape[0]
        out = take("mlp", (rows, weights[-1][0].shape[1]))
        for r0 in range(0, rows, MLP_BLOCK_ROWS):
            r1 = min(rows, r0 + MLP_BLOCK_ROWS)
            h = x[r0:r1]
            for i, (w, b) in enumerate(weights):
                if i == n_layers - 1:
                    torch.addmm(b, h, w, out=out[r0:r1])
                else:
                    h = torch.addmm(b, h, w, out=take(f"h{i % 2}", (r1 - r0, w.shape[1]))).relu_()
        return out

    def _step_group_reusing(self, names: list[str], grads: Params, state: dict, params: Params, step: Tensor,
                            new_params: dict, new_state: dict, ws: Workspace) -> None:
        """:meth:`_step_group` with its large temporaries written into ``ws`` (no autograd).

        The same operations in the same order, each writing into a buffer of the shape and memory
        layout the allocating step's result has (``out=`` forms, in-place ops), so every float is
        identical; products by per-tensor rows are done per slice in place instead of against a
        broadcast copy (the same products). What the step returns (parameters, accumulators) is
        freshly allocated, never a view of the workspace. Slots: ``g``, ``g2``, ``t1``, ``t2``,
        ``adam``, ``rsv`` (n or momenta x n), ``fac`` (3 adafactor decays x n), ``x`` and ``xx``
        (channels x n), ``mlp`` (n x 2), and the MLP's blocks ``h0``, ``h1``.
        """
        c = self.config
        sizes, sdt, dt = self._group_layout(names, params, state)
        nm, na = len(c.momentum_decays), len(c.adafactor_decays)
        n = sum(sizes)
        device = params[names[0]].device
        counts = self._counts(sizes, device)

        def take(slot: str, shape: tuple[int, ...]) -> Tensor:
            return ws.take(slot, shape, dt, device)

        if len(names) == 1:
            g = grads[names[0]].reshape(-1).to(dt)
        else:
            g = torch.cat([grads[k].reshape(-1).to(dt) for k in names], out=take("g", (n,)))
        g = torch.nan_to_num(g, nan=0.0, posinf=c.grad_clip, neginf=-c.grad_clip, out=take("g", (n,)))
        torch.clamp(g, -c.grad_clip, c.grad_clip, out=g)
        md, one_md, _, _ = self._decay_tensors(g)
        if len(names) == 1:
            m_old = state["m"][names[0]].reshape(nm, -1).to(dt)
        else:
            m_old = torch.cat([state["m"][k].reshape(nm, -1).to(dt) for k in names], dim=1, out=take("t1", (nm, n)))
        m = torch.mul(md, m_old, out=take("t1", (nm, n))) + torch.mul(one_md, g, out=take("t2", (nm, n)))
        if len(names) == 1:
            v_old = state["v"][names[0]].reshape(-1).to(dt)
        else:
            v_old = torch.cat([state["v"][k].reshape(-1).to(dt) for k in names], out=take("t1", (n,)))
        gg = torch.mul(g, 1 - c.rms_decay, out=take("t2", (n,)))
        v = torch.mul(v_old, c.rms_decay, out=take("t1", (n,))) + gg.mul_(g)
        g2 = torch.mul(g, g, out=take("g2", (n,))).add_(1e-30)
        fac_blocks = take("fac", (3 * na, n))  # row_b, col_b, fac
        off = 0
        for k, piece, piece2 in zip(names, torch.split(g, sizes), torch.split(g2, sizes)):
            shape = params[k].shape
            row, col, _ = self._factored(piece.reshape(shape), piece2.reshape(shape), state, k,
                                           out=fac_blocks[:, off:off + piece.numel()])
            off += piece.numel()
            new_state["row"][k] = row.to(sdt[k])
            if col is not None:
                new_state["col"][k] = col.to(sdt[k])
        p_flats = [params[k].reshape(-1).to(dt) for k in names] if "param" in c.features else [g]
        nf = c.num_element_features
        x_cm = take("x", (nf, n))  # channel-major, as the allocating step's concatenation
        _element_features_into(x_cm, g, p_flats, m, v, fac_blocks[:na], fac_blocks[na:2 * na],
                               fac_blocks[2 * na:], c, take("rsv", (n,)))
        x = x_cm.t()
        xx = torch.mul(x, x, out=take("xx", (nf, n)).t())
        norm = torch.rsqrt(1e-5 + self._per_tensor_mean(xx, sizes, counts))
        for row_scale, piece in zip(norm, torch.split(x, sizes)):
            piece.mul_(row_scale)
        self._store_moments(names, params, m, v, sizes, sdt, new_state)
        adam = None
        if c.nominal == "adam":
            bc1 = 1 - c.momentum_decays[0] ** step
            bc2 = 1 - c.rms_decay**step
            adam = torch.div(m[0], bc1, out=take("adam", (n,)))
            adam.div_(torch.div(v, bc2, out=take("t1", (n,))).sqrt_().add_(1e-8))
        scales = self._tensor_scales(names, params, x.dtype)
        tfeat = self._time_inputs(step, state, x)
        out = self._mlp_into(x, tfeat, take)
        d, mag = out[:, 0], out[:, 1]
        lr = self._nominal_lr(tfeat)
        if c.design == "additive":
            delta = torch.mul(mag, c.exp_mult, out=take("t1", (n,))).exp_()
            delta = torch.mul(d, delta, out=delta).mul_(c.step_mult)
            if lr is not None:
                delta.add_(adam.mul_(lr))
        elif c.design == "controller":
            delta = torch.tanh(d, out=take("t1", (n,))).mul_(c.controller_bound).exp_()
            delta = torch.mul(lr, delta, out=delta).mul_(adam)
        else:  # normalized: rms-normalise the learned direction per tensor
            dd = torch.mul(d, d, out=take("t1", (n,)))
            dscale = torch.rsqrt(self._per_tensor_mean(dd, sizes, counts) + 1e-12)
            dn = take("t2", (n,))
            for s_k, d_k, dn_k in zip(dscale, torch.split(d, sizes), torch.split(dn, sizes)):
                torch.mul(d_k, s_k, out=dn_k)
            dn.mul_(self.theta["mix"].to(dn.dtype))
            delta = torch.mul(lr, adam.add_(dn), out=adam)
        if scales:
            for s_k, piece in zip(scales, torch.split(delta, sizes)):
                piece.mul_(s_k)
        delta.clamp_(-c.max_update, c.max_update)
        for k, piece in zip(names, torch.split(delta, sizes)):
            new_params[k] = params[k] - piece.reshape(params[k].shape).to(params[k].dtype)


__all__ = [
    "LearnedOptimizer", "BoundLearnedOptimizer", "CHUNK_ELEMENTS", "REUSE_MIN_ELEMENTS", "MLP_BLOCK_ROWS",
    # the specification (optimizers.lo_spec), re-exported
    "LOConfig", "ConfigError", "check_types", "_check_keys", "FEATURE_GROUPS", "DEFAULT_TAUS",
    "DEFAULT_FRACTIONS", "DESIGNS", "TIME_FEATURES", "STEP_SCALES", "LOSS_FEATURES", "LEGACY_FIELDS",
    "LOSS_DECAYS", "group_channels", "element_features", "factored_dims", "time_features",
    "update_loss_stats", "loss_features", "safe_sqrt", "tensor_step_scale",
]
