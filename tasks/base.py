"""Tasks, task families and task distributions with disjoint splits.

A :class:`Task` is a *functional* training problem: ``init(generator) -> params`` and a pure
``loss(params, batch)``, so that inner loops can be differentiated (``torch.func.grad``) and
vmapped. A :class:`TaskFamily` samples JSON-able configurations and builds tasks from them; a config
fully determines its task (including its seed), which is what lets a checkpoint name the tasks of a
population and a resumed run rebuild them exactly.

A :class:`TaskDistribution` mixes families and exposes three disjoint splits (and a fourth, below):
``meta_train`` (what meta-training sees), ``held_out`` (evaluation and, later, the governor's adoption
decisions) and ``test``. Disjointness holds by construction: the task seed of split ``s`` index ``i`` is
``(base * 1_000_003 + i) * 3 + s``, so the seed's residue mod 3 names its split.

A fourth split, ``selection`` (:data:`SELECTION`), serves choices made *before* the governor sees a
candidate (successor architecture search, :mod:`meta.search`), so that the governor's evidence
(``held_out``) is never what chose it. Its seeds count *down* from just below the distribution's block:
index ``i`` has seed ``(base * 1_000_003 - 1 - i) * 3``, below every seed of the three splits above (all at
least ``base * 3_000_009``), so it is disjoint from them for every index, and adding it left their seeds,
and thus their tasks, exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from optimizers.errors import UserError
from optimizers.tree import Params

Batch = tuple[Tensor, ...]
TaskConfig = dict[str, Any]
SPLITS = ("meta_train", "held_out", "test")
# chooses among candidates before review (meta/search.py); not in SPLITS, whose seeds it must not change
SELECTION = "selection"
ALL_SPLITS = SPLITS + (SELECTION,)


class TaskConfigError(UserError, ValueError):
    """A task configuration that cannot be built."""


def seeded(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from any tuple of ints/strings (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Task(ABC):
    """A training problem. ``loss`` must be a pure function of ``params`` and ``batch``."""

    config: TaskConfig

    @property
    def name(self) -> str:
        return self.config.get("family", type(self).__name__)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @abstractmethod
    def init(self, generator: torch.Generator) -> Params: ...

    @abstractmethod
    def loss(self, params: Params, batch: Batch) -> Tensor: ...

    @abstractmethod
    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        """One minibatch from ``split`` ("train" or "valid")."""

    def full_batch(self, split: str) -> Batch:
        """A fixed large batch for evaluation (whole split for small datasets)."""
        return self.sample_batch(split, seeded("full", self.seed, split))

    @property
    def max_loss(self) -> float:
        """Loss value that counts as 'diverged'; used to clip meta-losses and map non-finite ones."""
        return 10.0

    def normalizer(self, loss: Tensor) -> Tensor:
        """Clip the loss into ``[0, max_loss]`` and map NaN/inf to ``max_loss``."""
        loss = torch.nan_to_num(loss, nan=self.max_loss, posinf=self.max_loss, neginf=self.max_loss)
        return torch.clamp(loss, 0.0, self.max_loss)

    def batch_key(self) -> Hashable | None:
        """A key equal for two tasks exactly when their ``loss`` and ``normalizer`` are the same function
        of ``(params, batch)`` with the same parameter and batch shapes (only the data in the batches and
        the initialisation differ), so meta-training may ``vmap`` them as one (``meta.estimators``'
        grouped truncated backprop). None (the default): never grouped. A task that keeps anything else
        the loss reads (a permutation, a noise scale, a reparameterisation) must keep None or put it in
        the key."""
        return None

    def init_default(self) -> Params:
        """The task's own initialisation (from its config seed)."""
        return self.init(seeded("init", self.seed))


class TaskFamily(ABC):
    name: str

    @abstractmethod
    def sample(self, generator: torch.Generator) -> TaskConfig: ...

    @abstractmethod
    def build(self, config: TaskConfig) -> Task: ...


FAMILIES: dict[str, Callable[[], TaskFamily]] = {}


def register_family(name: str):
    def deco(cls):
        cls.name = name
        FAMILIES[name] = cls
        return cls

    return deco


def build_task(config: TaskConfig) -> Task:
    family = config.get("family")
    if family not in FAMILIES:
        raise TaskConfigError(f"unknown task family {family!r}; known: {sorted(FAMILIES)}")
    augment = config.get("augment")
    if augment:  # the same task seen through a reparameterisation / gradient noise (tasks/augment.py)
        from tasks.augment import AugmentedTask

        if not isinstance(augment, dict):
            raise TaskConfigError(f"augment must be a JSON object, got {augment!r}")
        inner = FAMILIES[family]().build({k: v for k, v in config.items() if k != "augment"})
        return AugmentedTask(inner, augment, dict(config))
    return FAMILIES[family]().build(config)


