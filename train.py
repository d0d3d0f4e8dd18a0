#!/usr/bin/env python
"""Ouroboros command line.

    python train.py                       # default preset: meta-train, then evaluate (CPU, < 10 min)
    python train.py meta-train --preset smoke --out-dir runs/smoke
    python train.py meta-train --resume --out-dir runs/default      # continue an interrupted run
    python train.py evaluate --checkpoint runs/default/checkpoint
    python train.py evaluate --checkpoint runs/default/checkpoint --suite generalisation   # out-of-distribution
    python train.py presets               # list presets and their settings
    torchrun --nproc-per-node 4 train.py meta-train --resume auto ...   # the same run on 4 processes

Under torchrun (WORLD_SIZE > 1) the population and the evaluation tasks are sharded across processes
(gloo on CPU, NCCL on CUDA); rank 0 alone prints and writes files. ``--resume auto`` resumes when
OUT_DIR/checkpoint exists and starts a new run otherwise, so re-launching the same command after a
failure continues it; restarts by ``torchrun --max-restarts`` (TORCHELASTIC_RESTART_COUNT > 0) always
resume from the checkpoint if there is one. See README "Scaling out".

Every setting of the run config can be overridden: ``--meta.population 4``, ``--lo.hidden_width 16``,
``--eval.num_tasks 10`` (see ``python train.py meta-train --help``), or loaded from a JSON file with
``--config FILE``. Unknown keys are errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

PRESET_HELP = "named recipe: 'default' (the CPU run the README promises), 'smoke' (seconds, for tests)"


def presets() -> dict[str, Any]:
    from meta.config import EvalConfig, MetaConfig, RunConfig

    # Measured on the 2-core CPU machine (see README): raw-loss meta-objective (the acceptance metric is
    # a raw mean of final losses; log-loss LOs won more tasks but lost the hardest by large margins),
    # 400 outer steps of truncated backprop over 8 tasks, one torch thread (tiny ops: threads only add
    # synchronisation; under contention 2 threads were 10x slower), two processes (members and evaluation
    # tasks split over them: 1.7x faster on the 2-core machine, see README "Scaling out"); the outer
    # learning rate decays to 0 over the last 25% of the steps (the final iterate is otherwise noisy).
    # Loss features (lo.loss_features ema) measured better on held-out validation loss but far worse as
    # the outer optimizer of the governor's loop check (docs/ablation.md), so they stay an option.
    # Session 6 (README "Recursive generations"; docs/ablation.md rows default / logu20 /
    # controller_bound_1 / default_s6): the controller's per-element factor bounded to exp(+-1) (LOConfig's
    # own default, exp(+-2), stays for the checkpoints that rely on it): at bound 2 the factor it learned on
    # 8x8-digit MLPs made it no better an outer optimizer than Adam (the governor's loop check), at bound 1
    # it is better on each of four loop seeds but weaker on the inner tasks; and episodes of log-uniform
    # length 20..2000 (Celo's long-horizon recipe; each episode's length is the T of the fraction-of-
    # training features), which made it stronger on them (training loss at H and 10H). Together: adopted
    # by the governor as generation 0.
    from optimizers.learned import LOConfig

    default = RunConfig(
        meta=MetaConfig(meta_loss="train", outer_steps=400, outer_decay=0.25, schedule="log_uniform",
                        min_horizon=20, max_horizon=2000),
        lo=LOConfig(controller_bound=1.0),
        eval=EvalConfig(),
        out_dir="runs/default",
        threads=1,
        procs=2,
    )
    smoke = RunConfig(
        meta=MetaConfig(population=2, truncation=5, horizon=10, outer_steps=4),
        eval=EvalConfig(num_tasks=2, long_factor=2),
        out_dir="runs/smoke",
        checkpoint_every=2,
        wandb="disabled",
    )
    from meta.config import GenConfig, GovernorConfig

    smoke = replace(smoke, lo=LOConfig(hidden_width=8, hidden_layers=1),
                    gen=GenConfig(max_generations=2, outer_steps=2, poll_seconds=0.1),
                    gov=GovernorConfig(num_tasks=3, train_tasks=2, long_factor=2, adam_lrs=(1e-3, 1e-2, 1e-1),
                                       bootstrap=200, loop_steps=2, loop_population=2, loop_tasks=2,
                                       probe_tasks=1, probe_steps=3, sustain_tasks=3))
    return {"default": default, "smoke": smoke}


# ---- argument parsing ---------------------------------------------------------------------------
def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, generated from the dataclasses' annotations (meta.config_cli): a field
    added to a section appears here with its type, choices and comment, and no edit of this file."""
    from meta.config import SECTIONS, RunConfig
    from meta.config_cli import add_dataclass_flags

    base = presets()["default"]  # what a bare run uses (other presets: 'train.py presets')
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings ({cls.__name__})")
        add_dataclass_flags(group, cls, getattr(base, section), prefix=f"{section}.")
    add_dataclass_flags(p.add_argument_group("run settings"), RunConfig, base, prefix="", skip=tuple(SECTIONS))


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")
    return text


