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
* ``rollback``: the incumbent is set back to an earlier adopted generation;
* ``freeze`` / ``unfreeze`` (the safety layer, :mod:`meta.safety`): a frozen run adopts nothing (no
  ``generation`` entry may say ``adopted`` and no approval may approve) until an ``unfreeze`` entry, which
  needs a person (``by``) and a ``reason``. A freeze records who or what froze the run, why, its evidence
  (e.g. the runaway streak) and may revert the incumbent (``revert_to``: an adopted generation, or
  ``null`` for tuned Adam);
* ``sustain``: the incumbent re-checked against the generation it was judged against on fresh test
  tasks, with the evidence; ``"action": "rollback"`` sets the incumbent back to ``to``;
* ``goal``: a person's recorded change (``by``, ``reason``) of the run's goal -- meta-objective, task
  distribution (digest) and governor settings, first recorded in generation 0's entry. Every later
  ``generation`` entry carries its ``goal_hash``, which must equal the goal in force.

A ``generation`` entry whose architecture was chosen by search (:mod:`meta.search`) carries ``search``:
every proposal, its budget per rung and its selection scores. The lineage refuses one that was not chosen
on the ``selection`` split, or whose winner is not the entry's architecture or lies outside the bounds
(:func:`search_record_problem`).

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
from optimizers.errors import UserError

GENESIS = "0" * 64
RUN_LOCK = ".run.lock"  # in the run directory, held by the generations process using it
ADOPTED, REJECTED, PENDING = "adopted", "rejected", "pending"


class LineageError(UserError, RuntimeError):
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
    frozen: bool = False  # a freeze entry not yet followed by an unfreeze: nothing may be adopted
    freeze: dict | None = None  # the freeze entry in force
    goal: dict | None = None  # the run's goal in force (generation 0's, or the last recorded change)
    goal_hash: str | None = None


def goal_digest(goal: dict[str, Any]) -> str:
    """sha256 of a goal's canonical JSON (the goal itself, never keyed: it names content, not a signer)."""
    return canonical_hash(goal)


def search_record_problem(search: Any, lo_config: Any) -> str | None:
    """What is wrong with a generation entry's ``search`` record, or None. Why: the governor's evidence
    (the ``held_out`` split) must never have chosen what it reviews, and the record must describe the
    architecture the entry actually holds."""
    if not isinstance(search, dict) or not isinstance(search.get("proposals"), list):
        return "its search record lacks the list of proposals"
    if search.get("split") != "selection":
        return f"its architecture was chosen on the {search.get('split')!r} split, not the selection split"
    by_index = {p.get("index"): p for p in search["proposals"] if isinstance(p, dict)}
    winner = by_index.get(search.get("winner"))
    if winner is None:
        return f"its search winner {search.get('winner')!r} is not among the proposals"
    if winner.get("lo_config") != lo_config or search.get("winner_lo_config") != lo_config:
        return "its search winner is not the architecture the entry records"
    if not winner.get("in_bounds") and any(p.get("in_bounds") for p in by_index.values()):
        return "its search winner lies outside the governor's bounds"
    return None


def ceiling_held(record: dict[str, Any]) -> bool:
    """Was this generation's verdict held by the capability ceiling (approving it must be signed)?"""
    return bool(((record.get("verdict") or {}).get("checks") or {}).get("ceiling", {}).get("hold"))


