"""Masks: trees of python bools that pick the leaves a transformation acts on.

Shared by the ``masked`` wrapper and the rules that take a mask (weight decay), so this
sits below both: a rule never imports a wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from rmsjax._src import base, tree_paths

Mask = Any
"""A pytree of python bools with the parameters' structure (or a prefix of it), or a
function from the parameters to such a tree."""


class MaskedNode(NamedTuple):
    """Stands for a leaf (or subtree) that a mask leaves out, in the tree the inner
    transformation of :func:`masked` sees and so in its state.

    It is a pytree node without children, so ``jax.tree.map`` and optax's tree
    utilities skip it, as they skip ``optax.MaskedNode``; test for it with
    ``is_leaf=lambda x: isinstance(x, rj.MaskedNode)`` where a map needs to see it.
    """


def mask_is_function(mask: Any) -> bool:
    """Whether ``mask`` is a function of the parameters rather than a tree of bools.

    A mask is a function when every leaf of it is callable: a plain function or lambda,
    but not a callable pytree (an equinox Module holding bools is a tree of bools)."""
    leaves = jax.tree.leaves(jax.tree.map(callable, mask))
    return bool(leaves) and all(leaves)


def resolve_mask(function: str, mask: Mask | Callable[[base.Params], Mask], tree: Any) -> Any:
    """The mask as a tree of python bools; ``tree`` is what a function mask is given."""
    mask_tree = mask(tree) if mask_is_function(mask) else mask

    def check(m):
        if isinstance(m, (bool, np.bool_)):
            return bool(m)
        if isinstance(m, jax.core.Tracer):
            raise TypeError(
                f"rmsjax.{function}: the mask must hold python bools known when the step is "
                "traced, got a traced value. Build the mask from the parameters' structure "
                "(shapes, names), not from their values."
            )
        if np.shape(m) == () and np.asarray(m).dtype == bool:
            return bool(m)
        # 0 and 1 as False and True, as optax reads them (a mask made with int(...)
        # or from an integer array); any other number is more likely a mistake
        if isinstance(m, (int, np.integer, np.ndarray, jax.Array)) and np.shape(m) == ():
            if np.issubdtype(np.asarray(m).dtype, np.integer) and int(m) in (0, 1):
                return bool(m)
        raise TypeError(
            f"rmsjax.{function}: the mask must hold True or False (or the integers 0 and "
            f"1) at each leaf, got {type(m).__name__} {m!r}"
        )

    return jax.tree.map(check, mask_tree)


def _map_over_mask(function: str, what: str, fn: Callable, mask_tree: Any, *trees: Any) -> Any:
    def guarded(m: Any, *subs: Any) -> Any:
        # a None in the mask is an empty subtree, as in optax, not False: over an array
        # it is a structure error (it was taken as False, the leaf left out in silence)
        if m is None and subs[0] is not None:
            raise ValueError("a None in the mask over an array")
        return fn(m, *subs)

    try:
        return jax.tree.map(guarded, mask_tree, *trees, is_leaf=base.is_none)
    except (ValueError, TypeError) as error:
        where = tree_paths.tree_difference(mask_tree, trees[0], ("mask", what), prefix=True)
        raise ValueError(
            f"rmsjax.{function}: the mask's tree structure must be the {what}' (or a prefix "
            f"of it); {where}."
            f"\n  mask: {jax.tree.structure(mask_tree)}\n  {what}: "
            f"{jax.tree.structure(trees[0], is_leaf=base.is_none)}"
        ) from error


def select(mask_tree: Any, tree: Any, *, function: str = "masked", what: str = "updates") -> Any:
    """``tree`` with every subtree whose mask is False replaced by a :class:`MaskedNode`."""
    if tree is None:
        return None
    return _map_over_mask(
        function, what, lambda m, sub: sub if m else MaskedNode(), mask_tree, tree
    )


def merge(mask_tree: Any, chosen: Any, others: Any) -> Any:
    """Subtrees of ``chosen`` where the mask is True, of ``others`` elsewhere."""
    return jax.tree.map(
        lambda m, c, o: c if m else o, mask_tree, chosen, others, is_leaf=base.is_none
    )
