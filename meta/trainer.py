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

Under ``torchrun`` (a process group from :mod:`meta.distributed`) each rank steps only its shard of the
members (``self.member_ids``; the other slots of ``est_state.members`` are ``None``), the meta-gradient's
``(sum, count)`` and the logged metrics are all-reduced, and :meth:`MetaTrainer.save` gathers every
member to rank 0, which alone writes a checkpoint in the single-process format; :meth:`MetaTrainer.load`
(rank 0 reads, broadcasts) keeps each rank's shard, so a run resumes under any number of processes.
``save`` and ``load`` are then collective: call them on every rank.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from meta import distributed as D
from meta.config import MetaConfig, RunConfig
from meta.estimators import ESTIMATORS, ConstantSchedule, Estimator, EstimatorState, LogUniformSchedule, clip_meta_grad
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
    kw: dict[str, Any] = dict(population=meta.population, truncation=meta.truncation, schedule=schedule,
                              meta_loss=meta.meta_loss, seed=meta.seed,
                              num_train_tasks=meta.num_train_tasks or None)
    if meta.estimator in ("es", "pes"):
        kw.update(sigma=meta.sigma, pairs=meta.pairs)
    return ESTIMATORS[meta.estimator](lopt, dist, **kw)


def outer_update_scale(meta: MetaConfig, outer_lo: LOConfig, override: float = 0.0) -> float:
    """The factor on a learned outer optimizer's updates: ``override`` (``gen.outer_scale``) when set,
    else ``meta.outer_lr / outer_lo.nominal_lr``. Why: a learned optimizer's steps are sized for its
    inner tasks' parameters; scaled so its nominal Adam rate equals the outer learning rate, it takes
    meta-steps of the size Adam would on the learned optimizer's weights."""
    return override or meta.outer_lr / outer_lo.nominal_lr


def make_outer_optimizer(meta: MetaConfig, scale_override: float = 0.0) -> Optimizer:
    """``adam`` or the path of a learned-optimizer checkpoint: that optimizer, bound to its weights and
    scaled by :func:`outer_update_scale` (the one construction for the command line, a resumed run and
    ``generations``)."""
    if meta.outer_optimizer == "adam":
        return Adam(lr=meta.outer_lr)
    lopt, theta, _ = ckpt.load_learned_optimizer(meta.outer_optimizer)
    return scale_updates(lopt.bind(theta), outer_update_scale(meta, lopt.config, scale_override))


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


class MetaTrainer:
    def __init__(self, cfg: RunConfig, outer: Optimizer | None = None, theta: Params | None = None):
        self.cfg = cfg
        self.lopt = LearnedOptimizer(cfg.lo)
        self.dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
        self.estimator = make_estimator(cfg.meta, self.lopt, self.dist)
        # a learned outer optimizer that sees the fraction of training runs for meta.outer_steps
        if outer is None:
            outer = make_outer_optimizer(cfg.meta, cfg.gen.outer_scale)
        self.outer = for_horizon(outer, cfg.meta.outer_steps)
        if cfg.meta.outer_decay > 0 and not getattr(self.outer, "horizon_aware", False):
            self.outer = WarmDown(self.outer, max(cfg.meta.outer_steps, 1), cfg.meta.outer_decay)
        self.theta: Params = theta if theta is not None else self.lopt.init_theta(seeded("theta", cfg.meta.seed))
        self.theta0 = {k: v.clone() for k, v in self.theta.items()}
        self.outer_state = self.outer.init(self.theta)
        # sharding (no-op in a single process): this rank's members; gradients summed over ranks
        self.member_ids: list[int] = D.shard(range(cfg.meta.population))
        self._local_count, self._local_seconds, self._step_t0 = 0, 0.0, 0.0
        if D.active():
            self.estimator.reduce = self._all_reduce_estimate
        self.est_state: EstimatorState = self.estimator.init(self.theta, self.member_ids if D.active() else None)
        self.step = 0
        self.bad_steps = 0  # consecutive outer steps with no usable member (population-wide)
        self.wandb_id: str | None = None

    def _all_reduce_estimate(self, total: Params, count: int) -> tuple[Params, int]:
        """``Estimator.reduce`` under a process group: one all-reduce of (gradient sum, member count)."""
        self._local_count = count
        self._local_seconds = time.perf_counter() - self._step_t0  # this rank's member work, before waiting
        dtype = next(iter(total.values())).dtype
        out = D.all_reduce_sum({"sum": total, "count": torch.tensor([float(count)], dtype=dtype)})
        return out["sum"], round(float(out["count"][0]))

    def _reduce_metrics(self, metrics: dict[str, Any]) -> None:
        """Population-wide metrics on every rank (member-weighted means, summed counters; a mean over no
        member is None)."""
        n = self._local_count if metrics["meta_loss"] is not None else 0
        ni = n if metrics["inner_loss"] is not None else 0
        s = D.all_reduce_scalars([(metrics["meta_loss"] or 0.0) * n, n, (metrics["inner_loss"] or 0.0) * ni, ni,
                                  metrics["nonfinite"], metrics["nonfinite_loss"], metrics["nonfinite_grad"],
                                  metrics["episodes_done"]])
        metrics.update(meta_loss=s[0] / s[1] if s[1] else None, inner_loss=s[2] / s[3] if s[3] else None,
                       nonfinite=int(s[4]), nonfinite_loss=int(s[5]), nonfinite_grad=int(s[6]),
                       episodes_done=int(s[7]))
        # load balance: the step waits for the slowest shard
        hi, neg_lo = D.all_reduce_scalars([self._local_seconds, -self._local_seconds], "max")
        metrics.update(shard_seconds_max=hi, shard_seconds_min=-neg_lo)

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
        sharded = D.active()
        self._step_t0 = t0
        grad, self.est_state, metrics = self.estimator.estimate(self.theta, self.est_state, self.step,
                                                                self.member_ids if sharded else None)
        if sharded:
            self._reduce_metrics(metrics)
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
                D.maybe_inject_fault(self.step)  # test-only hook (OUROBOROS_TEST_FAULT); no-op otherwise
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
        self.theta = _fill(self.theta, tensors, "theta")
        self.theta0 = _fill(self.theta0, tensors, "theta0")
        self.outer_state = _fill(self.outer.init(self.theta), tensors, "outer")
        members: list = []
        mine = set(D.shard(range(len(meta["members"]))))  # every member in a single process
        for i, sc in enumerate(meta["members"]):
            if i not in mine:
                members.append(None)
                continue
            m = self.estimator._new_member(self.theta, i, sc["episode"])
            m.task_config, m.t, m.length, m.task = sc["task_config"], sc["t"], sc["length"], None
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
