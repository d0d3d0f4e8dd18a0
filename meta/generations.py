"""Recursive meta-generations: generation k's learned optimizer meta-trains generation k+1.

One generation, in order, each step resumable (a crash loses at most the outer steps since the last
checkpoint, never a finished generation):

0. **search** (successors only, when ``gen.search_candidates > 0``): the successor's architecture is
   chosen among proposals inside the governor's bounds by successive halving on the *selection* split
   (:mod:`meta.search`; cached in the generation's ``search.json``, recorded in its lineage entry).
1. **candidate**: a learned optimizer (``lo``, or ``lo`` + ``gen.successor_lo`` for successors, or the
   search's winner) is meta-trained for the generation's budget by the *incumbent* (the latest adopted
   generation, bound to its weights and wrapped by :func:`optimizers.transforms.scale_updates`; Adam
   before any adoption). It starts from the incumbent's weights when the architecture allows and
   ``gen.start == "incumbent"``, else from a fresh seeded initialisation.
2. **control**: the same successor meta-trained by Adam with the same budget, seeds and start, so the
   run measures whether the recursion pays. (No control when the incumbent *is* Adam: it would be the
   candidate itself.)
3. **review**: :class:`meta.governor.Governor` gathers evidence (the control rides along in the
   decision-split evaluation for the report) and returns a verdict; the review is cached in the
   generation's directory before the lineage entry is written.
4. **lineage**: weights + the verdict + evidence summary + hashes are appended to
   :class:`meta.lineage.Lineage`. ``adopt`` verdicts are adopted at once in ``auto`` approval mode;
   ``hold`` verdicts (rate limiter) and, in ``file`` / ``prompt`` mode, every passing verdict wait as
   *pending* for ``train.py approve RUN GEN`` / ``reject`` (or a y/n on the terminal).

Around each generation the safety layer (:mod:`meta.safety`) acts: before it, a frozen run exits (status
5), accelerating adoptions freeze the run (emergency stop), ``gen.patience`` generations without an
adoption end it, and the incumbent's gain is re-checked on fresh test tasks (rolled back if no longer
significant); its review is refused under another goal than the lineage records.

Under ``torchrun`` (several processes) every rank runs this loop in lockstep: meta-training and the
governor's evaluations are sharded (:mod:`meta.distributed`), while everything that touches the run
directory -- the config check, lineage reads and appends, weights, the review cache, reports, W&B --
happens on rank 0 alone (:func:`meta.distributed.run_on_main`) and its outcome is broadcast, so every
rank takes the same branch without a shared filesystem. The verdict is rank 0's (the step-time bound
is a timing, which differs between processes). ``prompt`` approval falls back to ``approve``/``reject``
commands under torchrun (only one process has a terminal); the approval poll is one broadcast per
``gen.poll_seconds``, so no collective waits on a human.

How a learned optimizer is scaled to be an outer optimizer: its features are normalised per tensor
and the meta-gradients it sees are clipped element-wise (``meta.grad_clip_value``) before they reach
it, so gradient scale does not matter; its *step size* was learned for inner tasks, so every update is
multiplied by ``gen.outer_scale`` (default ``meta.outer_lr / lo.nominal_lr``: the learned nominal Adam
term then starts exactly at the outer learning rate Adam would use, and the MLP term and learned
schedule keep their learned size relative to it). The outer step counter plays the role of the inner
step counter in the time features: an outer run of a few hundred steps is inside the range of inner
horizons the optimizer was meta-trained on.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from meta import distributed as D
from meta import safety
from meta.config import GenConfig, RunConfig
from meta.eval_cache import EvalCache
from meta.evidence import Evidence
from meta.governor import Candidate, Governor, Verdict
from meta.lineage import (ADOPTED, KEY_ENV, PENDING, REJECTED, Lineage, LineageError, canonical_hash, lineage_key,
                          weights_digest)
from meta.search import BriefMetaTraining, SelectionScorer, search
from meta.trainer import MetaTrainer, outer_update_scale
from optimizers import checkpoint as ckpt
from optimizers.base import Optimizer
from optimizers.hand import Adam
from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig
from optimizers.transforms import scale_updates
from optimizers.tree import Params
from tasks import get_distribution, seeded

STOP_FILE = "STOP"


# what a generations run writes at its top level (``wandb`` when W&B logs there); ``--overwrite``
# deletes a directory only if everything in it is one of these
RUN_LAYOUT = re.compile(r"^(config\.json|report\.(json|md|png)|STOP|\.run\.lock|lineage|wandb|gen-\d{4}|"
                        r"alerts(\.jsonl)?|lineage\.png)$")


def clear_run_dir(run_dir: str | Path) -> None:
    """Delete a generations run directory for ``--overwrite``, refusing anything this project did not write.

    Why: ``--overwrite`` used to ``rmtree`` whatever ``--out-dir`` named, so a typo could delete a user's
    own files. A missing or empty directory is fine; otherwise every top-level entry must belong to the
    generations layout (:data:`RUN_LAYOUT`), else a :class:`ConfigError` names the foreign entries."""
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"--overwrite: {run_dir} is a file, not a generations run directory; not deleted")
    foreign = sorted(p.name for p in run_dir.iterdir() if not RUN_LAYOUT.match(p.name))
    if foreign:
        raise ConfigError(f"--overwrite: {run_dir} holds files a generations run does not write "
                          f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); refusing to delete it. "
                          f"Choose another --out-dir or remove it yourself")
    shutil.rmtree(run_dir)


def _review_digest(data: dict) -> str:
    """Digest of a cached review's verdict and evidence: sha256, or HMAC-SHA256 under
    ``OUROBOROS_LINEAGE_KEY`` (then an edited review cannot be re-signed without the key). A review that
    does not match is done again, not trusted: a "reject" edited into "adopt" must not reach the lineage."""
    return canonical_hash({"verdict": data.get("verdict"), "evidence": data.get("evidence")}, lineage_key())


def gen_dir(run_dir: Path, g: int) -> Path:
    return Path(run_dir) / f"gen-{g:04d}"


def outer_scale(cfg: RunConfig, lo: LOConfig) -> float:
    """The update scale of a generation with config ``lo`` used as an outer optimizer."""
    return outer_update_scale(cfg.meta, lo, cfg.gen.outer_scale)


def lo_config_for(cfg: RunConfig, g: int) -> LOConfig:
    """Generation ``g``'s architecture without a search: ``lo``, plus ``gen.successor_lo`` for successors
    (with ``gen.search_candidates`` on, the base the successor search proposes around)."""
    if g == 0:
        return cfg.lo
    return LOConfig.from_dict({**cfg.lo.to_dict(), **cfg.gen.successor_overrides()})


class LoopTrainer:
    """The governor's loop check: meta-train a fresh successor for a few steps with a given outer optimizer
    from a fixed start (same seeds for every outer optimizer compared)."""

    def __init__(self, cfg: RunConfig, lo: LOConfig, seed: int):
        # outer_decay 0: the check compares outer optimizers at a constant Adam rate, as it always has
        self.cfg = replace(cfg, lo=lo, meta=replace(cfg.meta, population=cfg.gov.loop_population, seed=seed,
                                                    outer_decay=0.0), wandb="disabled")
        self.lopt = LearnedOptimizer(lo)
        self.seed = seed

    def __call__(self, outer: Optimizer | None, steps: int) -> Params:
        cfg = replace(self.cfg, meta=replace(self.cfg.meta, outer_steps=steps))  # T of a horizon-aware outer
        trainer = MetaTrainer(cfg, outer=outer or Adam(lr=self.cfg.meta.outer_lr),
                              theta=self.lopt.init_theta(seeded("loop_theta", self.seed)))
        for _ in range(steps):
            trainer.train_step()
        return trainer.theta


def train_task_indices(trainer: MetaTrainer, limit: int) -> list[int]:
    """The meta_train-split task indices the trainer's members actually trained on, in order seen."""
    est = trainer.estimator
    seen: dict[int, None] = {}
    members = trainer.member_scalars()  # every member, also when the population is sharded
    last = max((m["episode"] for m in members), default=0)
    for e in range(last + 1):
        for i, m in enumerate(members):
            if e <= m["episode"]:
                seen.setdefault(est.task_index(i, e), None)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)