def _suite_tasks(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _suite_factors(text: str) -> tuple[int, ...]:
    from meta.generalisation import parse_factors

    try:
        return parse_factors(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _suite_groups(text: str) -> tuple[str, ...]:
    from meta.generalisation import GROUP_NAMES

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in GROUP_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown suite group(s) {bad or text!r}; groups: {','.join(GROUP_NAMES)}")
    return names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help=PRESET_HELP)
    p.add_argument("--config", type=Path, help="JSON file with a run config (same keys as 'presets' prints)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    for name, kw in (
        ("run", dict(help="meta-train then evaluate (what a bare 'python train.py' does)")),
        ("meta-train", dict(help="meta-train a learned optimizer",
                            description="Meta-train a learned optimizer on a task distribution; checkpoints "
                                        "to OUT_DIR/checkpoint, metrics to OUT_DIR/metrics.jsonl (+ W&B).")),
    ):
        p = sub.add_parser(name, **kw)
        _common(p)
        p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                       help="continue from OUT_DIR/checkpoint; '--resume auto': continue if it exists, else "
                            "start a new run (the same command can be re-launched after a failure; torchrun "
                            "--max-restarts restarts resume automatically)")
        p.add_argument("--overwrite", action="store_true", help="start over even if OUT_DIR has a checkpoint")
        _add_config_flags(p)

    p = sub.add_parser("evaluate", help="compare a learned optimizer with tuned Adam on held-out tasks",
                       description="Evaluate a learned-optimizer (or meta-training) checkpoint against Adam "
                                   "tuned on a learning-rate grid, SGD-momentum and the untrained learned "
                                   "optimizer, at the meta-training horizon and at long_factor x that. "
                                   "--suite generalisation: the learned optimizer against tuned Adam on "
                                   "tasks outside the meta-training distribution instead (see --suite).")
    _common(p)
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default OUT_DIR/checkpoint)")
    p.add_argument("--suite", choices=["default", "generalisation"], default="default",
                   help="'default': held-out tasks of the meta-training distribution (OUT_DIR/eval); "
                        "'generalisation': tasks outside it - image MLPs 8x wider / 2x deeper than the trained "
                        "ones, conv nets, linear/logistic regression, quadratics, tiny transformers (embedded "
                        "and generated data) - at H and the --suite-factors multiples of H, against tuned Adam "
                        "(eval.adam_lrs, eval.split, eval.seed, eval.horizon apply); writes "
                        "OUT_DIR/eval/generalisation/results.{json,md}, ratios.png")
    p.add_argument("--suite-tasks", type=_suite_tasks, default=None, metavar="N",
                   help="generalisation suite: tasks per group (default 4)")
    p.add_argument("--suite-factors", type=_suite_factors, default=None, metavar="F,...",
                   help="generalisation suite: longer horizons as multiples of H, e.g. '10' (default) or "
                        "'10,30' (30H costs about 3x the rest of the suite); '' for H only")
    p.add_argument("--suite-groups", type=_suite_groups, default=None, metavar="G,...",
                   help="generalisation suite: a subset of the groups wide,deep,image_conv,linear_regression,"
                        "logistic_regression,quadratic,tiny_transformer (default all)")
    _add_config_flags(p)

    p = sub.add_parser(
        "generations", help="recursive generations: gen k meta-trains gen k+1, a governor decides adoption",
        description="Generation 0 is meta-trained by Adam; generation k+1 by the incumbent (latest adopted) "
                    "generation's learned optimizer, with an Adam-trained control arm. A governor reviews each "
                    "candidate on held-out tasks (generalisation, meta-overfitting, 10x horizon, the loop "
                    "itself, bounds, rate limit) and the lineage in OUT_DIR/lineage records everything. "
                    "Re-running the same command resumes; a file OUT_DIR/STOP or Ctrl-C ends the run cleanly.")
    _common(p)
    p.add_argument("--max-generations", type=int, default=None, metavar="N",
                   help="generations in the lineage when the run ends (default gen.max_generations)")
    p.add_argument("--approval", choices=["auto", "prompt", "file"], default=None,
                   help="auto: adopt what the governor adopts (held verdicts wait); prompt: ask y/n; "
                        "file: wait for 'train.py approve/reject RUN GEN' (default gen.approval)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT_DIR's generations run and start over")
    _add_config_flags(p)

    p = sub.add_parser("lineage", help="show a generations run's lineage (table + plot), verifying its hash chain")
    p.add_argument("run", type=Path, help="the run directory (generations --out-dir)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p = sub.add_parser("rollback", help="make an earlier adopted generation the incumbent again")
    p.add_argument("run", type=Path)
    p.add_argument("generation", type=int)
    p.add_argument("--reason", default="", help="recorded in the lineage")
    for name, verb in (("approve", "adopt"), ("reject", "reject")):
        p = sub.add_parser(name, help=f"{verb} a generation whose verdict is pending (approval file mode / rate "
                                      f"limiter / capability ceiling)")
        p.add_argument("run", type=Path)
        p.add_argument("generation", type=int)
        p.add_argument("--by", default="", help="who decided (recorded in the lineage; required to approve a "
                                                "generation held by the capability ceiling)")
    p = sub.add_parser("freeze", help="freeze a generations run by hand: nothing is adopted until 'unfreeze'",
                       description="Emergency stop by hand: a freeze entry in the lineage (who, why), an alert "
                                   "(log, RUN/alerts.jsonl, the report, W&B when the run uses it); a running "
                                   "'generations' process exits with status 5 at its next check and adopts "
                                   "nothing; approvals are refused until 'unfreeze'.")
    p.add_argument("run", type=Path)
    p.add_argument("--by", required=True, help="who froze the run (recorded)")
    p.add_argument("--reason", required=True, help="why (recorded)")
    p.add_argument("--revert-to", default=None, metavar="GEN|adam",
                   help="also make this adopted generation (or 'adam': tuned Adam) the incumbent (default: keep it)")
    p = sub.add_parser("unfreeze", help="let a frozen generations run adopt again (a person, with a reason)")
    p.add_argument("run", type=Path)
    p.add_argument("--by", required=True, help="who unfroze the run (recorded)")
    p.add_argument("--reason", required=True, help="why (recorded)")
    p = sub.add_parser("change-goal", help="record a person's change of a run's goal (meta-objective, "
                                           "distribution, governor settings)",
                       description="Goal preservation: a generations run's meta-objective, task distribution "
                                   "and governor settings are recorded with generation 0, and later generations "
                                   "are refused under other ones. This records a change (who, why) in the lineage "
                                   "and writes RUN/config.json with it; continue the run with "
                                   "'generations --config RUN/config.json'.")
    p.add_argument("run", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a goal setting: gov.* (any governor setting), meta.meta_loss, meta.distribution, "
                        "meta.dist_seed; VALUE is JSON (a bare word is a string); repeatable")
    p.add_argument("--by", required=True, help="who changed it (recorded)")
    p.add_argument("--reason", required=True, help="why (recorded)")

    sub.add_parser("presets", help="print the presets as JSON")
    # its own options live in bench/bench_lo_step.py (main() hands the arguments over; see --help there)
    sub.add_parser("bench-kernels", add_help=False,
                   help="CUDA benchmark of the fused LO-step kernels: forward, backward (meta-training inner "
                        "steps), population (bench/bench_lo_step.py; see 'bench-kernels --help')")
    return parser


def merge_config(base: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over ``base`` section by section: ``{"meta": {"population": 4}}`` changes that one key and
    keeps the rest of ``meta`` (a shallow merge replaced the whole section with one key's worth)."""
    out = dict(base)
    for key, value in data.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(args: argparse.Namespace):
    from meta.config import SECTIONS, RunConfig, apply_overrides
    from meta.config_cli import field_hints, parse_value
    from optimizers.learned import ConfigError

    table = presets()
    if args.preset not in table:
        raise ConfigError(f"unknown preset {args.preset!r}; presets: {sorted(table)}")
    cfg = table[args.preset]
    if args.config:
        if not args.config.is_file():
            raise ConfigError(f"config file {args.config} does not exist")
        try:
            data = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {args.config} is not valid JSON: {e}") from e
        cfg = RunConfig.from_dict(merge_config(cfg.to_dict(), data) if isinstance(data, dict) else data)
    overrides: dict[str, Any] = {}
    for key, text in vars(args).items():
        if not key.startswith("cfg:") or text is None:
            continue
        name = key[4:]
        section, _, field_name = name.rpartition(".")
        hint = field_hints(SECTIONS[section] if section else RunConfig)[field_name]
        try:
            overrides[name] = parse_value(text, hint)
        except ValueError as e:
            flag = name if section else name.replace("_", "-")
            raise ConfigError(f"bad value for --{flag}: {e}") from e
    return apply_overrides(cfg, overrides)


# ---- commands -----------------------------------------------------------------------------------
RELAUNCH_COMMANDS = ("run", "meta-train", "evaluate", "generations")
# exit status of a run stopped on request (Ctrl-C, SIGTERM, a STOP file) before it finished: a script
# or scheduler can tell it from a finished run (0) and from an error (2, 3); its state is saved
STOPPED_STATUS = 4
FROZEN_STATUS = 5  # the run is frozen: an emergency stop (runaway), or a freeze by hand (meta.safety)
GOAL_KEYS = ("meta.meta_loss", "meta.distribution", "meta.dist_seed")  # + every gov.* key


def relaunch_under_torchrun(argv: list[str], cfg) -> int:
    """Run this same command on ``cfg.procs`` local processes through torchrun and return its exit status.

    Why: meta-training spends most of its time in Python/op overhead on one core, so a second process
    (members split over the processes, meta-gradients all-reduced; see ``meta/distributed.py``) is the
    cheapest way to use a machine's other cores, and the code path is the tested torchrun one. The config
    was validated before this point, so a bad flag fails here, once, not in every process."""
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg.procs),
           str(Path(__file__).resolve()), *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cfg.threads or 1))  # torchrun's default, without its warning
    print(f"[train.py] running on {cfg.procs} processes (torchrun; --procs 1 for a single process)",
          file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # torchrun stops its workers
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the children too; let them checkpoint and stop
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _setup_threads(cfg) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)


