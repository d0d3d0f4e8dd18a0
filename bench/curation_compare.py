"""Active task curation against uniform task sampling, at equal meta-training compute.

    python bench/curation_compare.py [--steps 400] [--population 8] [--eval-tasks 20] [--suite-tasks 4] \
        [--floor 0.2] [--every 10] [--out runs/curation_compare]

Meta-trains the default preset twice from the same seeds, ``meta.curation uniform`` and ``trailing``
(:mod:`meta.curation`), for the same number of outer steps (the same population and truncation: equal
inner steps; curation adds no inner run, though the tasks it favours may be wider or narrower, so
each arm's wall-clock is reported), then evaluates both learned optimizers in
*one* call on the held-out split and on the generalisation suite, so every task gives a paired
comparison (same tasks, same initialisations, same minibatches, same tuned-Adam runs). Reported per
horizon: the mean paired difference ``log(loss_trailing) - log(loss_uniform)`` of the final training
(and validation) loss with its interval (:func:`meta.stats.paired_diff_ci`; negative favours
curation), and each arm's score against tuned Adam. Writes ``OUT/results.json`` and ``OUT/results.md``.

Shrink it with ``--steps``, ``--population``, ``--horizon``, ``--eval-tasks``, ``--suite-tasks``,
``--suite-factors ''`` (H only) or ``--no-suite``. Time on the 2-core CPU, one process (estimated,
not measured: from the README's default-run timings scaled to one process, and a tiny run of every
stage): the full comparison (defaults) takes about 35 minutes: ~7 minutes per meta-training arm (400
outer steps, 8 members), ~5 minutes of held-out evaluation (20 tasks x 2 learned optimizers + the
Adam grid, H and 10H) and ~12 minutes of suite. ``--steps 4 --population 2 --horizon 20 --eval-tasks
3 --suite-tasks 1 --suite-factors ''`` took 74 s (8 + 9 s of meta-training, 45 s held-out, 11 s
suite) on the shared machine.

Verdict rule: curation becomes the default only if it wins, i.e. the
held-out training-loss interval at H lies below zero, no held-out validation-loss interval lies above zero
(at any horizon), and the suite's pooled interval does not lie above zero.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("uniform", "trailing")
FLOOR = 1e-8  # absolute floor under a loss before its log (a loss of exactly 0 stays finite)


def _log(x: float) -> float:
    return math.log(max(float(x), 0.0) + FLOOR)


def arm_config(base: Any, arm: str, args: argparse.Namespace, out: Path) -> Any:
    meta = replace(base.meta, curation=arm, curation_floor=args.floor, curation_every=args.every,
                   outer_steps=args.steps, population=args.population, horizon=args.horizon,
                   seed=args.seed)
    return replace(base, meta=meta, out_dir=str(out / arm), wandb="disabled")


def meta_train(cfg: Any, progress: bool) -> tuple[Any, float, dict]:
    """(trainer, seconds, the last step's metrics)."""
    from meta.trainer import MetaTrainer

    last: dict = {}
    t0 = time.time()
    trainer = MetaTrainer(cfg, step_callbacks=[lambda tr, m: last.update(m)])
    trainer.train(progress=progress)
    return trainer, time.time() - t0, last


def paired(records: Sequence[dict], label: str, key: str, level: float) -> dict:
    """Paired interval of log(trailing) - log(uniform) for ``key`` at ``label`` over task records
    (``records[i]["results"][name][label][key]``)."""
    from meta import stats

    a = [_log(r["results"]["trailing"][label][key]) for r in records]
    b = [_log(r["results"]["uniform"][label][key]) for r in records]
    ci = stats.paired_diff_ci(a, b, level)
    ci["wins_trailing"] = sum(x < y for x, y in zip(a, b))
    return ci


def held_out(opts: dict, dist: Any, cfg: Any, args: argparse.Namespace) -> dict:
    from meta.evaluate import TUNED_ADAM, evaluate

    res = evaluate(opts, dist, split="held_out", num_tasks=args.eval_tasks, horizon=args.horizon,
                   long_horizon=args.long_factor * args.horizon, adam_lrs=cfg.eval.adam_lrs, sgdm_lrs=None,
                   seed=cfg.eval.seed, progress=not args.quiet, level=args.level).to_json()
    out: dict[str, Any] = {"task_indices": res["meta"]["task_indices"], "horizons": res["meta"]["horizons"]}
    for label in res["meta"]["horizons"]:
        recs = res["tasks"]
        out[label] = {key: paired(recs, label, key, args.level) for key in ("train_loss", "valid_loss")}
        out[label]["vs_tuned_adam"] = {}
        for arm in ARMS:  # each arm's log-loss score against tuned Adam (negative: better than Adam)
            from meta import stats

            d = [_log(r["results"][arm][label]["train_loss"]) - _log(r["results"][TUNED_ADAM][label]["train_loss"])
                 for r in recs]
            out[label]["vs_tuned_adam"][arm] = stats.mean_ci(d, args.level)
        out[label]["diverged"] = {arm: sum(bool(r["results"][arm][label]["diverged"]) for r in recs) for arm in ARMS}
    return out


def suite(opts: dict, dist: Any, args: argparse.Namespace) -> dict:
    from meta import stats
    from meta.generalisation import parse_factors, run_suite

    res = run_suite(opts, dist, args.horizon, tasks_per_group=args.suite_tasks,
                    factors=parse_factors(args.suite_factors), split="held_out", level=args.level,
                    progress=not args.quiet)
    out: dict[str, Any] = {"horizons": res["meta"]["horizons"], "groups": {}, "pooled": {}}
    in_dist = {g["name"] for g in res["groups"] if g.get("in_distribution")}
    pooled: dict[str, list[tuple[float, float]]] = {label: [] for label in res["meta"]["horizons"]}
    for group, recs in res["tasks"].items():
        out["groups"][group] = {}
        for label in res["meta"]["horizons"]:
            pairs = [(r["results"]["trailing"][label]["train_ratio"], r["results"]["uniform"][label]["train_ratio"])
                     for r in recs]
            out["groups"][group][label] = stats.paired_diff_ci([a for a, _ in pairs], [b for _, b in pairs],
                                                               args.level)
            if group not in in_dist:
                pooled[label] += pairs
    for label, pairs in pooled.items():
        if pairs:
            out["pooled"][label] = stats.paired_diff_ci([a for a, _ in pairs], [b for _, b in pairs], args.level)
    return out


def _ci(c: dict) -> str:
    lo, hi = c.get("lo"), c.get("hi")
    if lo is None or hi is None:
        return f"{c['mean']:+.3f} (n={c['n']})"
    return f"{c['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={c['n']})"


def markdown(results: dict) -> str:
    lines = ["# Task curation vs uniform sampling (paired; negative favours curation)", "",
             f"settings: `{json.dumps(results['settings'])}`", "",
             "| arm | meta-training s | episodes | final meta-loss |", "|---|---|---|---|"]
    for arm in ARMS:
        a = results["arms"][arm]
        lines.append(f"| {arm} | {a['seconds']:.0f} | {a['episodes']} | {a['meta_loss']} |")
    lines += ["", "## Held-out split: log(loss trailing) - log(loss uniform)", "",
              "| horizon | train loss | valid loss | trailing vs tuned Adam | uniform vs tuned Adam |",
              "|---|---|---|---|---|"]
    ho = results["held_out"]
    for label in ho["horizons"]:
        r = ho[label]
        lines.append(f"| {label} | {_ci(r['train_loss'])} | {_ci(r['valid_loss'])} | "
                     f"{_ci(r['vs_tuned_adam']['trailing'])} | {_ci(r['vs_tuned_adam']['uniform'])} |")
    if results.get("suite"):
        s = results["suite"]
        lines += ["", "## Generalisation suite: train log-ratio (vs tuned Adam), trailing - uniform", "",
                  "| group | " + " | ".join(s["horizons"]) + " |", "|---|" + "---|" * len(s["horizons"])]
        for group, per in s["groups"].items():
            lines.append(f"| {group} | " + " | ".join(_ci(per[label]) for label in s["horizons"]) + " |")
        if s["pooled"]:
            lines.append("| pooled (out of distribution) | " +
                         " | ".join(_ci(s["pooled"][label]) for label in s["horizons"] if label in s["pooled"]) + " |")
    lines += ["", f"verdict: {results['verdict']}", ""]
    return "\n".join(lines)


def verdict(results: dict) -> str:
    h = results["held_out"]["H"]["train_loss"]
    if h.get("hi") is None:
        return "inconclusive (too few tasks for an interval)"
    pooled = (results.get("suite") or {}).get("pooled", {}).get("H")
    suite_ok = pooled is None or pooled.get("lo") is None or pooled["lo"] <= 0
    # validation loss is part of the default's acceptance: a significant loss there at any horizon vetoes
    worse_valid = [label for label in results["held_out"].get("horizons", ["H"])
                   if (results["held_out"].get(label, {}).get("valid_loss", {}).get("lo") or 0) > 0]
    if h["hi"] < 0 and suite_ok and worse_valid:
        return (f"curation wins on training loss at H but its validation loss is significantly worse at "
                f"{', '.join(worse_valid)}: keep uniform")
    if h["hi"] < 0 and suite_ok:
        return "curation wins on the held-out split at H (and does not lose on the suite): candidate default"
    if h["lo"] > 0:
        return "curation loses on the held-out split at H: keep uniform"
    return "no significant difference on the held-out split at H: keep uniform"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="outer steps per arm (default preset: 400)")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--long-factor", type=int, default=10)
    p.add_argument("--eval-tasks", type=int, default=20)
    p.add_argument("--suite-tasks", type=int, default=4)
    p.add_argument("--suite-factors", default="10", help="long horizons of the suite ('' for H only)")
    p.add_argument("--no-suite", action="store_true")
    p.add_argument("--floor", type=float, default=0.2, help="meta.curation_floor of the trailing arm")
    p.add_argument("--every", type=int, default=10, help="meta.curation_every of the trailing arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--out", type=Path, default=Path("runs/curation_compare"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch

    from tasks import get_distribution
    from train import presets

    torch.set_num_threads(1)
    base = presets()["default"]
    t0 = time.time()
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "arms": {}}
    opts = {}
    for arm in ARMS:
        cfg = arm_config(base, arm, args, args.out)
        trainer, seconds, last = meta_train(cfg, progress=not args.quiet)
        trainer.save_learned_optimizer(Path(cfg.out_dir) / "learned_optimizer")
        opts[arm] = trainer.lopt.bind(trainer.theta)
        results["arms"][arm] = {"seconds": seconds, "episodes": trainer.est_state.episodes_done,
                                "meta_loss": last.get("meta_loss")}
        if arm == "trailing":
            s = trainer.sampler
            results["arms"][arm]["regions"] = {r: {"prob": p, "episodes": n, "progress": g}
                                               for r, p, n, g in zip(s.regions, s.probs, s.counts, s.progress)}
        print(f"[curation_compare] {arm}: meta-trained in {seconds:.0f} s", flush=True)
    dist = get_distribution(base.meta.distribution, base.meta.dist_seed)
    t1 = time.time()
    with torch.no_grad():
        results["held_out"] = held_out(opts, dist, base, args)
        print(f"[curation_compare] held-out evaluation in {time.time() - t1:.0f} s", flush=True)
        t2 = time.time()
        results["suite"] = None if args.no_suite else suite(opts, dist, args)
        if not args.no_suite:
            print(f"[curation_compare] suite in {time.time() - t2:.0f} s", flush=True)
    results["verdict"] = verdict(results)
    results["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"[curation_compare] wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
