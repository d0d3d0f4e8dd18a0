#!/usr/bin/env python
"""The step-scale rule for layers wider than any meta-training task, on the suite's ``wide`` group.

    python bench/width_rule.py      # ~15 min on 2 cores; writes runs/widthtest/out (read by bench/ablation.py)

The shipped default learned optimizer (meta-trained where no layer is wider than 64, so these rules
never acted during meta-training) with ``step_scale="width"`` and powers 1 (muP's 1/width) and 0.5, and
with no width scale, against per-task tuned Adam on 4 image MLPs of width 512 at H and 10H.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataclasses, torch
from optimizers import checkpoint as ck
from optimizers.learned import LearnedOptimizer
from meta.generalisation import run_suite, write_suite_report
from tasks import get_distribution
lo, th, _ = ck.load_learned_optimizer("optimizers/pretrained/default")
cfg = lo.config
variants = {
    "w64_linear": dataclasses.replace(cfg, scale_power=1.0),
    "w64_sqrt": dataclasses.replace(cfg, scale_power=0.5),
    "no_width_scale": dataclasses.replace(cfg, width_ref=1_000_000),
}
opts = {k: LearnedOptimizer(c).bind(th) for k, c in variants.items()}
with torch.no_grad():
    res = run_suite(opts, get_distribution("digits_mlp"), 200, tasks_per_group=4, factors=(10,), groups=["wide"])
write_suite_report(res, "runs/widthtest/out")
print(open("runs/widthtest/out/results.md").read())
# the chosen rule (the shipped default) on 4 other wide tasks (the test split), not used to choose it
with torch.no_grad():
    res = run_suite({"default": lo.bind(th)}, get_distribution("digits_mlp"), 200, tasks_per_group=4, factors=(10,),
                    groups=["wide"], split="test")
write_suite_report(res, "runs/widthtest/confirm_test_split")
print(open("runs/widthtest/confirm_test_split/results.md").read())