# ---- small sampling helpers ----------------------------------------------------------------
def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def log_uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(uniform(g, math.log(lo), math.log(hi)))


def log_int(g: torch.Generator, lo: int, hi: int) -> int:
    return int(round(log_uniform(g, lo, hi)))


def choice(g: torch.Generator, options: list | tuple):
    return options[int(torch.randint(len(options), (), generator=g))]


# ---- distributions -------------------------------------------------------------------------
@dataclass
class TaskDistribution:
    """A weighted mixture of families with disjoint meta_train / held_out / test splits.

    ``overrides`` are merged into every sampled config (e.g. ``{"dataset": "mnist"}``)."""

    name: str
    families: list[tuple[str, dict[str, Any], float]]  # (family name, family kwargs, weight)
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    # task augmentation: keyword arguments of tasks.augment.sample_augment (empty: none)
    augment: dict[str, Any] = field(default_factory=dict)
    # families seen in meta-training only: with probability ``train_prob`` a meta_train task is drawn
    # from ``train_families`` instead (its own generator, so every other task and every evaluation
    # split is exactly the distribution without them)
    train_families: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    train_prob: float = 0.0
    # augmentation of meta_train tasks only (same keywords as ``augment``; applied when ``augment``
    # drew nothing), so the evaluation splits stay exactly the distribution without it
    train_augment: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.train_prob <= 1.0 or (self.train_prob > 0) != bool(self.train_families):
            raise TaskConfigError(f"train_prob must be in [0, 1] and > 0 exactly when train_families are "
                                  f"given, got {self.train_prob} with {len(self.train_families)} families")
        for fam, _, w in [*self.families, *self.train_families]:
            if fam not in FAMILIES:
                raise TaskConfigError(f"unknown task family {fam!r}; known: {sorted(FAMILIES)}")
            if w <= 0:
                raise TaskConfigError(f"family weight must be positive, got {w} for {fam}")

    def task_seed(self, split: str, index: int) -> int:
        if split not in ALL_SPLITS:
            raise TaskConfigError(f"unknown split {split!r}; splits are {ALL_SPLITS}")
        if int(index) < 0:
            raise TaskConfigError(f"task index must be >= 0, got {index}")
        if split == SELECTION:  # below the block of the three splits (module docstring)
            return (self.seed * 1_000_003 - 1 - int(index)) * 3
        return (self.seed * 1_000_003 + int(index)) * 3 + SPLITS.index(split)

    @staticmethod
    def split_of_seed(seed: int) -> str:
        """The split of a ``meta_train`` / ``held_out`` / ``test`` seed (any base); see :meth:`split_of`
        for a seed that may be a ``selection`` one."""
        return SPLITS[seed % 3]

    def split_of(self, seed: int) -> str:
        """The split of one of this distribution's task seeds, ``selection`` included."""
        if seed < self.seed * 3_000_009:
            return SELECTION
        return SPLITS[seed % 3]

    def config(self, split: str, index: int) -> TaskConfig:
        seed = self.task_seed(split, index)
        g = seeded("task", seed)
        families = self.families
        if split == "meta_train" and self.train_prob > 0:
            gt = seeded("train-families", seed)
            if float(torch.rand((), generator=gt, dtype=torch.float64)) < self.train_prob:
                families, g = self.train_families, gt
        weights = torch.tensor([w for _, _, w in families], dtype=torch.float64)
        k = int(torch.multinomial(weights, 1, generator=g))
        fam_name, fam_kwargs, _ = families[k]
        cfg = FAMILIES[fam_name](**fam_kwargs).sample(g)
        cfg.update(self.overrides)
        cfg["family"] = fam_name
        cfg["seed"] = seed
        for aug_kwargs in (self.augment, self.train_augment if split == "meta_train" else None):
            if aug_kwargs and "augment" not in cfg:
                from tasks.augment import sample_augment

                aug = sample_augment(seed, **aug_kwargs)
                if aug:
                    cfg["augment"] = aug
        return cfg

    def task(self, split: str, index: int) -> Task:
        return build_task(self.config(split, index))

    def digest(self) -> str:
        """Content hash of the distribution (lineage records which distribution trained what)."""
        spec = {"name": self.name, "families": self.families, "seed": self.seed, "overrides": self.overrides}
        if self.augment:  # absent when unused, so older distributions keep their digests
            spec["augment"] = self.augment
        if self.train_families:
            spec["train_families"], spec["train_prob"] = self.train_families, self.train_prob
        if self.train_augment:
            spec["train_augment"] = self.train_augment
        blob = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
