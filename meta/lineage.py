"""Lineage: the append-only, hash-chained record of every generation and every decision about it.

Layout under ``RUN/lineage``::

    entries/000000.json   one JSON record per event, never rewritten
    weights/gen-0003/     the generation's learned optimizer (safetensors + JSON, content-addressed)

Entry kinds:

* ``generation``: a candidate after review: its config, parent (the generation whose weights it
  started from), ``trained_by`` (the optimizer that meta-trained it: ``adam`` or ``gen-K``), hash of the
  task distribution, seeds, metrics, the governor's verdict, the sha256 of its weights file, and the
  control arm's record;
* ``approval``: a human decision (``approve`` / ``reject``) on a held ("pending") verdict;
* ``rollback``: the incumbent is set back to an earlier adopted generation.

Every entry carries ``index``, ``prev_hash`` (the previous entry's hash; zeros for the first) and
``hash`` = sha256 of the canonical JSON of everything else, so editing, deleting or reordering any
entry breaks the chain at a point :meth:`Lineage.verify` names. Weights are verified against the
sha256 recorded in their entry. Appends take an exclusive ``flock`` (a running ``generations`` and a
``rollback`` / ``approve`` from another shell cannot interleave) and are atomic (temp file + rename), so
a crash leaves the lineage as it was before the append or after it, never in between.

State (who is the incumbent, which verdicts are pending) is *derived* by replaying the entries; it is
never stored separately, so it cannot drift from the evidence.

What a chain alone cannot catch, and what covers it:

* deleting the *last* entries (undoing a rejection or a rollback) leaves a valid shorter chain:
  ``HEAD.json`` (entry count and last hash, rewritten after every append, kept apart from the entries
  and also logged by the generations run) no longer matches;
* rewriting the whole chain (edit, then re-hash every entry) and ``HEAD.json`` with it: only a secret
  catches that. With ``OUROBOROS_LINEAGE_KEY`` set, hashes are HMAC-SHA256 under that key, entries say
  ``"signed": true``, and verifying with the key refuses unsigned or wrongly signed entries, so nobody
  without the key can re-sign an edited chain. Without the key, a full rewrite is not detectable;
* a weights path pointing outside the run's lineage is refused even in a correctly hashed entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizers import checkpoint as ckpt

GENESIS = "0" * 64
RUN_LOCK = ".run.lock"  # in the run directory, held by the generations process using it
ADOPTED, REJECTED, PENDING = "adopted", "rejected", "pending"


class LineageError(RuntimeError):
    """The lineage is inconsistent (tampered, truncated) or an operation on it is not allowed."""


KEY_ENV = "OUROBOROS_LINEAGE_KEY"
HEAD = "HEAD.json"


def lineage_key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def canonical_hash(entry: dict[str, Any], key: bytes | None = None) -> str:
    """sha256 of the entry's canonical JSON (without ``hash``), or HMAC-SHA256 under ``key``."""
    body = json.dumps({k: v for k, v in entry.items() if k != "hash"}, sort_keys=True,
                      separators=(",", ":")).encode()
    if key is not None:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of a saved learned optimizer's record (which itself holds the tensors' sha256)."""
    return hashlib.sha256((Path(path) / ckpt.RECORD).read_bytes()).hexdigest()


@dataclass
class LineageState:
    """What replaying the entries says."""

    status: dict[int, str] = field(default_factory=dict)  # generation -> adopted | rejected | pending
    records: dict[int, dict] = field(default_factory=dict)  # generation -> its 'generation' entry
    incumbent: int | None = None  # None: no adopted generation yet (the hand-designed baseline)
    adopted_order: list[int] = field(default_factory=list)


class Lineage:
    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir) / "lineage"
        self.entries_dir = self.root / "entries"
        self.weights_dir = self.root / "weights"

    # ---- reading --------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        if not self.entries_dir.is_dir():
            return []
        out = []
        for p in sorted(self.entries_dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except json.JSONDecodeError as e:
                raise LineageError(f"lineage entry {p} is not valid JSON: {e}") from e
        return out

    def verify(self, *, check_weights: bool = True) -> list[dict[str, Any]]:
        """Check the hash chain (and each generation's weights); returns the entries or raises."""
        entries = self.entries()
        prev, key = GENESIS, lineage_key()
        files = sorted(self.entries_dir.glob("*.json")) if entries else []
        for i, (e, path) in enumerate(zip(entries, files)):
            if path.name != f"{i:06d}.json" or e.get("index") != i:
                raise LineageError(f"lineage entry {path.name}: expected index {i} (an entry was removed "
                                   f"or renamed)")
            if e.get("prev_hash") != prev:
                raise LineageError(f"lineage entry {i}: prev_hash does not match entry {i - 1}'s hash "
                                   f"(the chain was edited)")
            if e.get("signed") and key is None:
                raise LineageError(f"lineage entry {i} is signed: set {KEY_ENV} to verify this lineage")
            if key is not None and not e.get("signed"):
                raise LineageError(f"lineage entry {i} is not signed although {KEY_ENV} is set (written "
                                   f"without the key, or re-hashed by someone who lacks it)")
            if canonical_hash(e, key if e.get("signed") else None) != e.get("hash"):
                raise LineageError(f"lineage entry {i} ({path}): content does not match its hash "
                                   f"(the entry was edited{', or signed with another key' if key else ''})")
            if check_weights and e.get("kind") == "generation":
                if e.get("weights"):
                    self._check_weights(i, "weights", self.root, e["weights"], e.get("weights_sha256"))
                    ckpt.load(self.root / e["weights"])  # verifies the tensors file against its own sha256
                control = e.get("control")
                if isinstance(control, dict) and control.get("weights_sha256"):  # recorded since session 2
                    self._check_weights(i, "control-arm weights", self.root.parent, control["weights"],
                                        control["weights_sha256"])
            if e.get("kind") == "rollback":
                target = self.state(entries[:i]).status.get(e.get("to"))
                if target != ADOPTED:
                    raise LineageError(f"lineage entry {i}: rollback to generation {e.get('to')!r}, which was "
                                       f"{target or 'not in the lineage'} at that point")
            prev = e["hash"]
        head = self.root / HEAD
        if head.is_file():
            try:
                h = json.loads(head.read_text())
            except json.JSONDecodeError as err:
                raise LineageError(f"{head} is not valid JSON: {err}") from err
            if h.get("count") != len(entries) or h.get("hash") != (entries[-1]["hash"] if entries else GENESIS):
                raise LineageError(f"the lineage has {len(entries)} entries but {head} records {h.get('count')} "
                                   f"ending in {str(h.get('hash'))[:12]}...: entries were removed or rewritten")
        elif any(e.get("format", 1) >= 2 for e in entries):  # format 1 lineages predate the head record
            raise LineageError(f"{head} is missing: the lineage's head record was removed")
        return entries

    @staticmethod
    def _check_weights(i: int, what: str, base: Path, rel: str, digest: str | None) -> None:
        """Entry ``i``'s weights at ``base / rel``: inside ``base`` (not another run's), present, and
        matching their recorded sha256."""
        path = base / rel
        if not path.resolve().is_relative_to(base.resolve()):
            raise LineageError(f"lineage entry {i}: {what} path {rel!r} points outside {base}")
        if not (path / ckpt.RECORD).is_file():
            raise LineageError(f"lineage entry {i}: {what} {path} are missing")
        if weights_digest(path) != digest:
            raise LineageError(f"lineage entry {i}: {what} {path} do not match their recorded sha256 "
                               f"(the weights were replaced)")

    def state(self, entries: list[dict[str, Any]] | None = None) -> LineageState:
        st = LineageState()
        for e in self.entries() if entries is None else entries:
            kind = e.get("kind")
            if kind == "generation":
                g = int(e["generation"])
                st.records[g] = e
                st.status[g] = e["status"]
                if st.status[g] == ADOPTED:
                    st.incumbent = g
                    st.adopted_order.append(g)
            elif kind == "approval":
                g = int(e["generation"])
                if st.status.get(g) == PENDING:
                    st.status[g] = ADOPTED if e["decision"] == "approve" else REJECTED
                    if st.status[g] == ADOPTED:
                        st.incumbent = g
                        st.adopted_order.append(g)
            elif kind == "rollback":
                st.incumbent = e["to"]
        return st

    def weights_path(self, generation: int) -> Path:
        rec = self.state().records.get(generation)
        if rec is None:
            raise LineageError(f"generation {generation} is not in the lineage at {self.root}")
        return self.root / rec["weights"]

    # ---- writing --------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def run_lock(self) -> Iterator[None]:
        """Exclusive use of the run directory for a whole ``generations`` process: a second process on the
        same run gets a :class:`LineageError` naming the holder's PID instead of writing duplicate
        generations beside it. Released when the process ends, also by kill -9 (``flock``)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        path = self.root.parent / RUN_LOCK
        f = open(path, "a+")  # noqa: SIM115 - held for the with-block
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise LineageError(f"run {self.root.parent} is in use by PID {holder} (a generations process "
                                   f"is running on it); wait for it or stop it (Ctrl-C or a STOP file)") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            f.close()  # releases the flock

    def save_weights(self, generation: int, lopt, theta) -> tuple[str, str]:
        """Write a generation's weights (idempotent); returns (path relative to the root, sha256)."""
        rel = f"weights/gen-{generation:04d}"
        ckpt.save_learned_optimizer(self.root / rel, lopt, theta, generation=generation)
        return rel, weights_digest(self.root / rel)

    def append(self, entry: dict[str, Any],
               precondition: Callable[[LineageState], dict[str, Any] | None] | None = None) -> dict[str, Any]:
        """Append one entry (chain fields are filled in here); verifies the chain first. ``precondition``
        sees the state read *under the lock* and raises when the entry may not be appended (it may return
        fields to add), so two processes cannot both pass a check such as "generation 3 is pending"."""
        with self._lock():
            entries = self.verify(check_weights=False)
            e = dict(entry)
            if precondition is not None:
                e.update(precondition(self.state(entries)) or {})
            e.update(index=len(entries), prev_hash=entries[-1]["hash"] if entries else GENESIS,
                     time=e.get("time", time.strftime("%Y-%m-%dT%H:%M:%S%z")))
            e["format"] = 2  # has a head record
            key = lineage_key()
            if key is not None:
                e["signed"] = True
            e["hash"] = canonical_hash(e, key)
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            path = self.entries_dir / f"{e['index']:06d}.json"
            if path.exists():
                raise LineageError(f"{path} already exists: the lineage is append-only")
            ckpt.atomic_write_json(path, e)
            ckpt.atomic_write_json(self.root / HEAD, self.head_of(e))
            return e

    @staticmethod
    def head_of(last: dict[str, Any]) -> dict[str, Any]:
        """The head record after ``last``: what :meth:`verify` checks the entries against."""
        return {"count": last["index"] + 1, "hash": last["hash"]}

    def append_approval(self, generation: int, decision: str, by: str = "") -> dict[str, Any]:
        if decision not in ("approve", "reject"):
            raise LineageError(f"decision must be approve or reject, got {decision!r}")
        def pending(st: LineageState) -> None:
            if st.status.get(generation) != PENDING:
                raise LineageError(f"generation {generation} has no pending verdict "
                                   f"(status: {st.status.get(generation, 'not in the lineage')})")

        return self.append({"kind": "approval", "generation": generation, "decision": decision, "by": by},
                           precondition=pending)

    def append_rollback(self, generation: int, reason: str = "") -> dict[str, Any]:
        def adopted(st: LineageState) -> dict[str, Any]:
            if st.status.get(generation) != ADOPTED:
                raise LineageError(f"can only roll back to an adopted generation; generation {generation} is "
                                   f"{st.status.get(generation, 'not in the lineage')}")
            return {"from": st.incumbent}

        return self.append({"kind": "rollback", "to": generation, "reason": reason}, precondition=adopted)