# what a resumed meta-training run may change: how long it runs, how it logs and checkpoints, where
# it computes, and how it is evaluated afterwards; everything else would silently change the maths
RESUME_MUTABLE = ("meta.outer_steps", "meta.max_bad_steps", "checkpoint_every", "log_every", "wandb",
                  "wandb_project", "threads", "procs", "out_dir")


def explicit_keys(args: argparse.Namespace) -> set[str]:
    """The config keys the user set on purpose: ``--section.name`` flags and the ``--config`` file's keys."""
    keys = {k[4:] for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    if getattr(args, "config", None):
        data = json.loads(args.config.read_text())  # validated by resolve_config already
        for k, v in data.items():
            keys.update(f"{k}.{n}" for n in v) if isinstance(v, dict) else keys.add(k)
    return keys


def resumed_config(stored, cfg, explicit: set[str]):
    """The stored run config with the explicitly given, resumable changes applied; a conflicting
    explicit value of any other field is a :class:`ConfigError` naming it (the checkpoint's config wins)."""
    from meta.config import apply_overrides
    from optimizers.learned import ConfigError

    def value(c, key):
        return getattr(getattr(c, key.split(".")[0]), key.split(".")[1]) if "." in key else getattr(c, key)

    changes, conflicts = {}, []
    for key in sorted(explicit):
        if value(cfg, key) == value(stored, key):
            continue
        if key in RESUME_MUTABLE or key.startswith("eval."):
            changes[key] = value(cfg, key)
        else:
            conflicts.append(f"{key}={value(cfg, key)!r} (the run has {value(stored, key)!r})")
    if conflicts:
        raise ConfigError("--resume continues the checkpoint's own config; these flags conflict with it: "
                          + ", ".join(conflicts) + ". Drop them, or start a new run with --out-dir "
                          "(only " + ", ".join(RESUME_MUTABLE) + " and eval.* may change on resume)")
    return apply_overrides(stored, changes)


def meta_train(cfg, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
               explicit: set[str] | None = None):
    """Meta-train per ``cfg``; returns the trainer. Refuses to clobber an existing run silently. A resumed
    run keeps the checkpoint's config (``explicit``: the keys the user set, checked against it)."""
    from meta import distributed as D
    from meta.logging import MetricsLogger
    from meta.trainer import MetaTrainer, MetaTrainingError, StopFlag
    from optimizers import checkpoint as ckpt
    from optimizers.learned import ConfigError

    out = Path(cfg.out_dir)
    path = out / "checkpoint"
    exists = D.run_on_main(ckpt.exists, path)  # rank 0 looks, every rank takes the same branch
    if resume == "auto" or D.restart_count() > 0:  # a torchrun restart continues what the first attempt wrote
        resume = exists
    if resume:
        if not exists:
            raise ConfigError(f"--resume: no checkpoint at {path} (nothing to resume)")
        requested = cfg
        trainer = MetaTrainer.load(path, adjust=lambda stored: resumed_config(stored, requested, explicit or set()))
        cfg = trainer.cfg
        print(f"[ouroboros] resumed from {path} at step {trainer.step}/{cfg.meta.outer_steps}", flush=True)
    else:
        if exists and not overwrite:
            raise ConfigError(f"{path} already holds a run: pass --resume to continue it (--resume auto: "
                              f"continue it if present), --overwrite to start over, or --out-dir for a new run")
        trainer = MetaTrainer(cfg)
    logger = None
    if D.is_main():  # rank 0 alone logs (JSONL + W&B) and writes files
        logger = MetricsLogger(out, mode=cfg.wandb, project=cfg.wandb_project, config=cfg.to_dict(),
                               name=out.name, resume_id=trainer.wandb_id)
        trainer.wandb_id = logger.wandb_id
        if resume:
            logger.truncate_after(trainer.step)
        else:
            logger.path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if D.active():
        print(f"[ouroboros] {D.world_size()} processes ({D.context().backend}); rank 0 steps members "
              f"{trainer.member_ids}", flush=True)
    print(f"[ouroboros] meta-training a learned optimizer ({trainer.lopt.num_theta()} weights) on "
          f"'{cfg.meta.distribution}' with {cfg.meta.estimator}, population {cfg.meta.population}, "
          + (f"horizon {cfg.meta.horizon}" if cfg.meta.schedule == "constant" else
             f"episodes of {cfg.meta.min_horizon}..{cfg.meta.max_horizon} steps (log-uniform), evaluation "
             f"horizon {cfg.meta.horizon}")
          + f", truncation {cfg.meta.truncation}; outer optimizer "
          f"{trainer.outer_label}", flush=True)
    from kernels import describe_step_path

    print(f"[ouroboros] {describe_step_path('cpu')}", flush=True)  # tasks live on the CPU
    t0 = time.time()
    with StopFlag() as stop:
        try:
            trainer.train(progress=progress, logger=logger, should_stop=stop)
        except MetaTrainingError:  # the trainer wrote a checkpoint first; close the W&B run, then report
            if logger is not None:
                logger.finish()
            raise
    trainer.save()
    lo_path = trainer.save_learned_optimizer(out / "learned_optimizer")
    if logger is not None:
        logger.log_artifact(lo_path, name=f"lopt-{out.name}", aliases=["latest"])
        logger.finish()
    done = trainer.step >= cfg.meta.outer_steps
    print(f"[ouroboros] {'finished' if done else 'stopped'} at step {trainer.step} in {time.time() - t0:.0f}s; "
          f"checkpoint {path}, learned optimizer {lo_path}", flush=True)
    return trainer


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write-test it, so a run that cannot save its results fails at once with
    a one-line error (an :class:`OSError`, reported by ``main``) instead of after the work."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def evaluation_horizon(cfg, trained_meta: dict[str, Any]) -> int:
    """The horizon H an evaluation runs at: ``eval.horizon`` when set, else the horizon the checkpoint was
    meta-trained at (``trained_meta``: its stored ``meta`` section), not this invocation's preset's, so
    that evaluating another run's checkpoint measures it where it was trained."""
    return cfg.eval.horizon or int(trained_meta.get("horizon", cfg.meta.horizon))


def evaluate_checkpoint(cfg, checkpoint: Path | None = None, *, progress: bool = True):
    import torch

    from meta import distributed as D
    from meta.evaluate import evaluate, write_report
    from optimizers import checkpoint as ckpt
    from tasks import get_distribution, seeded

    path = Path(checkpoint) if checkpoint else Path(cfg.out_dir) / "checkpoint"
    tensors, meta = D.load_checkpoint(path)  # under torchrun: rank 0 reads and broadcasts
    lopt, theta = ckpt.learned_optimizer_from(tensors, meta, path)
    theta0 = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("theta0/")}
    if not theta0:
        theta0 = lopt.init_theta(seeded("theta", cfg.meta.seed))
    run_cfg = meta.get("run_config", {}).get("meta", {})
    dist = get_distribution(run_cfg.get("distribution", cfg.meta.distribution),
                            run_cfg.get("dist_seed", cfg.meta.dist_seed))
    horizon = evaluation_horizon(cfg, run_cfg)
    optimizers = {"learned": lopt.bind(theta), "learned_untrained": lopt.bind(theta0)}
    D.run_on_main(check_writable, Path(cfg.out_dir) / "eval")  # before minutes of evaluation, not after
    print(f"[ouroboros] evaluating {path} on {cfg.eval.num_tasks} '{cfg.eval.split}' tasks of "
          f"'{dist.name}' at {horizon} and {horizon * cfg.eval.long_factor} steps", flush=True)
    t0 = time.time()
    with torch.no_grad():
        results = evaluate(optimizers, dist, split=cfg.eval.split, num_tasks=cfg.eval.num_tasks,
                           horizon=horizon, long_horizon=horizon * cfg.eval.long_factor,
                           adam_lrs=cfg.eval.adam_lrs, sgdm_lrs=cfg.eval.sgdm_lrs, seed=cfg.eval.seed,
                           progress=progress)
    results.checkpoint = str(path)
    results.eval_seconds = time.time() - t0
    out = Path(cfg.out_dir) / "eval"
    if not D.is_main():  # every rank holds the same results; rank 0 alone writes them
        return results
    write_report(results, out)
    print((out / "results.md").read_text())
    print(f"[ouroboros] wrote {out}/results.json, results.md, curves.png in {time.time() - t0:.0f}s", flush=True)
    return results


