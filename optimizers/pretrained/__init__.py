"""Pretrained learned optimizers shipped inside the package (package data, see ``README.md`` here).

Each entry is a folder ``optimizers/pretrained/<name>/`` holding a checkpoint written by
:func:`optimizers.checkpoint.save_learned_optimizer` (``checkpoint.json`` + ``tensors-*.safetensors``,
e.g. a run's ``learned_optimizer/`` folder copied as it is) and a ``MODEL_CARD.md``: what it was
meta-trained on, its measured results and where it is known to fail. Use one with::

    from optimizers import LearnedOptimizerTorch, pretrained
    pretrained.available()                      # ["default", ...]
    print(pretrained.model_card("default"))
    opt = LearnedOptimizerTorch.from_pretrained("default", model.parameters(), total_steps=1000)

Loading verifies the checkpoint's hash, that the weights are finite and match the architecture, and
that the config is valid (:func:`optimizers.checkpoint.check_learned_optimizer`); any failure raises
:class:`~optimizers.checkpoint.CheckpointError` naming the entry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# The folder holding the entries (module-level so tests can point it elsewhere).
ROOT = Path(__file__).resolve().parent
MODEL_CARD = "MODEL_CARD.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def available() -> list[str]:
    """Names of the pretrained learned optimizers in this installation, sorted."""
    from optimizers.checkpoint import RECORD

    if not ROOT.is_dir():
        return []
    return sorted(d.name for d in ROOT.iterdir()
                  if d.is_dir() and _NAME.match(d.name) and (d / RECORD).is_file())


def path(name: str) -> Path:
    """The folder of entry ``name``; ``ValueError`` listing the available names when there is none."""
    if not isinstance(name, str) or not _NAME.match(name) or name not in available():
        names = available()
        listed = ", ".join(repr(n) for n in names) if names else "none are shipped in this installation"
        raise ValueError(f"no pretrained learned optimizer named {name!r}; available: {listed}")
    return ROOT / name


def model_card(name: str) -> str:
    """The text of entry ``name``'s ``MODEL_CARD.md`` (``CheckpointError`` if it has none)."""
    from optimizers.checkpoint import CheckpointError

    card = path(name) / MODEL_CARD
    if not card.is_file():
        raise CheckpointError(f"pretrained learned optimizer {name!r} has no {MODEL_CARD} (expected {card})")
    return card.read_text(encoding="utf-8")


def load(name: str) -> tuple[Any, dict, dict[str, Any]]:
    """``(LearnedOptimizer, theta, meta)`` of entry ``name``, validated (see the module docstring)."""
    from optimizers.checkpoint import check_learned_optimizer, load_learned_optimizer

    where = path(name)
    lopt, theta, meta = load_learned_optimizer(where)
    check_learned_optimizer(lopt, theta, f"{where} (pretrained {name!r})")
    return lopt, theta, meta