KEEP = object()  # append_freeze: leave the incumbent as it is


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
            self._check_safety(i, e, self.state(entries[:i]))
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
    def _check_safety(i: int, e: dict[str, Any], before: LineageState) -> None:
        """The safety layer's rules, checked on every entry against the state the entries before it give."""
        kind = e.get("kind")

        def signed_by_person() -> None:
            if not (isinstance(e.get("by"), str) and e["by"].strip()
                    and isinstance(e.get("reason"), str) and e["reason"].strip()):
                raise LineageError(f"lineage entry {i}: a {kind} entry needs a person ('by') and a reason")

        def adopted_or_adam(target: Any, what: str) -> None:
            if target is not None and before.status.get(target) != ADOPTED:
                raise LineageError(f"lineage entry {i}: {what} generation {target!r}, which was "
                                   f"{before.status.get(target, 'not in the lineage')} at that point")

        if kind == "generation":
            if e.get("status") == ADOPTED and before.frozen:
                raise LineageError(f"lineage entry {i}: generation {e.get('generation')} adopted while the run "
                                   f"was frozen (entry {before.freeze['index']})")
            if e.get("goal") is not None and e.get("goal_hash") != goal_digest(e["goal"]):
                raise LineageError(f"lineage entry {i}: its goal does not match its goal_hash")
            if e.get("goal_hash") is not None and before.goal_hash is not None \
                    and e["goal_hash"] != before.goal_hash:
                raise LineageError(f"lineage entry {i}: generation {e.get('generation')} was reviewed under a "
                                   f"different goal (meta-objective, distribution, governor settings) than the "
                                   f"one in force, and no person recorded the change")
            if "search" in e:
                problem = search_record_problem(e["search"], e.get("lo_config"))
                if problem:
                    raise LineageError(f"lineage entry {i}: generation {e.get('generation')}: {problem}")
        elif kind == "approval" and e.get("decision") == "approve":
            if before.frozen:
                raise LineageError(f"lineage entry {i}: generation {e.get('generation')} approved while the run "
                                   f"was frozen")
            rec = before.records.get(e.get("generation"), {})
            if ceiling_held(rec) and not str(e.get("by") or "").strip():
                raise LineageError(f"lineage entry {i}: generation {e.get('generation')} was held by the "
                                   f"capability ceiling and approved without a name ('by')")
        elif kind == "freeze":
            if before.frozen:
                raise LineageError(f"lineage entry {i}: freeze of a run that was already frozen")
            if not str(e.get("by") or "").strip() or not str(e.get("reason") or "").strip():
                raise LineageError(f"lineage entry {i}: a freeze entry needs 'by' and a reason")
            if "revert_to" in e:
                adopted_or_adam(e["revert_to"], "freeze reverts to")
        elif kind == "unfreeze":
            if not before.frozen:
                raise LineageError(f"lineage entry {i}: unfreeze of a run that was not frozen")
            signed_by_person()
        elif kind == "goal":
            signed_by_person()
            if not isinstance(e.get("goal"), dict):
                raise LineageError(f"lineage entry {i}: a goal entry needs the new goal")
        elif kind == "sustain":
            if e.get("incumbent") != before.incumbent:
                raise LineageError(f"lineage entry {i}: sustained-gain check of generation {e.get('incumbent')!r}, "
                                   f"but the incumbent was {before.incumbent!r} at that point")
            if e.get("action") == "rollback":
                if e.get("passed"):
                    raise LineageError(f"lineage entry {i}: a sustained-gain check that passed rolled back")
                adopted_or_adam(e.get("to"), "sustained-gain check rolls back to")

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
            elif kind == "freeze":
                st.frozen, st.freeze = True, e
                if "revert_to" in e:
                    st.incumbent = e["revert_to"]
            elif kind == "unfreeze":
                st.frozen, st.freeze = False, None
            elif kind == "sustain":
                if e.get("action") == "rollback":
                    st.incumbent = e.get("to")
            elif kind == "goal":
                st.goal, st.goal_hash = e["goal"], goal_digest(e["goal"])
            if kind == "generation" and st.goal is None and e.get("goal") is not None:
                st.goal, st.goal_hash = e["goal"], goal_digest(e["goal"])  # generation 0's (the first) goal
        return st

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
            if decision == "approve" and st.frozen:
                raise LineageError(f"the run is frozen ({st.freeze.get('reason')}; entry {st.freeze['index']}): "
                                   f"nothing can be adopted until `train.py unfreeze RUN --by NAME --reason ...`")
            if decision == "approve" and ceiling_held(st.records[generation]) and not by.strip():
                raise LineageError(f"generation {generation} is over the capability ceiling: approving it "
                                   f"needs a person's name (--by NAME)")

        return self.append({"kind": "approval", "generation": generation, "decision": decision, "by": by},
                           precondition=pending)

    def append_rollback(self, generation: int, reason: str = "") -> dict[str, Any]:
        def adopted(st: LineageState) -> dict[str, Any]:
            if st.status.get(generation) != ADOPTED:
                raise LineageError(f"can only roll back to an adopted generation; generation {generation} is "
                                   f"{st.status.get(generation, 'not in the lineage')}")
            return {"from": st.incumbent}

        return self.append({"kind": "rollback", "to": generation, "reason": reason}, precondition=adopted)


    # ---- the safety layer's entries (meta.safety) ------------------------------------------
    def append_freeze(self, by: str, reason: str, revert_to: Any = KEEP, **extra: Any) -> dict[str, Any]:
        """Freeze the run: no adoption until :meth:`append_unfreeze`. ``revert_to`` (an adopted generation,
        or None for tuned Adam) also sets the incumbent back; ``extra`` is recorded (evidence, source)."""
        if not by.strip() or not reason.strip():
            raise LineageError("a freeze needs who froze the run (--by) and a reason (--reason)")

        def check(st: LineageState) -> dict[str, Any]:
            if st.frozen:
                raise LineageError(f"the run is already frozen (entry {st.freeze['index']}: {st.freeze.get('reason')})")
            if revert_to is not KEEP and revert_to is not None and st.status.get(revert_to) != ADOPTED:
                raise LineageError(f"can only revert to an adopted generation; generation {revert_to} is "
                                   f"{st.status.get(revert_to, 'not in the lineage')}")
            return {"from": st.incumbent}

        entry = {"kind": "freeze", "by": by, "reason": reason, **extra}
        if revert_to is not KEEP:
            entry["revert_to"] = revert_to
        return self.append(entry, precondition=check)

    def append_unfreeze(self, by: str, reason: str) -> dict[str, Any]:
        if not by.strip() or not reason.strip():
            raise LineageError("unfreezing needs a person (--by NAME) and a reason (--reason TEXT)")

        def frozen(st: LineageState) -> dict[str, Any]:
            if not st.frozen:
                raise LineageError("the run is not frozen")
            return {"freeze_entry": st.freeze["index"]}

        return self.append({"kind": "unfreeze", "by": by, "reason": reason}, precondition=frozen)

    def append_goal(self, goal: dict[str, Any], by: str, reason: str) -> dict[str, Any]:
        """A person's recorded change of the run's goal (meta-objective, distribution, governor settings)."""
        if not by.strip() or not reason.strip():
            raise LineageError("changing the goal needs a person (--by NAME) and a reason (--reason TEXT)")

        def check(st: LineageState) -> dict[str, Any]:
            if st.goal_hash == goal_digest(goal):
                raise LineageError("the goal in force is already this one: nothing to record")
            return {"previous_goal_hash": st.goal_hash, "goal_hash": goal_digest(goal)}

        return self.append({"kind": "goal", "goal": goal, "by": by, "reason": reason}, precondition=check)

    def append_sustain(self, entry: dict[str, Any]) -> dict[str, Any]:
        def check(st: LineageState) -> None:
            if st.incumbent != entry.get("incumbent"):
                raise LineageError(f"sustained-gain check of generation {entry.get('incumbent')}, but the "
                                   f"incumbent is {st.incumbent} now")
            if entry.get("action") == "rollback" and entry.get("to") is not None \
                    and st.status.get(entry["to"]) != ADOPTED:
                raise LineageError(f"cannot roll back to generation {entry['to']}: not adopted")

        return self.append({"kind": "sustain", **entry}, precondition=check)
