"""Fault injection: kill -9 at a random point of meta-training and of a generations run, then re-launch the
same command; the result must be what an uninterrupted run gives. (The bad-input table and corrupted
checkpoints are in ``test_hardening.py``; a killed rank under torchrun in ``test_distributed.py``.)

The kill points are drawn from a seeded generator, so a failure reproduces; ``OUROBOROS_FAULT_SEED``
draws other points.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meta.lineage import Lineage
from optimizers import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("OUROBOROS_FAULT_SEED", "0"))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def _kill_when(cmd: list[str], ready, timeout: float = 240) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true (it must not have finished by then)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("draw", [0, 1])
def test_kill_9_during_meta_training_then_relaunch_gives_the_uninterrupted_weights(tmp_path, draw):
    rng = random.Random(SEED * 1000 + draw)
    common = ["meta-train", "--preset", "smoke", "--quiet", "--meta.outer_steps", "12", "--checkpoint-every", "3",
              "--resume", "auto"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert subprocess.run(_cmd(*common, "--out-dir", str(straight)), cwd=ROOT, env=_env(),
                          capture_output=True, timeout=240).returncode == 0
    kill_after = rng.randint(1, 10)  # outer steps logged before the kill
    _kill_when(_cmd(*common, "--out-dir", str(cut)), lambda: _lines(cut / "metrics.jsonl") >= kill_after)
    r = subprocess.run(_cmd(*common, "--out-dir", str(cut)), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    (a, ma), (b, mb) = ckpt.load(straight / "checkpoint"), ckpt.load(cut / "checkpoint")
    assert ma["step"] == mb["step"] == 12
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_kill_9_during_a_generations_run_then_relaunch_gives_the_same_lineage(tmp_path):
    rng = random.Random(SEED * 1000 + 7)
    lax = ["--gov.min_improvement", "-100", "--gov.long_tolerance", "100", "--gov.max_overfit_gap", "100",
           "--gov.loop_tolerance", "100", "--gov.rate_limit", "100"]
    common = ["generations", "--preset", "smoke", "--quiet", "--max-generations", "2", *lax]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert subprocess.run(_cmd(*common, "--out-dir", str(straight)), cwd=ROOT, env=_env(),
                          capture_output=True, timeout=300).returncode == 0
    # kill somewhere in generation 1: while its candidate or control meta-trains, or during its review
    point = rng.choice(["candidate", "control", "review"])
    marks = {"candidate": cut / "gen-0001" / "candidate" / "metrics.jsonl",
             "control": cut / "gen-0001" / "control" / "metrics.jsonl",
             "review": cut / "gen-0001" / "control" / "learned_optimizer"}
    _kill_when(_cmd(*common, "--out-dir", str(cut)), lambda: marks[point].exists())
    r = subprocess.run(_cmd(*common, "--out-dir", str(cut)), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ea, eb = Lineage(straight).verify(), Lineage(cut).verify()
    assert [(e["kind"], e.get("generation"), e.get("status")) for e in ea] == \
           [(e["kind"], e.get("generation"), e.get("status")) for e in eb]
    assert [e.get("weights_sha256") for e in ea] == [e.get("weights_sha256") for e in eb]
