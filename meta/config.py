"""Run configuration as frozen dataclasses (torchtitan-style), validated before any work starts.

A run is described by :class:`RunConfig` = ``meta`` (:class:`MetaConfig`, the meta-training recipe),
``lo`` (:class:`~optimizers.learned.LOConfig`, the learned optimizer's architecture), ``eval``
(:class:`EvalConfig`), ``gen`` (:class:`GenConfig`, recursive generations), ``gov``
(:class:`GovernorConfig`, the governor's checks and bounds) and run-level settings (output directory,
logging). Configs round-trip through JSON; an unknown key anywhere is a :class:`ConfigError` naming the key and the known ones, so a typo
in a config file or on the command line fails at once instead of silently using a default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from optimizers.learned import ConfigError, LOConfig, _check_keys, check_types

# ---- choices as types: check_types validates them, the command line offers them as choices ----------
Estimator = Literal["tbptt", "es", "pes"]  # meta.estimators.ESTIMATORS
Schedule = Literal["constant", "log_uniform"]
MetaLoss = Literal["log_train", "train", "log_valid", "valid", "log_train_valid"]  # meta.unroll.META_LOSSES
Split = Literal["meta_train", "held_out", "test"]  # tasks.base.SPLITS
SuccessorStart = Literal["incumbent", "fresh"]
Approval = Literal["auto", "prompt", "file"]
WandbMode = Literal["offline", "online", "disabled"]
Curation = Literal["uniform", "trailing"]  # meta.curation


@dataclass(frozen=True)
class MetaConfig:
    distribution: str = "digits_mlp"  # a name from tasks.distributions.DISTRIBUTIONS
    dist_seed: int = 0
    estimator: Estimator = "tbptt"  # meta-gradient estimator: truncated backprop, ES or PES (meta.estimators)
    population: int = 8  # task slots stepped per outer step
    truncation: int = 20  # inner steps per truncation (per outer step)
    schedule: Schedule = "constant"  # episode lengths: constant (= horizon) | log_uniform
    horizon: int = 200  # meta-training horizon: inner steps per task episode
    min_horizon: int = 100  # log_uniform schedule bounds
    max_horizon: int = 1000
    sigma: float = 0.01  # ES / PES perturbation scale
    pairs: int = 1  # antithetic pairs per member (ES / PES)
    meta_loss: MetaLoss = "log_train"  # the meta-objective: (log) training or validation loss (meta.unroll)
    num_train_tasks: int = 0  # size of the meta-train task pool (0: unbounded)
    outer_optimizer: str = "adam"  # adam | a path to a learned-optimizer checkpoint
    outer_lr: float = 3e-3
    outer_steps: int = 300
    # fraction of the outer steps at the end over which a hand-designed (Adam) outer optimizer's updates
    # decay linearly to 0 (optimizers.transforms.WarmDown); 0: constant. A learned outer optimizer
    # anneals on its own learned schedule and is left as it is.
    outer_decay: float = 0.0
    grad_clip_value: float = 3.0  # element-wise meta-gradient clip (VeLO: +-3); 0 disables
    grad_clip_norm: float = 0.0  # global-norm clip; 0 disables
    seed: int = 0
    # stop with an error (after a checkpoint) after this many consecutive outer steps in which no member
    # gave a usable meta-gradient (every truncation non-finite); such steps leave theta unchanged
    max_bad_steps: int = 10
    # which meta_train tasks the members train on (meta/curation.py): uniform, or "trailing": regions of
    # task configurations drawn in proportion to how far the learned optimizer trails there, mixed with
    # curation_floor x uniform over regions, the proportions refreshed every curation_every outer steps
    curation: Curation = "uniform"
    curation_floor: float = 0.2
    curation_every: int = 10
    # truncated backprop: unroll members whose tasks are the same function of (params, batch) together,
    # vmapped (meta.estimators.TruncatedBackprop); same meta-gradient up to float rounding, fewer calls
    batch_members: bool = True

    def __post_init__(self) -> None:
        check_types(self, "meta")
        if not 0.0 <= self.curation_floor <= 1.0 or self.curation_every < 1:
            raise ConfigError("meta.curation_floor must lie in [0, 1] and meta.curation_every be >= 1")
        for name in ("population", "truncation", "horizon", "min_horizon", "max_horizon", "pairs", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"meta.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_horizon > self.max_horizon:
            raise ConfigError("meta.min_horizon must be <= meta.max_horizon")
        if self.outer_steps < 0 or self.sigma <= 0 or self.outer_lr <= 0:
            raise ConfigError("meta.outer_steps must be >= 0, meta.sigma and meta.outer_lr > 0")
        if not 0.0 <= self.outer_decay <= 1.0:
            raise ConfigError(f"meta.outer_decay must lie in [0, 1], got {self.outer_decay}")
        for name in ("num_train_tasks", "grad_clip_value", "grad_clip_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"meta.{name} must be >= 0 (0 disables it), got {getattr(self, name)}")


@dataclass(frozen=True)
class EvalConfig:
    split: Split = "held_out"
    num_tasks: int = 20
    horizon: int = 0  # 0: the meta-training horizon
    long_factor: int = 10  # also evaluate at long_factor x horizon
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    sgdm_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, "eval")
        object.__setattr__(self, "adam_lrs", tuple(float(x) for x in self.adam_lrs))
        object.__setattr__(self, "sgdm_lrs", tuple(float(x) for x in self.sgdm_lrs))
        if self.num_tasks < 1 or self.long_factor < 1 or self.horizon < 0:
            raise ConfigError("eval.num_tasks and eval.long_factor must be >= 1, eval.horizon >= 0")
        if len(self.adam_lrs) < 1 or any(lr <= 0 for lr in self.adam_lrs + self.sgdm_lrs):
            raise ConfigError("eval learning-rate grids must be non-empty and positive")


@dataclass(frozen=True)
class GovernorConfig:
    """The governor's checks and bounds (:mod:`meta.governor`); scores are in log-loss units vs tuned Adam."""

    num_tasks: int = 20  # decision-split (held_out) tasks
    train_tasks: int = 8  # meta-training tasks re-evaluated for the overfitting gap
    long_factor: int = 10  # horizon check at long_factor x the meta-training horizon
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    level: float = 0.95
    bootstrap: int = 4000
    min_improvement: float = 0.0  # lower end of the improvement interval must exceed this
    max_overfit_gap: float = 0.5  # held_out score - meta_train score, log units
    long_tolerance: float = 0.1  # allowed mean loss of advantage at the long horizon, log units
    loop_steps: int = 20  # outer steps of the loop check (0 disables it)
    loop_population: int = 4
    loop_tasks: int = 8
    loop_tolerance: float = 0.1  # log units
    probe_tasks: int = 2
    probe_steps: int = 50
    max_update_ratio: float = 0.5  # largest ||update|| / ||params|| in one step on the probe tasks
    max_theta: int = 100_000  # learned-optimizer weights
    max_flops_per_element: int = 20_000  # MLP FLOPs per parameter element per step
    max_state_floats: int = 8  # accumulator floats per parameter element
    max_step_time_ratio: float = 100.0  # wall-clock per step / Adam's, on the probe task
    rate_limit: float = 1.5  # mean improvement (log units) above which adoption waits for a human
    seed: int = 0
    # ---- the loop's safety layer (meta/safety.py; README "Safety layer") ----
    # a run counts as diverged when a full-batch training loss at any evaluated step (t > 0) exceeds
    # diverge_factor x its initial loss, or rises to the task's loss ceiling (task.max_loss), besides a
    # non-finite minibatch loss; any diverged candidate run at any horizon rejects
    diverge_factor: float = 2.0
    # capability ceiling: a mean held-out improvement (log units, at any evaluated horizon) above these
    # is held for a human (who must sign the approval with --by), whatever rate_limit says
    ceiling_vs_adam: float = 2.0  # over tuned Adam
    ceiling_vs_incumbent: float = 1.5  # over the incumbent
    # runaway: improvements of the last runaway_window adoptions, each > runaway_factor x the one before,
    # freeze the run (emergency stop, exit status 5); runaway_window 0 disables it
    runaway_window: int = 3
    runaway_factor: float = 1.5
    # sustained gains: before every generation the incumbent is re-checked against the generation it
    # was judged against on sustain_tasks fresh test-split tasks (at H; indices never used before); if the
    # pooled re-check interval (level sustain_level) no longer lies above min_improvement, or the
    # incumbent diverged, the incumbent is rolled back (sustain_rollback) -- 0 tasks disables the check
    sustain_tasks: int = 20  # as many as the decision split: 8 gave a +0.39 gain ~50% odds of a false rollback
    sustain_level: float = 0.9
    sustain_rollback: bool = True

    def __post_init__(self) -> None:
        check_types(self, "gov")
        object.__setattr__(self, "adam_lrs", tuple(float(x) for x in self.adam_lrs))
        if not self.adam_lrs or any(lr <= 0 for lr in self.adam_lrs):
            raise ConfigError("gov.adam_lrs must be a non-empty list of positive learning rates")
        for name in ("max_overfit_gap", "long_tolerance", "loop_tolerance", "max_step_time_ratio",
                     "max_theta", "max_flops_per_element", "max_state_floats"):
            if getattr(self, name) < 0:
                raise ConfigError(f"gov.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_tasks", "train_tasks", "long_factor", "bootstrap", "probe_tasks", "probe_steps",
                     "loop_population", "loop_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gov.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_tasks < 3:
            raise ConfigError("gov.num_tasks must be >= 3 for an interval")
        if not 0.0 < self.level < 1.0:
            raise ConfigError("gov.level must lie in (0, 1)")
        if self.loop_steps < 0 or self.rate_limit <= 0 or self.max_update_ratio <= 0:
            raise ConfigError("gov.loop_steps must be >= 0, gov.rate_limit and gov.max_update_ratio > 0")
        if self.diverge_factor < 1.0:
            raise ConfigError(f"gov.diverge_factor must be >= 1 (a multiple of the initial loss), got "
                              f"{self.diverge_factor}")
        for name in ("ceiling_vs_adam", "ceiling_vs_incumbent"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gov.{name} must be > 0 (log units), got {getattr(self, name)}")
        if self.runaway_window == 1 or self.runaway_window < 0:
            raise ConfigError(f"gov.runaway_window must be 0 (off) or >= 2 adoptions, got {self.runaway_window}")
        if self.runaway_factor <= 1.0:
            raise ConfigError(f"gov.runaway_factor must be > 1, got {self.runaway_factor}")
        if self.sustain_tasks != 0 and self.sustain_tasks < 3:
            raise ConfigError(f"gov.sustain_tasks must be 0 (off) or >= 3 (for an interval), got "
                              f"{self.sustain_tasks}")
        if not 0.0 < self.sustain_level < 1.0:
            raise ConfigError(f"gov.sustain_level must lie in (0, 1), got {self.sustain_level}")


@dataclass(frozen=True)
class GenConfig:
    """Recursive generations (``train.py generations``, :mod:`meta.generations`)."""

    max_generations: int = 3  # generations to have in the lineage when the run ends
    outer_steps: int = 150  # outer steps per successor generation (generation 0 uses meta.outer_steps)
    start: SuccessorStart = "incumbent"  # successors start from the incumbent's weights (same architecture) | fresh
    control: bool = True  # also meta-train each successor with Adam (same budget, seeds, start)
    outer_scale: float = 0.0  # update scale of a learned optimizer used as the outer one; 0: outer_lr / nominal_lr
    successor_lo: str = ""  # JSON object of LOConfig overrides for successors, e.g. {"hidden_width": 16}
    approval: Approval = "auto"
    poll_seconds: float = 2.0  # how often a run waiting for approval checks the lineage
    # diminishing returns: the run ends by itself after this many generations in a row without an
    # adoption (0: never); the report says so
    patience: int = 3
    # ---- successor architecture search (meta/search.py; README "Successor architecture search") ----
    # K proposals inside the governor's bounds, successive halving on the selection split; the winner is
    # generation g's architecture (g >= 1) instead of successor_lo alone. 0: off (the fixed architecture)
    search_candidates: int = 0
    search_budget: int = 10  # outer steps of the first rung (each later rung doubles it)
    search_tasks: int = 8  # selection-split tasks that score every rung

    def __post_init__(self) -> None:
        check_types(self, "gen")
        if self.search_candidates < 0 or self.search_budget < 1 or self.search_tasks < 1:
            raise ConfigError("gen.search_candidates must be >= 0 (0: off), gen.search_budget and "
                              "gen.search_tasks >= 1")
        if self.max_generations < 1 or self.outer_steps < 1:
            raise ConfigError("gen.max_generations and gen.outer_steps must be >= 1")
        if self.outer_scale < 0 or self.poll_seconds <= 0:
            raise ConfigError("gen.outer_scale must be >= 0 and gen.poll_seconds > 0")
        if self.patience < 0:
            raise ConfigError(f"gen.patience must be >= 0 (0: never stop for lack of adoptions), got {self.patience}")
        self.successor_overrides()  # validate now, not after generation 0

    def successor_overrides(self) -> dict[str, Any]:
        if not self.successor_lo.strip():
            return {}
        try:
            data = json.loads(self.successor_lo)
        except json.JSONDecodeError as e:
            raise ConfigError(f"gen.successor_lo is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError("gen.successor_lo must be a JSON object of LOConfig fields")
        _check_keys(LOConfig, data)
        LOConfig.from_dict({**LOConfig().to_dict(), **data})
        return data


@dataclass(frozen=True)
class RunConfig:
    meta: MetaConfig = field(default_factory=MetaConfig)
    lo: LOConfig = field(default_factory=LOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    gov: GovernorConfig = field(default_factory=GovernorConfig)
    out_dir: str = "runs/default"
    checkpoint_every: int = 25  # outer steps between checkpoints
    log_every: int = 1
    wandb: WandbMode = "offline"  # W&B mode
    wandb_project: str = "ouroboros"
    threads: int = 0  # torch CPU threads (0: torch's default)
    # processes on this machine: > 1 makes `train.py` re-launch itself under torchrun (meta-training
    # members and evaluation tasks split over the processes; the maths does not change). Ignored when
    # already launched by torchrun.
    procs: int = 1

    def __post_init__(self) -> None:
        check_types(self)
        for name in SECTIONS:
            expected = SECTIONS[name]
            if not isinstance(getattr(self, name), expected):
                raise ConfigError(f"{name} must be a {expected.__name__}, got {getattr(self, name)!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.procs < 1:  # an integer: check_types
            raise ConfigError(f"procs must be >= 1, got {self.procs}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every and log_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lo"] = self.lo.to_dict()
        for section in ("eval", "gov"):
            d[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in d[section].items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a JSON object, got {type(data).__name__}")
        _check_keys(cls, data)
        for name in SECTIONS:
            if name in data and not isinstance(data[name], dict):
                raise ConfigError(f"config section {name!r} must be a JSON object, got {data[name]!r}")
        kw = dict(data)
        if "meta" in kw:
            _check_keys(MetaConfig, kw["meta"])
            kw["meta"] = MetaConfig(**kw["meta"])
        if "lo" in kw:
            kw["lo"] = LOConfig.from_dict(kw["lo"])
        if "eval" in kw:
            _check_keys(EvalConfig, kw["eval"])
            kw["eval"] = EvalConfig(**kw["eval"])
        for name in ("gen", "gov"):
            if name in kw:
                _check_keys(SECTIONS[name], kw[name])
                kw[name] = SECTIONS[name](**kw[name])
        return cls(**kw)


SECTIONS = {"meta": MetaConfig, "lo": LOConfig, "eval": EvalConfig, "gen": GenConfig, "gov": GovernorConfig}


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply ``{"meta.population": 4, "out_dir": "x"}``-style overrides; unknown keys raise."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    run_fields = {f.name for f in fields(RunConfig)} - set(SECTIONS)
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: {sorted(SECTIONS)}")
            known = {f.name for f in fields(SECTIONS[section])}
            if name not in known:
                raise ConfigError(f"unknown config key {key!r}; known {section} keys: {sorted(known)}")
            nested.setdefault(section, {})[name] = value
        else:
            if key not in run_fields:
                raise ConfigError(f"unknown config key {key!r}; known: {sorted(run_fields | set(SECTIONS))}")
            top[key] = value
    for section, vals in nested.items():
        top[section] = replace(getattr(cfg, section), **vals)
    return replace(cfg, **top)
