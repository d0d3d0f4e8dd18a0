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
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.errors import UserError
from optimizers.tree import Params

# Feature groups and the number of channels each contributes (with 3 momentum / 3 adafactor decays).
FEATURE_GROUPS = (
    "grad",  # g
    "param",  # p
    "momentum",  # m at each momentum decay
    "rms",  # second moment v
    "adam_dir",  # m * rsqrt(v + 1e-6) for each momentum decay
    "rsqrt_rms",  # rsqrt(v + 1e-6)
    "fac_grad",  # g * row_factor * col_factor, per adafactor decay
    "row",  # row second-moment accumulator (broadcast), per adafactor decay
    "col",  # column accumulator (broadcast)
    "rsqrt_row",
    "rsqrt_col",
    "fac_mom",  # m * row_factor * col_factor
)
DEFAULT_TAUS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
# Centres c of the fraction-of-training features tanh(10 * (t / T - c)) (VeLO / Celo).
DEFAULT_FRACTIONS = (0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)

# How the MLP's output becomes a step (see LOConfig.design):
DESIGNS = ("additive", "normalized", "controller")
TIME_FEATURES = ("absolute", "fraction", "none")
STEP_SCALES = ("none", "rms", "width")
LOSS_FEATURES = ("none", "ema")

# What a config written before these fields existed means: the original design. ``from_dict`` fills
# missing keys from here, so every old checkpoint loads as the optimizer it was trained as.
LEGACY_FIELDS = {"design": "additive", "time_features": "absolute", "step_scale": "none"}


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot work; raised before any work starts."""


def _check_keys(cls: type, data: dict) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}"
        )


def check_types(obj: Any, section: str = "") -> None:
    """Check every field of a config dataclass against its annotation, before any coercion.

    Why: values arrive from JSON and the command line; ``x <= 0`` range checks let NaN through,
    ``"2"`` or ``2.5`` for an integer surfaced as shape errors deep in a run, and ``True`` is an ``int``
    in Python. Numbers must be finite; booleans are not numbers; an integer field takes an integer
    (``4.0`` too, from JSON), a float field any real number; tuples take lists or tuples of those; a
    ``Literal[...]`` field one of its values. The error names the key (``section.name``)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        value, hint = getattr(obj, f.name), hints.get(f.name)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key} must be a list, got {value!r}")
            for item in value:
                _check_scalar(item, args[0], key)
        elif typing.get_origin(hint) is typing.Literal:  # the choices are the type
            if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
                raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        elif hint in (int, float, bool, str):
            _check_scalar(value, hint, key)
            if hint is int and not isinstance(value, int):  # 4.0 from JSON
                object.__setattr__(obj, f.name, int(value))


