"""What the engine checks of the trees it is given, before it traces a step: leaves
of a float dtype, parameters shaped like their gradients, state trees shaped like the
updates and each slot as its declaration says, with errors that name the public
function the user called, the leaf's path and both sides.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import base, block_layout, quantization, tree_paths
from rmsjax._src.elementwise import LeafRule


def as_arrays(leaves: Sequence[Any], where: str = "", tree: Any = None) -> list:
    """The leaves as arrays: python and numpy scalars become 0-d arrays, as in optax.
    A leaf JAX cannot read (a string, say) is a TypeError naming it, ``where`` being
    ``"rmsjax.rmsprop.init"`` and ``tree`` the tree the leaves came from."""
    arrays = []
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array) or x is None:
            arrays.append(x)
            continue
        try:
            if isinstance(x, (str, bytes)):  # jnp.asarray reads '1.5' as a number
                raise TypeError
            arrays.append(jnp.asarray(x))
        except (TypeError, ValueError):
            raise TypeError(
                f"{where}: leaf {path_of(tree, i)} is {x!r} ({type(x).__name__}), not an "
                "array of numbers; optimizers update floating-point (or complex) arrays. "
                "Leave it out of the trained tree (replace it by None)."
            ) from None
    return arrays


def check_inexact(
    name: str, where: str, tree: Any, leaves: list, complex_refusal: str | None = None
) -> None:
    """Raises a TypeError unless every leaf is floating point (or complex, unless a
    ``complex_refusal`` says why not), naming the first leaf that is not."""
    for i, leaf in enumerate(leaves):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.complexfloating) and complex_refusal is not None:
            raise TypeError(
                f"rmsjax.{name}.{where}: leaf {path_of(tree, i)} has dtype {dtype}; "
                f"this transformation takes real leaves only ({complex_refusal}). "
                "Split the leaf into its real and imaginary parts."
            )
        if base.is_eight_bit_float(dtype):
            raise base.eight_bit_float_error(f"{name}.{where}", f"leaf {path_of(tree, i)}", dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"rmsjax.{name}.{where}: leaf {path_of(tree, i)} has dtype {dtype}; "
                "optimizers update floating-point (or complex) leaves only. Leave it out of "
                "the trained tree (replace it by None, e.g. with eqx.filter(model, "
                "eqx.is_inexact_array)) or cast it to a float dtype."
            )


def check_params(
    rule_name: str,
    updates: Any,
    leaves: list,
    param_leaves: list,
    needs_params: bool,
    apply: bool = False,
) -> None:
    """Raises unless each parameter that goes with an update is floating point (or
    complex, :func:`base.check_float_parameter`) and has the update's shape: a TypeError
    or ValueError naming the leaf. With ``apply`` (the step adds its updates to the
    parameters) a complex gradient, whose update is complex, needs a complex parameter."""
    for i, (g, p) in enumerate(zip(leaves, param_leaves)):
        if g is None or (p is None and not needs_params):
            continue
        if p is None:
            raise ValueError(
                f"rmsjax.{rule_name}.update: the parameter at {path_of(updates, i)} is None "
                "but its update is not; this transformation needs every updated parameter."
            )
        base.check_float_parameter(
            f"{rule_name}.update", functools.partial(path_of, updates, i), p, g if apply else None
        )
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(
                f"rmsjax.{rule_name}.update: the parameter at {path_of(updates, i)} has "
                f"shape {jnp.shape(p)} but its update has shape {jnp.shape(g)}; pass the "
                "parameters the gradients were taken of."
            )


def refuse_eight_bit_floats(function: str, tree: Any) -> None:
    """The TypeError of :func:`check_inexact` for the first 8-bit float leaf of ``tree``,
    for what takes a whole tree (``rmsjax.function``) rather than a rule's leaves."""
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and base.is_eight_bit_float(dtype):
            raise base.eight_bit_float_error(function, f"leaf {path_of(tree, i)}", dtype)