def evaluate_suite(cfg, checkpoint: Path | None = None, *, tasks_per_group: int = 4,
                   factors: tuple[int, ...] = (10,), groups: tuple[str, ...] | None = None,
                   progress: bool = True) -> dict:
    """``train.py evaluate --suite generalisation``: the trained learned optimizer vs tuned Adam on the
    groups of :mod:`meta.generalisation`; writes OUT_DIR/eval/generalisation/."""
    from meta import distributed as D
    from meta.generalisation import run_suite, write_suite_report
    from optimizers import checkpoint as ckpt
    from tasks import get_distribution

    path = Path(checkpoint) if checkpoint else Path(cfg.out_dir) / "checkpoint"
    tensors, meta = D.load_checkpoint(path)  # under torchrun: rank 0 reads and broadcasts
    lopt, theta = ckpt.learned_optimizer_from(tensors, meta, path)
    run_cfg = meta.get("run_config", {}).get("meta", {})
    dist = get_distribution(run_cfg.get("distribution", cfg.meta.distribution),
                            run_cfg.get("dist_seed", cfg.meta.dist_seed))
    horizon = evaluation_horizon(cfg, run_cfg)
    hz = ", ".join([str(horizon)] + [str(f * horizon) for f in factors])
    print(f"[ouroboros] generalisation suite for {path} (meta-trained on '{dist.name}'): {tasks_per_group} "
          f"'{cfg.eval.split}' task(s) per group at {hz} steps", flush=True)
    t0 = time.time()
    results = run_suite({"learned": lopt.bind(theta)}, dist, horizon, tasks_per_group=tasks_per_group,
                        factors=factors, groups=groups, adam_lrs=cfg.eval.adam_lrs, split=cfg.eval.split,
                        seed=cfg.eval.seed, progress=progress)
    results["checkpoint"] = str(path)
    if not D.is_main():  # every rank holds the same results; rank 0 alone writes them
        return results
    out = Path(cfg.out_dir) / "eval" / "generalisation"
    write_suite_report(results, out)
    print((out / "results.md").read_text())
    print(f"[ouroboros] generalisation suite: {results['meta']['runtime_s']:.0f}s running "
          f"({results['meta']['workers']} worker(s)), {time.time() - t0:.0f}s in all; wrote "
          f"{out}/results.json, results.md, ratios.png", flush=True)
    return results


