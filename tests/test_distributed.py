"""Scale-out under torch.distributed (gloo, CPU): 2 processes compute what 1 process computes.

* the meta-gradient at every step and the meta-parameters after K outer steps (TBPTT and PES, uneven
  and even shards) equal the single-process ones (float tolerance: the summation order differs);
* a checkpoint written under 2 processes holds every member and reloads under any process count;
* sharded ``evaluate()`` returns the single-process results, the same on every rank;
* a killed rank ends the job (torchrun tears it down), re-launching the same command resumes from the
  last checkpoint and ends with the same weights as an uninterrupted run; ``torchrun --max-restarts``
  does the same within one command;
* a hung rank makes the others fail after the collective timeout instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from meta import distributed as D

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV_FAULT = "OUROBOROS_TEST_FAULT"  # read by the launcher below, never by the library
FAULT_LAUNCHER = str(ROOT / "tests" / "_fault_launcher.py")  # runs train.py with the fault planted

pytestmark = pytest.mark.skipif(not (D._dist().is_available() and D._dist().is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           D.ENV_TIMEOUT: "60"}
    env.pop(ENV_FAULT, None)
    env.update(extra)
    return env


def _run(cmd, timeout=240, **env):
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout,
                          check=False)


# ---- pure helpers ---------------------------------------------------------------------------------
def test_shard_partitions_deterministically():
    ids = list(range(7))
    for mode in ("contiguous", "strided"):
        parts = [D.shard(ids, mode=mode, rank_=r, world=3) for r in range(3)]
        assert sorted(i for p in parts for i in p) == ids and all(parts)
    assert [D.shard(ids, rank_=r, world=3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert D.shard(ids) == ids  # no process group: everything


def test_single_process_helpers_are_no_ops():
    assert not D.active() and D.is_main() and D.rank() == 0 and D.world_size() == 1
    tree = {"a": torch.ones(2), "b": [torch.zeros(1)]}
    assert D.all_reduce_sum(tree) is tree
    assert D.broadcast_object(3) == 3 and D.all_gather_object(3) == [3] and D.gather_object(3) == [3]
    assert D.run_on_main(lambda x: x + 1, 1) == 2 and D.any_true(True) and not D.any_true(False)
    assert D.init() == D.DistContext()  # WORLD_SIZE unset: no process group


# ---- 2 processes == 1 process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_and_single(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    import _distributed_worker as W

    out = tmp_path_factory.mktemp("dist2")
    r = _run([*TORCHRUN, str(ROOT / "tests" / "_distributed_worker.py"), str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]
    single = W.compute(str(tmp_path_factory.mktemp("dist1")))
    return ranks, single, out


def _close(a: dict, b: dict, rtol=1e-5, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("estimator", ["tbptt", "pes", "curated"])
def test_two_processes_match_one(sharded_and_single, estimator):
    ranks, single, _ = sharded_and_single
    ref = single[estimator]
    assert [r["world"] for r in ranks] == [2, 2]
    shards = [r[estimator]["member_ids"] for r in ranks]
    assert sorted(shards[0] + shards[1]) == ref["member_ids"] and shards[0] and shards[1]
    for r in ranks:
        got = r[estimator]
        assert len(got["grads"]) == len(ref["grads"])
        for g, g_ref in zip(got["grads"], ref["grads"]):  # the meta-gradient of every outer step
            _close(g, g_ref)
        _close(got["theta"], ref["theta"])
        assert got["members_used"] == ref["members_used"]  # population-wide, reduced
        assert got["member_scalars"] == ref["member_scalars"]  # every member's position, on every rank
        assert got["meta_loss"] == pytest.approx(ref["meta_loss"], rel=1e-5, abs=1e-6)
    for k in ranks[0][estimator]["theta"]:  # ranks hold bit-identical meta-parameters
        assert torch.equal(ranks[0][estimator]["theta"][k], ranks[1][estimator]["theta"][k])
    if "sampler" in ref:  # curated: the same statistics, probabilities and task history on every rank
        assert sum(ref["sampler"]["counts"]) > 0
        for r in ranks:
            assert r[estimator]["sampler"]["history"] == ref["sampler"]["history"]
            assert r[estimator]["sampler"]["counts"] == ref["sampler"]["counts"]
            assert r[estimator]["sampler"]["progress"] == pytest.approx(ref["sampler"]["progress"], rel=1e-6)
            assert r[estimator]["sampler"]["probs"] == pytest.approx(ref["sampler"]["probs"], rel=1e-6)
            assert r[estimator]["reloaded_sampler"] == r[estimator]["sampler"]
        assert ranks[0][estimator]["sampler"] == ranks[1][estimator]["sampler"]


def test_checkpoint_from_two_processes_is_complete_and_resumes_anywhere(sharded_and_single):
    from meta.trainer import MetaTrainer
    from optimizers import checkpoint as ckpt

    ranks, single, out = sharded_and_single
    for est in ("tbptt", "pes"):
        tensors, meta = ckpt.load(out / est / "checkpoint")
        assert len(meta["members"]) == len(single[est]["member_ids"])
        # same format, keys and content as the single-process checkpoint
        ref_tensors, ref_meta = ckpt.load(Path(single["out_dir"]) / est / "checkpoint")
        assert sorted(tensors) == sorted(ref_tensors)
        _close(tensors, ref_tensors)
        assert {k: v for k, v in meta.items() if k != "run_config"} == \
            {k: v for k, v in ref_meta.items() if k != "run_config"}
        # reloaded under 2 processes each rank kept its shard; reloaded here (1 process) it has all
        for r in ranks:
            assert [i for i, has in enumerate(r[est]["reloaded_members"]) if has] == r[est]["member_ids"]
            _close(r[est]["reloaded_theta"], r[est]["theta"], rtol=0, atol=0)
        whole = MetaTrainer.load(out / est / "checkpoint")
        assert all(m is not None for m in whole.est_state.members)
        whole.train(whole.step + 1, progress=False)  # and keeps training in one process


def test_sharded_evaluate_matches_single_process(sharded_and_single):
    ranks, single, _ = sharded_and_single

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("runtime_s", "run_seconds", "workers", "ranks")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    assert ranks[0]["evaluate"]["meta"]["ranks"] == 2 and single["evaluate"]["meta"]["ranks"] == 1
    ref = json.dumps(strip(single["evaluate"]), sort_keys=True)
    for r in ranks:  # every rank returns the full, single-process result
        assert json.dumps(strip(r["evaluate"]), sort_keys=True) == ref
    assert ranks[0]["evaluate"]["meta"]["runtime_s"] == ranks[1]["evaluate"]["meta"]["runtime_s"]


# ---- faults: kill, relaunch, --max-restarts, hang ---------------------------------------------------
def _cli(out: Path) -> list[str]:
    return ["train.py", "meta-train", "--preset", "smoke", "--quiet", "--meta.outer_steps", "6",
            "--checkpoint-every", "2", "--out-dir", str(out), "--resume", "auto"]


def _same_checkpoints(a: Path, b: Path) -> None:
    from optimizers import checkpoint as ckpt

    ta, ma = ckpt.load(a)
    tb, mb = ckpt.load(b)
    assert ma["step"] == mb["step"] == 6
    assert ma["members"] == mb["members"] and ma["episodes_done"] == mb["episodes_done"]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    r = _run([*TORCHRUN, *_cli(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_killed_rank_stops_the_job_and_relaunch_resumes(tmp_path, uninterrupted):
    out = tmp_path / "run"
    fault = f"rank=1,step=3,once={tmp_path / 'fired'}"
    t0 = time.time()
    r = _run([*TORCHRUN, FAULT_LAUNCHER, *_cli(out)], **{ENV_FAULT: fault})
    assert r.returncode != 0 and (tmp_path / "fired").exists()
    assert time.time() - t0 < 60  # the survivor did not wait for the dead rank
    from optimizers import checkpoint as ckpt

    assert ckpt.load(out / "checkpoint")[1]["step"] == 2  # the last checkpoint before the fault
    r = _run([*TORCHRUN, FAULT_LAUNCHER, *_cli(out)], **{ENV_FAULT: fault})  # the very same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 2/6" in r.stdout
    _same_checkpoints(out / "checkpoint", uninterrupted / "checkpoint")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_torchrun_max_restarts_resumes_automatically(tmp_path, uninterrupted):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "--max-restarts", "1", FAULT_LAUNCHER, *_cli(out)[:-2]]  # no --resume: restarts resume
    r = _run(cmd, **{ENV_FAULT: f"rank=1,step=3,once={tmp_path / 'fired'}"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "fired").exists() and "resumed from" in r.stdout
    _same_checkpoints(out / "checkpoint", uninterrupted / "checkpoint")


HANG = textwrap.dedent("""
    import os, sys, time, torch
    from meta import distributed as D
    open(sys.argv[1] + os.environ["RANK"], "w").close()  # imported; start together (slow imports
    while not os.path.exists(sys.argv[1] + "go"):          # under load must not eat the 2 s timeout)
        time.sleep(0.02)
    D.init(timeout=2)
    if D.rank() == 1:
        time.sleep(60)
    t0 = time.time()
    try:
        D.all_reduce_sum(torch.ones(1))
    except RuntimeError as e:
        print(f"rank0 failed after {time.time() - t0:.1f}s: {e}", flush=True)
        D.shutdown()
        print("shut down", flush=True)
        sys.exit(5)