def _check_scalar(value: Any, kind: Any, key: str) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    else:
        ok = kind is float or float(value).is_integer()
    if not ok:
        name = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{key} must be {name}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class LOConfig:
    """Architecture of the learned optimizer. Serialised as JSON beside its safetensors weights."""

    hidden_width: int = 32
    hidden_layers: int = 2
    features: tuple[str, ...] = FEATURE_GROUPS
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decay: float = 0.999
    adafactor_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    time_taus: tuple[float, ...] = DEFAULT_TAUS
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    nominal: str = "adam"  # "adam" or "none"
    nominal_lr: float = 1e-2  # initial value of the meta-learned nominal learning rate
    # learn a schedule for the nominal term: log lr(t) = log nominal_lr + w . time_features(t), w = 0 at init
    nominal_schedule: bool = True
    output_init_scale: float = 0.01  # small: the untrained optimizer starts close to its nominal term
    max_update: float = 1.0  # per-element clamp on |update|, a bound that holds by construction
    grad_clip: float = 1e3  # VeLO clips incoming gradients to +-1000
    # ---- the step's form (defaults: the design that measured best; docs/ablation.md) ----------
    # "additive": d * exp(exp_mult * m) * step_mult + lr(t) * adam_dir (the original; the MLP term
    #     has a fixed size that nothing anneals);
    # "normalized": lr(t) * (adam_dir + mix * rmsnorm_per_tensor(d)) (Celo2): the learned direction
    #     rides on the nominal schedule, so it shrinks when the schedule does; ``mix`` is learned;
    # "controller": lr(t) * exp(controller_bound * tanh(d)) * adam_dir (Harrison et al.'s nominal
    #     controller): the MLP only rescales Adam's step per element, within e^(+-bound).
    design: str = "controller"
    # "absolute": tanh(t / tau - 1) over time_taus (the original; unseen values past the horizon);
    # "fraction": tanh(10 * (t / T - c)) over time_fractions, T the run's total steps (needs T);
    # "none": no time input (horizon-free; the nominal schedule is then a constant).
    time_features: str = "fraction"
    time_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    # per-tensor step scale: "rms": matrices (rank >= 2) step in units of (RMS(p) / rms_ref) ** scale_power
    # (Celo / VeLO; wider layers are initialised smaller, so they get smaller steps), vectors by
    # exp(vector_log_lr) (learned); "width": matrices by min(1, width_ref / max(shape)) ** scale_power
    # (muP: a layer's output moves by ~fan_in * step, so wider layers need proportionally smaller
    # steps; the largest dim is the fan-in of hidden and output layers whatever the layout),
    # vectors by exp(vector_log_lr); "none": every tensor in the nominal learning rate's units.
    step_scale: str = "width"
    width_ref: int = 64  # the widest layer the default was meta-trained on
    rms_ref: float = 0.1
    rms_floor: float = 1e-3
    # 0.5 measured best on 8x wider MLPs (power 1, muP's 1/width: 3x tuned Adam's loss at H; no width
    # scale: better at H, worse at 10H and on validation; docs/ablation.md). Both the same up to width_ref.
    scale_power: float = 0.5
    controller_bound: float = 2.0
    mix_init: float = 0.1  # initial weight of the normalised learned direction ("normalized")
    # horizon-free inputs from the run's own loss (the ``loss`` passed to ``update``), same for every
    # element like the time features, and also inputs of the nominal schedule: "ema": EMAs of log loss
    # give tanh(fast - slow) (trend), tanh(2 (log loss - fast)) (this step's surprise) and
    # tanh((fast - first) / 3) (progress since the first step); scale-free (logs), and defined whatever
    # the run's length. Zero until a loss has been seen. "none": off.
    loss_features: str = "none"

    def __post_init__(self) -> None:
        check_types(self, "lo")
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "momentum_decays", tuple(self.momentum_decays))
        object.__setattr__(self, "adafactor_decays", tuple(self.adafactor_decays))
        object.__setattr__(self, "time_taus", tuple(float(t) for t in self.time_taus))
        object.__setattr__(self, "time_fractions", tuple(float(t) for t in self.time_fractions))
        for name, allowed in (("design", DESIGNS), ("time_features", TIME_FEATURES),
                              ("step_scale", STEP_SCALES), ("loss_features", LOSS_FEATURES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.design != "additive" and self.nominal != "adam":
            raise ConfigError(f"design {self.design!r} scales the nominal Adam term: it needs nominal='adam'")
        if self.rms_ref <= 0 or self.rms_floor <= 0 or self.controller_bound <= 0 or self.nominal_lr <= 0:
            raise ConfigError("rms_ref, rms_floor, controller_bound and nominal_lr must be positive")
        if any(t <= 0 for t in self.time_taus):  # finite: check_types
            raise ConfigError(f"time_taus must be positive, got {list(self.time_taus)}")
        if not self.features:
            raise ConfigError("features must name at least one feature group")
        bad = [f for f in self.features if f not in FEATURE_GROUPS]
        if bad:
            raise ConfigError(f"unknown feature group(s) {bad}; choose from {list(FEATURE_GROUPS)}")
        if self.hidden_width < 1 or self.hidden_layers < 0 or self.width_ref < 1:
            raise ConfigError("hidden_width must be >= 1 and hidden_layers >= 0")
        if self.nominal not in ("adam", "none"):
            raise ConfigError(f"nominal must be 'adam' or 'none', got {self.nominal!r}")
        for d in (*self.momentum_decays, *self.adafactor_decays, self.rms_decay):
            if not 0.0 <= d < 1.0:
                raise ConfigError(f"decays must lie in [0, 1), got {d}")
        if not self.momentum_decays or not self.adafactor_decays:
            raise ConfigError("need at least one momentum and one adafactor decay")
        if self.max_update <= 0 or self.step_mult <= 0 or self.grad_clip <= 0:
            raise ConfigError("max_update, step_mult and grad_clip must be positive")
        if self.output_init_scale < 0:
            raise ConfigError(f"output_init_scale must be >= 0, got {self.output_init_scale}")

    @property
    def num_inputs(self) -> int:
        nm, na = len(self.momentum_decays), len(self.adafactor_decays)
        per = {
            "grad": 1, "param": 1, "momentum": nm, "rms": 1, "adam_dir": nm, "rsqrt_rms": 1,
            "fac_grad": na, "row": na, "col": na, "rsqrt_row": na, "rsqrt_col": na,
            "fac_mom": min(nm, na),
        }
        return sum(per[f] for f in self.features) + self.num_step_features

    @property
    def num_time_features(self) -> int:
        return {"absolute": len(self.time_taus), "fraction": len(self.time_fractions),
                "none": 0}[self.time_features]

    @property
    def num_loss_features(self) -> int:
        return 3 if self.loss_features == "ema" else 0

    @property
    def num_step_features(self) -> int:
        """Inputs that are the same for every element of a step (time, then loss features): the last
        rows of the MLP's first layer, folded into its bias, and the nominal schedule's inputs."""
        return self.num_time_features + self.num_loss_features

    @property
    def needs_total_steps(self) -> bool:
        """Whether the step depends on the run's total length T (fraction-of-training features)."""
        return self.time_features == "fraction"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LOConfig":
        """From JSON; a config saved before the design fields existed is the original design."""
        if not isinstance(data, dict):
            raise ConfigError(f"a learned-optimizer config must be a JSON object, got {type(data).__name__}")
        _check_keys(cls, data)
        if "design" not in data:
            data = {**LEGACY_FIELDS, **data}
        return cls(**data)


def time_features(step: Tensor, total_steps: Tensor | None, cfg: LOConfig) -> Tensor:
    """The step's time inputs (same for every element), shape ``(cfg.num_time_features,)``.

    ``fraction``: ``tanh(10 * (t / T - c))``; the schedule and the MLP see *how far through* the run a
    step is, so a run 10x longer stretches the learned behaviour instead of extrapolating it."""
    if cfg.time_features == "absolute":
        taus = torch.tensor(cfg.time_taus, dtype=step.dtype, device=step.device)
        return torch.tanh(step / taus - 1.0)
    if cfg.time_features == "fraction":
        if total_steps is None:
            raise ValueError("this learned optimizer uses the fraction of training t/T: give total_steps "
                             "(bind(..., total_steps=T), init(params, total_steps=T), or "
                             "LearnedOptimizerTorch(..., total_steps=T))")
        cs = _constant(cfg.time_fractions, step.dtype, step.device)
        frac = step / torch.clamp(total_steps.to(step), min=1.0)
        return torch.tanh(10.0 * (frac - cs))
    return torch.zeros(0, dtype=step.dtype, device=step.device)


_CONSTANTS: dict = {}


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, built once per (values, dtype, device): building it from a Python list
    every step costs more than the arithmetic on it for small tasks."""
    key = (values, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


LOSS_DECAYS = (0.9, 0.99)  # fast and slow EMA of log loss (loss_features="ema")


def update_loss_stats(stats: Tensor, loss: Tensor | None) -> Tensor:
    """``stats = [count, fast EMA, slow EMA, first, last]`` of the run's log loss, after ``loss`` (no
    gradient flows through it; a missing or non-finite loss leaves the stats as they are)."""
    if loss is None:
        return stats
    ll = torch.log(torch.clamp(loss.detach().to(device=stats.device, dtype=stats.dtype).reshape(()), min=1e-12))
    first = stats[0] == 0
    fast = torch.where(first, ll, LOSS_DECAYS[0] * stats[1] + (1 - LOSS_DECAYS[0]) * ll)
    slow = torch.where(first, ll, LOSS_DECAYS[1] * stats[2] + (1 - LOSS_DECAYS[1]) * ll)
    new = torch.stack([stats[0] + 1, fast, slow, torch.where(first, ll, stats[3]), ll])
    return torch.where(torch.isfinite(ll), new, stats)


def loss_features(stats: Tensor) -> Tensor:
    """The three loss inputs from :func:`update_loss_stats`'s stats (zeros before the first loss)."""
    _, fast, slow, first, last = stats.unbind()
    feats = torch.stack([torch.tanh(fast - slow), torch.tanh(2.0 * (last - fast)), torch.tanh((fast - first) / 3.0)])
    return feats * (stats[0] > 0).to(feats.dtype)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with derivative 0 (not inf) at ``x = 0``.

    ``torch.sqrt``'s derivative at 0 is infinite; multiplied by the zero upstream gradient of a
    parameter that never had a gradient it gives NaN and throws away whole meta-gradients. The
    forward values are identical to ``torch.sqrt``."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def tensor_step_scale(p: Tensor, cfg: LOConfig) -> Tensor:
    """Per-tensor scale of a rank >= 2 parameter's step (no gradient flows through it).

    ``rms``: ``(sqrt(mean(p^2) + floor^2) / rms_ref) ** power``; ``width``:
    ``min(1, width_ref / max(p.shape)) ** power`` (a constant of the shape)."""
    if cfg.step_scale == "width":
        return _constant((min(1.0, cfg.width_ref / max(p.shape)) ** cfg.scale_power,), torch.float32,
                         p.device).reshape(())
    pd = p.detach().float()
    rms = torch.sqrt((pd * pd).mean() + cfg.rms_floor**2) if p.numel() else pd.new_ones(())
    return (rms / cfg.rms_ref) ** cfg.scale_power


def factored_dims(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """The two largest dims (second largest, largest) of a rank>=2 shape, else None (Adafactor)."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    return order[-2], order[-1]


def _state_dtype(p: Tensor) -> torch.dtype:
    """State is kept in (at least) fp32, per parameter: bf16 params get fp32 state, fp64 keep fp64."""
    return torch.promote_types(p.dtype if p.is_floating_point() else torch.float32, torch.float32)


def element_features(g: Tensor, p: Tensor, m: Tensor, v: Tensor, row_b: Tensor, col_b: Tensor,
                     fac: Tensor, cfg: LOConfig) -> Tensor:
    """The per-element input channels in the config's order, shape (n, channels), before
    normalisation. Shared with the kernels' PyTorch reference so both build identical features."""
    nmf = min(len(cfg.momentum_decays), len(cfg.adafactor_decays))
    feats: list[Tensor] = []
    memo: list[Tensor] = []

    def rs_v() -> Tensor:  # rsqrt(v + eps) is used by two feature groups: compute it once
        if not memo:
            memo.append(torch.rsqrt(v + 1e-6))
        return memo[0]

    for name in cfg.features:
        if name == "grad":
            feats.append(g.unsqueeze(0))
        elif name == "param":
            feats.append(p.to(g.dtype).unsqueeze(0))
        elif name == "momentum":
            feats.append(m)
        elif name == "rms":
            feats.append(v.unsqueeze(0))
        elif name == "adam_dir":
            feats.append(m * rs_v())
        elif name == "rsqrt_rms":
            feats.append(rs_v().unsqueeze(0))
        elif name == "fac_grad":
            feats.append(g * fac)
        elif name == "row":
            feats.append(row_b)
        elif name == "col":
            feats.append(col_b)
        elif name == "rsqrt_row":
            feats.append(torch.rsqrt(row_b + 1e-8))
        elif name == "rsqrt_col":
            feats.append(torch.rsqrt(col_b + 1e-8))
        elif name == "fac_mom":
            feats.append(m[:nmf] * fac[:nmf])
    # (channels, *shape) -> (n, channels); the explicit channel count also covers 0-element tensors
    return torch.cat(feats, dim=0).reshape(cfg.num_inputs - cfg.num_step_features, g.numel()).transpose(0, 1)


def _normalize(x: Tensor) -> Tensor:
    """Per-tensor, per-channel second-moment normalisation; x has shape (n, channels)."""
    return x * torch.rsqrt(1e-5 + (x * x).mean(dim=0, keepdim=True))


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


def _kernels_disabled(kernels: bool | None, device: torch.device) -> str | None:
    """None when the Triton kernels may run on ``device`` given the ``kernels`` setting, else why not.

    Imports only the light :mod:`kernels` package (triton itself only when asked)."""
    import os

    from kernels import ENV, kernel_decision, triton_available

    if kernels is None:
        use, why = kernel_decision(device)
        return None if use else f"kernels not chosen for {device}: {why}"
    if not kernels:
        return "kernels=False"
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return f"{ENV}=0"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return f"device {device} needs TRITON_INTERPRET=1"
    if not triton_available():
        return "triton not importable"
    return None


def _traced_reason(tensors: list, allow_autograd: bool = False) -> str | None:
    """Why these tensors must stay on the PyTorch path: autograd (unless ``allow_autograd``: the
    differentiable kernel step handles it), torch.func transforms, tracing."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return "torch.compile tracing"
    functorch = getattr(torch._C, "_functorch", None)
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    batched = getattr(functorch, "is_batchedtensor", None)
    grad_enabled = torch.is_grad_enabled()
    for t in tensors:
        if not isinstance(t, Tensor):
            return f"non-tensor {type(t).__name__}"
        if (wrapped is not None and wrapped(t)) or (batched is not None and batched(t)):
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
             total_steps: int | None = None) -> "BoundLearnedOptimizer":
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
        """
        return BoundLearnedOptimizer(self.config, theta, kernels=kernels, precision=precision,
                                     total_steps=total_steps)

    def flops_per_element(self) -> int:
        sizes = self.layer_sizes()
        return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))

    def state_floats_per_element(self) -> int:
        c = self.config
        return len(c.momentum_decays) + 1  # factored accumulators are O(rows + cols), not O(n)