GENERATIONS_DIR = "runs/generations"


def generations(cfg, args, *, progress: bool = True):
    """``train.py generations``: run (or resume) recursive generations under the governor."""
    from meta import distributed as D
    from meta.generations import GenerationRunner, clear_run_dir
    from meta.trainer import StopFlag

    gen = {}
    if args.max_generations is not None:
        gen["max_generations"] = args.max_generations
    if args.approval is not None:
        gen["approval"] = args.approval
    if gen:
        cfg = replace(cfg, gen=replace(cfg.gen, **gen))
    if getattr(args, "cfg:out_dir") is None and not args.config:
        cfg = replace(cfg, out_dir=GENERATIONS_DIR)
    out = Path(cfg.out_dir)
    # validate the task distribution before any work starts (e.g. a missing dataset directory), and
    # before --overwrite deletes anything
    from tasks import get_distribution
    get_distribution(cfg.meta.distribution, cfg.meta.dist_seed).task("held_out", 0)
    if args.overwrite:  # rank 0 deletes (only a generations run's own files); every rank waits for it
        D.run_on_main(clear_run_dir, out)
    t0 = time.time()
    with StopFlag() as stop:
        result = GenerationRunner(cfg, out, progress=progress, should_stop=stop).run()
    if not D.is_main():  # rank 0 wrote the report (the others may not share its filesystem)
        return result
    print((out / "report.md").read_text())
    print(f"[ouroboros] generations run {out}: {time.time() - t0:.0f}s this invocation; "
          f"report {out / 'report.md'}, plot {out / 'report.png'}", flush=True)
    return result


