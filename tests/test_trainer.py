"""Meta-trainer: exact resume, checkpoints that detect corruption, configs that reject unknown keys."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meta.config import RunConfig, apply_overrides
from meta.trainer import MetaTrainer
from optimizers import checkpoint as ckpt
from optimizers.learned import ConfigError, LOConfig

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **over):
    base = {"meta.population": 2, "meta.truncation": 4, "meta.horizon": 10, "lo.hidden_width": 8,
            "lo.hidden_layers": 1, "meta.outer_steps": 6, "out_dir": str(tmp_path / "run"), "wandb": "disabled"}
    return apply_overrides(RunConfig(), {**base, **over})


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_resumed_run_matches_uninterrupted(tmp_path, estimator):
    cfg = _cfg(tmp_path, **{"meta.estimator": estimator})
    straight = MetaTrainer(cfg)
    straight.train(6, progress=False)

    first = MetaTrainer(cfg)
    first.train(3, progress=False)
    first.save()
    del first
    resumed = MetaTrainer.load(cfg.out_dir + "/checkpoint")
    assert resumed.step == 3
    resumed.train(6, progress=False)
    for k in straight.theta:
        assert torch.equal(straight.theta[k], resumed.theta[k]), k
    assert straight.est_state.episodes_done == resumed.est_state.episodes_done
    for a, b in zip(straight.est_state.members, resumed.est_state.members):
        assert a.task_config == b.task_config and a.t == b.t
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_meta_training_lowers_meta_loss_of_a_poorly_initialised_optimizer(tmp_path):
    """Start from a nominal learning rate 100x too small; a few outer steps must raise it and lower
    the meta-loss measured on fixed tasks (a test that fails if the meta-gradient has the wrong sign)."""
    from meta.estimators import ConstantSchedule, TruncatedBackprop
    from tasks import get_distribution

    cfg = _cfg(tmp_path, **{"lo.nominal_lr": 1e-5, "meta.outer_lr": 0.1, "meta.truncation": 8,
                            "meta.horizon": 16, "meta.population": 2})
    trainer = MetaTrainer(cfg)
    probe = TruncatedBackprop(trainer.lopt, get_distribution("digits_mlp"), population=2, truncation=8,
                              schedule=ConstantSchedule(16), desync=False, seed=99)

    def meta_loss(theta):
        _, _, m = probe.estimate(theta, probe.init(theta), 0)
        return m["meta_loss"]

    before = meta_loss(trainer.theta)
    trainer.train(15, progress=False)
    assert float(trainer.theta["nominal_log_lr"]) > float(trainer.theta0["nominal_log_lr"]) + 0.5
    assert meta_loss(trainer.theta) < before - 0.05


def test_corrupted_checkpoint_gives_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    tr = MetaTrainer(cfg)
    tr.train(1, progress=False)
    path = tr.save()
    tensors_file = next(path.glob("tensors-*.safetensors"))
    data = bytearray(tensors_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors_file.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        MetaTrainer.load(path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="corrupt checkpoint record"):
        MetaTrainer.load(path)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load(tmp_path / "nowhere")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint loadable."""
    path = tmp_path / "c"
    ckpt.save(path, {"a": torch.ones(2)}, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.save(path, {"a": torch.zeros(2)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = ckpt.load(path)
    assert meta["step"] == 1 and torch.equal(tensors["a"], torch.ones(2))
    assert not list(path.glob("*.tmp"))


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'meta.popsize'"):
        apply_overrides(RunConfig(), {"meta.popsize": 3})
    with pytest.raises(ConfigError, match="unknown config section"):
        apply_overrides(RunConfig(), {"optim.lr": 3})
    with pytest.raises(ConfigError, match="unknown RunConfig key"):
        RunConfig.from_dict({"meta": {}, "bogus": 1})
    with pytest.raises(ConfigError, match="unknown MetaConfig key"):
        RunConfig.from_dict({"meta": {"populaton": 2}})
    with pytest.raises(ConfigError, match="unknown LOConfig key"):
        LOConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="estimator"):
        apply_overrides(RunConfig(), {"meta.estimator": "sgd"})


def test_config_round_trips_through_json():
    cfg = apply_overrides(RunConfig(), {"meta.population": 3, "lo.features": ("grad", "momentum"),
                                        "eval.adam_lrs": (1e-3, 1e-2)})
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def _cli(*args, cwd=ROOT, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_cli_errors_are_clear(tmp_path):
    r = _cli("meta-train", "--preset", "smoke", "--out-dir", str(tmp_path / "x"), "--meta.population", "zero")
    assert r.returncode == 2 and "bad value for --meta.population" in r.stderr
    r = _cli("meta-train", "--preset", "nope")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"meta": {"populaton": 3}}))
    r = _cli("meta-train", "--preset", "smoke", "--config", str(cfg_file))
    assert r.returncode == 2 and "unknown MetaConfig key" in r.stderr and "populaton" in r.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUROBOROS_DATA": str(tmp_path / "no_data_here")}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "meta-train", "--preset", "smoke",
                        "--meta.distribution", "mnist_mlp", "--out-dir", str(tmp_path / "m")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no_data_here" in r.stderr and "mnist" in r.stderr
    assert not (tmp_path / "m" / "checkpoint").exists()  # validated before any work started