""")


def test_a_hung_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    flag = str(tmp_path / "flag")
    procs = [subprocess.Popen([sys.executable, str(script), flag], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 60
        while not all(os.path.exists(flag + str(r)) for r in range(2)) and time.time() < deadline:
            time.sleep(0.02)
        Path(flag + "go").touch()
        out, err = procs[0].communicate(timeout=45)
        assert procs[0].returncode == 5, out + err[-2000:]
        assert "rank0 failed after" in out
        assert float(out.split("after ")[1].split("s")[0]) < 10
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---- generations under torchrun -------------------------------------------------------------------
LAX = ["--gov.min_improvement", "-100", "--gov.long_tolerance", "100", "--gov.max_overfit_gap", "100",
       "--gov.loop_tolerance", "100", "--gov.rate_limit", "100"]  # adopt everything: gen 1 is trained by gen 0


def _generations_cli(out: Path) -> list[str]:
    return ["train.py", "generations", "--preset", "smoke", "--quiet", "--wandb", "disabled", "--out-dir", str(out),
            *LAX]


def _generations_summary(run: Path) -> dict:
    from meta.lineage import Lineage
    from optimizers import checkpoint as ckpt

    lineage = Lineage(run)
    every = lineage.verify()  # the hash chain and every weights file check out
    entries = [e for e in every if e["kind"] == "generation"]
    out = {"sustain": [(e["kind"], e.get("generation"), e.get("decision")) for e in every if e["kind"] != "generation"],
           "entries": [(e["kind"], e["generation"], e["status"], e["trained_by"], e["parent"], e["verdict"]["decision"],
                        e["outer_steps"]) for e in entries],
           "weights": [ckpt.load_learned_optimizer(lineage.root / e["weights"])[1] for e in entries],
           "scores": []}
    for e in entries:
        review = json.loads((run / f"gen-{e['generation']:04d}" / "review.json").read_text())["evidence"]
        out["scores"].append({name: d["scores"] for name, d in review["held_out"]["H"].items()})
    return out


def test_generations_under_two_processes_match_one_and_resume_after_a_killed_rank(tmp_path):
    one = tmp_path / "one"
    r = _run([sys.executable, *_generations_cli(one)])
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    fault = f"rank=1,step=3,once={tmp_path / 'fired'}"  # dies in generation 0's meta-training, after step 3
    r = _run([*TORCHRUN, FAULT_LAUNCHER, *_generations_cli(two)], **{ENV_FAULT: fault})
    assert r.returncode != 0 and (tmp_path / "fired").exists()
    assert not (two / "lineage" / "entries").exists()  # nothing half-written reached the lineage
    r = _run([*TORCHRUN, FAULT_LAUNCHER, *_generations_cli(two)], **{ENV_FAULT: fault})  # the very same command
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "gen 0 candidate: meta-training by adam for 4 outer steps (from step 2)" in r.stdout
    assert "| 1 | adopted (incumbent) | gen-0 |" in (two / "report.md").read_text()

    a, b = _generations_summary(one), _generations_summary(two)
    assert a["entries"] == b["entries"] == [("generation", 0, "adopted", "adam", None, "adopt", 4),
                                            ("generation", 1, "adopted", "gen-0", 0, "adopt", 2)]
    for wa, wb in zip(a["weights"], b["weights"]):
        _close(wa, wb)
    assert {"candidate", "incumbent", "control"} <= set(b["scores"][1])  # gen 1 had an incumbent and a control
    for sa, sb in zip(a["scores"], b["scores"]):  # the governor saw the same held-out evidence
        assert sa.keys() == sb.keys()
        for name in sa:
            assert sb[name] == pytest.approx(sa[name], rel=1e-4, abs=1e-5)
    log = (two / "gen-0000" / "candidate" / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in log.splitlines()]
    assert steps == [1, 2, 3, 4]  # rank 0 alone logged; the resumed run dropped the dead attempt's step 3


# ---- --procs: train.py re-launches itself under torchrun ----------------------------------------------
def test_procs_flag_relaunches_under_torchrun_with_the_same_maths(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = [sys.executable, str(ROOT / "train.py"), "meta-train", "--preset", "smoke", "--quiet",
            "--meta.population", "4", "--meta.outer_steps", "3"]
    r1 = _run([*base, "--out-dir", str(one)])
    r2 = _run([*base, "--out-dir", str(two), "--procs", "2"])
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "running on 2 processes" in r2.stderr and "2 processes (gloo)" in r2.stdout
    from optimizers import checkpoint as ckpt

    (a, ma), (b, mb) = ckpt.load(one / "checkpoint"), ckpt.load(two / "checkpoint")
    assert ma["step"] == mb["step"] == 3
    for k in a:
        if k.startswith("theta/"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # a bad value fails once, in the parent, before anything is launched
    r3 = _run([*base, "--out-dir", str(tmp_path / "bad"), "--procs", "2", "--meta.outer_lr", "nan"])
    assert r3.returncode == 2 and "running on" not in r3.stderr and "meta.outer_lr" in r3.stderr