class GenerationRunner:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, progress: bool = True,
                 should_stop: Callable[[], bool] = lambda: False, prompt: Callable[[str], str] | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.lineage = Lineage(self.run_dir)
        self.progress = progress
        self._should_stop = should_stop
        self.prompt = prompt
        self._log = log or (lambda s: print(f"[ouroboros] {s}", flush=True))
        self.dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
        # reviews re-run tuned Adam and the incumbent on the same tasks: keep their results (identical)
        self.eval_cache = EvalCache()

    # ---- control ------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        if D.is_main():
            self._log(text)

    def should_stop(self) -> bool:
        """A stop request (Ctrl-C, a STOP file in the run directory) seen by *any* rank stops every rank."""
        return D.any_true(self._should_stop() or (self.run_dir / STOP_FILE).exists())

    def state(self):
        """The lineage's state as rank 0 reads it (the only rank that writes it)."""
        return D.run_on_main(self.lineage.state)

    def check_config(self) -> None:
        """A run directory holds one run: refuse to continue it under a different config."""
        path = self.run_dir / "config.json"
        mine = self.cfg.to_dict()
        if path.exists():
            old = json.loads(path.read_text())
            # bounds on the run's length may change between invocations; nothing else may
            for key, value in _SEARCH_DEFAULTS.items():  # a run written before the search existed: off
                old.setdefault("gen", {}).setdefault(key, value)
            for d in (old, mine):
                for key in ("max_generations", "approval", "poll_seconds", "patience"):
                    d.get("gen", {}).pop(key, None)
                for key in ("wandb", "wandb_project", "threads", "out_dir"):
                    d.pop(key, None)
            if old != mine:
                diff = sorted(_diff_keys(old, mine))
                raise ConfigError(f"{self.run_dir} holds a generations run with a different config "
                                  f"(differs in {diff}); use a new --out-dir or --overwrite")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_json(path, self.cfg.to_dict())

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run generations until ``max_generations`` are in the lineage or a stop request; the result's
        ``stopped`` says which (a STOP file left in the run directory stops a relaunch at once, and the
        log says so)."""
        with contextlib.ExitStack() as held:
            # rank 0 holds the run for the whole process (a second `generations` on it is refused)
            D.run_on_main(lambda: held.enter_context(self.lineage.run_lock()) and None)
            return self._run()

    def _run(self) -> dict[str, Any]:
        D.run_on_main(self.check_config)
        D.run_on_main(self.lineage.verify)
        D.run_on_main(self.check_goal)
        if (self.run_dir / STOP_FILE).exists():
            self.log(f"{self.run_dir / STOP_FILE} exists: not starting; remove it to continue the run")
        frozen, patience = False, False
        while not self.should_stop():
            st = self.state()
            if st.frozen:  # frozen by hand, or by an earlier emergency stop: no work until a person unfreezes
                self.log(f"the run is frozen (lineage entry {st.freeze['index']}, by {st.freeze.get('by')}: "
                         f"{st.freeze.get('reason')}); nothing is adopted until `python train.py unfreeze "
                         f"{self.run_dir} --by NAME --reason TEXT`")
                frozen = True
                break
            if self.check_runaway():
                frozen = True
                break
            pending = [g for g, s in st.status.items() if s == PENDING]
            if pending:
                if not self.wait_for_approval(pending[0]):
                    break
                continue
            g = len(st.records)
            if g >= self.cfg.gen.max_generations:
                break
            idle = safety.generations_without_adoption(st)
            if self.cfg.gen.patience and idle >= self.cfg.gen.patience:
                self.log(f"diminishing returns: no adoption in the last {idle} generation(s) (gen.patience "
                         f"{self.cfg.gen.patience}); the run stops")
                patience = True
                break
            if not self.sustain_check(g):
                break
            if not self.run_generation(g):
                break
        if not frozen:  # an adoption just before a stop request is still checked for a runaway
            frozen = self.check_runaway()
        stopped = self.should_stop()  # collective: every rank gets the same answer
        from meta.generations_report import write_report

        paths = D.run_on_main(write_report, self.run_dir)
        st = self.state()
        who = f"gen-{st.incumbent}" if st.incumbent is not None else "tuned Adam (none adopted)"
        self.log(f"lineage: {len(st.records)} generation(s), incumbent {who}; report {paths['md']}")
        return {"state": st, "report": paths, "stopped": stopped, "frozen": frozen, "patience_stop": patience}

    # ---- the safety layer (meta.safety) ---------------------------------------------------------
    def goal(self) -> dict[str, Any]:
        return safety.goal_of(self.cfg, self.dist)

    def check_goal(self) -> None:
        """Refuse to review under another goal than the lineage's (rank 0)."""
        safety.check_goal(self.lineage.state(), self.goal(), self.run_dir)

    def check_runaway(self) -> bool:
        """Emergency stop if the last adoptions accelerate; True if the run is (now) frozen."""
        return bool(D.run_on_main(self._check_runaway))

    def _check_runaway(self) -> bool:
        c = self.cfg.gov
        entries = self.lineage.verify(check_weights=False)
        if self.lineage.state(entries).frozen:
            return True
        streak = safety.runaway_streak(entries, c.runaway_window, c.runaway_factor)
        if streak is None:
            return False
        return self.emergency_stop(
            f"runaway: the improvements of generations {streak['generations']} "
            f"({', '.join(f'{x:+.3f}' for x in streak['improvements'])}) each grew by more than "
            f"{c.runaway_factor:g}x over {c.runaway_window} adoptions", revert_to=streak["revert_to"], evidence=streak)

    def emergency_stop(self, reason: str, revert_to: int | None, evidence: dict) -> bool:
        """Freeze the run, revert the incumbent, alert (log, alerts.jsonl, report, W&B); rank 0."""
        e = self.lineage.append_freeze("governor", reason, revert_to=revert_to, source="runaway", evidence=evidence)
        who = f"generation {revert_to}" if revert_to is not None else "tuned Adam"
        text = (f"{reason}. The run is frozen (lineage entry {e['index']}) and the incumbent reverted from "
                f"{'gen-' + str(e['from']) if e['from'] is not None else 'tuned Adam'} to {who}; nothing is adopted "
                f"until a person runs `python train.py unfreeze {self.run_dir} --by NAME --reason TEXT`.")
        safety.alert(self.run_dir, "EMERGENCY STOP", text, wandb=self.cfg.wandb, project=self.cfg.wandb_project,
                     log=self.log, entry=e["index"], kind="runaway")
        return True

    def sustain_check(self, g: int) -> bool:
        """Success-story criterion before generation ``g``: re-check the incumbent against the generation it
        was judged against on fresh test tasks; roll it back if its gain is no longer significant. False
        if asked to stop."""
        c = self.cfg.gov
        st = self.state()
        if not c.sustain_tasks or st.incumbent is None or g == 0:
            return True
        entries = D.run_on_main(self.lineage.entries)
        if any(e.get("kind") == "sustain" and e.get("generation") == g for e in entries):
            return True  # done before a restart
        inc = st.incumbent
        parent = safety.judged_against(st.records[inc])
        indices = safety.sustain_indices(entries, g, c.sustain_tasks)
        opts = {"incumbent": self._load_generation(inc).bind()}
        if parent is not None:
            opts["parent"] = self._load_generation(parent).bind()
        self.log(f"gen {g}: sustained-gain check of gen-{inc} against "
                 f"{'gen-' + str(parent) if parent is not None else 'tuned Adam'} on test tasks "
                 f"{indices[0]}..{indices[-1]}")
        from meta.evaluate import evaluate
        from meta.governor import TaskSubset

        with torch.no_grad():
            res = evaluate(opts, TaskSubset(self.dist, indices), split="test", num_tasks=len(indices),
                           horizon=self.cfg.meta.horizon, long_horizon=self.cfg.meta.horizon, adam_lrs=c.adam_lrs,
                           sgdm_lrs=None, seed=c.seed, progress=self.progress)
        inc_s = res.task_scores("incumbent", "H")
        par_s = res.task_scores("parent", "H") if parent is not None else [0.0] * len(inc_s)
        diffs = [b - a for a, b in zip(inc_s, par_s)]
        diverged = len(res.diverged_tasks("incumbent", "H", c.diverge_factor))
        decision = safety.decide_sustain(diffs, safety.pooled_diffs(entries, inc, parent), diverged, c)
        rollback = not decision["passed"] and c.sustain_rollback
        entry = {"generation": g, "incumbent": inc, "parent": parent, "split": "test", "task_indices": indices,
                 "horizon": self.cfg.meta.horizon, "incumbent_scores": inc_s, "parent_scores": par_s,
                 "diffs": diffs, **decision, "action": "rollback" if rollback else "none"}
        if rollback:
            entry["to"] = parent
        entry = D.broadcast_object(entry)

        def write() -> None:
            e = self.lineage.append_sustain(entry)
            what = (f"gain no longer significant: incumbent rolled back to "
                    f"{'gen-' + str(parent) if parent is not None else 'tuned Adam'}" if rollback else
                    ("gain sustained" if decision["passed"] else "gain no longer significant (rollback off)"))
            self.log(f"gen {g}: sustained-gain check of gen-{inc}: {what}; {decision['reason']} (entry {e['index']})")

        D.run_on_main(write)
        return not self.should_stop()

    def _load_generation(self, g: int) -> Candidate:
        path = self.lineage.root / self.state().records[g]["weights"]
        tensors, meta = D.load_checkpoint(path)
        lopt, theta = ckpt.learned_optimizer_from(tensors, meta, path)
        return Candidate(f"gen-{g}", lopt, theta, horizon=self.cfg.meta.horizon,
                         outer_scale=outer_scale(self.cfg, lopt.config))

    def incumbent(self) -> tuple[int | None, Candidate | None, Path | None]:
        """The adopted generation, as a candidate, and where its weights are (all None before one is)."""
        st = self.state()
        if st.incumbent is None:
            return None, None, None
        path = self.lineage.root / st.records[st.incumbent]["weights"]
        tensors, meta = D.load_checkpoint(path)  # rank 0 reads (hash-checked) and broadcasts
        lopt, theta = ckpt.learned_optimizer_from(tensors, meta, path)
        return st.incumbent, Candidate(f"gen-{st.incumbent}", lopt, theta, horizon=self.cfg.meta.horizon,
                                       outer_scale=outer_scale(self.cfg, lopt.config)), path

    def _arm_config(self, g: int, arm: str, lo: LOConfig, trained_by: str) -> RunConfig:
        meta = self.cfg.meta
        steps = meta.outer_steps if g == 0 else self.cfg.gen.outer_steps
        return replace(self.cfg, lo=lo, out_dir=str(gen_dir(self.run_dir, g) / arm),
                       meta=replace(meta, seed=meta.seed + g, outer_steps=steps, outer_optimizer=trained_by))

    def _meta_train(self, g: int, arm: str, lo: LOConfig, outer: Optimizer, trained_by: str, outer_path: str,
                    start: Params) -> MetaTrainer | None:
        """Meta-train (or resume) one arm; None if asked to stop before it finished."""
        from meta.logging import MetricsLogger

        cfg = self._arm_config(g, arm, lo, outer_path)
        path = Path(cfg.out_dir) / "checkpoint"
        if D.run_on_main(ckpt.exists, path):  # rank 0 looks; MetaTrainer.load broadcasts what it reads
            trainer = MetaTrainer.load(path, cfg, outer=outer)
        else:
            trainer = MetaTrainer(cfg, outer=outer, theta={k: v.clone() for k, v in start.items()})
        if trainer.step >= cfg.meta.outer_steps:
            return trainer
        logger = None
        if D.is_main():  # rank 0 alone logs (JSONL + W&B)
            logger = MetricsLogger(cfg.out_dir, mode=cfg.wandb, project=cfg.wandb_project, config=cfg.to_dict(),
                                   name=f"{self.run_dir.name}-gen{g}-{arm}", group=self.run_dir.name,
                                   job_type=arm, resume_id=trainer.wandb_id)
            trainer.wandb_id = logger.wandb_id
            logger.truncate_after(trainer.step)
        self.log(f"gen {g} {arm}: meta-training by {trained_by} for {cfg.meta.outer_steps} outer steps "
                 f"(from step {trainer.step})")
        try:
            trainer.train(progress=self.progress, logger=logger, should_stop=self.should_stop)
            trainer.save()
        finally:
            if logger is not None:
                logger.finish()
        return trainer if trainer.step >= cfg.meta.outer_steps else None

    def _start(self, g: int, lo: LOConfig, incumbent: Candidate | None,
               inc_gen: int | None) -> tuple[Params, int | None]:
        """Generation ``g``'s starting weights for architecture ``lo`` and the generation they came from:
        the incumbent's when ``gen.start`` is ``incumbent`` and the architecture is the same, else fresh."""
        if self.cfg.gen.start == "incumbent" and incumbent is not None and incumbent.lopt.config == lo:
            return incumbent.theta, inc_gen
        return LearnedOptimizer(lo).init_theta(seeded("theta", self.cfg.meta.seed + g)), None

    def _outer(self, incumbent: Candidate | None) -> Optimizer:
        """The optimizer that meta-trains a successor: the incumbent, scaled (Adam before any adoption)."""
        return Adam(lr=self.cfg.meta.outer_lr) if incumbent is None else \
            scale_updates(incumbent.bind(), incumbent.outer_scale)

    def run_generation(self, g: int) -> bool:
        """Make generation ``g`` (resuming whatever part was done); False if stopped part-way."""
        t0 = time.time()
        inc_gen, incumbent, inc_path = self.incumbent()
        lo = lo_config_for(self.cfg, g)
        searched = None
        if self.cfg.gen.search_candidates and g > 0:
            searched = self.search_successor(g, lo, incumbent, inc_gen)
            if searched is None:
                return False
            lo = LOConfig.from_dict(searched["winner_lo_config"])
        start, parent = self._start(g, lo, incumbent, inc_gen)
        trained_by = "adam" if incumbent is None else incumbent.name
        outer_path = "adam" if incumbent is None else str(inc_path)
        outer = self._outer(incumbent)

        cand = self._meta_train(g, "candidate", lo, outer, trained_by, outer_path, start)
        if cand is None:
            return False
        control = None
        if self.cfg.gen.control and incumbent is not None:
            control = self._meta_train(g, "control", lo, Adam(lr=self.cfg.meta.outer_lr), "adam", "adam", start)
            if control is None:
                return False
        verdict, ev = self.review(g, cand, control, incumbent)
        self.record(g, cand, control, verdict, ev, parent=parent, trained_by=trained_by, seconds=time.time() - t0,
                    search=searched)
        return True

    def search_successor(self, g: int, base: LOConfig, incumbent: Candidate | None,
                         inc_gen: int | None) -> dict[str, Any] | None:
        """Generation ``g``'s architecture by search (:mod:`meta.search`): its record, whose
        ``winner_lo_config`` is the architecture; None if asked to stop part-way. The record is cached in
        the generation's ``search.json`` (with a digest: an edited one is searched again), so a restart
        after the search does not repeat it."""
        c = self.cfg
        path = gen_dir(self.run_dir, g) / "search.json"
        data = D.run_on_main(_read_json, path)
        if data is not None and data.get("base") == base.to_dict() and \
                canonical_hash(data.get("record"), lineage_key()) == data.get("digest"):
            return data["record"]
        trained_by = "adam" if incumbent is None else incumbent.name
        train = BriefMetaTraining(c, seed=c.meta.seed + g, outer=lambda: self._outer(incumbent),
                                  start=lambda lo: self._start(g, lo, incumbent, inc_gen)[0])
        scorer = SelectionScorer(self.dist, c.gov, c.meta.horizon, c.gen.search_tasks, progress=self.progress,
                                 cache=self.eval_cache)
        self.log(f"gen {g}: searching {c.gen.search_candidates} successor architectures (selection split, "
                 f"{c.gen.search_tasks} tasks)")
        result = search(base, c.gen.search_candidates, c.gen.search_budget, c.gov, seed=c.meta.seed, generation=g,
                        train=train, scorer=scorer, should_stop=self.should_stop, outer=trained_by, log=self.log)
        if result is None:
            return None
        assert result.record["split"] == "selection", "the governor's decision split must never choose"
        record = D.broadcast_object(_jsonable(result.record))  # rank 0's (its timing)
        self.log(f"gen {g}: search winner: proposal {record['winner']} {result.winner.changes or '(the base)'}")
        D.run_on_main(ckpt.atomic_write_json, path, {"base": base.to_dict(), "record": record,
                                                      "digest": canonical_hash(record, lineage_key())})
        return record

    def review(self, g: int, cand: MetaTrainer, control: MetaTrainer | None,
               incumbent: Candidate | None) -> tuple[Verdict, Evidence]:
        path = gen_dir(self.run_dir, g) / "review.json"
        data = D.run_on_main(_read_json, path)
        if data is not None and _review_digest(data) == data.get("digest"):
            # reviewed before a crash: deterministic, reuse
            return Verdict(**data["verdict"]), Evidence.from_json(data["evidence"])
        if data is not None:
            self.log(f"gen {g}: the cached review {path} does not match its digest (edited, damaged, or "
                     f"signed with another {KEY_ENV}); reviewing again")
        D.run_on_main(self.check_goal)  # never review under another goal than the lineage records
        lo = cand.lopt.config
        candidate = Candidate(f"gen-{g}", cand.lopt, cand.theta,
                              train_task_indices=train_task_indices(cand, self.cfg.gov.train_tasks),
                              horizon=self.cfg.meta.horizon, outer_scale=outer_scale(self.cfg, lo))
        # the loop check trains the plain successor architecture: with the search on, generation g + 1's
        # own is not known until its search, which needs this verdict's incumbent
        loop = LoopTrainer(self.cfg, lo_config_for(self.cfg, g + 1), seed=self.cfg.meta.seed + 7919 * (g + 1))
        gov = Governor(self.cfg.gov, self.dist, self.cfg.meta.horizon, loop_trainer=loop, progress=self.progress,
                       cache=self.eval_cache)
        extra = {"control": control.lopt.bind(control.theta)} if control is not None else None
        self.log(f"gen {g}: governor reviewing {candidate.name} against "
                 f"{incumbent.name if incumbent else 'tuned Adam'}")
        verdict, ev = gov.review(candidate, incumbent, extra)  # evaluations sharded across ranks
        self.log(f"gen {g}: review done; evaluation cache: {self.eval_cache.hits} task records reused, "
                 f"{self.eval_cache.misses} computed")
        results, ev.held_out_results = ev.held_out_results, None  # written apart, not into review.json
        verdict, ev = D.broadcast_object((verdict, ev))  # rank 0's: its step-time bound decides for all

        def write() -> None:
            if results is not None:
                ckpt.atomic_write_json(gen_dir(self.run_dir, g) / "held_out_results.json", results.to_json())
            body = {"verdict": verdict.to_dict(), "evidence": _jsonable(ev.to_json())}
            ckpt.atomic_write_json(path, {**body, "digest": _review_digest(body)})

        D.run_on_main(write)
        return verdict, ev

    def record(self, g: int, cand: MetaTrainer, control: MetaTrainer | None, verdict: Verdict, ev: Evidence, *,
               parent: int | None, trained_by: str, seconds: float, search: dict | None = None) -> dict:
        """Write the weights and append the lineage entry (rank 0; every rank returns the entry)."""
        return D.run_on_main(self._record, g, cand, control, verdict, ev, parent=parent, trained_by=trained_by,
                             seconds=seconds, search=search)

    def _record(self, g: int, cand: MetaTrainer, control: MetaTrainer | None, verdict: Verdict, ev: Evidence, *,
                parent: int | None, trained_by: str, seconds: float, search: dict | None = None) -> dict:
        mode = self.cfg.gen.approval
        if verdict.decision == "reject":
            status = REJECTED
        elif verdict.decision == "hold" or mode in ("file", "prompt"):
            status = PENDING
        else:
            status = ADOPTED
        wpath, wsha = self.lineage.save_weights(g, cand.lopt, cand.theta)
        control_rec = None
        if control is not None:
            cpath = gen_dir(self.run_dir, g) / "control_lopt"
            ckpt.save_learned_optimizer(cpath, control.lopt, control.theta, generation=g, arm="control")
            control_rec = {"weights": str(cpath.relative_to(self.run_dir)), "trained_by": "adam",
                           "steps": control.step, "weights_sha256": weights_digest(cpath)}
        st = self.lineage.state()
        goal = self.goal()
        entry = {
            "kind": "generation",
            "generation": g,
            "status": status,
            "incumbent_at_review": None if trained_by == "adam" else int(trained_by.split("-", 1)[1]),
            "goal": goal if st.goal is None else None,  # generation 0's entry records the goal in full
            "goal_hash": safety.goal_digest(goal),
            "parent": parent,
            "parent_hash": st.records[parent]["hash"] if parent is not None else None,
            "trained_by": trained_by,
            "lo_config": cand.lopt.config.to_dict(),
            "num_theta": cand.lopt.num_theta(),
            "outer_steps": cand.step,
            "seed": cand.cfg.meta.seed,
            "distribution": self.dist.name,
            "distribution_digest": self.dist.digest(),
            "weights": wpath,
            "weights_sha256": wsha,
            "control": control_rec,
            "verdict": verdict.to_dict(),
            "metrics": summary_metrics(ev),
            "seconds": seconds,
        }
        if search is not None:  # absent when the search is off: such entries are as they always were
            entry["search"] = search
        def allowed(now) -> dict[str, Any] | None:
            """Under the lineage lock: the goal still holds, and a run frozen meanwhile adopts nothing."""
            if now.goal_hash is not None and now.goal_hash != entry["goal_hash"]:
                raise safety.GoalError(f"generation {g} was reviewed under another goal than the lineage's")
            if now.frozen and entry["status"] == ADOPTED:
                self.log(f"gen {g}: the run was frozen during this generation; its verdict waits as pending")
                return {"status": PENDING, "frozen_at_record": now.freeze["index"]}
            return None

        e = self.lineage.append(entry, precondition=allowed)
        status = e["status"]
        self.log(f"gen {g}: verdict {verdict.decision.upper()} -> {status}; " + " | ".join(verdict.reasons))
        head = self.lineage.head_of(e)  # logged apart from the lineage: a later truncation shows
        self.log(f"lineage head: {head['count']} entries, last hash {head['hash']}")
        self._wandb_generation(g, {**e, "lineage_head": head}, wpath, control_rec)
        return e

    def _wandb_generation(self, g: int, entry: dict, wpath: str, control_rec: dict | None) -> None:
        if self.cfg.wandb == "disabled":
            return
        from meta.logging import MetricsLogger

        logger = MetricsLogger(gen_dir(self.run_dir, g) / "verdict", mode=self.cfg.wandb,
                               project=self.cfg.wandb_project, name=f"{self.run_dir.name}-gen{g}-verdict",
                               group=self.run_dir.name, job_type="verdict", config={"generation": g})
        try:
            v = entry["verdict"]
            logger.log_table("verdict", ["check", "passed", "reason"],
                             [[k, c.get("passed"), c.get("reason", "")] for k, c in v["checks"].items()])
            logger.summary({"decision": v["decision"], "status": entry["status"], **entry["metrics"],
                            "lineage_count": entry["lineage_head"]["count"],
                            "lineage_hash": entry["lineage_head"]["hash"]})
            logger.log_artifact(self.lineage.root / wpath, name=f"{self.run_dir.name}-gen{g}",
                                aliases=["candidate", entry["status"]])
            if control_rec:
                logger.log_artifact(self.run_dir / control_rec["weights"], name=f"{self.run_dir.name}-gen{g}-control",
                                    aliases=["control"])
        finally:
            logger.finish()

    # ---- approval -----------------------------------------------------------------------------
    def wait_for_approval(self, g: int) -> bool:
        """Block until generation ``g``'s pending verdict is decided; False if asked to stop first."""
        st = self.state()
        if st.frozen:
            return True  # the loop exits on the freeze; approving is refused until a person unfreezes
        rec = st.records[g]
        if self.cfg.gen.approval == "prompt" and not D.active() and (self.prompt is not None or sys.stdin.isatty()):
            ask = self.prompt or input
            reasons = "\n  ".join(rec["verdict"]["reasons"])
            answer = ask(f"generation {g}: governor says {rec['verdict']['decision']}:\n  {reasons}\n"
                         f"adopt generation {g}? [y/N] ").strip().lower()
            self.lineage.append_approval(g, "approve" if answer in ("y", "yes") else "reject", by="prompt")
            return True
        self.log(f"gen {g}: verdict pending approval: run `python train.py approve {self.run_dir} {g}` or "
                 f"`python train.py reject {self.run_dir} {g}` (Ctrl-C or a {STOP_FILE} file to stop waiting)")
        while not self.should_stop():
            st = self.state()
            if st.status.get(g) != PENDING or st.frozen:  # a freeze ends the wait (the loop then exits)
                return True
            time.sleep(self.cfg.gen.poll_seconds)
        return False


# gen settings of the search, as a run directory written before they existed means them (the search off)
_SEARCH_DEFAULTS = {k: getattr(GenConfig(), k) for k in ("search_candidates", "search_budget", "search_tasks")}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def summary_metrics(ev: Evidence | dict) -> dict[str, float]:
    """Means of the held-out scores (log loss vs tuned Adam) by optimizer and horizon, for lineage/plots
    (:meth:`meta.evidence.Evidence.summary_metrics`; ``ev`` may be its JSON)."""
    return Evidence.from_json(ev).summary_metrics()


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return set() if a == b else {prefix}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


__all__ = ["GenerationRunner", "clear_run_dir", "Lineage", "LineageError", "LoopTrainer", "gen_dir", "lo_config_for", "outer_scale"]
