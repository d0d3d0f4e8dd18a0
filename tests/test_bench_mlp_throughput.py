"""bench/mlp_throughput.py: the smoke run's report is complete and self-consistent, and timing the
step's MLP does not change the step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from optimizers.learned import LearnedOptimizer, LOConfig

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_report_fields_fractions_and_flops(tmp_path):
    prefix = tmp_path / "mlp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mlp_throughput.py"), "--smoke", "--out", str(prefix)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(Path(str(prefix) + ".json").read_text())
    md = Path(str(prefix) + ".md").read_text()
    assert report["machine"]["cpu_model"] in md

    lo = LearnedOptimizer(LOConfig())
    fpe = lo.flops_per_element()
    assert report["config"]["flops_per_element"] == fpe
    assert report["config"]["layer_sizes"] == lo.layer_sizes()
    assert report["threads"] == 1 and report["torch_threads"] == 1

    peak = report["peak"]
    assert peak["gflops"] == max(r["gflops"] for r in peak["square"])
    layers = report["addmm"]["layers"]
    assert [(L["fan_in"], L["fan_out"]) for L in layers] == list(zip(lo.layer_sizes()[:-1], lo.layer_sizes()[1:]))

    mlp = report["mlp"]
    assert mlp["flops"] == fpe * mlp["elements"]
    assert mlp["rows"] == mlp["elements"] == report["args"]["rows"]
    assert mlp["features"] == LOConfig().num_element_features  # time features folded, as the step does
    assert report["steps"], "no step measured"
    for s in report["steps"]:
        assert s["flops"] == fpe * s["numel"]
        assert s["mlp_rows"] == s["numel"]  # every element through the MLP exactly once per step
        assert 0 < s["mlp_in_step_s"] < s["instrumented_step_s"]
        assert s["addmm_same_rows"]["flops"] == s["executed_flops"]  # the reference does the MLP's matmuls
    values = [mlp["frac_of_peak_square"], mlp["frac_of_same_shape_addmm"]]
    values += [s[k] for s in report["steps"] for k in ("frac_of_peak_square", "frac_of_same_shape_addmm",
                                                        "frac_of_same_rows_addmm", "mlp_share_of_step")]
    for v in values:
        assert 0 < v < math.inf
    for s in report["steps"]:
        assert s["mlp_share_of_step"] < 1


def test_mlp_timer_leaves_the_step_unchanged():
    from bench.mlp_throughput import MLPTimer, bound_optimizer

    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(16, 8, generator=gen), "b": torch.randn(8, generator=gen)}
    grads = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    plain, timed = bound_optimizer(), bound_optimizer()
    timer = MLPTimer(timed)
    with torch.no_grad():
        p1, s1 = plain.update(grads, plain.init(params, total_steps=10), params)
        p2, s2 = timed.update(grads, timed.init(params, total_steps=10), params)
    for k in params:
        assert torch.equal(p1[k], p2[k])
        assert torch.equal(s1["m"][k], s2["m"][k])
    assert timer.calls == 1 and timer.rows == 16 * 8 + 8 and timer.seconds > 0


def test_mlp_timer_counts_the_buffer_reusing_step_once():
    """A group large enough for the step that reuses its buffers goes through ``_mlp_into``: timed
    once per group, the step unchanged."""
    from bench.mlp_throughput import MLPTimer, bound_optimizer
    from optimizers.learned import REUSE_MIN_ELEMENTS

    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(128, REUSE_MIN_ELEMENTS // 64, generator=gen)}
    grads = {"w": torch.randn(params["w"].shape, generator=gen)}
    plain, timed = bound_optimizer(), bound_optimizer()
    timer = MLPTimer(timed)
    with torch.no_grad():
        p1, _ = plain.update(grads, plain.init(params, total_steps=10), params)
        p2, _ = timed.update(grads, timed.init(params, total_steps=10), params)
    assert torch.equal(p1["w"], p2["w"])
    assert timer.calls == 1 and timer.rows == params["w"].numel() and timer.seconds > 0
