#!/usr/bin/env python
"""Where the loop check's result comes from: the governor's loop check (the candidate meta-trains a fresh
learned optimizer for ``gov.loop_steps`` outer steps, against Adam doing the same) for one checkpoint, with
one thing changed at a time.

    python bench/loop_probe.py                           # the check as the governor runs it (outer scale 0.3)
    python bench/loop_probe.py zero_mlp=1                # MLP output layer zeroed: Adam on the learned schedule
    python bench/loop_probe.py scale=0.6                 # another outer update scale
    python bench/loop_probe.py T=200 scale=0.16          # the outer run seen as the first 10% of a 200-step run
    python bench/loop_probe.py ckpt=runs/default/checkpoint
    python bench/loop_probe.py plain_small=3              # tensors of < 3 elements take the plain nominal step
                                                          # (the MLP's output zeroed there; theta's scalars)
    python bench/loop_probe.py dist=digits_mlp          # the loop job on another task distribution
    python bench/loop_probe.py seed_mult=2               # another loop seed (the governor uses g + 1)
    python bench/loop_probe.py ratios=1                   # only the candidate's 20 outer steps: its update
                                                          # RMS over Adam's (same meta-gradients, own state),
                                                          # per tensor of the outer problem (~1 minute)

About 3 minutes each on 2 cores. Prints the mean per-task log-loss gap (candidate-trained minus
Adam-trained) with its 95% t-interval; the governor's bound is ``gov.loop_tolerance`` (+0.1).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from meta import stats  # noqa: E402
from meta.config import RunConfig  # noqa: E402
from meta.generations import LoopTrainer  # noqa: E402
from meta.governor import Candidate, Governor  # noqa: E402
from optimizers import checkpoint as ck  # noqa: E402
from tasks import get_distribution  # noqa: E402

opts = dict(a.split("=", 1) for a in sys.argv[1:])
if "plain_small" in opts:
    from optimizers.learned import BoundLearnedOptimizer as _B
    _N = int(opts["plain_small"]); _ou, _om = _B.update, _B._mlp
    def _upd(self, grads, state, params, **kw):
        self._sizes = [p.numel() for p in params.values()]
        return _ou(self, grads, state, params, **kw)
    def _mlp(self, x, tfeat=None):
        out = _om(self, x, tfeat)
        mask = torch.cat([torch.full((n,), float(n >= _N)) for n in self._sizes]).to(out.dtype)
        return out * mask[:, None]
    _B.update, _B._mlp = _upd, _mlp
tensors, meta = ck.load(opts.get("ckpt", "runs/ablation/controller/checkpoint"))
cfg = RunConfig.from_dict(meta["run_config"])
if "dist" in opts:  # the loop job on another distribution than the checkpoint was meta-trained on
    from dataclasses import replace
    cfg = replace(cfg, meta=replace(cfg.meta, distribution=opts["dist"]))
lopt, theta = ck.learned_optimizer_from(tensors, meta, "x")
scale = float(opts.get("scale", cfg.meta.outer_lr / cfg.lo.nominal_lr))
if opts.get("zero_mlp"):
    n = cfg.lo.hidden_layers
    theta = dict(theta)
    theta[f"w{n}"], theta[f"b{n}"] = torch.zeros_like(theta[f"w{n}"]), torch.zeros_like(theta[f"b{n}"])


class FixedHorizon:
    """A learned optimizer bound to its own T, whatever run length it is used for."""

    horizon_aware = False

    def __init__(self, opt):
        self.opt = opt

    def init(self, params):
        return self.opt.init(params)

    def update(self, grads, state, params, *, loss=None):
        return self.opt.update(grads, state, params, loss=loss)


class ProbeCandidate(Candidate):
    def bind(self):
        b = super().bind()
        return FixedHorizon(b.with_total_steps(int(opts["T"]))) if "T" in opts else b


dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
loop = LoopTrainer(cfg, cfg.lo, seed=cfg.meta.seed + 7919 * int(opts.get("seed_mult", 1)))

if opts.get("ratios"):
    from optimizers.hand import Adam
    from optimizers.transforms import scale_updates

    class StepRatio:
        """The scaled candidate as outer optimizer, with Adam (the outer lr) run beside it on the same
        meta-gradients: per step, the RMS of each optimizer's update per tensor."""

        horizon_aware = True

        def __init__(self, opt, rows):
            self.opt, self.rows, self.adam = opt, rows, Adam(lr=cfg.meta.outer_lr)

        def with_total_steps(self, total):
            return StepRatio(self.opt.with_total_steps(total), self.rows)

        def init(self, params, **kw):
            self.adam_state = self.adam.init(params)
            return self.opt.init(params, **kw)

        def update(self, grads, state, params, **kw):
            new, st = self.opt.update(grads, state, params, **kw)
            ref, self.adam_state = self.adam.update(grads, self.adam_state, params)
            rms = {k: float((params[k] - new[k]).pow(2).mean().sqrt() / ((params[k] - ref[k]).pow(2).mean().sqrt() + 1e-12))
                   for k in params}
            total = sum(float((params[k] - new[k]).pow(2).sum()) for k in params)
            total_ref = sum(float((params[k] - ref[k]).pow(2).sum()) for k in params)
            self.rows.append(((total / total_ref) ** 0.5, rms))
            return new, st

    rows: list = []
    loop(StepRatio(scale_updates(lopt.bind(theta), scale), rows), cfg.gov.loop_steps)
    for i, (r, per) in enumerate(rows):
        print(f"step {i:2d}  all {r:6.3f}  " + "  ".join(f"{k} {v:.2f}" for k, v in per.items()))
    print(f"mean over steps (all tensors): {sum(r for r, _ in rows) / len(rows):.3f}")
    sys.exit(0)
gov = Governor(cfg.gov, dist, cfg.meta.horizon, loop_trainer=loop, progress=False)
ev = gov._loop_evidence(ProbeCandidate("c", lopt, theta, horizon=cfg.meta.horizon, outer_scale=scale), None)
d = [a - b for a, b in zip(ev.by_candidate, ev.by_incumbent)]
print(" ".join(sys.argv[1:]) or "as-governed", f"scale={scale:.3g}", stats.mean_ci(d, 0.95, "t"), flush=True)
