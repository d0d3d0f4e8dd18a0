"""Active task curation (meta/curation.py): planted trails move the sampling, the floor keeps every
region alive, only meta_train tasks are drawn, ``uniform`` is today's task sequence, a resumed run
restores the sampler, and the sampling does not depend on how members are sharded."""

from __future__ import annotations

import math

import pytest
import torch

from meta.config import RunConfig, apply_overrides
from meta.curation import EpisodeRecord, TrailingTaskSampler, UniformTaskSampler, mixture, region_of
from meta.trainer import MetaTrainer
from optimizers.learned import ConfigError
from tasks import get_distribution, seeded

DIST = get_distribution("quadratics")  # six width regions, cheap tasks


def _sampler(**kw) -> TrailingTaskSampler:
    return TrailingTaskSampler(DIST, seed=0, **{"floor": 0.2, "every": 1, **kw})


def _plant(s: TrailingTaskSampler, progress: dict[str, float], episodes: int = 5) -> None:
    """``episodes`` ended episodes per region with the given progress."""
    recs = [EpisodeRecord(member=k, episode=e, region=r, progress=p, next_index=0)
            for k, (r, p) in enumerate(progress.items()) for e in range(episodes)]
    s.observe(recs)


def _cfg(tmp_path, **over):
    base = {"meta.population": 3, "meta.truncation": 3, "meta.horizon": 6, "lo.hidden_width": 8,
            "lo.hidden_layers": 1, "meta.outer_steps": 6, "meta.distribution": "quadratics",
            "meta.curation": "trailing", "meta.curation_every": 2, "out_dir": str(tmp_path / "run"),
            "wandb": "disabled"}
    return apply_overrides(RunConfig(), {**base, **over})


def test_weights_follow_planted_trails():
    s = _sampler(floor=0.1)
    regions = s.regions
    assert len(regions) >= 4
    # progress (log loss change over an episode): the larger, the further the optimizer trails there
    planted = {r: -1.0 + 0.3 * k for k, r in enumerate(regions)}
    _plant(s, planted)
    assert s.refresh(1)
    mean = sum(planted.values()) / len(planted)
    w = [max(planted[r] - mean, 0.0) for r in regions]
    for r, p, wr in zip(regions, s.probs, w):
        assert p == pytest.approx(0.1 / len(regions) + 0.9 * wr / sum(w))
    assert s.probs == sorted(s.probs) and s.probs[-1] > s.probs[0]  # most mass where it trails most
    assert sum(s.probs) == pytest.approx(1.0)
    # and the draws follow the probabilities
    counts = {r: 0 for r in regions}
    for i in range(3000):
        counts[region_of(DIST.config("meta_train", s.index(i, 0)))] += 1
    for r, p in zip(regions, s.probs):
        assert counts[r] / 3000 == pytest.approx(p, abs=0.03)


def test_a_tuned_adam_reference_replaces_the_mean_where_given():
    s = _sampler(floor=0.0, reference={})
    r0, r1 = s.regions[:2]
    _plant(s, {r0: -0.5, r1: -0.5})
    s.refresh(1)
    assert s.probs[0] == pytest.approx(1.0 / len(s.regions))  # equal progress: nobody trails -> uniform
    s.reference = {r0: -2.0}  # Adam makes far more progress on r0: the optimizer trails there
    s.refresh(2)
    assert s.probs[0] == pytest.approx(1.0) and s.probs[1] == 0.0


@pytest.mark.parametrize("floor", [0.05, 0.3, 1.0])
def test_the_floor_keeps_every_region_alive(floor):
    s = _sampler(floor=floor)
    _plant(s, {s.regions[0]: 5.0, **{r: -5.0 for r in s.regions[1:]}})  # one region trails enormously
    s.refresh(1)
    n = len(s.regions)
    assert all(p >= floor / n - 1e-12 for p in s.probs)
    assert mixture([None] * n, floor) == [1.0 / n] * n  # nothing seen: uniform over regions


def test_refresh_only_every_n_steps_and_stats_need_no_refresh():
    s = _sampler(every=3)
    before = list(s.probs)
    _plant(s, {s.regions[0]: 1.0, s.regions[1]: -1.0})
    assert not s.refresh(1) and not s.refresh(2) and s.probs == before
    assert s.refresh(3) and s.probs != before


def test_only_meta_train_tasks_are_drawn(tmp_path):
    s = _sampler()
    _plant(s, {s.regions[0]: 1.0, s.regions[1]: -1.0})
    s.refresh(1)
    for i in range(200):
        seed = DIST.config("meta_train", s.index(i, 3))["seed"]
        assert DIST.split_of_seed(seed) == "meta_train"
    with pytest.raises(ValueError, match="meta_train"):
        TrailingTaskSampler(DIST, seed=0, split="held_out")
    tr = MetaTrainer(_cfg(tmp_path))
    tr.train(4, progress=False)
    assert all(DIST.split_of_seed(m.task_config["seed"]) == "meta_train" for m in tr.est_state.members)
    for i, m in enumerate(tr.est_state.members):  # the members' tasks are the sampler's
        assert m.task_config == DIST.config("meta_train", tr.estimator.task_index(i, m.episode))


