"""Reading pytrees for messages and for frameworks: key paths as jax prints them, a
framework's variables read as the values they hold, and where two trees' structures
part. Layer 1: below the base protocol, which names paths in its own errors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_variable(x: Any) -> bool:
    """Whether ``x`` is a framework's variable, a pytree node around one array that
    carries metadata (flax nnx's ``Param``: it has ``get_value`` and ``get_metadata``).
    Gradients and parameters reach an optimizer with such nodes or without them
    (``nnx.Optimizer`` builds the state from the first and steps it with the second)."""
    return callable(getattr(x, "get_value", None)) and callable(getattr(x, "get_metadata", None))


def key_path(path: tuple, root: str = "<root>") -> str:
    """A key path as jax prints it (``['w'][0]``), and ``root`` for the tree itself."""
    return jax.tree_util.keystr(path) or root


def held_values(tree: Any) -> Any:
    """``tree`` with each framework variable (:func:`is_variable`) replaced by what it
    holds: an ``nnx.Optimizer``'s state and ``nnx.state(model)`` hold variables."""
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def first_difference(
    expected: Any, got: Any, names: tuple[str, str] = ("params", "updates"), *, prefix=False
) -> str:
    """Where ``got``'s tree structure first departs from ``expected``'s, as a phrase
    naming the key path and what each side holds there (``names`` says what the trees
    are), or "" where none is found. With ``prefix``, a leaf of ``expected`` stands for
    any subtree of ``got`` (a mask over the parameters); None is an empty subtree.

    >>> first_difference({"w": 1.0, "b": 2.0}, {"w": 1.0})
    "at the root: ['b'] only in the params"
    """

    def node(x: Any) -> Any:  # x's own node: its children taken as leaves
        return jax.tree.structure(x, is_leaf=lambda y: y is not x)

    def is_leaf(x: Any) -> bool:
        return jax.tree.structure(x) == jax.tree.structure(0)  # (not None, {} or ())

    def what(x: Any) -> str:
        if x is None or not is_leaf(x):
            return repr(x) if x is None else f"a {type(x).__name__}"
        return f"a leaf of shape {tuple(jnp.shape(x))}" if hasattr(x, "shape") else "a leaf"

    def walk(a: Any, b: Any, path: tuple) -> str:
        where = f"at {key_path(path, root='the root')}: "
        both = f"{where}{what(a)} in the {names[0]}, {what(b)} in the {names[1]}"
        if prefix and is_leaf(a):
            return ""
        if is_leaf(a) or is_leaf(b) or a is None or b is None:
            return "" if (a is None, is_leaf(a)) == (b is None, is_leaf(b)) else both
        if type(a) is not type(b):
            return both
        kids_a, kids_b = (
            jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y, x=x: y is not x)[0]
            for x in (a, b)
        )
        keys_a, keys_b = ([jax.tree_util.keystr(k) for k, _ in kids] for kids in (kids_a, kids_b))
        if keys_a != keys_b:
            only_a = [k for k in keys_a if k not in keys_b]
            only_b = [k for k in keys_b if k not in keys_a]
            sides = [
                f"{', '.join(o)} only in the {n}" for n, o in zip(names, (only_a, only_b)) if o
            ]
            return where + ("; ".join(sides) or "the same keys in another order")
        if not _equal(node(a).node_data(), node(b).node_data()):
            return f"{where}{what(a)} with other static fields in the {names[1]}"
        for (key, x), (_, y) in zip(kids_a, kids_b):
            found = walk(x, y, path + key)
            if found:
                return found
        return ""

    return walk(expected, got, ())


def _equal(x: Any, y: Any) -> bool:
    """``x == y`` as one bool, for a node's static data that may hold arrays (an
    equinox static field): the same object where ``==`` gives no single answer."""
    try:
        return bool(x == y)
    except Exception:
        return x is y


def tree_difference(
    expected: Any, got: Any, names: tuple[str, str] = ("params", "updates"), *, prefix=False
) -> str:
    """:func:`first_difference` of the values the trees hold (a framework's variables
    read as their values), for an error message: it never raises (a tree too deep to
    walk, a node that cannot be compared), and says so where no difference is found."""
    try:
        found = first_difference(held_values(expected), held_values(got), names, prefix=prefix)
    except Exception:  # (a diagnostic must not replace the error it explains)
        found = ""
    return found or NO_DIFFERENCE_FOUND


NO_DIFFERENCE_FOUND = "they differ below a leaf or in a node's static fields"
