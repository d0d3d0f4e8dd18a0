"""bench/drop_in_trial.py: tuned Adam is the grid's best run, the table's ratios are the runs' floored log
ratios, every task builds and trains, and a bad task name is refused before any work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import drop_in_trial as trial  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "drop_in_trial.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_report_is_the_runs_tuned_adam_is_the_grid_best(tmp_path):
    proc = _run("--tasks", "logreg_synth,sine_regression", "--horizons", "6", "--seeds", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["task"], r["seed"]) for r in rows] == [("logreg_synth", 0), ("logreg_synth", 1),
                                                       ("sine_regression", 0), ("sine_regression", 1)]
    for r in rows:
        best = min(r["adam_all"].values(), key=lambda v: v[0])
        assert r["adam_tuned"] == best and r["adam_default"] == r["adam_all"]["0.001"]
        assert all(math.isfinite(v) and v > 0 for v in r["learned"] + r["initial"])
    md = (tmp_path / "results.md").read_text()
    for task in ("logreg_synth", "sine_regression"):
        rs = [r for r in rows if r["task"] == task]
        ratios = [trial._log_ratio(r["learned"][0], r["adam_tuned"][0], r["initial"][0]) for r in rs]
        assert f"| {task} | 6 | {sum(ratios) / len(ratios):+.3f} [" in md


def test_log_ratio_floor_and_divergence():
    assert trial._log_ratio(2.0, 1.0, 10.0) == pytest.approx(math.log(2.0))
    assert trial._log_ratio(1e-9, 1e-6, 1.0) == 0.0  # both below 1e-3 x the initial loss: a tie
    assert trial._log_ratio(math.inf, 1.0, 1.0) is None


@pytest.mark.parametrize("name", trial.TASKS)
def test_every_task_builds_deterministically_and_learns(name):
    losses = []
    for _ in range(2):
        model, loss_fn, data, batch = trial.make_task(name, 3)
        x, y = data[:2]
        with torch.no_grad():
            losses.append(float(loss_fn(model(x[:batch]), y[:batch])))
    assert losses[0] == losses[1]
    before = trial.initial_losses(name, 3)
    after = trial.train(name, 3, 15, lambda ps, _: torch.optim.Adam(ps, lr=3e-3))
    assert after[0] < before[0]


def test_unknown_task_is_refused():
    proc = _run("--tasks", "mnist_resnet", "--out", "/nonexistent")
    assert proc.returncode == 2 and "unknown task 'mnist_resnet'" in proc.stderr
