"""Meta-gradient estimators over truncated unrolls of a persistent population of tasks.

All three share one interface (:class:`Estimator`): ``init(theta) -> state`` creates the population
(one *member* per task slot, each with its own task, inner parameters, optimizer state and position in
its episode) and ``estimate(theta, state, step) -> (meta_grad, state, metrics)`` advances every member
by one truncation and returns a meta-gradient estimate. Members persist across truncations and start a
new episode (fresh task, fresh init) when theirs finishes; the first episode of each member has a
random length so members are de-synchronised and truncations see every phase of training.

* :class:`TruncatedBackprop` — exact gradient of the truncation's meta-loss (``torch.func.grad``
  through the unroll); low variance, short-horizon biased.
* :class:`TruncatedES` — antithetic ES over one truncation: ``(L+ - L-) / (2 sigma^2) * eps``, both
  signs (and all pairs) in one vmapped unroll. Needs no backward pass.
* :class:`PES` — persistent ES (Vicol et al. 2021): each pair keeps its own +/- inner states and the
  running sum ``xi`` of its perturbations, giving an estimate that is unbiased across truncations;
  ``xi`` resets when the member's episode ends.

Contract with the trainer: :meth:`Estimator.accumulate` returns *sums and counts* only
(:class:`EstimateSums`: the sum of the used members' meta-gradients and their number, loss sums,
non-finite counters, the episodes that ended); the caller reduces them (across processes under
``torchrun``: :meth:`EstimateSums.all_reduce`) and takes the means (:meth:`EstimateSums.mean`).
:meth:`Estimator.estimate` is the single-process composition of the two. Why: the estimator knows
members and truncations, not process groups; a mean taken before the reduction would weight ranks, not
members.

Sharding: every member's randomness (task, batches, perturbations) is derived from
``(seed, member index, episode / step)``, never from a shared generator, and the estimate is
``sum of member contributions / count``, so a rank that steps a slice of ``member_ids`` contributes
its sums and the reduced result does not depend on the number of ranks. Which meta-training task a
member's episode uses is the *task sampler*'s choice (:mod:`meta.curation`: uniform by default,
or curated towards the tasks the learned optimizer trails on); :meth:`Estimator.task_index` asks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from meta.curation import EpisodeRecord, TaskSampler, UniformTaskSampler, region_of
from meta.unroll import META_LOSSES, autograd_grad_and_value, meta_term, unroll
from optimizers.base import LearnableOptimizer
from optimizers.tree import Params, all_finite, detach, stack, tree_leaves, tree_map, unstack
from tasks.base import Task, TaskDistribution, build_task, seeded

Tree = Any


# ---- truncation schedules ------------------------------------------------------------------
@dataclass(frozen=True)
class ConstantSchedule:
    length: int

    def sample(self, g: torch.Generator) -> int:
        return self.length


@dataclass(frozen=True)
class LogUniformSchedule:
    """Episode lengths log-uniform in [low, high] (learned_optimization's default for long horizons)."""

    low: int
    high: int

    def sample(self, g: torch.Generator) -> int:
        u = float(torch.rand((), generator=g))
        return int(round(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))))


# ---- population state ------------------------------------------------------------------------
@dataclass
class Member:
    """One persistent task slot. ``params``/``opt_state`` carry a leading +/- axis for PES."""

    task_config: dict
    episode: int
    t: int
    length: int
    params: Tree
    opt_state: Tree
    extra: dict = field(default_factory=dict)  # estimator-specific tensors (PES: "xi")
    task: Task | None = None
    # log normalised training loss after the episode's first inner step; kept only when the task sampler
    # curates (the episode's progress, end minus start, is what it reads)
    start_log_loss: float | None = None

    def scalars(self) -> dict:
        out = {"task_config": self.task_config, "episode": self.episode, "t": self.t, "length": self.length}
        if self.start_log_loss is not None:  # absent unless curating: uniform checkpoints are unchanged
            out["start_log_loss"] = self.start_log_loss
        return out


@dataclass
class EstimatorState:
    members: list[Member]
    # total non-finite events caught (non-finite inner losses / parameters, or a non-finite meta-gradient
    # of a finite truncation): the member's contribution is dropped and its next episode starts
    nonfinite: int = 0
    episodes_done: int = 0


