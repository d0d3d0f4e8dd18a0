"""Hardening (bad input and data safety): every case here failed before the fix, silently or destructively.

- ``--overwrite`` deletes only a generations run's own files, and only after the config and the data
  were validated;
- ``--resume`` continues the checkpoint's own config; a conflicting flag is an error naming the field;
- non-finite, out-of-range and wrongly typed config values (CLI and JSON) are errors naming the key.
"""

from __future__ import annotations

import json

import pytest
import torch

from meta.config import RunConfig
from meta.generations import clear_run_dir
from optimizers import checkpoint as ckpt
from optimizers.learned import ConfigError
from train import main


# ---- --overwrite never deletes what the project did not write ------------------------------------------
def test_generations_overwrite_refuses_a_foreign_directory(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    code = main(["generations", "--preset", "smoke", "--out-dir", str(precious), "--overwrite", "--quiet"])
    assert code == 2
    assert (precious / "thesis.tex").read_text() == "x"
    assert "thesis.tex" in capsys.readouterr().err


def test_generations_overwrite_validates_the_data_before_deleting(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "lineage").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    monkeypatch.setenv("OUROBOROS_DATA", str(tmp_path / "no-data-here"))
    code = main(["generations", "--preset", "smoke", "--out-dir", str(run), "--overwrite", "--quiet",
                 "--meta.distribution", "mnist_mlp"])
    assert code == 2
    assert (run / "config.json").exists() and (run / "lineage").is_dir()


def test_clear_run_dir_deletes_a_generations_layout_only(tmp_path):
    run = tmp_path / "run"
    for d in ("lineage/entries", "gen-0000/candidate", "gen-0001"):
        (run / d).mkdir(parents=True)
    for f in ("config.json", "report.md", "report.png", "STOP"):
        (run / f).write_text("x")
    clear_run_dir(run)
    assert not run.exists()
    clear_run_dir(run)  # missing: nothing to do
    (run / "gen-0000").mkdir(parents=True)
    (run / "gen-12").mkdir()  # not the layout's gen-NNNN
    with pytest.raises(ConfigError, match="gen-12"):
        clear_run_dir(run)
    assert (run / "gen-0000").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        clear_run_dir(tmp_path / "file")


# ---- --resume continues the stored config ----------------------------------------------------------
def _smoke(out, *extra):
    return ["meta-train", "--preset", "smoke", "--out-dir", str(out), "--quiet", *extra]


def test_resume_uses_the_stored_config_and_may_extend_it(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_smoke(straight, "--meta.outer_steps", "6", "--meta.outer_lr", "0.01")) == 0
    assert main(_smoke(resumed, "--meta.outer_steps", "3", "--meta.outer_lr", "0.01")) == 0
    # no --meta.outer_lr here: the preset's 3e-3 must not replace the run's 0.01
    assert main(_smoke(resumed, "--resume", "--meta.outer_steps", "6")) == 0
    stored = json.loads((resumed / "config.json").read_text())
    assert stored["meta"]["outer_lr"] == 0.01 and stored["meta"]["outer_steps"] == 6
    (a, meta_a), (b, meta_b) = ckpt.load(straight / "checkpoint"), ckpt.load(resumed / "checkpoint")
    assert meta_a["step"] == meta_b["step"] == 6
    for k in a:
        if k.startswith("theta/"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("flag,value", [("--meta.population", "4"), ("--meta.truncation", "3"),
                                        ("--meta.seed", "5"), ("--lo.hidden_width", "4")])
def test_resume_refuses_a_conflicting_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert main(_smoke(out, "--meta.outer_steps", "2")) == 0
    before = (out / "config.json").read_text()
    assert main(_smoke(out, "--resume", flag, value)) == 2
    err = capsys.readouterr().err
    assert flag[2:] in err and "conflict" in err
    assert (out / "config.json").read_text() == before


# ---- values: finite, in range, of the right type -------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--meta.outer_lr", "nan"), ("--meta.outer_lr", "inf"), ("--meta.sigma", "-inf"),
    ("--lo.grad_clip", "-1"), ("--lo.time_taus", "0,1"), ("--eval.num_tasks", "-3"),
    ("--meta.num_train_tasks", "-1"), ("--meta.grad_clip_value", "-3"), ("--gov.loop_tolerance", "nan"),
    ("--eval.adam_lrs", "1e-3,nan"), ("--procs", "0"), ("--threads", "-1"),
])
def test_bad_cli_values_are_errors(tmp_path, capsys, flag, value):
    assert main(_smoke(tmp_path / "run", f"{flag}={value}")) == 2  # '=': argparse reads "-inf" as a flag
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("config,key", [
    ({"meta": {"population": "2"}}, "meta.population"), ({"meta": {"population": 2.5}}, "meta.population"),
    ({"meta": {"population": None}}, "meta.population"), ({"meta": {"population": [2]}}, "meta.population"),
    ({"meta": {"outer_lr": float("nan")}}, "meta.outer_lr"), ({"meta": {"outer_lr": float("inf")}}, "meta.outer_lr"),
    ({"lo": {"hidden_width": True}}, "lo.hidden_width"), ({"eval": {"adam_lrs": ["a"]}}, "eval.adam_lrs"),
    ({"gov": {"rate_limit": "high"}}, "gov.rate_limit"), ({"meta": 3}, "meta"), ([], "JSON object"),
    ({"threads": 1.5}, "threads"),
])
def test_bad_json_configs_are_errors_naming_the_key(tmp_path, capsys, config, key):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))  # json.dumps writes NaN / Infinity as Python's json reads them
    assert main(_smoke(tmp_path / "run", "--config", str(path))) == 2
    assert key in capsys.readouterr().err


