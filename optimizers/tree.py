"""Tiny pytree helpers for the nested dicts of tensors that optimizers use as state.

Optimizer state is a nested ``dict[str, dict | Tensor]``. torch.func (``vmap``, ``grad``) already
understands nested dicts; these helpers add the two operations the rest of the code needs on top:
flattening to ``"a/b/c"`` keys (safetensors files are flat) and mapping a function over leaves.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

Params = dict[str, Tensor]
Tree = Any  # dict[str, Tree] | Tensor

SEP = "/"


def flatten(tree: Tree, prefix: str = "") -> dict[str, Tensor]:
    """Flatten a nested dict of tensors to ``{"a/b": tensor}`` (keys must not contain ``/``)."""
    if isinstance(tree, Tensor):
        return {prefix: tree}
    if not isinstance(tree, dict):
        raise TypeError(f"expected a dict of tensors at {prefix!r}, got {type(tree).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in tree.items():
        if SEP in key:
            raise ValueError(f"key {key!r} contains {SEP!r}; rename it")
        out.update(flatten(value, f"{prefix}{SEP}{key}" if prefix else key))
    return out


def unflatten(flat: dict[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten`."""
    if list(flat) == [""]:
        return flat[""]
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def tree_map(fn: Callable[..., Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over one or more trees of the same structure."""
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_leaves(tree: Tree) -> list[Tensor]:
    return list(flatten(tree).values())


def detach(tree: Tree) -> Tree:
    return tree_map(lambda t: t.detach(), tree)


def stack(trees: list[Tree]) -> Tree:
    """Stack trees of equal structure along a new leading (population) axis."""
    return tree_map(lambda *ts: torch.stack(ts), trees[0], *trees[1:])


def unstack(tree: Tree, n: int) -> list[Tree]:
    return [tree_map(lambda t: t[i], tree) for i in range(n)]


def all_finite(tree: Tree) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tree_leaves(tree))


def under_func_transform(t: Tensor) -> bool:
    """True for a tensor wrapped by a ``torch.func`` transform (``vmap``'s batched tensors, ``grad``'s
    tracked ones): code with a plain-autograd or fused fast path must take its pure path for them."""
    functorch = getattr(torch._C, "_functorch", None)
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    batched = getattr(functorch, "is_batchedtensor", None)
    return bool((wrapped is not None and wrapped(t)) or (batched is not None and batched(t)))