# why a member's truncation contributed no gradient (``info["nonfinite"]`` of ``member_estimate``)
NONFINITE_LOSS = "loss"  # an inner loss, the meta-loss or the inner parameters became non-finite
NONFINITE_GRAD = "grad"  # every loss finite, the meta-gradient estimate is not


def _sum_trees(a: Tree | None, b: Tree) -> Tree:
    return b if a is None else tree_map(torch.add, a, b)


@dataclass
class EstimateSums:
    """What one outer step's members contributed, as sums and counts (not yet reduced or averaged).

    ``grad_sum`` / ``count``: the used members' meta-gradients and their number; ``meta_loss_sum`` /
    ``inner_loss_sum`` with their counts (an ES member whose unrolls all diverged has a meta-loss but no
    finite inner loss); ``nonfinite_loss`` / ``nonfinite_grad``: truncations dropped this step and why;
    ``episodes_done``: the state's cumulative counter; ``episodes``: the episodes that ended this step
    (filled only when the task sampler curates)."""

    grad_sum: Params
    count: int = 0
    meta_loss_sum: float = 0.0
    meta_loss_count: int = 0
    inner_loss_sum: float = 0.0
    inner_loss_count: int = 0
    nonfinite_loss: int = 0
    nonfinite_grad: int = 0
    episodes_done: int = 0
    episodes: list[EpisodeRecord] = field(default_factory=list)

    def mean(self) -> tuple[Params, dict]:
        """``(meta-gradient, metrics)``: the averages of the sums. Metrics: ``members_used`` (0 means the
        gradient is all zeros and must not be applied), ``meta_loss`` / ``inner_loss`` (None when no
        member gave one), ``nonfinite_loss``, ``nonfinite_grad``, ``nonfinite`` (their sum),
        ``episodes_done``."""
        grad = tree_map(lambda t: t / max(self.count, 1), self.grad_sum)
        return grad, {
            "meta_loss": float(self.meta_loss_sum / self.meta_loss_count) if self.meta_loss_count else None,
            "inner_loss": float(self.inner_loss_sum / self.inner_loss_count) if self.inner_loss_count else None,
            "members_used": self.count,
            "nonfinite": self.nonfinite_loss + self.nonfinite_grad,
            "nonfinite_loss": self.nonfinite_loss,
            "nonfinite_grad": self.nonfinite_grad,
            "episodes_done": self.episodes_done,
        }

    def all_reduce(self, tensors: Callable[[dict], dict], scalars: Callable[[list[float]], list[float]],
                   gather: Callable[[Any], list] | None = None) -> "EstimateSums":
        """The population-wide sums, given a process group's collectives (``meta.distributed``'s
        ``all_reduce_sum`` / ``all_reduce_scalars`` / ``all_gather_object``): one all-reduce of the
        gradient sum with its count, one of the scalar sums; the ended episodes are gathered (when
        ``gather`` is given) in (member, episode) order, so every rank sees the same list."""
        dtype = next(iter(self.grad_sum.values())).dtype
        out = tensors({"sum": self.grad_sum, "count": torch.tensor([float(self.count)], dtype=dtype)})
        s = scalars([self.meta_loss_sum, self.meta_loss_count, self.inner_loss_sum, self.inner_loss_count,
                     self.nonfinite_loss, self.nonfinite_grad, self.episodes_done])
        episodes = self.episodes
        if gather is not None:
            episodes = sorted((r for part in gather(self.episodes) for r in part),
                              key=lambda r: (r.member, r.episode))
        return EstimateSums(out["sum"], round(float(out["count"][0])), s[0], round(s[1]), s[2], round(s[3]),
                            round(s[4]), round(s[5]), round(s[6]), episodes)


