"""The meta-trainer: estimator + *any* functional outer optimizer, with atomic checkpoints and resume.

One outer step: the estimator advances the task population by one truncation and returns a
meta-gradient; it is clipped; the outer optimizer (Adam by default, or a learned optimizer bound to
its weights: the recursion point of Ouroboros) updates ``theta`` through the same
``update(grads, state, params)`` call every optimizer in the project answers. A step in which no member
gave a usable meta-gradient (``members_used == 0``, population-wide) applies no update (``theta`` and
the outer state stay as they are) and logs ``meta_loss`` / ``inner_loss`` / ``grad_norm`` as missing
(None); ``meta.max_bad_steps`` such steps in a row end the run with :class:`MetaTrainingError` after a
checkpoint.

A checkpoint holds every tensor of the run (``theta``, the outer optimizer's state, each member's
inner parameters / optimizer state / PES accumulators) plus JSON (configs, step, each member's task
config and position). All randomness is derived from seeds and step/member indices, so there is no
generator state to save and a resumed run reproduces an uninterrupted one exactly.

The estimator returns sums and counts (:meth:`~meta.estimators.Estimator.accumulate`); the trainer
reduces them and takes the means. Under ``torchrun`` (a process group from :mod:`meta.distributed`)
each rank steps only its shard of the members (``self.member_ids``; the other slots of
``est_state.members`` are ``None``), the sums (meta-gradient, member count, losses, counters) are
all-reduced, and :meth:`MetaTrainer.save` gathers every
member to rank 0, which alone writes a checkpoint in the single-process format; :meth:`MetaTrainer.load`
(rank 0 reads, broadcasts) keeps each rank's shard, so a run resumes under any number of processes.
``save`` and ``load`` are then collective: call them on every rank.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from meta import distributed as D
from meta.config import MetaConfig, RunConfig
from meta.curation import TrailingTaskSampler, make_sampler
from meta.estimators import (ESTIMATORS, ConstantSchedule, EstimateSums, Estimator, EstimatorState, LogUniformSchedule,
                             clip_meta_grad)
from optimizers import checkpoint as ckpt
from optimizers.base import Optimizer, for_horizon
from optimizers.errors import UserError
from optimizers.hand import Adam
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig
from optimizers.transforms import WarmDown, scale_updates
from optimizers.tree import Params, flatten
from tasks import get_distribution, seeded

CHECKPOINT_DIR = "checkpoint"


class MetaTrainingError(UserError, RuntimeError):
    """Meta-training cannot go on (e.g. ``meta.max_bad_steps`` consecutive steps with no usable member);
    the trainer wrote a checkpoint before raising it. Its own exit status tells it from a bad setting."""

    exit_status = 3


def make_estimator(meta: MetaConfig, lopt: LearnedOptimizer, dist) -> Estimator:
    schedule = (ConstantSchedule(meta.horizon) if meta.schedule == "constant"
                else LogUniformSchedule(meta.min_horizon, meta.max_horizon))
    sampler = make_sampler(meta.curation, dist, seed=meta.seed, num_train_tasks=meta.num_train_tasks or None,
                           floor=meta.curation_floor, every=meta.curation_every)
    kw: dict[str, Any] = dict(population=meta.population, truncation=meta.truncation, schedule=schedule,
                              meta_loss=meta.meta_loss, seed=meta.seed,
                              num_train_tasks=meta.num_train_tasks or None, sampler=sampler)
    if meta.estimator in ("es", "pes"):
        kw.update(sigma=meta.sigma, pairs=meta.pairs)
    else:
        kw.update(batch_members=meta.batch_members)
    return ESTIMATORS[meta.estimator](lopt, dist, **kw)


def outer_update_scale(meta: MetaConfig, outer_lo: LOConfig, override: float = 0.0) -> float:
    """The factor on a learned outer optimizer's updates: ``override`` (``gen.outer_scale``) when set,
    else ``meta.outer_lr / outer_lo.nominal_lr``. Why: a learned optimizer's steps are sized for its
    inner tasks' parameters; scaled so its nominal Adam rate equals the outer learning rate, it takes
    meta-steps of the size Adam would on the learned optimizer's weights."""
    return override or meta.outer_lr / outer_lo.nominal_lr