def path_of(tree: Any, index: int) -> str:
    """The key path of leaf ``index`` of ``tree``, as jax prints it."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tree_paths.key_path(paths[index][0])


def flatten_like(rule_name: str, what: str, treedef: Any, tree: Any) -> list:
    """``tree``'s leaves in the order of ``treedef``; a ValueError shows both structures
    when they differ."""
    try:
        return leaves_up_to(treedef, tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"rmsjax.{rule_name}.update: the tree structure of the updates differs from "
            f"that of the {what}; {difference(treedef, tree, ('updates', what))}."
            f"\n  updates: {treedef}\n  {what}: "
            f"{jax.tree.structure(tree)}\nInitialise the optimizer with parameters of the "
            "same structure as the gradients."
        ) from error


def difference(treedef: Any, tree: Any, names: tuple[str, str]) -> str:
    """Where ``tree`` departs from ``treedef`` (:func:`tree_paths.tree_difference`)."""
    try:  # (a node's unflatten may check its children)
        expected = treedef.unflatten([0] * treedef.num_leaves)
    except Exception:
        return tree_paths.NO_DIFFERENCE_FOUND
    return tree_paths.tree_difference(expected, tree, names)


def leaves_up_to(treedef: Any, tree: Any) -> list:
    """``treedef.flatten_up_to(tree)``, which also takes a tree that goes on below a leaf
    of ``treedef`` (a dict where the updates hold an array); here each item must be one
    array (an int8 slot included), a number or None, else a ValueError."""
    flat = treedef.flatten_up_to(tree)
    if not all(x is None or hasattr(x, "shape") or is_number(x) for x in flat):
        raise ValueError("a subtree where a leaf belongs")
    return flat


def is_number(x: Any) -> bool:
    """A Python or NumPy scalar, which JAX takes as a leaf of a tree of arrays."""
    return isinstance(x, (int, float, complex, np.number, np.bool_))


def params_like(rule_name: str, treedef: Any, updates: Any, params: Any) -> list:
    """The parameter leaves that go with the update leaves. Where ``updates`` holds None
    (a leaf left out of this step) the parameter is skipped, as optax does."""
    try:
        pruned = jax.tree.map(
            lambda g, p: None if g is None else p, updates, params, is_leaf=base.is_none
        )
    except (ValueError, TypeError):
        pruned = params  # let flatten_like report the two structures
    return flatten_like(rule_name, "parameters", treedef, pruned)


def check_slots(
    rule: LeafRule, layout_name: str | None, updates, leaves, blocks, per_block
) -> None:
    """Each slot against its declaration (:class:`~rmsjax._src.elementwise.Slot`): the
    shape it must have for its leaf, with a leading axis for a block of stacked leaves.
    A slot stored in 8 bits is checked by the shape of the array it stands for."""
    for block, slots in zip(blocks, per_block):
        leaf_shape = tuple(jnp.shape(leaves[block[0]]))
        complex_leaf = jnp.iscomplexobj(leaves[block[0]])
        lead = () if len(block) == 1 else (len(block),)
        for declared, slot in zip(rule.slots, slots):
            if hasattr(slot, "dtype") and not jnp.issubdtype(slot.dtype, jnp.inexact):
                raise TypeError(
                    f"rmsjax.{rule.name}.update: the state's {declared.field} at "
                    f"{path_of(updates, block[0])} has dtype {slot.dtype}; it is kept in "
                    "a floating dtype (or as a QuantizedArray), and an integer one would "
                    "truncate it. Pass the state this optimizer's init made."
                )
            if complex_leaf and hasattr(slot, "dtype") and not jnp.iscomplexobj(slot):
                # a real state would drop the imaginary part of what it keeps (momentum)
                raise TypeError(
                    f"rmsjax.{rule.name}.update: the update at {path_of(updates, block[0])} "
                    f"has dtype {jnp.result_type(leaves[block[0]])} but the state's "
                    f"{declared.field} there has dtype {slot.dtype}, made for real "
                    "parameters. Initialise the optimizer with the complex parameters."
                )
            if isinstance(slot, quantization.QuantizedArray):
                # the path is found only for an error: it walks the whole tree
                where = functools.partial(_slot_at, declared.field, updates, block[0])
                quantization.check_consistent(f"{rule.name}.update", slot, where)
            expected = lead + declared.shape_for(leaf_shape)
            shape = slot_shape(slot)
            if shape is None or shape == expected:
                continue
            path = path_of(updates, block[0])
            if lead and layout_name is not None:
                raise ValueError(
                    f"rmsjax.{layout_name}.update: a block of the state has shape "
                    f"{tuple(shape)} but the updates at {path} and the leaves stacked with "
                    f"it need {expected}. Was the state made with another block_size or "
                    "max_stacked_size, or for parameters of other shapes or dtypes? "
                    "ungroup_state (with the optimizer that made it) and group_state convert it."
                )
            needs = "" if expected == leaf_shape else f" (its {declared.field} needs {expected})"
            raise ValueError(
                f"rmsjax.{rule.name}.update: the update at {path} has shape {leaf_shape} "
                f"but the state holds {tuple(shape)}{needs}. Initialise the optimizer with "
                "parameters of the gradients' shapes."
            )


def _slot_at(field: str, updates: Any, index: int) -> str:
    return f"the state's {field} at {path_of(updates, index)}"


def slot_shape(slot: Any) -> tuple[int, ...] | None:
    """The shape of the array a slot stands for, stacked axes included. An int8 slot's
    ``shape`` is that of one leaf; in a block of stacked leaves its codes and scales
    carry the block's leading axis."""
    if isinstance(slot, quantization.QuantizedArray):
        stacked = jnp.ndim(slot.codes) - len(block_layout.blocks_shape(slot.shape))
        return tuple(jnp.shape(slot.codes)[:stacked]) + slot.shape
    shape = getattr(slot, "shape", None)
    return None if shape is None else tuple(shape)
