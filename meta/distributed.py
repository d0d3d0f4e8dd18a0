"""Scale-out over ``torch.distributed``: one process per GPU or per CPU core group, on one or many nodes.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ...);
:func:`init` then creates the process group: ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` on CUDA machines
(CPU tensors, which is what the meta-trainer reduces today, go through gloo; CUDA tensors through NCCL;
the process's device is ``cuda:LOCAL_RANK``). Override with ``OUROBOROS_DIST_BACKEND``.

Without a process group every helper is a no-op on the single process (rank 0 of 1): ``shard`` returns
all ids, ``all_reduce_sum`` returns its input, ``broadcast_object`` returns its argument. Nothing here
touches ``torch.distributed`` at import time, and the single-process path costs one global lookup.

What is sharded (see README "Scaling out"):

* meta-training: each rank steps a contiguous block of the population's members
  (:func:`shard`); every member's randomness derives from ``(seed, member index, episode, step)``,
  never from the rank, so the maths does not depend on the number of processes; the meta-gradient's
  ``(sum, count)`` is all-reduced (:class:`meta.trainer.MetaTrainer`);
* evaluation: tasks are dealt round-robin to ranks, the per-task records all-gathered, so *every*
  rank returns the same results (:func:`meta.evaluate.evaluate`) and code that decides on them (the
  governor) takes the same decision everywhere.

Faults: every collective has a timeout (``OUROBOROS_DIST_TIMEOUT`` seconds, default
:data:`DEFAULT_TIMEOUT_S`), so a rank that dies or hangs makes the others raise instead of waiting
forever (a rank that *exits* is usually noticed at once: its sockets close). Rank-0-only side effects
(checkpoints, lineage, W&B) go through :func:`run_on_main`, which broadcasts the result or the error so
all ranks continue -- or fail -- together.

API for other modules: :func:`is_main`, :func:`rank`, :func:`world_size`, :func:`shard`,
:func:`all_reduce_sum`, :func:`all_reduce_scalars`, :func:`any_true`, :func:`gather_object`,
:func:`all_gather_object`, :func:`broadcast_object`, :func:`barrier`, :func:`run_on_main`,
:func:`load_checkpoint`, :func:`shutdown`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_TIMEOUT = "OUROBOROS_DIST_TIMEOUT"
ENV_BACKEND = "OUROBOROS_DIST_BACKEND"
DEFAULT_TIMEOUT_S = 600.0  # longest a rank waits in one collective (covers evaluation load imbalance)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: str = "cpu"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_SINGLE = DistContext()
_CTX: DistContext | None = None  # set by init() when a process group was created here
_OWNED = False  # whether init() created the process group (shutdown() destroys only that one)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers (0: first attempt)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def timeout_s() -> float:
    value = os.environ.get(ENV_TIMEOUT, "")
    return float(value) if value.strip() else DEFAULT_TIMEOUT_S


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True when a process group with more than one rank is up (ours or one created by the caller)."""
    if _CTX is not None:
        return _CTX.distributed
    import sys

    dist = sys.modules.get("torch.distributed")  # never import it just to answer "no"
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def context() -> DistContext:
    if _CTX is not None:
        return _CTX
    if active():  # a group initialised by someone else (e.g. a test using mp.spawn)
        dist = _dist()
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=_env_int("LOCAL_RANK", 0),
                           local_world_size=_env_int("LOCAL_WORLD_SIZE", dist.get_world_size()),
                           backend=str(dist.get_backend()))
    return _SINGLE


def rank() -> int:
    return context().rank


def world_size() -> int:
    return context().world_size


def local_world_size() -> int:
    return context().local_world_size


def is_main() -> bool:
    return context().rank == 0


def init(backend: str | None = None, timeout: float | None = None) -> DistContext:
    """Create the process group from torchrun's environment; a no-op (single context) when
    ``WORLD_SIZE`` is unset or 1. Idempotent."""
    global _CTX, _OWNED
    if _CTX is not None:
        return _CTX
    world = env_world_size()
    if world <= 1:
        return _SINGLE
    import torch

    dist = _dist()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = "cpu"
    if backend is None:
        backend = os.environ.get(ENV_BACKEND) or None
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    t = timeout_s() if timeout is None else float(timeout)
    if not dist.is_initialized():
        _OWNED = True
        td = datetime.timedelta(seconds=t)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps ONE store across --max-restarts attempts, so a restarted group
            # would read the dead attempt's addresses (gloo: "connectFullMesh failed ... Connection
            # refused"); a per-attempt key prefix gives every attempt a clean namespace.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=td)
            store = dist.PrefixStore(f"ouroboros/attempt_{restart_count()}", store)
            dist.init_process_group(backend=backend, store=store, rank=_env_int("RANK", 0), world_size=world,
                                    timeout=td)
        else:
            dist.init_process_group(backend=backend, init_method="env://", timeout=td)
    _CTX = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       local_world_size=_env_int("LOCAL_WORLD_SIZE", dist.get_world_size()),
                       backend=backend, device=device, timeout_s=t)
    return _CTX