def test_uniform_is_todays_task_sequence(tmp_path):
    """``meta.curation uniform`` (the default) draws exactly the historical seeded uniform indices."""
    assert RunConfig().meta.curation == "uniform"
    for pool in (0, 16):
        tr = MetaTrainer(_cfg(tmp_path, **{"meta.curation": "uniform", "meta.num_train_tasks": pool}))
        assert isinstance(tr.sampler, UniformTaskSampler)
        for member in range(4):
            for episode in range(5):
                idx = int(torch.randint(2**31 - 1, (), generator=seeded("task_index", 0, member, episode)))
                assert tr.estimator.task_index(member, episode) == (idx % pool if pool else idx)
        tr.train(4, progress=False)
        assert "start_log_loss" not in tr.member_scalars()[0]  # uniform checkpoints keep their format


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_curated_training_observes_its_own_episodes(tmp_path, estimator):
    tr = MetaTrainer(_cfg(tmp_path, **{"meta.estimator": estimator}))
    probs0 = list(tr.sampler.probs)
    tr.train(6, progress=False)
    assert sum(tr.sampler.counts) == tr.est_state.episodes_done > 0
    assert all(math.isfinite(p) for p, n in zip(tr.sampler.progress, tr.sampler.counts) if n)
    assert tr.sampler.refreshed_at == 6 and tr.sampler.probs != probs0
    # the history knows every episode each member trained (generations reads it)
    for i, m in enumerate(tr.est_state.members):
        assert all((i, e) in tr.sampler.history for e in range(m.episode + 1))


def test_resume_restores_the_sampler(tmp_path):
    cfg = _cfg(tmp_path)
    straight = MetaTrainer(cfg)
    straight.train(6, progress=False)
    first = MetaTrainer(cfg)
    first.train(3, progress=False)
    first.save()
    resumed = MetaTrainer.load(cfg.out_dir + "/checkpoint")
    for key in ("progress", "counts", "probs", "history", "refreshed_at"):
        assert getattr(resumed.sampler, key) == getattr(first.sampler, key), key
    assert [m.start_log_loss for m in resumed.est_state.members] == [m.start_log_loss for m in first.est_state.members]
    resumed.train(6, progress=False)
    for key in ("progress", "counts", "probs", "history"):
        assert getattr(resumed.sampler, key) == getattr(straight.sampler, key), key
    for k in straight.theta:
        assert torch.equal(straight.theta[k], resumed.theta[k]), k
    assert [m.task_config for m in resumed.est_state.members] == [m.task_config for m in straight.est_state.members]


def test_resume_without_curation_statistics_is_a_clear_error(tmp_path):
    from optimizers import checkpoint as ckpt

    cfg = _cfg(tmp_path, **{"meta.curation": "uniform"})
    tr = MetaTrainer(cfg)
    tr.train(2, progress=False)
    tr.save()
    with pytest.raises(ckpt.CheckpointError, match="curation"):
        MetaTrainer.load(cfg.out_dir + "/checkpoint", _cfg(tmp_path))


def test_sharded_members_give_the_same_sampler_state(tmp_path):
    """What two ranks see (each its shard's episodes, gathered) equals one process's record list, and
    observing it in any order gives the same statistics: every rank samples the same tasks."""
    cfg = _cfg(tmp_path)
    whole, parts = MetaTrainer(cfg), MetaTrainer(cfg)
    for step in range(4):
        a = whole.estimator.accumulate(whole.theta, whole.est_state, step)
        b = [parts.estimator.accumulate(parts.theta, parts.est_state, step, ids) for ids in ([2, 0], [1])]
        gathered = sorted((r for s in b for r in s.episodes), key=lambda r: (r.member, r.episode))
        assert gathered == sorted(a.episodes, key=lambda r: (r.member, r.episode))
        whole.sampler.observe(a.episodes)
        parts.sampler.observe(list(reversed(gathered)))
        whole.sampler.refresh(step + 1)
        parts.sampler.refresh(step + 1)
        assert whole.sampler.probs == parts.sampler.probs and whole.sampler.history == parts.sampler.history


def test_bad_curation_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="curation"):
        _cfg(tmp_path, **{"meta.curation": "hardest"})
    with pytest.raises(ConfigError, match="curation_floor"):
        _cfg(tmp_path, **{"meta.curation_floor": 1.5})
    with pytest.raises(ConfigError, match="curation_every"):
        _cfg(tmp_path, **{"meta.curation_every": 0})
