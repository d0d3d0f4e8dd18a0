"""Recursive generations: the loop, its control arm, resume at any point, approval, rollback, and a
lineage whose hash chain catches tampering."""

import json
import threading
import time
from dataclasses import replace

import pytest

from meta.generations import GenerationRunner, gen_dir
from meta.lineage import ADOPTED, PENDING, REJECTED, Lineage, LineageError
from optimizers import checkpoint as ckpt
from optimizers.learned import ConfigError
from train import main, presets

LAX = {"min_improvement": -100.0, "long_tolerance": 100.0, "max_overfit_gap": 100.0, "loop_tolerance": 100.0,
           "rate_limit": 100.0, "sustain_tasks": 0}  # no re-check entries: the lineage holds generations only


def _cfg(tmp_path, name="run", gens=2, approval="auto", **gov):
    cfg = presets()["smoke"]
    return replace(cfg, out_dir=str(tmp_path / name), gen=replace(cfg.gen, max_generations=gens, approval=approval),
                   gov=replace(cfg.gov, **{**LAX, **gov}))


def _run(cfg, **kw):
    return GenerationRunner(cfg, cfg.out_dir, progress=False, log=lambda s: None, **kw).run()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-generation run with a permissive governor (everything is adopted)."""
    cfg = _cfg(tmp_path_factory.mktemp("gens"))
    _run(cfg)
    return cfg


def test_successor_is_trained_by_the_incumbent_with_an_adam_control(straight):
    lineage = Lineage(straight.out_dir)
    entries = lineage.verify()
    st = lineage.state(entries)
    assert [e["generation"] for e in entries] == [0, 1]
    assert st.status == {0: ADOPTED, 1: ADOPTED} and st.incumbent == 1
    gen0, gen1 = st.records[0], st.records[1]
    assert gen0["trained_by"] == "adam" and gen0["control"] is None and gen0["parent"] is None
    assert gen1["trained_by"] == "gen-0" and gen1["parent"] == 0 and gen1["parent_hash"] == gen0["hash"]
    assert gen1["control"]["trained_by"] == "adam"
    assert gen1["distribution_digest"] == gen0["distribution_digest"]
    # the recursion changed something: the two arms started from the same weights and ended apart
    _, cand, _ = ckpt.load_learned_optimizer(lineage.root / gen1["weights"])
    _, ctrl, _ = ckpt.load_learned_optimizer(f"{straight.out_dir}/{gen1['control']['weights']}")
    assert any(not bool((cand[k] == ctrl[k]).all()) for k in cand)
    review = json.loads((gen_dir(straight.out_dir, 1) / "review.json").read_text())
    assert {"candidate", "incumbent", "control", "tuned_adam"} <= set(review["evidence"]["held_out"]["H"])
    for name in ("report.md", "report.png", "report.json"):
        assert (gen_dir(straight.out_dir, 0).parent / name).is_file()
    assert "| 1 | adopted (incumbent) | gen-0 |" in (gen_dir(straight.out_dir, 0).parent / "report.md").read_text()


def test_resume_between_and_during_generations_keeps_the_lineage(straight, tmp_path):
    cfg = _cfg(tmp_path, gens=1)
    _run(cfg)  # "killed" between generations: generation 0 finished
    gen0 = Lineage(cfg.out_dir).entries()[0]
    cfg = replace(cfg, gen=replace(cfg.gen, max_generations=2))
    calls = {"n": 0}

    def stop_mid_generation():  # stop after one outer step of generation 1's candidate
        calls["n"] += 1
        return calls["n"] > 2

    _run(cfg, should_stop=stop_mid_generation)
    assert len(Lineage(cfg.out_dir).entries()) == 1
    assert ckpt.exists(gen_dir(cfg.out_dir, 1) / "candidate" / "checkpoint")
    _run(cfg)  # the same command again: resumes generation 1 from its checkpoint
    entries = Lineage(cfg.out_dir).verify()
    assert entries[0] == gen0  # the finished generation was not touched
    want = Lineage(straight.out_dir).entries()
    assert [e["weights_sha256"] for e in entries] == [e["weights_sha256"] for e in want]
    assert [e["verdict"]["decision"] for e in entries] == [e["verdict"]["decision"] for e in want]


def test_tampered_lineage_is_detected(straight, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(straight.out_dir, run)
    lineage = Lineage(run)
    path = lineage.entries_dir / "000000.json"
    entry = json.loads(path.read_text())
    entry["status"] = REJECTED  # rewrite history
    path.write_text(json.dumps(entry))
    with pytest.raises(LineageError, match="entry 0 .*does not match its hash"):
        lineage.verify()
    assert main(["lineage", str(run)]) == 2
    assert "does not match its hash" in capsys.readouterr().err
    # re-hashing the edited entry does not help: the next entry's prev_hash no longer matches
    from meta.lineage import canonical_hash

    entry["hash"] = canonical_hash(entry)
    path.write_text(json.dumps(entry))
    with pytest.raises(LineageError, match="entry 1: prev_hash"):
        lineage.verify()


def test_replaced_weights_are_detected(straight, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(straight.out_dir, run)
    lineage = Lineage(run)
    w0, w1 = (lineage.root / e["weights"] for e in lineage.entries())
    shutil.rmtree(w0)
    shutil.copytree(w1, w0)
    with pytest.raises(LineageError, match="do not match their recorded sha256"):
        lineage.verify()


def test_rollback_and_lineage_command(straight, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(straight.out_dir, run)
    assert main(["rollback", str(run), "0", "--reason", "test"]) == 0
    assert Lineage(run).state().incumbent == 0
    assert main(["lineage", str(run)]) == 0
    out = capsys.readouterr().out
    assert "rollback to gen 0" in out and "hash chain verified" in out
    assert (run / "lineage.png").is_file()
    assert main(["rollback", str(run), "7"]) == 2  # not in the lineage


def _run_in_thread(cfg):
    box = {}
    t = threading.Thread(target=lambda: box.update(result=_run(cfg)), daemon=True)
    t.start()
    return t, box


def _wait_pending(run, g, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if Lineage(run).entries_dir.is_dir() and Lineage(run).state().status.get(g) == PENDING:
            return
        time.sleep(0.05)
    raise AssertionError("no pending verdict")


def test_file_approval_waits_for_approve(tmp_path):
    cfg = _cfg(tmp_path, gens=1, approval="file")
    t, _ = _run_in_thread(cfg)
    _wait_pending(cfg.out_dir, 0)
    assert t.is_alive()  # waiting, not adopted on its own
    assert main(["approve", cfg.out_dir, "0", "--by", "tester"]) == 0
    t.join(60)
    assert not t.is_alive()
    st = Lineage(cfg.out_dir).state()
    assert st.status[0] == ADOPTED and st.incumbent == 0
    assert main(["approve", cfg.out_dir, "0"]) == 2  # nothing pending any more


def test_rate_limiter_holds_a_large_jump_even_in_auto_mode(tmp_path, monkeypatch):
    """A 'hold' verdict (the rate limiter's) waits for a human even when approval is automatic."""
    from meta.governor import Governor, Verdict

    decide = Governor.decide

    def held(self, ev):
        v = decide(self, ev)
        return Verdict("hold", ["rate limiter: planted", *v.reasons], v.checks, v.improvement)

    monkeypatch.setattr(Governor, "decide", held)
    cfg = _cfg(tmp_path, gens=1)
    t, _ = _run_in_thread(cfg)
    _wait_pending(cfg.out_dir, 0)
    assert Lineage(cfg.out_dir).entries()[0]["verdict"]["decision"] == "hold"
    assert main(["reject", cfg.out_dir, "0"]) == 0
    t.join(60)
    st = Lineage(cfg.out_dir).state()
    assert st.status[0] == REJECTED and st.incumbent is None


def test_strict_governor_rejects_and_adam_stays_incumbent(tmp_path):
    cfg = _cfg(tmp_path, gens=1, min_improvement=100.0)
    _run(cfg)
    st = Lineage(cfg.out_dir).state()
    assert st.status == {0: REJECTED} and st.incumbent is None


def test_a_run_directory_refuses_another_config(straight):
    other = replace(straight, meta=replace(straight.meta, outer_lr=1e-2))
    with pytest.raises(ConfigError, match="meta.outer_lr"):
        GenerationRunner(other, straight.out_dir, progress=False).check_config()


def test_stop_file_ends_the_run(tmp_path):
    cfg = _cfg(tmp_path, gens=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "STOP").touch()
    _run(cfg)
    assert not Lineage(cfg.out_dir).entries()


def test_bad_successor_config_is_rejected_before_work():
    from meta.config import GenConfig

    with pytest.raises(ConfigError, match="unknown LOConfig key"):
        GenConfig(successor_lo='{"hidden_widht": 16}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        GenConfig(successor_lo="{hidden_width: 16}")


def test_successor_may_change_architecture(tmp_path):
    cfg = _cfg(tmp_path, gens=2)
    cfg = replace(cfg, gen=replace(cfg.gen, successor_lo='{"hidden_width": 4}'))
    _run(cfg)
    st = Lineage(cfg.out_dir).state()
    gen0, gen1 = st.records[0], st.records[1]
    assert gen0["lo_config"]["hidden_width"] == 8 and gen1["lo_config"]["hidden_width"] == 4
    assert gen1["trained_by"] == "gen-0" and gen1["parent"] is None  # new architecture: fresh start
    assert gen1["num_theta"] < gen0["num_theta"]


def test_an_edited_cached_review_is_done_again_not_trusted(tmp_path):
    """A review cached before a kill, then edited ("reject" -> "adopt"), must not reach the lineage."""
    from meta.trainer import MetaTrainer

    cfg = _cfg(tmp_path, gens=1, min_improvement=100.0)  # a governor that rejects everything
    logs: list[str] = []
    runner = GenerationRunner(cfg, cfg.out_dir, progress=False, log=logs.append)
    cand = MetaTrainer(replace(cfg, out_dir=str(tmp_path / "cand")))
    verdict, _ = runner.review(0, cand, None, None)
    assert verdict.decision == "reject"
    path = gen_dir(cfg.out_dir, 0) / "review.json"
    data = json.loads(path.read_text())
    n_logs = len(logs)
    assert runner.review(0, cand, None, None)[0].decision == "reject" and len(logs) == n_logs  # reused as is
    data["verdict"]["decision"] = "adopt"
    path.write_text(json.dumps(data))
    verdict, _ = runner.review(0, cand, None, None)
    assert verdict.decision == "reject"
    assert any("does not match its digest" in s for s in logs)
