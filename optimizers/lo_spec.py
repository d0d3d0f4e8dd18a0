"""The learned optimizer's specification: its configuration, its inputs and its accumulator rules.

What a learned-optimizer step *is*, independent of how it is computed: :class:`LOConfig` (architecture,
step design, time / loss inputs), the table of feature groups and their channel counts
(:func:`group_channels`), the per-element features (:func:`element_features`), the Adafactor layout
(:func:`factored_dims`), the time and loss inputs and the per-tensor step scale.

Why a module of its own: two implementations compute the step, the PyTorch one in
:mod:`optimizers.learned` and the fused Triton kernels in :mod:`kernels` (with their PyTorch reference),
and both must agree on this. Keeping it a leaf (it imports torch and the standard library only) makes
the dependencies one way: ``kernels`` imports this module and nothing else of ``optimizers``, and no
module of ``optimizers`` imports ``kernels``. The optimizers reach the fused step only through the
interface defined here, :class:`StepBackend`, and its one accessor :func:`step_backend`, which loads the
``kernels`` package lazily by name (dependency inversion: the specification owns the interface, the
kernels provide it), so neither side holds the other together through function-local imports.
``optimizers.learned`` re-exports the specification's names, so ``from optimizers.learned import
LOConfig`` and saved checkpoints keep working.
"""

from __future__ import annotations

import importlib
import math
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

# the base class of every user error: a leaf module too (imports nothing), so the specification stays one
from optimizers.errors import UserError

# Feature groups, in the order of the kernels' canonical slots (channels per group: group_channels).
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


def group_channels(name: str, num_momenta: int, num_adafactor: int) -> int:
    """Channels feature group ``name`` contributes with ``num_momenta`` momentum and ``num_adafactor``
    Adafactor decays: the one table of the feature layout. :attr:`LOConfig.num_inputs` and the kernels'
    canonical slots (``kernels.lo_step_reference.feature_slots``, at the kernels' maximum decays) are
    both derived from it, so a new group or a changed count cannot leave them disagreeing."""
    per_decay = {"momentum": num_momenta, "adam_dir": num_momenta, "fac_grad": num_adafactor,
                 "row": num_adafactor, "col": num_adafactor, "rsqrt_row": num_adafactor,
                 "rsqrt_col": num_adafactor, "fac_mom": min(num_momenta, num_adafactor)}
    if name not in FEATURE_GROUPS:
        raise ConfigError(f"unknown feature group {name!r}; choose from {list(FEATURE_GROUPS)}")
    return per_decay.get(name, 1)  # grad, param, rms, rsqrt_rms: one channel


DEFAULT_TAUS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
# Centres c of the fraction-of-training features tanh(10 * (t / T - c)) (VeLO / Celo).
DEFAULT_FRACTIONS = (0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)

# How the MLP's output becomes a step (see LOConfig.design):
# The choices of LOConfig's design settings are their types (check_types and the command line read them)
Design = typing.Literal["additive", "normalized", "controller"]
TimeFeatures = typing.Literal["absolute", "fraction", "none"]
StepScale = typing.Literal["none", "rms", "width"]
LossFeatures = typing.Literal["none", "ema"]
Nominal = typing.Literal["adam", "none"]
DESIGNS, TIME_FEATURES = typing.get_args(Design), typing.get_args(TimeFeatures)
STEP_SCALES, LOSS_FEATURES = typing.get_args(StepScale), typing.get_args(LossFeatures)

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
    nominal: Nominal = "adam"  # "adam" or "none"
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
    design: Design = "controller"
    # "absolute": tanh(t / tau - 1) over time_taus (the original; unseen values past the horizon);
    # "fraction": tanh(10 * (t / T - c)) over time_fractions, T the run's total steps (needs T);
    # "none": no time input (horizon-free; the nominal schedule is then a constant).
    time_features: TimeFeatures = "fraction"
    time_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    # per-tensor step scale: "rms": matrices (rank >= 2) step in units of (RMS(p) / rms_ref) ** scale_power
    # (Celo / VeLO; wider layers are initialised smaller, so they get smaller steps), vectors by
    # exp(vector_log_lr) (learned); "width": matrices by min(1, width_ref / max(shape)) ** scale_power
    # (muP: a layer's output moves by ~fan_in * step, so wider layers need proportionally smaller
    # steps; the largest dim is the fan-in of hidden and output layers whatever the layout),
    # vectors by exp(vector_log_lr); "none": every tensor in the nominal learning rate's units.
    step_scale: StepScale = "width"
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
    loss_features: LossFeatures = "none"

    def __post_init__(self) -> None:
        check_types(self, "lo")
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "momentum_decays", tuple(self.momentum_decays))
        object.__setattr__(self, "adafactor_decays", tuple(self.adafactor_decays))
        object.__setattr__(self, "time_taus", tuple(float(t) for t in self.time_taus))
        object.__setattr__(self, "time_fractions", tuple(float(t) for t in self.time_fractions))
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
        """Inputs of the MLP: the per-element channels of every feature group, then the step features."""
        return self.num_element_features + self.num_step_features

    @property
    def num_element_features(self) -> int:
        """Per-element input channels (:func:`element_features`'s width), from :func:`group_channels`."""
        nm, na = len(self.momentum_decays), len(self.adafactor_decays)
        return sum(group_channels(name, nm, na) for name in self.features)

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
    # (channels, *shape) -> (n, channels); the explicit channel count also covers 0-element tensors.
    # A plain reshape, not einops.rearrange: this runs every step, where rearrange's parsing measured
    # ~10 us more per call (1.7x) for the same view.
    return torch.cat(feats, dim=0).reshape(cfg.num_element_features, g.numel()).transpose(0, 1)


