#!/usr/bin/env python
"""Where the gap between generation 1 and its control comes from: the successor job of ``python train.py
generations`` (start from a generation's weights, meta-train ``gen.outer_steps`` more outer steps) run
for one arm, with one thing changed at a time, then scored on the governor's held-out tasks at H.

    python bench/successor_probe.py arm=candidate              # the candidate arm as generations runs it
    python bench/successor_probe.py arm=control                # the Adam-trained control (same seeds)
    python bench/successor_probe.py arm=candidate g=2          # another successor seed (generation g)
    python bench/successor_probe.py arm=candidate warmdown=1   # the meta-training warm-down (meta.outer_decay)
                                                               # applied to the learned outer optimizer too
    python bench/successor_probe.py arm=candidate zero_mlp=1   # MLP output zeroed: Adam on the learned schedule
    python bench/successor_probe.py arm=candidate plain_small=3  # tensors of < 3 elements: controller off
    python bench/successor_probe.py arm=candidate scale=0.2    # another outer update scale (governed: 0.3)
    python bench/successor_probe.py arm=candidate continue=1   # the successor's run as the continuation of the
                                                               # incumbent's (t from meta.outer_steps of
                                                               # meta.outer_steps + steps; the control's warm-down
                                                               # likewise)
    python bench/successor_probe.py arm=candidate fresh=1      # the successor starts from a fresh initialisation
                                                               # (generations' --gen.start fresh), not the incumbent
    python bench/successor_probe.py arm=candidate population=16 steps=75   # less meta-gradient noise, same cost
    python bench/successor_probe.py arm=candidate ckpt=runs/default/checkpoint

``ckpt`` (default ``runs/default/checkpoint``) is the incumbent: the weights the successor starts from and, for
the candidate arm, its outer optimizer. One process, one thread: about 3 minutes a run on this CPU (two at
a time on 2 cores). Prints the mean per-task log-loss ratio vs tuned Adam at H (the governor's score;
generation 0's own is the reference) and writes the per-task scores to ``out`` (default
``runs/successor_probe/<name>.json``); ``compare=a.json,b.json`` prints the paired difference of two runs
(b minus a) with its 95% t-interval instead of running anything.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from meta import stats  # noqa: E402
from meta.config import RunConfig  # noqa: E402
from meta.evaluate import evaluate  # noqa: E402
from meta.trainer import MetaTrainer  # noqa: E402
from optimizers import checkpoint as ck  # noqa: E402
from optimizers import learned as L  # noqa: E402
from optimizers.hand import Adam  # noqa: E402
from optimizers.transforms import WarmDown, scale_updates  # noqa: E402
from tasks import get_distribution  # noqa: E402
from tasks.base import seeded  # noqa: E402

opts = dict(a.split("=", 1) for a in sys.argv[1:])
if "compare" in opts:
    a, b = (json.loads(Path(p).read_text())["scores"] for p in opts["compare"].split(","))
    ci = stats.mean_ci([y - x for x, y in zip(a, b)], 0.95, "t")
    print(f"b - a: {ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}] (paired over {ci['n']} tasks, 95% t-interval)")
    sys.exit(0)
arm = opts.get("arm", "candidate")
if arm not in ("candidate", "control"):
    sys.exit("arm must be candidate or control")
tensors, meta = ck.load(opts.get("ckpt", "runs/default/checkpoint"))
cfg = RunConfig.from_dict(meta["run_config"])
lopt, theta = ck.learned_optimizer_from(tensors, meta, "incumbent")
steps, g = int(opts.get("steps", cfg.gen.outer_steps)), int(opts.get("g", 1))
elapsed = cfg.meta.outer_steps if opts.get("continue") else 0
scale = float(opts.get("scale", cfg.meta.outer_lr / cfg.lo.nominal_lr))
outer_theta = dict(theta)
if opts.get("zero_mlp"):
    n = cfg.lo.hidden_layers
    outer_theta[f"w{n}"] = torch.zeros_like(theta[f"w{n}"])
    outer_theta[f"b{n}"] = torch.zeros_like(theta[f"b{n}"])

plain_small = int(opts["plain_small"]) if "plain_small" in opts else 0


class OuterProbe(L.BoundLearnedOptimizer):
    """The incumbent as the outer optimizer, with the probe's changes; the successor's own inner runs use
    the plain class, so nothing here touches them. ``continue``: the time inputs see ``elapsed`` more
    steps of a run ``elapsed`` longer. ``plain_small``: the MLP's output zeroed on tensors of fewer
    elements (the outer problem is below the buffer-reusing step's size, so ``_mlp`` is the MLP it runs)."""

    def with_total_steps(self, total_steps):
        return OuterProbe(self.config, self.theta, kernels=self.kernels, precision=self.precision,
                          total_steps=total_steps + elapsed, reuse_buffers=self.reuse_buffers)

    def _time_inputs(self, step, state, x):
        return super()._time_inputs(step + elapsed, state, x)

    def update(self, grads, state, params, **kw):
        self._sizes = [p.numel() for p in params.values()]
        return super().update(grads, state, params, **kw)

    def _mlp(self, x, tfeat=None):
        out = super()._mlp(x, tfeat)
        if not plain_small:
            return out
        mask = torch.cat([torch.full((n,), float(n >= plain_small)) for n in self._sizes]).to(out.dtype)
        return out * mask[:, None]


class Scheduled:
    """``opt`` set up for ``elapsed + T`` steps, with the meta-training warm-down over that run (when
    asked) and its schedule position starting at ``elapsed``: the trainer calls ``with_total_steps(T)``."""

    horizon_aware = True

    def __init__(self, opt, warmdown: bool):
        self.opt, self.warmdown = opt, warmdown

    def with_total_steps(self, total):
        inner = self.opt.with_total_steps(total) if getattr(self.opt, "horizon_aware", False) else self.opt
        out = Scheduled(inner, self.warmdown)
        if self.warmdown:
            out.opt = WarmDown(inner, total + elapsed, cfg.meta.outer_decay)
        return out

    def init(self, params, **kw):
        state = self.opt.init(params)
        if self.warmdown:
            state["step"] = state["step"] + elapsed
        return state

    def update(self, grads, state, params, **kw):
        return self.opt.update(grads, state, params, **kw)


if arm == "candidate":
    bound = OuterProbe(lopt.config, outer_theta)
    outer = Scheduled(scale_updates(bound, scale), warmdown=bool(opts.get("warmdown")))
else:
    outer = Scheduled(Adam(lr=cfg.meta.outer_lr), warmdown=cfg.meta.outer_decay > 0)
population = int(opts.get("population", cfg.meta.population))
run_cfg = replace(cfg, meta=replace(cfg.meta, outer_steps=steps, seed=cfg.meta.seed + g, population=population),
                  wandb="disabled", out_dir=str(Path("runs/successor_probe") / "work"))
start = theta
if opts.get("fresh"):  # as generations' _start does under gen.start fresh
    start = L.LearnedOptimizer(cfg.lo).init_theta(seeded("theta", cfg.meta.seed + g))
trainer = MetaTrainer(run_cfg, outer=outer, theta={k: v.clone() for k, v in start.items()})
for _ in range(steps):
    trainer.train_step()
dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
res = evaluate({"successor": lopt.bind(trainer.theta)}, dist, split="held_out", num_tasks=cfg.gov.num_tasks,
               horizon=cfg.meta.horizon, long_horizon=cfg.meta.horizon, adam_lrs=cfg.gov.adam_lrs, sgdm_lrs=None,
               seed=cfg.gov.seed, progress=False, workers=1)
scores = res.task_scores("successor", "H")
name = opts.get("name", "_".join([arm, f"g{g}", *(f"{k}{v}" for k, v in sorted(opts.items())
                                                    if k not in ("arm", "g", "ckpt", "name", "out"))]))
out = Path(opts.get("out", f"runs/successor_probe/{name}.json"))
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"args": opts, "scores": scores}, indent=1))
print(name, f"mean log ratio vs tuned Adam at H {statistics.mean(scores):+.3f}", f"({out})", flush=True)
