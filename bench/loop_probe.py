#!/usr/bin/env python
"""Where the loop check's failure comes from: the governor's loop check for the ablation's ``controller``
run (the default) with (a) its MLP output layer zeroed, i.e. Adam on its learned fraction-of-training
schedule, and (b) the outer update scale set from its learned rate at t = 0 instead of the config's
initial nominal rate.

    python bench/loop_probe.py zero_mlp        # ~3 min on 2 cores each
    python bench/loop_probe.py learned_lr0
"""
import sys

import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from meta.config import RunConfig
from meta.generations import LoopTrainer
from meta.governor import Candidate, Governor
from meta import stats
from optimizers import checkpoint as ck
from tasks import get_distribution
mode = sys.argv[1]
tensors, meta = ck.load("runs/ablation/controller/checkpoint")
cfg = RunConfig.from_dict(meta["run_config"])
lopt, theta = ck.learned_optimizer_from(tensors, meta, "x")
scale = 0.3
if mode == "zero_mlp":
    n = cfg.lo.hidden_layers
    theta = dict(theta); theta[f"w{n}"] = torch.zeros_like(theta[f"w{n}"]); theta[f"b{n}"] = torch.zeros_like(theta[f"b{n}"])
elif mode == "learned_lr0":
    scale = cfg.meta.outer_lr / 0.01856
dist = get_distribution(cfg.meta.distribution, cfg.meta.dist_seed)
loop = LoopTrainer(cfg, cfg.lo, seed=cfg.meta.seed + 7919)
gov = Governor(cfg.gov, dist, cfg.meta.horizon, loop_trainer=loop)
ev = gov._loop_evidence(Candidate("c", lopt, theta, horizon=200, outer_scale=scale), None)
d = [a - b for a, b in zip(ev["by_candidate"], ev["by_incumbent"])]
print(mode, scale, stats.mean_ci(d, 0.95, "t"))