class Estimator:
    """Base class: population bookkeeping, seeding, non-finite handling, sums over members."""

    name = "base"

    def __init__(
        self,
        lopt: LearnableOptimizer,
        dist: TaskDistribution,
        *,
        population: int = 8,
        truncation: int = 20,
        schedule: ConstantSchedule | LogUniformSchedule = ConstantSchedule(200),
        meta_loss: str = "log_train",
        seed: int = 0,
        split: str = "meta_train",
        num_train_tasks: int | None = None,
        desync: bool = True,
        sampler: TaskSampler | None = None,
    ):
        if meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")
        if population < 1 or truncation < 1:
            raise ValueError("population and truncation must be >= 1")
        self.lopt, self.dist = lopt, dist
        self.population, self.truncation, self.schedule = population, truncation, schedule
        self.meta_loss, self.seed, self.split = meta_loss, seed, split
        # Finite pool of meta-training task indices (None: effectively unbounded).
        self.num_train_tasks = num_train_tasks
        self.desync = desync
        # which task each (member, episode) trains on: uniform over the pool unless curated
        self.sampler: TaskSampler = sampler or UniformTaskSampler(seed, num_train_tasks)

    # -- members ----------------------------------------------------------------------------
    def task_index(self, member: int, episode: int) -> int:
        """The ``split`` task index member ``member`` trains on in episode ``episode`` (the sampler's)."""
        return self.sampler.index(member, episode)

    def new_member(self, theta: Params, i: int, episode: int, task_config: dict | None = None) -> Member:
        """Member ``i`` at the start of ``episode``: its task (``task_config``, else the sampler's choice),
        episode length, inner initialisation and optimizer state, all derived from the seeds."""
        cfg = task_config if task_config is not None else self.dist.config(self.split, self.task_index(i, episode))
        task = build_task(cfg)
        g = seeded("episode", self.seed, i, episode)
        length = max(1, self.schedule.sample(g))
        if episode == 0 and self.desync:  # de-synchronise members: first episodes end at random times
            length = int(torch.randint(min(self.truncation, length), length + 1, (), generator=g))
        params = task.init(seeded("init", self.seed, i, episode))
        # designs that see the fraction of training get the episode's length as their T
        opt_state = self.lopt.bind(theta).init(params, total_steps=length)
        m = Member(cfg, episode, 0, length, params, opt_state, task=task)
        self._init_extra(theta, m)
        return m

    def _init_extra(self, theta: Params, m: Member) -> None:
        """Estimator-specific per-member state (PES duplicates params into +/- copies)."""

    def init(self, theta: Params, member_ids: list[int] | None = None) -> EstimatorState:
        """The population at step 0. With ``member_ids`` (a rank's shard) only those members are built;
        the others are ``None`` placeholders, so ``state.members[i]`` keeps its global index ``i``."""
        if member_ids is None:
            return EstimatorState([self.new_member(theta, i, 0) for i in range(self.population)])
        mine = set(member_ids)
        for i in range(self.population):  # every rank knows every member's first task (sampler history)
            self.task_index(i, 0)
        return EstimatorState([self.new_member(theta, i, 0) if i in mine else None
                               for i in range(self.population)])

    def task_of(self, m: Member) -> Task:
        if m.task is None:
            m.task = build_task(m.task_config)
        return m.task

    def batches(self, i: int, m: Member, n: int) -> tuple[list, list | None]:
        task = self.task_of(m)
        train = [task.sample_batch("train", seeded("batch", self.seed, i, m.episode, m.t + k)) for k in range(n + 1)]
        valid = None
        if self.meta_loss.endswith("valid"):
            valid = [task.sample_batch("valid", seeded("vbatch", self.seed, i, m.episode, m.t + k))
                     for k in range(n + 1)]
        return train, valid

    def steps_this_truncation(self, m: Member) -> int:
        return max(1, min(self.truncation, m.length - m.t))

    def _advance(self, theta: Params, state: EstimatorState, i: int, n: int, finite: bool) -> None:
        """Move member ``i`` on by ``n`` inner steps; a non-finite truncation (``finite=False``) is
        counted and, like a finished episode, replaced by the member's next episode."""
        m = state.members[i]
        m.t += n
        if not finite:
            state.nonfinite += 1
        if not finite or m.t >= m.length:
            state.episodes_done += 1
            state.members[i] = self.new_member(theta, i, m.episode + 1)

    # -- estimate ---------------------------------------------------------------------------
    def member_estimate(self, theta: Params, state: EstimatorState, i: int, step: int
                        ) -> tuple[Tree | None, dict]:
        """``(gradient or None, {"meta_loss", "inner_loss", "nonfinite"[, "log_losses"]})``: a member
        whose gradient is None contributes nothing (its losses are None too) and ``nonfinite`` says why
        (None, :data:`NONFINITE_LOSS` or :data:`NONFINITE_GRAD`); ``log_losses`` (only when the sampler
        curates): :meth:`_log_losses` of the truncation."""
        raise NotImplementedError

    def accumulate(self, theta: Params, state: EstimatorState, step: int,
                   member_ids: list[int] | None = None) -> EstimateSums:
        """Advance the members ``member_ids`` (default all) by one truncation and return their sums and
        counts (:class:`EstimateSums`), unreduced: the caller reduces across processes, then averages."""
        theta = detach(theta)
        total, count = None, 0
        meta_sum, meta_n, inner_sum, inner_n = 0.0, 0, 0.0, 0
        bad = {NONFINITE_LOSS: 0, NONFINITE_GRAD: 0}
        episodes: list[EpisodeRecord] = []
        ids = list(member_ids) if member_ids is not None else list(range(len(state.members)))
        for i, before, t0, g, info in self._member_results(theta, state, step, ids):
            if self.sampler.curated:
                self._track_progress(state, i, before, t0, info, episodes)
            if info.get("nonfinite") is not None:
                bad[info["nonfinite"]] += 1
            if g is not None:  # {}: counted, its gradient is inside its group's first member's sum
                total, count = (_sum_trees(total, g) if g else total), count + 1
                meta_sum, meta_n = meta_sum + info["meta_loss"], meta_n + 1
                if info["inner_loss"] is not None:
                    inner_sum, inner_n = inner_sum + info["inner_loss"], inner_n + 1
        return EstimateSums(total if total is not None else tree_map(torch.zeros_like, theta), count,
                            meta_sum, meta_n, inner_sum, inner_n, bad[NONFINITE_LOSS], bad[NONFINITE_GRAD],
                            state.episodes_done, episodes)

    def _member_results(self, theta: Params, state: EstimatorState, step: int, ids: list[int]):
        """``(i, member before, its t before, gradient, info)`` for every member ``i`` of ``ids``, in that
        order, each advanced by one truncation (:meth:`member_estimate`). A gradient ``{}`` (never from
        :meth:`member_estimate`) means "used, its gradient is already inside an earlier member's":
        estimators that compute a group of members at once return the group's sum once."""
        for i in ids:
            before, t0 = state.members[i], state.members[i].t
            g, info = self.member_estimate(theta, state, i, step)
            yield i, before, t0, g, info

    def estimate(self, theta: Params, state: EstimatorState, step: int,
                 member_ids: list[int] | None = None) -> tuple[Params, EstimatorState, dict]:
        """:meth:`accumulate` then the means, with no reduction (one process): ``(grad, state, metrics)``,
        metrics as :meth:`EstimateSums.mean` names them."""
        grad, metrics = self.accumulate(theta, state, step, member_ids).mean()
        return grad, state, metrics

    # -- progress of episodes (read by a curating task sampler) ------------------------------
    def _log_losses(self, task: Task, losses: Tensor) -> tuple[float, float]:
        """Log normalised training loss after the truncation's first and last inner step, averaged over
        the unrolls (ES: every signed one); a non-finite loss counts as the task's ceiling."""
        v = meta_term(task, losses.detach(), "log_train")
        v = v.reshape(-1, v.shape[-1])
        return float(v[:, 0].mean()), float(v[:, -1].mean())

    def _track_progress(self, state: EstimatorState, i: int, before: Member, t0: int, info: dict,
                        episodes: list[EpisodeRecord]) -> None:
        """Keep the episode's starting log-loss; when the episode ended, record its progress (end minus
        start, log units) and the task index of the member's next episode."""
        first, last = info["log_losses"]
        start = first if t0 == 0 or before.start_log_loss is None else before.start_log_loss
        after = state.members[i]
        if after is before:  # episode goes on
            before.start_log_loss = start
            return
        episodes.append(EpisodeRecord(i, before.episode, region_of(before.task_config), last - start,
                                      self.task_index(i, after.episode)))