def shutdown() -> None:
    """Destroy the process group :func:`init` created (safe to call when there is none, or after a peer
    died); a group created by the caller is left alone."""
    global _CTX, _OWNED
    owned, _CTX, _OWNED = _OWNED, None, False
    import sys

    dist = sys.modules.get("torch.distributed")
    if owned and dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a dead peer must not turn a clean exit into a crash
            dist.destroy_process_group()


# ---- sharding ----------------------------------------------------------------------------------
def shard(ids: Iterable[int], *, mode: str = "contiguous", rank_: int | None = None,
          world: int | None = None) -> list[int]:
    """This rank's share of ``ids``, deterministic: ``contiguous`` blocks (sizes differ by at most one,
    the first ``len % world`` ranks get one more) or ``strided`` (``ids[rank::world]``)."""
    ids = list(ids)
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w <= 1:
        return ids
    if mode == "strided":
        return ids[r::w]
    if mode != "contiguous":
        raise ValueError(f"mode must be 'contiguous' or 'strided', got {mode!r}")
    n, extra = divmod(len(ids), w)
    start = r * n + min(r, extra)
    return ids[start:start + n + (1 if r < extra else 0)]


# ---- tensor collectives ------------------------------------------------------------------------
def _leaves(tree: Any, out: list) -> None:
    import torch

    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, dict):
        for k in sorted(tree):
            _leaves(tree[k], out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _leaves(v, out)


def _rebuild(tree: Any, it) -> Any:
    import torch

    if isinstance(tree, torch.Tensor):
        return next(it)
    if isinstance(tree, dict):
        new = {k: _rebuild(tree[k], it) for k in sorted(tree)}
        return {k: new[k] for k in tree}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, it) for v in tree)
    return tree


def _comm_device(t) -> Any:
    """Where a tensor must be for the backend: NCCL-only groups need CUDA tensors."""
    ctx = context()
    if ctx.backend == "nccl" and t.device.type == "cpu":
        return ctx.device
    return t.device


def all_reduce_sum(tree: Any) -> Any:
    """Sum a tree (dict / list / tuple of tensors) over ranks: one collective per dtype and device."""
    if not active():
        return tree
    import torch

    dist = _dist()
    leaves: list = []
    _leaves(tree, leaves)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(leaves):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out = list(leaves)
    for idx in groups.values():
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])
        dev = _comm_device(flat)
        buf = flat.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.to(flat.device)
        offset = 0
        for i in idx:
            n = leaves[i].numel()
            out[i] = buf[offset:offset + n].reshape(leaves[i].shape).clone()
            offset += n
    return _rebuild(tree, iter(out))


def all_reduce_scalars(values: Sequence[float], op: str = "sum") -> list[float]:
    """Reduce a few Python numbers (float64) over ranks; ``op`` is ``sum``, ``max`` or ``min``."""
    if not active():
        return [float(v) for v in values]
    import torch

    dist = _dist()
    buf = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dev = _comm_device(buf)
    buf = buf.to(dev)
    dist.all_reduce(buf, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                             "min": dist.ReduceOp.MIN}[op])
    return [float(x) for x in buf.cpu()]


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a stop request seen by one rank)."""
    if not active():
        return bool(flag)
    return all_reduce_scalars([1.0 if flag else 0.0], "max")[0] > 0


# ---- object collectives ------------------------------------------------------------------------
def gather_object(obj: Any, dst: int = 0) -> list | None:
    """Rank ``dst`` gets ``[obj of rank 0, obj of rank 1, ...]``; the others get None. Tensors inside
    ``obj`` should be on the CPU."""
    if not active():
        return [obj]
    dist = _dist()
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj: Any) -> list:
    if not active():
        return [obj]
    dist = _dist()
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Every rank returns rank ``src``'s ``obj`` (the others' argument is ignored)."""
    if not active():
        return obj
    dist = _dist()
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        _dist().barrier()


class RemoteError(RuntimeError):
    """An error raised on the main rank inside :func:`run_on_main`, re-raised on the other ranks."""


def run_on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on rank 0 only and return its result on every rank; if it raises, every rank raises
    (the same exception type when it pickles, else :class:`RemoteError`). Use it for rank-0-only side
    effects whose outcome all ranks must agree on: writing a checkpoint, a lineage record, a decision."""
    if not active():
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            try:
                pickle.dumps(e)
                payload: tuple = ("error", e)
            except Exception:  # noqa: BLE001
                payload = ("error", RemoteError(f"{type(e).__name__}: {e}"))
            broadcast_object(payload)
            raise
        broadcast_object(("ok", result))
        return result
    status, value = broadcast_object(None)
    if status == "error":
        raise value
    return value


def load_checkpoint(path: str | Path):
    """``optimizers.checkpoint.load(path)`` read (and hash-checked) by rank 0 and broadcast, so every rank
    gets the same ``(tensors, meta)`` -- or the same CheckpointError -- without a shared filesystem."""
    from optimizers import checkpoint as ckpt

    return run_on_main(ckpt.load, path)