def lineage_command(args) -> int:
    from meta.generations_report import generation_rows, markdown, plot
    from meta.lineage import Lineage

    lineage = Lineage(args.run)
    if not lineage.entries_dir.is_dir():
        from meta.lineage import LineageError
        raise LineageError(f"{args.run} has no lineage (expected {lineage.entries_dir})")
    if args.command == "rollback":
        e = lineage.append_rollback(args.generation, args.reason)
        print(f"[ouroboros] incumbent of {args.run} is now generation {args.generation} (was {e['from']}); "
              f"lineage entry {e['index']}")
        return 0
    if args.command in ("approve", "reject"):
        e = lineage.append_approval(args.generation, args.command, by=args.by)
        done = "approved" if args.command == "approve" else "rejected"
        print(f"[ouroboros] generation {args.generation} {done}; lineage entry {e['index']}")
        return 0
    if args.command in ("freeze", "unfreeze", "change-goal"):
        return safety_command(args, lineage)
    rows = generation_rows(args.run)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(markdown(rows, args.run))
    events = [e for e in lineage.entries() if e["kind"] in ("rollback", "approval")]
    for e in events:
        what = f"rollback to gen {e['to']}" if e["kind"] == "rollback" else f"{e['decision']} gen {e['generation']}"
        print(f"- entry {e['index']} ({e['time']}): {what}")
    png = plot(rows, Path(args.run) / "lineage.png")
    print(f"hash chain verified ({len(lineage.entries())} entries); plot {png}")
    return 0