@dataclass(frozen=True)
class OuterSpec:
    """The outer optimizer in one value: ``kind`` ``adam`` (``scale`` is its learning rate) or ``learned``
    (the checkpoint at ``path``, its updates multiplied by ``scale``). Logs and checkpoints name it by
    :attr:`label`; :func:`make_outer_optimizer` builds it."""

    kind: Literal["adam", "learned"]
    path: str = ""
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("adam", "learned"):
            raise ConfigError(f"outer optimizer kind must be adam or learned, got {self.kind!r}")
        if self.kind == "learned" and not self.path:
            raise ConfigError("a learned outer optimizer needs the path of its checkpoint")
        if not self.scale > 0:
            raise ConfigError(f"the outer optimizer's scale must be > 0, got {self.scale}")

    @property
    def label(self) -> str:
        return "adam" if self.kind == "adam" else self.path

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "scale": self.scale}

    @classmethod
    def from_config(cls, meta: MetaConfig, scale_override: float = 0.0,
                    lo: LOConfig | None = None) -> "OuterSpec":
        """``meta.outer_optimizer`` (``adam`` or a checkpoint path) as a spec; a learned one's scale is
        :func:`outer_update_scale` of its config (``lo``, else read from the checkpoint)."""
        if meta.outer_optimizer == "adam":
            return cls("adam", "", meta.outer_lr)
        if lo is None:
            lo = ckpt.load_learned_optimizer(meta.outer_optimizer)[0].config
        return cls("learned", meta.outer_optimizer, outer_update_scale(meta, lo, scale_override))


def make_outer_optimizer(spec: OuterSpec) -> Optimizer:
    """The one construction of an outer optimizer (the command line, a resumed run, ``generations``):
    Adam at rate ``spec.scale``, or the learned optimizer at ``spec.path`` bound to its weights with its
    updates scaled by ``spec.scale``."""
    if spec.kind == "adam":
        return Adam(lr=spec.scale)
    lopt, theta, _ = ckpt.load_learned_optimizer(spec.path)
    return scale_updates(lopt.bind(theta), spec.scale)


def _fill(template: Any, flat: dict[str, torch.Tensor], prefix: str) -> Any:
    """Rebuild a tree shaped like ``template`` from checkpoint tensors under ``prefix``."""

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            name = f"{prefix}/{key}" if key else prefix
            if name not in flat:
                raise ckpt.CheckpointError(f"checkpoint is missing tensor {name!r}")
            if flat[name].shape != node.shape:
                raise ckpt.CheckpointError(f"tensor {name!r}: shape {tuple(flat[name].shape)} != {tuple(node.shape)}")
            return flat[name].to(node.dtype)
        return {k: walk(v, f"{key}/{k}" if key else k) for k, v in node.items()}

    return walk(template, "")


def _check_trainer_meta(meta: dict, cfg: RunConfig, path) -> None:
    """The JSON side of a meta-training checkpoint, checked before it is used (older records are not
    hashed; a damaged one must be a clear error, not a traceback or a silently wrong resume)."""
    def bad(what: str):
        return ckpt.CheckpointError(f"{path}: invalid checkpoint metadata: {what}")

    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"step must be a non-negative integer, got {step!r}")
    members = meta.get("members")
    if not isinstance(members, list) or len(members) != cfg.meta.population:
        raise bad(f"members must list the population's {cfg.meta.population} members")
    for i, m in enumerate(members):
        if not isinstance(m, dict) or not {"task_config", "episode", "t", "length"} <= set(m):
            raise bad(f"member {i} lacks task_config / episode / t / length")
        if any(isinstance(m[k], bool) or not isinstance(m[k], int) or m[k] < 0 for k in ("episode", "t", "length")):
            raise bad(f"member {i}: episode, t and length must be non-negative integers")
    for k in ("nonfinite", "episodes_done", "bad_steps"):
        v = meta.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{k} must be a non-negative integer, got {v!r}")


