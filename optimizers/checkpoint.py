"""Checkpoints: safetensors for tensors + JSON for everything else, written atomically, never pickle.

Layout of a checkpoint named ``PATH`` (a directory):

* ``PATH/tensors-<sha256[:16]>.safetensors``: content-addressed tensors;
* ``PATH/checkpoint.json``: the commit record: format version, the tensors file's name and full
  sha256, and arbitrary JSON metadata (configs, step, counters).

Writes go to a temporary file followed by ``os.replace``; the tensors file is written first and the
JSON last, so a crash at any point leaves either the old checkpoint or the new one, never a mix. Old
tensors files are removed only after the new JSON is in place. Loading verifies the hash, so a
truncated or edited tensors file is reported as corrupt instead of silently loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from optimizers.errors import UserError

FORMAT = "ouroboros-checkpoint/1"
RECORD = "checkpoint.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, corrupt, or of an unexpected kind; the message says which file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's temporary files are 0600


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write a checkpoint directory at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob(".*.tmp"):  # a write killed mid-way (one writer per checkpoint directory)
        leftover.unlink(missing_ok=True)
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    digest = hashlib.sha256(blob).hexdigest()
    name = f"tensors-{digest[:16]}.safetensors"
    atomic_write_bytes(path / name, blob)
    atomic_write_json(path / RECORD, {"format": FORMAT, "tensors": name, "sha256": digest, "meta": meta,
                                      "meta_sha256": meta_digest(meta)})
    for old in path.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def meta_digest(meta: Any) -> str:
    """sha256 of the metadata's canonical JSON: the record's JSON side is covered like its tensors."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, allow_nan=True).encode()).hexdigest()


def exists(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file()


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; returns ``(tensors, meta)``."""
    path = Path(path)
    record_path = path / RECORD
    if not record_path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected {record_path}")
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint record {record_path}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{record_path} is not an Ouroboros checkpoint (format != {FORMAT!r})")
    tensors_path = path / str(record.get("tensors"))
    if not tensors_path.is_file():
        raise CheckpointError(f"corrupt checkpoint: {tensors_path} named by {record_path} is missing")
    blob = tensors_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        raise CheckpointError(
            f"corrupt checkpoint: {tensors_path} does not match the sha256 recorded in {record_path}"
        )
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt checkpoint record {record_path}: 'meta' is not a JSON object")
    # records written before the metadata was hashed have no meta_sha256 (their fields are validated
    # by whoever reads them)
    if "meta_sha256" in record and record["meta_sha256"] != meta_digest(meta):
        raise CheckpointError(f"corrupt checkpoint: the metadata in {record_path} does not match its recorded "
                              f"sha256 (edited or damaged)")
    try:
        tensors = st_load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is corruption
        raise CheckpointError(f"corrupt checkpoint: cannot parse {tensors_path}: {e}") from e
    return tensors, meta


# ---- learned optimizers ----------------------------------------------------------------------
def save_learned_optimizer(path: str | Path, lopt, theta: dict[str, Tensor], **meta: Any) -> Path:
    """Save an architecture + weights so that ``load_learned_optimizer`` rebuilds it anywhere."""
    return save(path, {f"theta/{k}": v for k, v in theta.items()},
                {"kind": "learned_optimizer", "lo_config": lopt.config.to_dict(), **meta})


def load_learned_optimizer(path: str | Path):
    """Returns ``(LearnedOptimizer, theta, meta)`` from a learned-optimizer or meta-training checkpoint."""
    tensors, meta = load(path)
    lopt, theta = learned_optimizer_from(tensors, meta, path)
    return lopt, theta, meta


def learned_optimizer_from(tensors: dict[str, Tensor], meta: dict[str, Any], path: str | Path = "<memory>"):
    """The ``(LearnedOptimizer, theta)`` held by an already-loaded checkpoint (no second read)."""
    from optimizers.learned import ConfigError, LearnedOptimizer, LOConfig

    if "lo_config" not in meta:
        raise CheckpointError(f"checkpoint at {path} holds no learned optimizer (no 'lo_config')")
    try:
        lopt = LearnedOptimizer(LOConfig.from_dict(meta["lo_config"]))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint at {path} has an invalid learned-optimizer config: {e}") from e
    theta = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("theta/")}
    expected = set(lopt.init_theta(0))
    if set(theta) != expected:
        raise CheckpointError(
            f"checkpoint at {path}: weights {sorted(theta)} do not match the architecture {sorted(expected)}"
        )
    return lopt, theta


def check_learned_optimizer(lopt, theta: dict[str, Tensor], path: str | Path = "<memory>") -> None:
    """Raise ``CheckpointError`` unless ``theta`` can drive ``lopt``: the architecture's names and shapes,
    floating-point and finite values, and a nominal log learning rate inside the range the update
    clamps it to (outside it the weights cannot be what was meta-trained)."""
    import torch

    from optimizers.torch_optim import LOG_LR_RANGE, check_theta

    try:
        check_theta(lopt, theta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint at {path}: {e}") from e
    for k, v in theta.items():
        if not v.is_floating_point():
            raise CheckpointError(f"checkpoint at {path}: weight {k!r} has dtype {v.dtype}, not floating point")
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise CheckpointError(f"checkpoint at {path}: weight {k!r} has {bad} non-finite value(s)")
    if "nominal_log_lr" in theta:
        lo, hi = LOG_LR_RANGE
        value = float(theta["nominal_log_lr"])
        if not lo <= value <= hi:
            raise CheckpointError(
                f"checkpoint at {path}: nominal_log_lr={value:.3g} lies "
                f"outside [{lo}, {hi}], the range the update clamps it to"
            )
