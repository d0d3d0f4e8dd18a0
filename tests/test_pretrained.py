"""Pretrained learned optimizers shipped as package data: optimizers.pretrained and
LearnedOptimizerTorch.from_pretrained. The entries here are temporary ones (ROOT monkeypatched); the
entries the package really ships are checked by test_shipped_entries_load_and_have_a_model_card."""

from __future__ import annotations

import fnmatch
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimizers import LearnedOptimizer, LearnedOptimizerTorch, LOConfig, pretrained
from optimizers.checkpoint import CheckpointError, save_learned_optimizer

REPO = Path(__file__).resolve().parents[1]
LOPT = LearnedOptimizer(LOConfig(hidden_width=8, time_features="fraction"))
CARD = "# test entry\n\nMeta-trained on nothing: a test fixture.\n"


def make_entry(root: Path, name: str, lopt=LOPT, theta=None, card: str | None = CARD) -> dict:
    theta = lopt.init_theta(3) if theta is None else theta
    save_learned_optimizer(root / name, lopt, theta, generation=7)
    if card is not None:
        (root / name / pretrained.MODEL_CARD).write_text(card)
    return theta


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "ROOT", tmp_path)
    return tmp_path


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_available_lists_entries(root):
    assert pretrained.available() == []
    make_entry(root, "default")
    make_entry(root, "b-2")
    (root / "not_an_entry").mkdir()  # no checkpoint.json
    (root / "__pycache__").mkdir()
    assert pretrained.available() == ["b-2", "default"]
    assert pretrained.model_card("default") == CARD


def test_from_pretrained_is_the_checkpointed_optimizer(root):
    theta = make_entry(root, "default")
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    m1, m2 = model(), model()
    opt1 = LearnedOptimizerTorch.from_pretrained("default", m1.parameters(), total_steps=10, lr=3e-3)
    opt2 = LearnedOptimizerTorch(m2.parameters(), lopt=LOPT, theta=theta, total_steps=10, lr=3e-3)
    assert opt1.lopt.config == LOPT.config and opt1.total_steps == 10
    assert opt1.checkpoint_meta["pretrained"] == "default" and opt1.checkpoint_meta["generation"] == 7
    assert opt1.learned_lr == pytest.approx(math.exp(float(theta["nominal_log_lr"])))
    for m, opt in ((m1, opt1), (m2, opt2)):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # the default design sees t/T: total_steps is required
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizerTorch.from_pretrained("default", model().parameters())


def test_unknown_name_lists_the_available_ones(root):
    with pytest.raises(ValueError, match="none are shipped"):
        LearnedOptimizerTorch.from_pretrained("default", model().parameters(), total_steps=10)
    make_entry(root, "default")
    make_entry(root, "small")
    for bad in ("nope", "../default", "", "default/", None):
        with pytest.raises(ValueError, match=r"available: 'default', 'small'"):
            LearnedOptimizerTorch.from_pretrained(bad, model().parameters(), total_steps=10)


def test_invalid_entries_raise_checkpoint_error(root):
    theta = LOPT.init_theta(0)
    theta["w1"][0, 0] = float("inf")
    make_entry(root, "inf", theta=theta)
    with pytest.raises(CheckpointError, match=r"'w1' has 1 non-finite"):
        pretrained.load("inf")

    theta = LOPT.init_theta(0)
    theta["nominal_log_lr"] = torch.tensor(5.0)
    make_entry(root, "huge_lr", theta=theta)
    with pytest.raises(CheckpointError, match="nominal_log_lr"):
        LearnedOptimizerTorch.from_pretrained("huge_lr", model().parameters(), total_steps=10)

    make_entry(root, "bad_config")
    record_path = root / "bad_config" / "checkpoint.json"
    record = json.loads(record_path.read_text())
    record["meta"]["lo_config"]["rms_decay"] = 1.5
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):  # the JSON is hashed
        pretrained.load("bad_config")
    del record["meta_sha256"]  # an older, unhashed record: the config itself is validated
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="invalid learned-optimizer config"):
        pretrained.load("bad_config")

    make_entry(root, "corrupt")
    (tensors,) = (root / "corrupt").glob("tensors-*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="corrupt"):
        pretrained.load("corrupt")

    make_entry(root, "no_card", card=None)
    pretrained.load("no_card")  # the weights load; the card is what is missing
    with pytest.raises(CheckpointError, match="MODEL_CARD.md"):
        pretrained.model_card("no_card")


def test_package_data_ships_the_entries():
    """pyproject's package-data globs cover every file of an entry (so `pip install .` ships them)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]["optimizers.pretrained"]
    assert any(fnmatch.fnmatch("optimizers.pretrained", pattern) for pattern in data["packages"]["find"]["include"])
    entry = ["default/checkpoint.json", "default/tensors-0123456789abcdef.safetensors", "default/MODEL_CARD.md",
             "README.md"]
    for f in entry:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f
    assert (Path(pretrained.__file__).parent / "README.md").is_file()


@pytest.mark.parametrize("name", pretrained.available() or [
    pytest.param(None, marks=pytest.mark.skip(reason="no pretrained entry shipped yet"))])
def test_shipped_entries_load_and_have_a_model_card(name):
    lopt, theta, _ = pretrained.load(name)
    card = pretrained.model_card(name)
    assert len(card.strip()) > 200, "the model card should say what it was trained on, results, failures"
    kw = {"total_steps": 100} if lopt.config.needs_total_steps else {}
    m = model()
    opt = LearnedOptimizerTorch.from_pretrained(name, m.parameters(), **kw)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