# most inner parameters (summed over members) that truncated backprop unrolls as one vmapped group
GROUP_ELEMENTS = 1 << 18


def _numel(tree: Tree) -> int:
    return sum(t.numel() for t in tree_leaves(tree))


def _stack_batches(per_member: tuple[list, ...]) -> list[tuple[Tensor, ...]]:
    """Members' batch sequences (one list of ``(x, y, ...)`` per member) as one sequence whose every
    batch tensor has a leading member axis."""
    return [tuple(torch.stack(parts) for parts in zip(*step)) for step in zip(*per_member)]


class TruncatedBackprop(Estimator):
    """Exact gradient of each truncation's meta-loss. ``engine="autograd"`` (default, faster on CPU,
    see meta/unroll.py) or ``"func"`` (nested torch.func.grad); both give the same gradient.

    ``batch_members`` (default on): members whose tasks are the same function of ``(params, batch)``
    (equal :meth:`~tasks.base.Task.batch_key`) and that take the same number of inner steps this
    truncation are unrolled together (at most :data:`GROUP_ELEMENTS` inner parameters per group),
    ``torch.func.vmap`` over their stacked parameters, optimizer states and batches, and differentiated
    with one backward pass of their summed meta-losses. Why: an outer step on small tasks is bound by
    per-operator overhead (436,528 calls per outer step on tensors of a few thousand elements, session 7's
    profile), and a group of k members costs the calls of one (8 identical 64-32-32-10 MLPs, one thread:
    1.13 s -> 0.68 s per outer step). Same gradient as one member at a time up to float rounding
    (tests/test_batched_members.py); if the group's summed gradient is not finite, its members are redone
    one at a time, so a bad member is dropped exactly as it would be alone.
    """

    name = "tbptt"

    def __init__(self, *a, engine: str = "autograd", batch_members: bool = True, **kw):
        super().__init__(*a, **kw)
        if engine not in ("autograd", "func"):
            raise ValueError(f"engine must be 'autograd' or 'func', got {engine!r}")
        self.engine = engine
        self.batch_members = batch_members

    # -- members unrolled together ----------------------------------------------------------
    def member_groups(self, state: EstimatorState, ids: list[int]) -> list[list[int]]:
        """Groups (of at least 2, in member order) of ``ids`` that can be unrolled as one vmapped call:
        equal task :meth:`~tasks.base.Task.batch_key` (not None) and equal steps this truncation."""
        if not self.batch_members:
            return []
        by_key: dict[Any, list[int]] = {}
        for i in ids:
            m = state.members[i]
            key = self.task_of(m).batch_key()
            if key is not None:
                by_key.setdefault((key, self.steps_this_truncation(m)), []).append(i)
        groups = []
        for members in by_key.values():
            # at most GROUP_ELEMENTS parameters per group: the gain is per-call overhead, which only small
            # tasks pay, and a group keeps every member's unroll graph in memory at once
            size = max(1, GROUP_ELEMENTS // _numel(state.members[members[0]].params))
            groups += [members[j:j + size] for j in range(0, len(members), size)]
        return [g for g in groups if len(g) > 1]

    def _group_unroll(self, theta: Params, state: EstimatorState, group: list[int]):
        """One vmapped unroll of ``group``'s members and one backward of their finite meta-losses:
        ``(summed gradient or None, meta-losses, params, opt states, inner losses, finite flags)``; the
        gradient is None when no member is finite or when the sum is not finite."""
        ms = [state.members[i] for i in group]
        task = self.task_of(ms[0])
        n = self.steps_this_truncation(ms[0])
        train, valid = zip(*(self.batches(i, m, n) for i, m in zip(group, ms)))
        train, valid = _stack_batches(train), None if valid[0] is None else _stack_batches(valid)
        leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}

        def f(params, opt_state, tb, vb):
            ml, (p, s, losses) = unroll(self.lopt, task, leaves, params, opt_state, tb, self.meta_loss, vb)
            return ml, p, s, losses

        with torch.enable_grad():
            in_dims = (0, 0, 0, 0 if valid is not None else None)
            ml, params, opt_state, losses = vmap(f, in_dims=in_dims)(
                stack([m.params for m in ms]), stack([m.opt_state for m in ms]), train, valid)
            finite = torch.isfinite(ml) & torch.isfinite(losses).all(1)
            for p in tree_leaves(params):
                finite &= torch.isfinite(p.detach().reshape(len(group), -1)).all(1)
            flags = [bool(x) for x in finite]
            grad = None
            if any(flags):
                used = ml[torch.tensor(flags)].sum()
                grads = torch.autograd.grad(used, list(leaves.values()), allow_unused=True)
                grad = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(leaves.items(), grads)}
                if not all_finite(grad):
                    grad = None
        return grad, ml.detach(), detach(params), detach(opt_state), losses.detach(), flags

    def _member_results(self, theta, state, step, ids):
        outcomes: dict[int, tuple] = {}
        for group in self.member_groups(state, ids):
            grad, ml, params, opt_state, losses, flags = self._group_unroll(theta, state, group)
            if grad is None and any(flags):
                continue  # a used member's gradient is not finite: redo them one at a time, below
            first = True
            for j, (i, p, s) in enumerate(zip(group, unstack(params, len(group)), unstack(opt_state, len(group)))):
                g = None
                if flags[j]:  # the group's sum goes with its first used member, {} with the others
                    g, first = (grad if first else {}), False
                outcomes[i] = (g, ml[j], p, s, losses[j], flags[j])
        for i in ids:
            before, t0 = state.members[i], state.members[i].t
            if i in outcomes:
                g, info = self._finish(theta, state, i, self.steps_this_truncation(before), *outcomes[i])
            else:
                g, info = self.member_estimate(theta, state, i, step)
            yield i, before, t0, g, info


    def _grad(self, task, theta, m, train, valid):
        if self.engine == "func":
            def f(th):
                return unroll(self.lopt, task, th, m.params, m.opt_state, train, self.meta_loss, valid)

            return grad_and_value(f, has_aux=True)(theta)
        leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
        with torch.enable_grad():
            ml, aux = unroll(self.lopt, task, leaves, m.params, m.opt_state, train, self.meta_loss, valid,
                             grad_fn=autograd_grad_and_value)
            grads = torch.autograd.grad(ml, list(leaves.values()), allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(leaves.items(), grads)}
        return g, (ml.detach(), aux)

    def member_estimate(self, theta, state, i, step):
        m = state.members[i]
        task = self.task_of(m)
        n = self.steps_this_truncation(m)
        train, valid = self.batches(i, m, n)
        g, (ml, (params, opt_state, losses)) = self._grad(task, theta, m, train, valid)
        finite = bool(torch.isfinite(ml)) and bool(torch.isfinite(losses).all()) and all_finite(params)
        return self._finish(theta, state, i, n, g if all_finite(g) else None, ml, params, opt_state, losses,
                            finite)

    def _finish(self, theta, state, i, n, g, ml, params, opt_state, losses, finite):
        """Member ``i``'s truncation of ``n`` steps done: keep its new state, advance it (a new episode
        if it ended or anything was not finite) and say what it contributes. ``g`` None with ``finite``:
        its meta-gradient was not finite."""
        m = state.members[i]
        task = self.task_of(m)
        m.params, m.opt_state = detach(params), detach(opt_state)
        self._advance(theta, state, i, n, finite and g is not None)
        progress = {"log_losses": self._log_losses(task, losses)} if self.sampler.curated else {}
        if not finite or g is None:  # counted and restarted in _advance; contributes no gradient
            return None, {"meta_loss": None, "inner_loss": None,
                          "nonfinite": NONFINITE_GRAD if finite else NONFINITE_LOSS, **progress}
        return g, {"meta_loss": float(ml), "inner_loss": float(losses[-1].detach()), "nonfinite": None, **progress}


