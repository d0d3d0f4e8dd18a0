#!/usr/bin/env python
"""Does the successor architecture search (:mod:`meta.search`) beat the fixed architecture at equal
meta-training compute?

    python bench/search_compare.py [--candidates 6] [--budget 10] [--steps 200] [--tasks 20]
                                   [--out docs/search_compare]

Arms, both meta-trained by Adam from a fresh seeded start with the default preset's recipe (digits_mlp,
truncated backprop, population 8, truncation 20, H = 200, outer-lr warm-down):

- ``search``: :func:`meta.search.search` proposes ``--candidates`` architectures inside the governor's
  bounds and successive-halves them on the *selection* split (first rung ``--budget`` outer steps, doubling),
  then the winner is meta-trained for ``--steps`` outer steps;
- ``fixed``: the default architecture meta-trained for ``--steps`` plus every outer step the search spent
  (equal meta-training outer steps; the search's selection evaluations are extra, reported in seconds).

Both are then evaluated on ``--tasks`` tasks of the held-out split at H against per-task tuned Adam (the
governor's score, ``log((L + f) / (A + f))``) and compared per task (paired: same tasks, same tuned-Adam
runs). Positive ``fixed - search`` means the search helped. One process, one torch thread; about 25
minutes with the defaults on the 2-core CPU when nothing else runs. Writes ``OUT/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=6, help="architectures proposed (K)")
    p.add_argument("--budget", type=int, default=10, help="outer steps of the first rung")
    p.add_argument("--selection-tasks", type=int, default=8, help="selection-split tasks scoring each rung")
    p.add_argument("--steps", type=int, default=200, help="outer steps of the winner's meta-training")
    p.add_argument("--tasks", type=int, default=20, help="held-out tasks of the comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/search_compare"))
    args = p.parse_args(argv)

    import torch

    from meta import stats
    from meta.evaluate import evaluate
    from meta.search import BriefMetaTraining, SelectionScorer, search
    from optimizers.hand import Adam
    from optimizers.learned import LearnedOptimizer
    from tasks import get_distribution
    from tasks.base import seeded
    from train import presets

    torch.set_num_threads(1)
    cfg = replace(presets()["default"], procs=1, threads=1, wandb="disabled")
    cfg = replace(cfg, meta=replace(cfg.meta, seed=args.seed))
    dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
    H = cfg.meta.horizon
    train = BriefMetaTraining(cfg, seed=cfg.meta.seed + 1, outer=lambda: Adam(lr=cfg.meta.outer_lr),
                              start=lambda lo: LearnedOptimizer(lo).init_theta(seeded("theta", cfg.meta.seed + 1)))
    seconds: dict[str, float] = {}

    t0 = time.process_time()
    scorer = SelectionScorer(dist, cfg.gov, H, args.selection_tasks, progress=False)
    result = search(cfg.lo, args.candidates, args.budget, cfg.gov, seed=cfg.meta.seed, generation=1,
                    train=train, scorer=scorer, log=lambda s: print(s, flush=True))
    assert result is not None
    spent = int(result.record["outer_steps_spent"])
    lopt_w, theta_w = train(result.winner.lo, args.steps)
    seconds["search"] = time.process_time() - t0
    print(f"search + winner: {seconds['search']:.0f} CPU s; search spent {spent} outer steps; winner "
          f"{result.winner.changes or '(the base architecture)'}", flush=True)

    t0 = time.process_time()
    lopt_f, theta_f = train(cfg.lo, args.steps + spent)
    seconds["fixed"] = time.process_time() - t0
    print(f"fixed: {args.steps + spent} outer steps, {seconds['fixed']:.0f} CPU s", flush=True)

    with torch.no_grad():
        res = evaluate({"search": lopt_w.bind(theta_w), "fixed": lopt_f.bind(theta_f)}, dist, split="held_out",
                       num_tasks=args.tasks, horizon=H, long_horizon=H, adam_lrs=cfg.gov.adam_lrs, sgdm_lrs=None,
                       seed=cfg.gov.seed, progress=False)
    s_search, s_fixed = res.task_scores("search", "H"), res.task_scores("fixed", "H")
    diff = stats.mean_ci([f - s for f, s in zip(s_fixed, s_search)], 0.95, "t")
    vs_adam = {n: stats.mean_ci(s, 0.95, "t") for n, s in (("search", s_search), ("fixed", s_fixed))}
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "search_record": result.record,
           "outer_steps": {"search": spent + args.steps, "fixed": spent + args.steps},
           "cpu_seconds": seconds, "scores": {"search": s_search, "fixed": s_fixed},
           "vs_tuned_adam": vs_adam, "fixed_minus_search": diff}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1, default=str))

    def ci(d: dict) -> str:
        return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"

    md = ["# Successor search vs fixed architecture at equal meta-training outer steps\n",
          f"`python bench/search_compare.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
          f"(one process, one thread). Winner: proposal {result.record['winner']} "
          f"{result.winner.changes or '(the base architecture)'}; the search spent {spent} outer steps.\n",
          "| arm | outer steps | CPU s | held-out H vs tuned Adam (n=%d) |" % len(s_search), "|---|---|---|---|",
          f"| search winner | {spent} + {args.steps} | {seconds['search']:.0f} | {ci(vs_adam['search'])} |",
          f"| fixed architecture | {spent + args.steps} | {seconds['fixed']:.0f} | {ci(vs_adam['fixed'])} |",
          f"\nPaired, fixed minus search (> 0: the search helped): **{ci(diff)}**.\n",
          "| proposal | changes | in bounds | rung scores (selection split) |", "|---|---|---|---|"]
    for prop in result.record["proposals"]:
        rungs = ", ".join(f"{r['budget']}: {r['score']:+.3f}" if r["score"] is not None else f"{r['budget']}: -"
                          for r in prop.get("rungs", []))
        md.append(f"| {prop['index']} | {prop.get('changes') or '(base)'} | {prop.get('in_bounds')} | {rungs} |")
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