def test_cli_interrupt_then_resume_matches_uninterrupted(tmp_path):
    """SIGINT stops cleanly after the current step with a checkpoint; --resume finishes the run and
    reaches the same weights as a run that was never interrupted."""
    common = ["--preset", "smoke", "--quiet", "--meta.outer_steps", "40", "--checkpoint-every", "1000"]
    r = _cli("meta-train", *common, "--out-dir", str(tmp_path / "straight"))
    assert r.returncode == 0, r.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "meta-train", *common,
                             "--out-dir", str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err  # stopped, not finished (train.STOPPED_STATUS)
    assert "stopped at step" in out
    _, meta = ckpt.load(tmp_path / "cut" / "checkpoint")
    assert 3 <= meta["step"] < 40

    r = _cli("meta-train", *common, "--out-dir", str(tmp_path / "cut"), "--resume")
    assert r.returncode == 0, r.stderr
    a, ma = ckpt.load(tmp_path / "straight" / "checkpoint")
    b, mb = ckpt.load(tmp_path / "cut" / "checkpoint")
    assert ma["step"] == mb["step"] == 40
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # the JSONL log matches the run's state after resume


def test_cli_run_writes_checkpoint_results_and_plot(tmp_path):
    """The bare command's pipeline (meta-train then evaluate) on the smoke preset."""
    out = tmp_path / "run"
    r = _cli("--preset", "smoke", "--quiet", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert ckpt.exists(out / "checkpoint") and ckpt.exists(out / "learned_optimizer")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"tuned_adam", "tuned_sgdm", "learned", "learned_untrained"} <= set(results["optimizers"])
    assert (out / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Paired difference" in (out / "eval" / "results.md").read_text()
    # the drop-in loads what the run wrote
    from optimizers import LearnedOptimizerTorch

    model = torch.nn.Linear(3, 2)
    opt = LearnedOptimizerTorch.from_checkpoint(model.parameters(), out / "learned_optimizer", total_steps=10)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()


def test_learned_outer_optimizer_from_a_path_is_scaled_as_in_generations(tmp_path):
    """``--meta.outer_optimizer PATH`` and a resumed run take the same meta-steps as a generation
    trained by that optimizer: its updates scaled by meta.outer_lr / nominal_lr (they ran unscaled)."""
    from meta.generations import outer_scale
    from optimizers.base import for_horizon
    from optimizers.learned import LearnedOptimizer
    from optimizers.transforms import scale_updates

    outer_lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1, nominal_lr=0.05))
    outer_theta = outer_lo.init_theta(3)
    path = tmp_path / "outer"
    ckpt.save_learned_optimizer(path, outer_lo, outer_theta)
    cfg = _cfg(tmp_path, **{"meta.outer_optimizer": str(path), "meta.outer_lr": 1e-3})
    trainer = MetaTrainer(cfg)
    theta = trainer.theta
    grads = {k: torch.full_like(v, 0.1) for k, v in theta.items()}
    got, _ = trainer.outer.update(grads, trainer.outer.init(theta), theta)
    factor = outer_scale(cfg, outer_lo.config)
    assert factor == pytest.approx(1e-3 / 0.05)
    ref_opt = for_horizon(scale_updates(outer_lo.bind(outer_theta), factor), cfg.meta.outer_steps)
    want, _ = ref_opt.update(grads, ref_opt.init(theta), theta)
    raw_opt = for_horizon(outer_lo.bind(outer_theta), cfg.meta.outer_steps)
    raw, _ = raw_opt.update(grads, raw_opt.init(theta), theta)
    for k in theta:
        torch.testing.assert_close(got[k], want[k])
    moved = sum(float((got[k] - theta[k]).abs().sum()) for k in theta)
    moved_raw = sum(float((raw[k] - theta[k]).abs().sum()) for k in theta)
    assert moved == pytest.approx(factor * moved_raw, rel=1e-4)
    # a resumed trainer rebuilds the same scaled outer optimizer
    trainer.save()
    again = MetaTrainer.load(cfg.out_dir + "/checkpoint", cfg)
    got2, _ = again.outer.update(grads, again.outer.init(theta), theta)
    for k in theta:
        torch.testing.assert_close(got2[k], want[k])