# ---- the fused step's interface ---------------------------------------------------------------------
class StepBackend(Protocol):
    """What the optimizers need of a fused implementation of the step (the Triton kernels).

    Why an interface here: the PyTorch step (:mod:`optimizers.learned`) and its ``torch.optim`` drop-in
    hand a step to the kernels where they can run it, but must not import ``kernels`` (which imports
    this specification): they call these four functions on the object :func:`step_backend` returns.
    Structural (a ``Protocol``), so the provider need not import anything to conform.
    """

    def refusal(self, requested: bool | None, device: torch.device) -> str | None:
        """None when the fused step may run on ``device`` given the caller's ``kernels`` setting
        (None = automatic, True = wherever it can, False = never), else why not."""
        ...

    def unsupported(self, cfg: LOConfig, params: dict[str, Tensor], grads: dict[str, Tensor] | None = None,
                    state: dict | None = None) -> str | None:
        """Why the fused step cannot run this configuration and these tensors (None when it can)."""
        ...

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
             theta: dict[str, Tensor], cfg: LOConfig, *, precision: str = "ieee",
             inplace: bool = False) -> tuple[dict[str, Tensor], dict]:
        """One fused step, ``(new_params, new_state)``; not differentiable."""
        ...

    def step_autograd(self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
                      theta: dict[str, Tensor], cfg: LOConfig, *, forward: str = "reference",
                      backward: str = "auto", precision: str = "ieee") -> tuple[dict[str, Tensor], dict]:
        """One differentiable fused step (gradients flow to params, grads, state and theta)."""
        ...


class UnavailableBackend:
    """The backend when the ``kernels`` package cannot be imported: it refuses every step, with the
    reason, so the optimizers take the PyTorch step instead of failing (a CPU install without the
    kernels, or a broken one, still trains). Its step functions are never reached through a refusal;
    called directly they raise with the same reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def refusal(self, requested: bool | None, device: torch.device) -> str | None:
        return "kernels=False" if requested is False else self.reason

    def unsupported(self, cfg: LOConfig, params: dict[str, Tensor], grads: dict[str, Tensor] | None = None,
                    state: dict | None = None) -> str | None:
        return self.reason

    def step(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Tensor], dict]:
        raise RuntimeError(self.reason)

    def step_autograd(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Tensor], dict]:
        raise RuntimeError(self.reason)



_step_backend: StepBackend | None = None  # loaded by step_backend() on first use


def step_backend() -> StepBackend:
    """The fused step's backend: ``kernels.STEP_BACKEND``, or an :class:`UnavailableBackend` saying why
    the ``kernels`` package could not be imported.

    The one seam between the two packages: this is the only place in ``optimizers`` that names
    ``kernels`` (by string, through :func:`importlib.import_module`, so the specification stays a leaf
    at import time and ``tests/test_imports.py`` can check there is no other edge). Loaded on first use
    (importing ``kernels`` does not import triton; its step functions import it when called) and cached
    in a module global, since the dispatch asks every step (a global rather than ``functools.lru_cache``:
    ``torch.compile`` reads a global, where it would trace through a cache wrapper and warn). Any
    exception while importing counts as absent: a kernel package that cannot load must never stop the
    PyTorch step.
    """
    global _step_backend
    if _step_backend is None:
        try:
            _step_backend = importlib.import_module("kernels").STEP_BACKEND
        except Exception as e:  # ImportError, or the package itself failing to import
            _step_backend = UnavailableBackend(f"the kernels package cannot be imported ({type(e).__name__}: {e})")
    return _step_backend