def safety_command(args, lineage) -> int:
    """``freeze`` / ``unfreeze`` / ``change-goal`` (meta.safety): lineage entries signed by a person."""
    from meta import safety
    from meta.config import RunConfig, apply_overrides
    from meta.generations_report import write_report
    from optimizers import checkpoint as ckpt
    from optimizers.learned import ConfigError

    run = Path(args.run)
    cfg_path = run / "config.json"
    stored = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if args.command == "change-goal":
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path} is missing: not a generations run")
        overrides: dict[str, Any] = {}
        for item in args.settings:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
            if not (key.startswith("gov.") or key in GOAL_KEYS):
                raise ConfigError(f"--set {key}: not a goal setting (gov.*, {', '.join(GOAL_KEYS)})")
            try:
                overrides[key] = json.loads(text)
            except json.JSONDecodeError:
                overrides[key] = text
        if not overrides:
            raise ConfigError("change-goal needs at least one --set KEY=VALUE")
        cfg = apply_overrides(RunConfig.from_dict(stored), overrides)
        from tasks import get_distribution

        goal = safety.goal_of(cfg, get_distribution(cfg.meta.distribution, cfg.meta.dist_seed))
        e = lineage.append_goal(goal, args.by, args.reason)
        ckpt.atomic_write_json(cfg_path, cfg.to_dict())
        print(f"[ouroboros] goal of {run} changed by {args.by} (lineage entry {e['index']}); {cfg_path} updated: "
              f"continue with `python train.py generations --config {cfg_path}`")
        return 0
    if args.command == "freeze":
        revert: Any = None if args.revert_to in ("adam", "tuned_adam", "none") else args.revert_to
        if revert is not None:
            try:
                revert = int(revert)
            except ValueError:
                raise ConfigError(f"--revert-to expects a generation number or 'adam', got {args.revert_to!r}") from None
        kw = {} if args.revert_to is None else {"revert_to": revert}
        e = lineage.append_freeze(args.by, args.reason, source="manual", **kw)
        text = (f"frozen by {args.by}: {args.reason} (lineage entry {e['index']})"
                + (f"; incumbent reverted to {'gen ' + str(revert) if revert is not None else 'tuned Adam'}"
                   if "revert_to" in e else ""))
        safety.alert(run, "FROZEN BY HAND", text, wandb=stored.get("wandb", "disabled"),
                     project=stored.get("wandb_project", "ouroboros"), entry=e["index"], kind="manual")
    else:
        e = lineage.append_unfreeze(args.by, args.reason)
        print(f"[ouroboros] {run} unfrozen by {args.by} (lineage entry {e['index']})")
    write_report(run)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench-kernels":  # exit 0 without CUDA (message, nothing measured)
        from bench.bench_lo_step import main as bench_main  # a tool beside the library (bench/)

        return bench_main(argv[1:], prog="train.py bench-kernels", no_cuda_status=0)
    if not argv or argv[0].startswith("--") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from meta import distributed as D
    from optimizers.errors import UserError
    from optimizers.learned import ConfigError

    stdout = sys.stdout
    if D.env_world_size() > 1 and args.command != "presets":  # launched by torchrun on several processes
        D.init()  # gloo on CPU, NCCL on CUDA; OUROBOROS_DIST_TIMEOUT bounds every collective
        if not D.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone prints (errors reach stderr)
    try:
        if args.command == "presets":
            print(json.dumps({k: v.to_dict() for k, v in presets().items()}, indent=2))
            return 0
        if args.command in ("lineage", "rollback", "approve", "reject", "freeze", "unfreeze", "change-goal"):
            return lineage_command(args)
        cfg = resolve_config(args)
        if cfg.procs > 1 and not D.env_world_size() > 1 and args.command in RELAUNCH_COMMANDS:
            return relaunch_under_torchrun(argv, cfg)
        _setup_threads(cfg)
        progress = not args.quiet and D.is_main()
        if args.command in ("run", "meta-train"):
            # validate the task distribution before any work starts (e.g. a missing dataset directory)
            from tasks import get_distribution
            get_distribution(cfg.meta.distribution, cfg.meta.dist_seed).task("held_out", 0)
            trainer = meta_train(cfg, resume=args.resume, overwrite=args.overwrite, progress=progress,
                                 explicit=explicit_keys(args))
            cfg = trainer.cfg  # a resumed run's own config (evaluated as it was trained)
            if trainer.step < cfg.meta.outer_steps:  # stopped early (Ctrl-C, SIGTERM): not "finished"
                return STOPPED_STATUS
            if args.command == "run":
                evaluate_checkpoint(cfg, trainer.checkpoint_path, progress=progress)
        elif args.command == "evaluate":
            suite_opts = {"tasks_per_group": args.suite_tasks, "factors": args.suite_factors,
                          "groups": args.suite_groups}
            if args.suite == "generalisation":
                evaluate_suite(cfg, args.checkpoint, progress=progress,
                               **{k: v for k, v in suite_opts.items() if v is not None})
            elif any(v is not None for v in suite_opts.values()):
                raise ConfigError("--suite-tasks, --suite-factors and --suite-groups need --suite generalisation")
            else:
                evaluate_checkpoint(cfg, args.checkpoint, progress=progress)
        elif args.command == "generations":
            result = generations(cfg, args, progress=progress)
            if result.get("frozen"):
                return FROZEN_STATUS
            if result.get("stopped"):
                return STOPPED_STATUS
    except UserError as e:  # a bad setting, a missing file, a refused operation: its message, no traceback
        print(f"error{f' (rank {D.rank()})' if D.active() else ''}: {e}", file=sys.stderr)
        return e.exit_status  # 2; 3 when meta-training could not go on (its checkpoint is written)
    except BrokenPipeError:  # e.g. `train.py presets | head`: the reader left; say nothing more to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:  # out-dir is a file, read-only directory, disk full, permission denied, ...
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"error{f' (rank {D.rank()})' if D.active() else ''}: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    finally:
        D.shutdown()  # also after an error (e.g. a peer died): no process is left waiting
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
    return 0


if __name__ == "__main__":
    from meta.distributed import env_world_size

    status = main()
    if env_world_size() > 1:
        # Under torchrun, skip the interpreter's finalisation once everything is written, the process
        # group destroyed and the streams flushed: with gloo (torch 2.13, CPU) it occasionally aborted
        # there after a clean run ("terminate called without an active exception", no Python frame;
        # ~1 in 20 two-process `generations` runs under load, never in one process), which torchrun
        # reports as a failed job. Files are closed by the code that wrote them; W&B is finished.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