def test_a_partial_config_file_changes_only_the_keys_it_names(tmp_path, monkeypatch):
    """``--config`` with ``{"meta": {"population": 4}}`` keeps the rest of the preset's ``meta`` section
    (a shallow merge silently reset it to RunConfig()'s defaults, e.g. 300 outer steps for 400)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import train

    cfg_file = tmp_path / "partial.json"
    cfg_file.write_text(json.dumps({"meta": {"population": 4}, "eval": {"num_tasks": 5}}))
    args = train.build_parser().parse_args(["meta-train", "--config", str(cfg_file)])
    cfg = train.resolve_config(args)
    preset = train.presets()["default"]
    assert cfg.meta.population == 4 and cfg.eval.num_tasks == 5
    assert cfg.meta.outer_steps == preset.meta.outer_steps == 400
    assert cfg.meta.meta_loss == preset.meta.meta_loss and cfg.meta.outer_decay == preset.meta.outer_decay
    assert cfg.eval.adam_lrs == preset.eval.adam_lrs and cfg.procs == preset.procs
    # command-line flags still win over the file
    args = train.build_parser().parse_args(["meta-train", "--config", str(cfg_file), "--meta.population", "6"])
    assert train.resolve_config(args).meta.population == 6


def test_help_shows_the_default_presets_values():
    """``--help`` shows what a bare run uses (the default preset), not RunConfig()'s field defaults."""
    r = _cli("meta-train", "--help")
    assert r.returncode == 0
    flat = " ".join(r.stdout.split())
    assert "--meta.outer_steps INT (default preset: 400)" in flat
    assert re.search(r"--procs INT .*?\(default preset: (\d+)\)", flat).group(1) == "2"  # after its comment


def test_a_learned_outer_optimizer_reads_the_meta_loss(tmp_path):
    """A learned outer optimizer with loss features is given the population's meta-loss (as a positive
    loss: exp of a log meta-loss), as it is given its inner tasks' losses; Adam ignores it."""
    from optimizers.learned import LearnedOptimizer

    outer_lo = LearnedOptimizer(LOConfig(hidden_width=4, hidden_layers=1, loss_features="ema"))
    path = tmp_path / "outer"
    ckpt.save_learned_optimizer(path, outer_lo, outer_lo.init_theta(1))
    cfg = _cfg(tmp_path, **{"meta.outer_optimizer": str(path), "meta.meta_loss": "log_train"})
    trainer = MetaTrainer(cfg)
    losses = [trainer.train_step()["meta_loss"] for _ in range(2)]
    stats = trainer.outer_state["loss_stats"]
    assert float(stats[0]) == 2  # both steps' meta-losses were seen
    assert float(stats[3]) == pytest.approx(losses[0], rel=1e-6)  # log(exp(log meta-loss)): the first one