def test_integral_floats_from_json_become_integers():
    cfg = RunConfig.from_dict({"meta": {"population": 4.0}})
    assert cfg.meta.population == 4 and isinstance(cfg.meta.population, int)


# ---- OS errors: one error line, no traceback --------------------------------------------------------
def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(_smoke(target)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert target.read_text() == "x"


def test_evaluate_checks_its_output_directory_before_evaluating(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(_smoke(run)) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "eval").write_text("not a directory")
    import meta.evaluate

    def must_not_run(*a, **k):
        raise AssertionError("evaluation ran although its results could not be written")

    monkeypatch.setattr(meta.evaluate, "evaluate", must_not_run)
    code = main(["evaluate", "--preset", "smoke", "--quiet", "--checkpoint", str(run / "checkpoint"),
                 "--out-dir", str(other)])
    assert code == 2 and "error:" in capsys.readouterr().err


def test_broken_pipe_is_not_a_traceback():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # `true` exits without reading, long before train.py (importing torch) writes: the write gets EPIPE
    cmd = f"{sys.executable} {root / 'train.py'} presets | true"
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=root, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# ---- stopped runs, leftovers, permissions ------------------------------------------------------------
def test_a_stop_file_left_in_place_is_reported_and_the_status_says_stopped(tmp_path, capsys):
    run = tmp_path / "gens"
    run.mkdir()
    (run / "STOP").touch()
    code = main(["generations", "--preset", "smoke", "--out-dir", str(run), "--quiet"])
    assert code == 4
    assert "STOP exists: not starting" in capsys.readouterr().out
    assert not list(run.glob("gen-*"))


def test_checkpoint_files_get_umask_permissions_and_leftover_temp_files_go(tmp_path):
    import os
    import stat

    path = tmp_path / "ck"
    path.mkdir()
    (path / ".record.json.abc123.tmp").write_text("half-written by a killed process")
    ckpt.save(path, {"x": torch.ones(2)}, {"kind": "test"})
    assert not list(path.glob(".*.tmp"))
    mask = os.umask(0)
    os.umask(mask)
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


# ---- the checkpoint's JSON side ------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["step_edited", "meta_null", "step_text_unhashed", "members_deleted_unhashed",
                                  "step_negative_unhashed"])