class TruncatedES(Estimator):
    """Antithetic ES; ``pairs`` perturbations per member, all 2*pairs unrolls in one vmapped call."""

    name = "es"

    def __init__(self, *a, sigma: float = 0.01, pairs: int = 1, **kw):
        super().__init__(*a, **kw)
        if sigma <= 0 or pairs < 1:
            raise ValueError("sigma must be > 0 and pairs >= 1")
        self.sigma, self.pairs = sigma, pairs

    def _eps(self, theta: Params, step: int, i: int) -> Params:
        g = seeded("eps", self.seed, step, i)
        return {k: torch.randn((self.pairs, *v.shape), generator=g, dtype=v.dtype) * self.sigma
                for k, v in sorted(theta.items())}

    def _signed_thetas(self, theta: Params, eps: Params) -> Params:
        return {k: torch.cat([theta[k] + eps[k], theta[k] - eps[k]]) for k in theta}

    def _run(self, theta_pm, m: Member, train, valid, in_dims_state):
        task = self.task_of(m)

        def f(th, params, opt_state):
            ml, (p, s, losses) = unroll(self.lopt, task, th, params, opt_state, train, self.meta_loss, valid)
            return ml, p, s, losses

        return vmap(f, in_dims=(0, in_dims_state, in_dims_state))(theta_pm, m.params, m.opt_state)

    def _clean(self, task: Task, ml: Tensor, losses: Tensor) -> tuple[Tensor, bool]:
        """Map non-finite meta-losses to the worst value; report whether the raw inner losses were
        all finite (the normaliser hides NaN losses from the meta-loss, not from this check)."""
        worst = meta_term(task, torch.tensor(float("inf")), self.meta_loss)
        finite = bool(torch.isfinite(ml).all()) and bool(torch.isfinite(losses).all())
        return torch.where(torch.isfinite(ml), ml, worst), finite

    def _grad(self, ml: Tensor, direction: Params) -> Params:
        diff = (ml[: self.pairs] - ml[self.pairs:]) / (2 * self.sigma**2)
        return {k: torch.einsum("p,p...->...", diff, v) / self.pairs for k, v in direction.items()}

    state_in_dims: int | None = None  # all 2*pairs unrolls start from the member's one shared state

    def _carry(self, m: Member, params: Tree, opt_state: Tree, eps: Params) -> Params:
        """Keep the state for the next truncation; returns the direction the estimate multiplies."""
        # truncated ES: the persistent trajectory continues along the first "+" member
        m.params = tree_map(lambda t: t[0].detach(), params)
        m.opt_state = tree_map(lambda t: t[0].detach(), opt_state)
        return eps

    def member_estimate(self, theta, state, i, step):
        m = state.members[i]
        task = self.task_of(m)
        n = self.steps_this_truncation(m)
        train, valid = self.batches(i, m, n)
        eps = self._eps(theta, step, i)
        ml, params, opt_state, losses = self._run(self._signed_thetas(theta, eps), m, train, valid,
                                                  self.state_in_dims)
        ml, finite = self._clean(task, ml, losses)
        direction = self._carry(m, params, opt_state, eps)
        finite = finite and all_finite(m.params)
        g = self._grad(ml, direction)
        grad_finite = all_finite(g)
        self._advance(theta, state, i, n, finite and grad_finite)
        progress = {"log_losses": self._log_losses(task, losses)} if self.sampler.curated else {}
        if not grad_finite:
            return None, {"meta_loss": None, "inner_loss": None,
                          "nonfinite": NONFINITE_GRAD if finite else NONFINITE_LOSS, **progress}
        if not finite and bool((ml == ml[0]).all()):
            # every signed unroll scored the same (all diverged at once, each the worst meta-loss): the
            # estimate is exactly zero, carries no information and would only dilute the others
            return None, {"meta_loss": None, "inner_loss": None, "nonfinite": NONFINITE_LOSS, **progress}
        # non-finite unrolls that differ from their partners still contribute (they score the worst
        # value); the logged inner loss is the mean final loss of the finite ones (None: none finite)
        last = losses[:, -1].detach()
        last = last[torch.isfinite(last)]
        return g, {"meta_loss": float(ml.mean()), "inner_loss": float(last.mean()) if last.numel() else None,
                   "nonfinite": None if finite else NONFINITE_LOSS, **progress}


