"""Run configuration as frozen dataclasses (torchtitan-style), validated before any work starts.

A run is described by :class:`RunConfig` = ``meta`` (:class:`MetaConfig`, the meta-training recipe),
``lo`` (:class:`~optimizers.learned.LOConfig`, the learned optimizer's architecture), ``eval``
(:class:`EvalConfig`) and run-level settings (output directory, logging). Configs round-trip through
JSON; an unknown key anywhere is a :class:`ConfigError` naming the key and the known ones, so a typo
in a config file or on the command line fails at once instead of silently using a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from meta.unroll import META_LOSSES
from optimizers.learned import ConfigError, LOConfig, _check_keys


@dataclass(frozen=True)
class MetaConfig:
    distribution: str = "digits_mlp"  # a name from tasks.distributions.DISTRIBUTIONS
    dist_seed: int = 0
    estimator: str = "tbptt"  # tbptt | es | pes
    population: int = 8  # task slots stepped per outer step
    truncation: int = 20  # inner steps per truncation (per outer step)
    schedule: str = "constant"  # episode lengths: constant (= horizon) | log_uniform
    horizon: int = 200  # meta-training horizon: inner steps per task episode
    min_horizon: int = 100  # log_uniform schedule bounds
    max_horizon: int = 1000
    sigma: float = 0.01  # ES / PES perturbation scale
    pairs: int = 1  # antithetic pairs per member (ES / PES)
    meta_loss: str = "log_train"  # log_train | train | log_valid | valid
    num_train_tasks: int = 0  # size of the meta-train task pool (0: unbounded)
    outer_optimizer: str = "adam"  # adam | a path to a learned-optimizer checkpoint
    outer_lr: float = 3e-3
    outer_steps: int = 300
    grad_clip_value: float = 3.0  # element-wise meta-gradient clip (VeLO: +-3); 0 disables
    grad_clip_norm: float = 0.0  # global-norm clip; 0 disables
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ("tbptt", "es", "pes"):
            raise ConfigError(f"meta.estimator must be tbptt, es or pes, got {self.estimator!r}")
        if self.schedule not in ("constant", "log_uniform"):
            raise ConfigError(f"meta.schedule must be constant or log_uniform, got {self.schedule!r}")
        if self.meta_loss not in META_LOSSES:
            raise ConfigError(f"meta.meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        for name in ("population", "truncation", "horizon", "min_horizon", "max_horizon", "pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"meta.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_horizon > self.max_horizon:
            raise ConfigError("meta.min_horizon must be <= meta.max_horizon")
        if self.outer_steps < 0 or self.sigma <= 0 or self.outer_lr <= 0:
            raise ConfigError("meta.outer_steps must be >= 0, meta.sigma and meta.outer_lr > 0")


@dataclass(frozen=True)
class EvalConfig:
    split: str = "held_out"
    num_tasks: int = 20
    horizon: int = 0  # 0: the meta-training horizon
    long_factor: int = 10  # also evaluate at long_factor x horizon
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    sgdm_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_lrs", tuple(float(x) for x in self.adam_lrs))
        object.__setattr__(self, "sgdm_lrs", tuple(float(x) for x in self.sgdm_lrs))
        if self.split not in ("meta_train", "held_out", "test"):
            raise ConfigError(f"eval.split must be meta_train, held_out or test, got {self.split!r}")
        if self.num_tasks < 1 or self.long_factor < 1 or self.horizon < 0:
            raise ConfigError("eval.num_tasks and eval.long_factor must be >= 1, eval.horizon >= 0")
        if len(self.adam_lrs) < 1 or any(lr <= 0 for lr in self.adam_lrs + self.sgdm_lrs):
            raise ConfigError("eval learning-rate grids must be non-empty and positive")


@dataclass(frozen=True)
class RunConfig:
    meta: MetaConfig = field(default_factory=MetaConfig)
    lo: LOConfig = field(default_factory=LOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/default"
    checkpoint_every: int = 25  # outer steps between checkpoints
    log_every: int = 1
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "ouroboros"
    threads: int = 0  # torch CPU threads (0: torch's default)

    def __post_init__(self) -> None:
        if self.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"wandb must be offline, online or disabled, got {self.wandb!r}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every and log_every must be >= 1")

    @property
    def eval_horizon(self) -> int:
        return self.eval.horizon or self.meta.horizon

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lo"] = self.lo.to_dict()
        d["eval"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["eval"].items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        _check_keys(cls, data)
        kw = dict(data)
        if "meta" in kw:
            _check_keys(MetaConfig, kw["meta"])
            kw["meta"] = MetaConfig(**kw["meta"])
        if "lo" in kw:
            kw["lo"] = LOConfig.from_dict(kw["lo"])
        if "eval" in kw:
            _check_keys(EvalConfig, kw["eval"])
            kw["eval"] = EvalConfig(**kw["eval"])
        return cls(**kw)


SECTIONS = {"meta": MetaConfig, "lo": LOConfig, "eval": EvalConfig}


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