def test_a_damaged_checkpoint_record_is_a_clear_error(tmp_path, capsys, edit):
    out = tmp_path / "run"
    assert main(_smoke(out, "--meta.outer_steps", "2")) == 0
    record_path = out / "checkpoint" / ckpt.RECORD
    record = json.loads(record_path.read_text())
    if edit == "step_edited":  # hashed: any edit is caught
        record["meta"]["step"] = 1
    elif edit == "meta_null":
        record["meta"] = None
    else:  # an older, unhashed record: the fields themselves are checked
        del record["meta_sha256"]
        if edit == "step_text_unhashed":
            record["meta"]["step"] = "abc"
        elif edit == "step_negative_unhashed":
            record["meta"]["step"] = -5
        else:
            del record["meta"]["members"]
    record_path.write_text(json.dumps(record))
    assert main(_smoke(out, "--resume", "--meta.outer_steps", "4")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# ---- the lineage: one process per run, checks under the lock -------------------------------------------
def test_a_second_generations_process_on_a_run_is_refused(tmp_path):
    from meta.generations import GenerationRunner
    from meta.lineage import Lineage, LineageError

    from dataclasses import replace

    cfg = replace(_smoke_cfg(), out_dir=str(tmp_path / "run"))
    with Lineage(tmp_path / "run").run_lock():  # another process holds the run
        with pytest.raises(LineageError, match="in use by PID"):
            GenerationRunner(cfg, tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "lineage" / "entries").exists()


def _smoke_cfg():
    from train import presets

    return presets()["smoke"]


def test_approve_and_reject_at_the_same_moment_cannot_both_succeed(tmp_path, monkeypatch):
    import threading
    from contextlib import contextmanager

    from meta.lineage import PENDING, Lineage, LineageError

    lineage = Lineage(tmp_path / "run")
    lineage.append({"kind": "generation", "generation": 0, "status": PENDING})
    real_lock = Lineage._lock
    barrier = threading.Barrier(2, timeout=10)

    @contextmanager
    def racing_lock(self):  # both deciders reach the lock together, after any check done outside it
        barrier.wait()
        with real_lock(self):
            yield

    monkeypatch.setattr(Lineage, "_lock", racing_lock)
    outcomes: list[str] = []

    def decide(decision):
        try:
            Lineage(tmp_path / "run").append_approval(0, decision)
            outcomes.append("ok")
        except LineageError:
            outcomes.append("refused")

    threads = [threading.Thread(target=decide, args=(d,)) for d in ("approve", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["ok", "refused"]
    assert [e["kind"] for e in Lineage(tmp_path / "run").verify()] == ["generation", "approval"]


def _lineage_with(tmp_path, n=3):
    from meta.lineage import Lineage

    lin = Lineage(tmp_path / "run")
    for g in range(n):
        lin.append({"kind": "generation", "generation": g, "status": "rejected"})
    return lin


def test_removing_the_last_lineage_entries_is_detected(tmp_path):
    from meta.lineage import LineageError

    lin = _lineage_with(tmp_path)
    (lin.entries_dir / "000002.json").unlink()  # undo the last decision: the chain alone still verifies
    with pytest.raises(LineageError, match="removed or rewritten"):
        lin.verify()
    (lin.root / "HEAD.json").unlink()
    with pytest.raises(LineageError, match="head record was removed"):
        lin.verify()


def test_a_keyed_lineage_cannot_be_re_signed_without_the_key(tmp_path, monkeypatch):
    from meta.lineage import GENESIS, KEY_ENV, LineageError, canonical_hash

    monkeypatch.setenv(KEY_ENV, "s3cret")
    lin = _lineage_with(tmp_path)
    assert lin.verify() and all(e["signed"] for e in lin.entries())
    # rewrite the chain without the key: edit entry 1, re-hash everything (and the head) with sha256
    prev = GENESIS
    entries = lin.entries()
    entries[1]["status"] = "adopted"
    for e in entries:
        e.pop("signed")
        e["prev_hash"] = prev
        e["hash"] = prev = canonical_hash(e)
        (lin.entries_dir / f"{e['index']:06d}.json").write_text(json.dumps(e))
    (lin.root / "HEAD.json").write_text(json.dumps(lin.head_of(entries[-1])))
    with pytest.raises(LineageError, match="not signed"):
        lin.verify()
    monkeypatch.delenv(KEY_ENV)
    lin.verify()  # without the key a full rewrite is not detectable: the README says so


def test_a_weights_path_outside_the_run_is_refused_even_when_hashed(tmp_path):
    from meta.lineage import Lineage, LineageError
    from optimizers import LearnedOptimizer, LOConfig

    other = Lineage(tmp_path / "other")
    lopt = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1))
    rel, digest = other.save_weights(0, lopt, lopt.init_theta(0))
    lin = Lineage(tmp_path / "run")
    lin.append({"kind": "generation", "generation": 0, "status": "adopted",
                "weights": f"../../other/lineage/{rel}", "weights_sha256": digest})
    with pytest.raises(LineageError, match="outside"):
        lin.verify()


def test_replaced_control_arm_weights_and_a_forged_rollback_are_detected(tmp_path):
    from meta.lineage import Lineage, LineageError, weights_digest
    from optimizers import LearnedOptimizer, LOConfig

    run = tmp_path / "run"
    lopt = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1))
    cpath = run / "gen-0001" / "control_lopt"
    ckpt.save_learned_optimizer(cpath, lopt, lopt.init_theta(0))
    lin = Lineage(run)
    lin.append({"kind": "generation", "generation": 0, "status": "adopted",
                "control": {"weights": "gen-0001/control_lopt", "weights_sha256": weights_digest(cpath)}})
    lin.verify()
    ckpt.save_learned_optimizer(cpath, lopt, lopt.init_theta(1))  # swapped for other weights
    with pytest.raises(LineageError, match="control-arm weights"):
        lin.verify()
    ckpt.save_learned_optimizer(cpath, lopt, lopt.init_theta(0))
    lin.append({"kind": "rollback", "to": 99, "reason": "forged"})  # bypasses append_rollback's check
    with pytest.raises(LineageError, match="rollback to generation 99"):
        lin.verify()
