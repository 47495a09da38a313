"""Helpers over parameter pytrees.

metaopt's rules take *parameter trees*: usually a flat ``dict[str, Tensor]`` such as
``dict(model.named_parameters())``, but any pytree that :mod:`torch.utils._pytree`
understands (lists, tuples, nested dicts, registered classes) works. Every leaf is
identified by a string *key*: the dict key for a flat dict of tensors, otherwise the
pytree key path (``"[0]['weight']"``). Rule states are ``dict[key, leaf_state]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

Params = dict[str, torch.Tensor]
"""A parameter tree; usually ``dict(model.named_parameters())``."""

__all__ = [
    "Params",
    "global_norm",
    "is_flat_dict",
    "leaf_keys",
    "map_with_keys",
    "named_leaves",
    "rebuild",
    "tree_dot",
    "tree_map",
    "zeros_like",
]

tree_map = pytree.tree_map
"""``tree_map(fn, tree, *rests)``: :func:`torch.utils._pytree.tree_map` re-exported."""


def is_flat_dict(tree: Any) -> bool:
    """True when ``tree`` is a ``dict`` of string keys to tensors (the common case); a
    value may also be ``None`` (a gradient that ``torch.autograd.grad(...,
    allow_unused=True)`` left out), so that such a tree keeps its parameters' keys."""
    return isinstance(tree, Mapping) and all(
        isinstance(k, str) and (v is None or isinstance(v, torch.Tensor)) for k, v in tree.items()
    )


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[(key, leaf), ...]`` in a deterministic order.

    Keys are the dict keys of a flat ``dict[str, Tensor]`` and pytree key paths
    otherwise, so the same tree always yields the same keys. A ``None`` is a leaf of its
    own (a missing gradient: rules give it a ``None`` update and keep its state).
    """
    if is_flat_dict(tree):
        return list(tree.items())
    with_path, _ = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path), leaf) for path, leaf in with_path]


def leaf_keys(tree: Any) -> list[str]:
    """The keys of :func:`named_leaves`, without the leaves."""
    return [key for key, _ in named_leaves(tree)]


def rebuild(tree: Any, leaves: list[Any]) -> Any:
    """A tree shaped like ``tree`` holding ``leaves`` (in :func:`named_leaves` order)."""
    if is_flat_dict(tree):
        return dict(zip(tree.keys(), leaves, strict=True))
    _, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten(leaves, spec)


def zeros_like(tree: Any) -> Any:
    """A tree of zero tensors shaped like ``tree`` (``None`` leaves stay ``None``)."""
    return tree_map(lambda x: None if x is None else torch.zeros_like(x), tree)


def global_norm(tree: Any) -> torch.Tensor:
    """Euclidean norm of all leaves taken together, as a 0-d tensor.

    Matches the ``total_norm`` of :func:`torch.nn.utils.clip_grad_norm_` (norm type 2).
    Differentiable; the norm is computed in the leaves' dtype; ``None`` leaves are skipped.
    """
    leaves = [leaf for _, leaf in named_leaves(tree) if leaf is not None]
    if not leaves:
        raise ValueError("global_norm of an empty tree")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in leaves]))


def tree_dot(a: Any, b: Any) -> torch.Tensor:
    """Sum over leaves of ``<a_leaf, b_leaf>``: the inner product of two same-shaped trees.

    Leaves are paired by key (two dicts may list their keys in different orders);
    ``None`` leaves are skipped.

    Raises:
        ValueError: the trees have different keys, or no leaves.
    """
    left, right = dict(named_leaves(a)), dict(named_leaves(b))
    if left.keys() != right.keys():
        raise ValueError(f"tree_dot: keys differ: {sorted(left)} vs {sorted(right)}")
    pairs = [(x, right[k]) for k, x in left.items() if x is not None and right[k] is not None]
    terms = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in pairs]
    if not terms:
        raise ValueError("tree_dot of empty trees")
    return torch.stack(terms).sum()


def map_with_keys(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``tree_map`` whose function also receives each leaf's key."""
    items = named_leaves(tree)
    return rebuild(tree, [fn(key, leaf) for key, leaf in items])
