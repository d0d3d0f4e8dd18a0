"""Reading task configs with clear errors.

Configs arrive from JSON (checkpoints, lineage records, command lines), so a typo or a wrong type must
fail when the task is *built*, with a message naming the family, the key, what was expected and what
was found -- not deep inside a loss function halfway through meta-training.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from tasks.base import TaskConfig, TaskConfigError

# Split names accepted by ``sample_batch``/``full_batch``: the data-level splits of one task (not the
# meta_train/held_out/test splits of a TaskDistribution, which choose *tasks*).
DATA_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "valid"}


def data_split(split: str) -> str:
    """Map a data split name to ``"train"`` or ``"valid"`` (``"validation"``/``"test"`` alias valid)."""
    if split not in DATA_SPLITS:
        raise ValueError(f"unknown data split {split!r}; use 'train' or 'valid'")
    return DATA_SPLITS[split]


def _where(config: TaskConfig, key: str) -> str:
    return f"{config.get('family', 'task')} config key {key!r}"


def cfg_int(config: TaskConfig, key: str, default: int | None = None, *, lo: int | None = None,
            hi: int | None = None) -> int:
    """An integer config value in ``[lo, hi]`` (integral floats such as ``16.0`` are accepted)."""
    value: Any = config.get(key, default)
    if value is None:
        raise TaskConfigError(f"{_where(config, key)} is required (an integer)")
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise TaskConfigError(f"{_where(config, key)} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise TaskConfigError(f"{_where(config, key)} must be in [{lo}, {hi}], got {value}")
    return value


def cfg_float(config: TaskConfig, key: str, default: float | None = None, *, lo: float | None = None,
              hi: float | None = None, positive: bool = False) -> float:
    """A real config value in ``[lo, hi]`` (strictly ``> 0`` when ``positive``)."""
    value: Any = config.get(key, default)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TaskConfigError(f"{_where(config, key)} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise TaskConfigError(f"{_where(config, key)} must be finite, got {value}")
    if positive and value <= 0:
        raise TaskConfigError(f"{_where(config, key)} must be > 0, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise TaskConfigError(f"{_where(config, key)} must be in [{lo}, {hi}], got {value}")
    return value


def cfg_choice(config: TaskConfig, key: str, default: Any, options: Sequence[Any]) -> Any:
    """A config value that must be one of ``options``."""
    value = config.get(key, default)
    if value not in options:
        raise TaskConfigError(f"{_where(config, key)} must be one of {list(options)}, got {value!r}")
    return value


def cfg_bool(config: TaskConfig, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise TaskConfigError(f"{_where(config, key)} must be true or false, got {value!r}")
    return value


def cfg_int_list(config: TaskConfig, key: str, default: list[int], *, lo: int, hi: int,
                 min_len: int, max_len: int) -> list[int]:
    """A list of integers in ``[lo, hi]`` with ``min_len..max_len`` entries (layer widths)."""
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not (min_len <= len(value) <= max_len):
        raise TaskConfigError(
            f"{_where(config, key)} must be a list of {min_len}..{max_len} integers, got {value!r}"
        )
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not (isinstance(v, numbers.Integral)
                                       or (isinstance(v, float) and v.is_integer())):
            raise TaskConfigError(f"{_where(config, key)}[{i}] must be an integer, got {v!r}")
        if not lo <= int(v) <= hi:
            raise TaskConfigError(f"{_where(config, key)}[{i}] must be in [{lo}, {hi}], got {v}")
        out.append(int(v))
    return out