StepCallback = Callable[["MetaTrainer", dict], None]


class MetaTrainer:
    """``outer``: an outer optimizer (built by the caller, e.g. a generation in memory), an
    :class:`OuterSpec`, or None (the spec of ``cfg.meta.outer_optimizer``). ``step_callbacks`` are
    called as ``callback(trainer, metrics)`` at the end of every step of :meth:`train`, after the
    step's checkpoint (e.g. progress reports, or a test's fault injection)."""

    def __init__(self, cfg: RunConfig, outer: Optimizer | OuterSpec | None = None, theta: Params | None = None,
                 step_callbacks: list[StepCallback] | None = None):
        self.cfg = cfg
        self.lopt = LearnedOptimizer(cfg.lo)
        self.dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
        self.estimator = make_estimator(cfg.meta, self.lopt, self.dist)
        self.step_callbacks: list[StepCallback] = list(step_callbacks or [])
        # a learned outer optimizer that sees the fraction of training runs for meta.outer_steps
        if outer is None:
            outer = OuterSpec.from_config(cfg.meta, cfg.gen.outer_scale)
        self.outer_spec: OuterSpec | None = outer if isinstance(outer, OuterSpec) else None
        if isinstance(outer, OuterSpec):
            outer = make_outer_optimizer(outer)
        self.outer = for_horizon(outer, cfg.meta.outer_steps)
        if cfg.meta.outer_decay > 0 and not getattr(self.outer, "horizon_aware", False):
            self.outer = WarmDown(self.outer, max(cfg.meta.outer_steps, 1), cfg.meta.outer_decay)
        self.theta: Params = theta if theta is not None else self.lopt.init_theta(seeded("theta", cfg.meta.seed))
        self.theta0 = {k: v.clone() for k, v in self.theta.items()}
        self.outer_state = self.outer.init(self.theta)
        # sharding (no-op in a single process): this rank's members; gradients summed over ranks
        self.member_ids: list[int] = D.shard(range(cfg.meta.population))
        self.est_state: EstimatorState = self.estimator.init(self.theta, self.member_ids if D.active() else None)
        self.step = 0
        self.bad_steps = 0  # consecutive outer steps with no usable member (population-wide)
        self.wandb_id: str | None = None

    @property
    def outer_label(self) -> str:
        """How logs and checkpoints name the outer optimizer (the spec's label; a caller-built one: the
        config's ``meta.outer_optimizer``)."""
        return self.outer_spec.label if self.outer_spec is not None else self.cfg.meta.outer_optimizer

    @property
    def sampler(self):
        """The estimator's task sampler (:mod:`meta.curation`)."""
        return self.estimator.sampler

    def _reduce(self, sums: EstimateSums) -> tuple[EstimateSums, dict[str, Any]]:
        """Population-wide sums on every rank (identity in one process) and, under a process group, the
        shards' seconds of member work (the step waits for the slowest)."""
        if not D.active():
            return sums, {}
        local_seconds = time.perf_counter() - self._step_t0  # this rank's member work, before waiting
        gather = D.all_gather_object if self.sampler.curated else None
        sums = sums.all_reduce(D.all_reduce_sum, D.all_reduce_scalars, gather)
        hi, neg_lo = D.all_reduce_scalars([local_seconds, -local_seconds], "max")
        return sums, {"shard_seconds_max": hi, "shard_seconds_min": -neg_lo}

    def _outer_loss(self, meta_loss: float | None) -> torch.Tensor | None:
        """The loss the outer optimizer is given (a learned one with loss features reads it, as it reads
        its inner tasks' losses): the population's meta-loss, as a positive loss (``exp`` of a log
        meta-loss, the geometric mean of the losses); None when no member gave a finite one."""
        if meta_loss is None or not math.isfinite(meta_loss):
            return None
        value = math.exp(meta_loss) if self.cfg.meta.meta_loss.startswith("log") else meta_loss
        return torch.tensor(value, dtype=torch.float64)

    # ---- training ---------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._step_t0 = t0
        sums = self.estimator.accumulate(self.theta, self.est_state, self.step,
                                         self.member_ids if D.active() else None)
        sums, shard_metrics = self._reduce(sums)
        grad, metrics = sums.mean()
        metrics.update(shard_metrics)
        if self.sampler.curated:  # every rank folds the same (gathered) episodes in the same order
            self.sampler.observe(sums.episodes)
        if metrics["members_used"] == 0:
            # no usable member anywhere (members_used is population-wide): the gradient is an empty
            # average, so theta and the outer optimizer's state are left as they are; the step counts
            self.bad_steps += 1
            norm = None
        else:
            self.bad_steps = 0
            grad, norm = clip_meta_grad(grad, self.cfg.meta.grad_clip_value or None,
                                        self.cfg.meta.grad_clip_norm or None)
            self.theta, self.outer_state = self.outer.update(grad, self.outer_state, self.theta,
                                                             loss=self._outer_loss(metrics["meta_loss"]))
            self.theta = {k: v.detach() for k, v in self.theta.items()}
        self.step += 1
        if self.sampler.curated and self.sampler.refresh(self.step):
            metrics["curation_max_prob"] = max(self.sampler.probs)
        metrics.update(grad_norm=norm, step_time=time.perf_counter() - t0)
        if "nominal_log_lr" in self.theta:
            metrics["nominal_lr"] = float(self.theta["nominal_log_lr"].exp())
        return metrics

    def train(self, steps: int | None = None, *, progress: bool = True, logger=None,
              checkpoint_every: int | None = None, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Run until ``steps`` outer steps in total (default: the config's). Returns the final step."""
        from tqdm.auto import tqdm

        total = self.cfg.meta.outer_steps if steps is None else steps
        every = checkpoint_every or self.cfg.checkpoint_every
        main = D.is_main()
        bar = tqdm(total=total, initial=self.step, desc="meta-train", disable=not (progress and main),
                   dynamic_ncols=True)
        try:
            # under a process group every rank must stop at the same step (a signal may reach one first)
            while self.step < total and not D.any_true(should_stop()):
                m = self.train_step()
                if logger is not None and main and self.step % self.cfg.log_every == 0:
                    logger.log(m, self.step)
                bar.update(1)
                bar.set_postfix(meta_loss="-" if m["meta_loss"] is None else f"{m['meta_loss']:.4f}",
                                inner="-" if m["inner_loss"] is None else f"{m['inner_loss']:.3f}")
                saved = self.step % every == 0 or self.step == total
                if saved:
                    self.save()
                if self.bad_steps >= self.cfg.meta.max_bad_steps:
                    path = self.checkpoint_path if saved else self.save()
                    first = self.step - self.bad_steps + 1
                    raise MetaTrainingError(
                        f"no usable member for {self.bad_steps} consecutive outer steps (steps {first}-{self.step} "
                        f"of {total}, meta.max_bad_steps={self.cfg.meta.max_bad_steps}): every member's "
                        f"truncation had non-finite inner losses or a non-finite meta-gradient (last step: "
                        f"nonfinite_loss={m['nonfinite_loss']}, nonfinite_grad={m['nonfinite_grad']}), so theta "
                        f"was not updated. Checkpoint at step {self.step} written to {path}. Check the learned "
                        f"optimizer's settings (e.g. lo.output_init_scale, lo.nominal_lr) or the task distribution")
                for callback in self.step_callbacks:
                    callback(self, m)
        finally:
            bar.close()
        return self.step

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out_dir) / CHECKPOINT_DIR

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {f"theta/{k}": v for k, v in self.theta.items()}
        t.update({f"theta0/{k}": v for k, v in self.theta0.items()})
        for k, v in flatten(self.outer_state).items():
            t[f"outer/{k}" if k else "outer"] = v
        for i, m in enumerate(self.est_state.members):
            if m is None:  # another rank's member
                continue
            for part in ("params", "opt_state", "extra"):
                for k, v in flatten(getattr(m, part)).items():
                    t[f"members/{i}/{part}/{k}"] = v
        if isinstance(self.sampler, TrailingTaskSampler):  # the same on every rank
            t.update(self.sampler.state_tensors())
        return t

    def member_scalars(self) -> list[dict]:
        """Every member's ``{task_config, episode, t, length}``, in member order, on every rank. Under a
        process group ``est_state.members`` holds only this rank's members (``None`` elsewhere) and this
        call is collective (an all-gather): use it instead of iterating ``est_state.members``."""
        own = {i: m.scalars() for i, m in enumerate(self.est_state.members) if m is not None}
        if not D.active():
            return [own[i] for i in range(len(self.est_state.members))]
        merged: dict[int, dict] = {}
        for part in D.all_gather_object(own):
            merged.update(part)
        return [merged[i] for i in range(len(self.est_state.members))]

    def _gathered_state(self) -> tuple[dict[str, torch.Tensor], list, int, int]:
        """(tensors, member scalars, nonfinite, episodes_done) of the WHOLE population. Under a process
        group the shards are gathered to rank 0 (the other ranks get empty values)."""
        st = self.est_state
        if not D.active():
            return self.state_tensors(), [m.scalars() for m in st.members], st.nonfinite, st.episodes_done
        own = {i: m for i, m in enumerate(st.members) if m is not None}
        tensors = {k: v.detach().cpu() for k, v in self.state_tensors().items()}
        shard = {"tensors": {k: v for k, v in tensors.items() if k.startswith("members/")},
                 "members": {i: m.scalars() for i, m in own.items()},
                 "nonfinite": st.nonfinite, "episodes_done": st.episodes_done}
        shards = D.gather_object(shard)
        if shards is None:
            return {}, [], 0, 0
        scalars: dict[int, dict] = {}
        member_tensors: dict[str, torch.Tensor] = {}
        for sh in shards:
            scalars.update(sh["members"])
            member_tensors.update(sh["tensors"])
        if sorted(scalars) != list(range(len(st.members))):
            raise RuntimeError(f"gathered members {sorted(scalars)} != 0..{len(st.members) - 1}")
        out = {k: v for k, v in tensors.items() if not k.startswith("members/")}
        for i in range(len(st.members)):  # same key order as a single-process checkpoint
            prefix = f"members/{i}/"
            out.update({k: v for k, v in member_tensors.items() if k.startswith(prefix)})
        return (out, [scalars[i] for i in range(len(st.members))], sum(sh["nonfinite"] for sh in shards),
                sum(sh["episodes_done"] for sh in shards))

    def save(self, path: str | Path | None = None) -> Path:
        tensors, members, nonfinite, episodes_done = self._gathered_state()
        meta = {
            "kind": "meta_train",
            "lo_config": self.cfg.lo.to_dict(),
            "run_config": self.cfg.to_dict(),
            "step": self.step,
            "members": members,
            "nonfinite": nonfinite,
            "episodes_done": episodes_done,
            "bad_steps": self.bad_steps,
            "wandb_id": self.wandb_id,
            "distribution_digest": self.dist.digest(),
        }
        if self.outer_spec is not None and self.outer_spec.kind == "learned":  # adam: the config says it all
            meta["outer_optimizer"] = self.outer_spec.to_dict()
        if isinstance(self.sampler, TrailingTaskSampler):
            meta["curation"] = self.sampler.state_json()
        # rank 0 writes; every rank returns the path or raises the same error
        return D.run_on_main(ckpt.save, path or self.checkpoint_path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, cfg: RunConfig | None = None, outer: Optimizer | None = None,
             adjust: Callable[[RunConfig], RunConfig] | None = None) -> "MetaTrainer":
        """Restore a trainer from a checkpoint: with ``cfg`` if given, else its own config passed through
        ``adjust`` (e.g. the changes a resume may make to it)."""
        tensors, meta = D.load_checkpoint(path)  # ckpt.load; under a process group rank 0 reads, broadcasts
        if meta.get("kind") != "meta_train":
            raise ckpt.CheckpointError(f"{path} is not a meta-training checkpoint (kind={meta.get('kind')!r})")
        if cfg is None:
            try:
                cfg = RunConfig.from_dict(meta["run_config"])
            except (KeyError, TypeError, ConfigError) as e:
                raise ckpt.CheckpointError(f"{path}: invalid run config in the checkpoint: {e}") from e
            cfg = adjust(cfg) if adjust is not None else cfg
        _check_trainer_meta(meta, cfg, path)
        self = cls(cfg, outer=outer)
        if isinstance(self.sampler, TrailingTaskSampler):  # before the members: it knows their tasks
            if "curation" not in meta:
                raise ckpt.CheckpointError(f"{path}: meta.curation is trailing but the checkpoint has no "
                                           f"curation statistics")
            try:
                self.sampler.load_state(tensors, meta["curation"])
            except (KeyError, TypeError, ValueError) as e:
                raise ckpt.CheckpointError(f"{path}: invalid curation statistics: {e}") from e
        self.theta = _fill(self.theta, tensors, "theta")
        self.theta0 = _fill(self.theta0, tensors, "theta0")
        self.outer_state = _fill(self.outer.init(self.theta), tensors, "outer")
        members: list = []
        mine = set(D.shard(range(len(meta["members"]))))  # every member in a single process
        for i, sc in enumerate(meta["members"]):
            if i not in mine:
                members.append(None)
                continue
            m = self.estimator.new_member(self.theta, i, sc["episode"], task_config=sc["task_config"])
            m.t, m.length, m.start_log_loss = sc["t"], sc["length"], sc.get("start_log_loss")
            m.params = _fill(m.params, tensors, f"members/{i}/params")
            m.opt_state = _fill(m.opt_state, tensors, f"members/{i}/opt_state")
            if m.extra:
                m.extra = _fill(m.extra, tensors, f"members/{i}/extra")
            members.append(m)
        self.member_ids = sorted(mine)
        first = D.is_main()  # population-wide counters live on rank 0 (the others count from 0)
        self.est_state = EstimatorState(members, meta["nonfinite"] if first else 0,
                                        meta["episodes_done"] if first else 0)
        self.step = int(meta["step"])
        self.bad_steps = int(meta.get("bad_steps", 0))  # older checkpoints: none recorded
        self.wandb_id = meta.get("wandb_id")
        return self

    def save_learned_optimizer(self, path: str | Path) -> Path:
        """Write the trained optimizer alone. Under a process group only rank 0 writes (theta is the same
        on every rank); not collective, so it may be called on rank 0 alone."""
        if not D.is_main():
            return Path(path)
        return ckpt.save_learned_optimizer(path, self.lopt, self.theta, step=self.step,
                                           distribution=self.cfg.meta.distribution,
                                           horizon=self.cfg.meta.horizon)


class StopFlag:
    """SIGINT / SIGTERM set a flag so the run ends cleanly after the current step (then checkpoints)."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop = True
        print("\n[ouroboros] stopping after the current step (Ctrl-C again to abort)...", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self) -> bool:
        return self.stop