class PES(TruncatedES):
    """Persistent evolution strategies: +/- inner states per pair and accumulated perturbations."""

    name = "pes"

    def _init_extra(self, theta, m):
        two_p = 2 * self.pairs
        m.params = tree_map(lambda t: t.unsqueeze(0).repeat(two_p, *[1] * t.dim()), m.params)
        m.opt_state = tree_map(lambda t: t.unsqueeze(0).repeat(two_p, *[1] * t.dim()), m.opt_state)
        m.extra = {"xi": {k: torch.zeros((self.pairs, *v.shape), dtype=v.dtype) for k, v in theta.items()}}

    state_in_dims = 0  # each of the 2*pairs unrolls continues its own persistent state

    def _carry(self, m, params, opt_state, eps):
        m.params, m.opt_state = detach(params), detach(opt_state)
        m.extra = {"xi": {k: m.extra["xi"][k] + eps[k] for k in eps}}
        return m.extra["xi"]


ESTIMATORS = {"tbptt": TruncatedBackprop, "es": TruncatedES, "pes": PES}


def clip_meta_grad(grad: Params, value: float | None = 3.0, norm: float | None = None) -> tuple[Params, float]:
    """Value clipping (VeLO uses +-3) then optional global-norm clipping; returns the pre-clip norm."""
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grad.values()))
    if value:
        grad = {k: torch.clamp(g, -value, value) for k, g in grad.items()}
    if norm:
        clipped = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grad.values()))
        if clipped > norm:
            grad = {k: g * (norm / clipped) for k, g in grad.items()}
    return grad, total