class BoundLearnedOptimizer:
    """A learned optimizer bound to weights ``theta``: the same interface as Adam."""

    def __init__(self, config: LOConfig, theta: Params, *, kernels: bool | None = None,
                 precision: str = "tf32", total_steps: int | None = None):
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
        reason = _kernels_disabled(self.kernels, device)
        if reason:
            return reason
        tensors = [*params.values(), *grads.values(), *self.theta.values(), state["step"],
                   *(t for key in ("m", "v", "row", "col") for t in state.get(key, {}).values())]
        reason = _traced_reason(tensors, allow_autograd=differentiable)
        if reason:
            return reason
        if set(grads) != set(params):
            return "gradients and parameters have different names"
        from kernels.lo_step_triton import unsupported

        return unsupported(self.config, params, grads, state)

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
                                     total_steps=total_steps)

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
    def _factored(self, g: Tensor, g2: Tensor, st: dict, k: str) -> tuple[Tensor, Tensor | None, Tensor]:
        """One tensor's Adafactor accumulators (shape-dependent, so per tensor); returns the new row
        and column accumulators and the per-element ``(adafactor decays, n)`` block ``[row_b; col_b;
        fac]`` of the features (``row_b``/``col_b``: the accumulators broadcast to the elements, ``fac``
        the factored rsqrt of the second moment)."""
        c = self.config
        shape, na = g.shape, len(c.adafactor_decays)
        _, _, ad, one_ad = self._decay_tensors(g)
        dims = factored_dims(shape)
        if dims is None:
            row = ad * st["row"][k] + one_ad * g2
            rows = row.reshape(na, -1)
            return row, None, torch.cat([rows, rows, torch.rsqrt(rows + 1e-9)])
        a, b = dims
        row = ad * st["row"][k] + one_ad * g2.mean(dim=b, keepdim=True)
        col = ad * st["col"][k] + one_ad * g2.mean(dim=a, keepdim=True)
        # +1 on every dim index: axis 0 of the accumulators is the decay axis
        row_mean = row.mean(dim=a + 1, keepdim=True)
        row_factor = torch.rsqrt(torch.clamp(row / row_mean, min=1e-9))
        col_factor = torch.rsqrt(torch.clamp(col, min=1e-9))
        block = torch.cat([row.expand(na, *shape), col.expand(na, *shape), row_factor * col_factor])
        return row, col, block.reshape(3 * na, -1)

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
        sums = torch.stack([piece.sum(0) for piece in torch.split(x * x, sizes)])
        return sums / counts.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

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
            tensors = [*params.values(), *grads.values(), *self.theta.values(),
                       *(t for key in ("m", "v", "row", "col") for t in state.get(key, {}).values())]
            if _needs_autograd(tensors):  # truncated backprop: kernel forward + kernel backward
                from kernels.lo_step_autograd import lo_step_autograd

                return lo_step_autograd(params, grads, state, self.theta, c, forward="triton",
                                        backward="auto", precision=self.precision)
            from kernels.lo_step_triton import lo_step

            return lo_step(params, grads, state, self.theta, c, precision=self.precision, inplace=False)
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
        for names in _groups(params):
            self._step_group(names, grads, state, params, step, new_params, new_state)
        return new_params, new_state

    def _step_group(self, names: list[str], grads: Params, state: dict, params: Params, step: Tensor,
                    new_params: dict, new_state: dict) -> None:
        """One group's step (see :meth:`update`), written into ``new_params`` / ``new_state``."""
        c = self.config
        # Every elementwise quantity is computed once over all tensors' elements concatenated (the
        # op count, not the arithmetic, is what a small task's step costs); only the Adafactor
        # accumulators, whose shapes differ, are per tensor. Per-tensor normalisations reduce over
        # each tensor's slice. Same maths as a per-tensor loop (measured: meta-training step -20%).
        sizes = tuple(params[k].numel() for k in names)
        sdt = {k: state["v"][k].dtype for k in names}
        dt = sdt[names[0]]
        for k in names[1:]:
            dt = torch.promote_types(dt, sdt[k])
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
        for k, mk, vk in zip(names, torch.split(m, sizes, dim=1), torch.split(v, sizes)):
            shape = params[k].shape
            new_state["m"][k] = mk.reshape(nm, *shape).to(sdt[k])
            new_state["v"][k] = vk.reshape(shape).to(sdt[k])
        adam = None
        if c.nominal == "adam":
            bc1 = 1 - c.momentum_decays[0] ** step
            bc2 = 1 - c.rms_decay**step
            # safe_sqrt only matters for gradients (sqrt's infinite derivative at 0); same values
            sqrt = safe_sqrt if torch.is_grad_enabled() else torch.sqrt
            adam = (m[0] / bc1) / (sqrt(v / bc2) + 1e-8)
        scales = []
        if c.step_scale != "none":
            scales = [tensor_step_scale(params[k], c).to(x.dtype) if params[k].dim() >= 2
                      else torch.exp(self.theta["vector_log_lr"]).to(x.dtype).reshape(()) for k in names]
        tfeat = time_features(step.to(device=x.device, dtype=x.dtype), state.get("horizon"), c)
        if "loss_stats" in state:
            tfeat = torch.cat([tfeat, loss_features(state["loss_stats"]).to(device=x.device, dtype=x.dtype)])
        out = self._mlp(x, tfeat)
        d, mag = out[:, 0], out[:, 1]
        lr = None
        if c.nominal == "adam":
            log_lr = self.theta["nominal_log_lr"]
            if "nominal_time_w" in self.theta:
                log_lr = log_lr + (tfeat * self.theta["nominal_time_w"].to(tfeat.dtype)).sum()
            lr = torch.exp(torch.clamp(log_lr, -20.0, 2.0))
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
