"""The one engine that runs an elementwise rule over a pytree, for every state layout.

A :class:`~rmsjax._src.elementwise.LeafRule` describes one leaf's step. The engine
walks the leaves, hands each its slots, and collects the new slots and updates. Where
those slots live is a :class:`Layout`:

* :data:`PER_LEAF` (what every rule, alias and chain uses): each leaf has its own slots,
  held in trees with the parameters' structure, optax's layout;
* the blocks of :func:`~rmsjax._src.grouped.grouped`: same-shaped leaves share one
  stacked array per slot, and the rule runs under ``jax.vmap`` on the stack.

A layout only says which leaves share a block and how the blocks are packed into the
state; checks, parameters, the shared step and the parameter update are the same code
for both, so a block of one leaf is exactly the per-leaf step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import base, block_layout, quantization, sharding
from rmsjax._src import in_turn as in_turn_lib
from rmsjax._src.elementwise import LeafRule

Blocks = tuple[tuple[int, ...], ...]
"""Indices into ``jax.tree.leaves(tree)``, one tuple per block of leaves sharing state."""


class Layout(NamedTuple):
    """Where a rule's per-leaf state lives.

    Attributes:
      name: None for per-leaf state; else the public wrapper that chose the layout
        (``"grouped"``), named in errors about the state's blocks.
      blocks: ``tree -> Blocks``, from the shapes and dtypes of the tree's leaves.
      pack: ``(treedef, per_block) -> slot tree``: one slot of every block, as the state
        holds it.
      unpack: ``(rule_name, treedef, slot_tree, count) -> per_block``, the inverse; raises
        a ValueError naming the function the user called when the state does not fit.
    """

    name: str | None
    blocks: Callable[[Any], Blocks]
    pack: Callable[[Any, list], Any]
    unpack: Callable[[str, Any, Any, int], list]


def _each_leaf_alone(tree: Any) -> Blocks:
    return tuple((i,) for i in range(len(jax.tree.leaves(tree))))


def _pack_per_leaf(treedef: Any, per_leaf: list) -> Any:
    """Each leaf's slot where the leaf is, in the parameters' tree. An int8 slot takes
    the place of a framework's variable around its parameter (:func:`base.is_variable`)
    instead of going inside it: its codes and scales do not have the parameter's shape,
    and flax's ``nnx.Optimizer``, which keeps a variable per array of the state, would
    store them as a mapping inside the variable after its first step."""
    tree = treedef.unflatten(per_leaf)
    if not any(isinstance(slot, quantization.QuantizedArray) for slot in per_leaf):
        return tree

    def unwrap(x):
        inside = jax.tree.leaves(x, is_leaf=lambda y: isinstance(y, quantization.QuantizedArray))
        held = len(inside) == 1 and isinstance(inside[0], quantization.QuantizedArray)
        return inside[0] if base.is_variable(x) and held else x

    return jax.tree.map(unwrap, tree, is_leaf=base.is_variable)


PER_LEAF = Layout(
    name=None,
    blocks=_each_leaf_alone,
    pack=_pack_per_leaf,
    unpack=lambda rule_name, treedef, tree, count: flatten_like(rule_name, "state", treedef, tree),
)
"""Each leaf's slots in trees shaped like the parameters (optax's layout)."""


# ----------------------------------------------------------------------------- checks


def as_arrays(leaves: Sequence[Any]) -> list:
    """The leaves as arrays: python and numpy scalars become 0-d arrays, as in optax."""
    return [x if isinstance(x, jax.Array) or x is None else jnp.asarray(x) for x in leaves]


def check_inexact(rule: LeafRule, where: str, tree: Any, leaves: list) -> None:
    """Raises a TypeError unless every leaf is floating point (or complex, where the rule
    takes complex leaves), naming the first leaf that is not."""
    name = rule.name
    for i, leaf in enumerate(leaves):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.complexfloating) and rule.complex_refusal is not None:
            raise TypeError(
                f"rmsjax.{name}.{where}: leaf {path_of(tree, i)} has dtype {dtype}; "
                f"this transformation takes real leaves only ({rule.complex_refusal}). Use "
                "the default storage, or split the leaf into its real and imaginary parts."
            )
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"rmsjax.{name}.{where}: leaf {path_of(tree, i)} has dtype {dtype}; "
                "optimizers update floating-point (or complex) leaves only. Leave it out of "
                "the trained tree (replace it by None, e.g. with eqx.filter(model, "
                "eqx.is_inexact_array)) or cast it to a float dtype."
            )


def check_params(
    rule_name: str, updates: Any, leaves: list, param_leaves: list, needs_params: bool
) -> None:
    """Raises unless each parameter that goes with an update is floating point (or
    complex, :func:`base.check_float_parameter`) and has the update's shape: a TypeError
    or ValueError naming the leaf."""
    for i, (g, p) in enumerate(zip(leaves, param_leaves)):
        if g is None or (p is None and not needs_params):
            continue
        if p is None:
            raise ValueError(
                f"rmsjax.{rule_name}.update: the parameter at {path_of(updates, i)} is None "
                "but its update is not; this transformation needs every updated parameter."
            )
        base.check_float_parameter(f"{rule_name}.update", functools.partial(path_of, updates, i), p)
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(
                f"rmsjax.{rule_name}.update: the parameter at {path_of(updates, i)} has "
                f"shape {jnp.shape(p)} but its update has shape {jnp.shape(g)}; pass the "
                "parameters the gradients were taken of."
            )


def path_of(tree: Any, index: int) -> str:
    """The key path of leaf ``index`` of ``tree``, as jax prints it."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return jax.tree_util.keystr(paths[index][0]) or "<root>"


def flatten_like(rule_name: str, what: str, treedef: Any, tree: Any) -> list:
    """``tree``'s leaves in the order of ``treedef``; a ValueError shows both structures
    when they differ."""
    try:
        return leaves_up_to(treedef, tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"rmsjax.{rule_name}.update: the tree structure of the updates differs from "
            f"that of the {what}.\n  updates: {treedef}\n  {what}: "
            f"{jax.tree.structure(tree)}\nInitialise the optimizer with parameters of the "
            "same structure as the gradients."
        ) from error


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


def _check_shapes(rule: LeafRule, layout: Layout, updates, leaves, blocks, per_block) -> None:
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
            expected = lead + declared.shape_for(leaf_shape)
            shape = _slot_shape(slot)
            if shape is None or shape == expected:
                continue
            path = path_of(updates, block[0])
            if lead and layout.name is not None:
                raise ValueError(
                    f"rmsjax.{layout.name}.update: a block of the state has shape "
                    f"{tuple(shape)} but the updates at {path} and the leaves stacked with "
                    f"it need {expected}. Initialise the optimizer with parameters of the "
                    "gradients' shapes and dtypes."
                )
            needs = "" if expected == leaf_shape else f" (its {declared.field} needs {expected})"
            raise ValueError(
                f"rmsjax.{rule.name}.update: the update at {path} has shape {leaf_shape} "
                f"but the state holds {tuple(shape)}{needs}. Initialise the optimizer with "
                "parameters of the gradients' shapes."
            )


def _slot_shape(slot: Any) -> tuple[int, ...] | None:
    """The shape of the array a slot stands for, stacked axes included. An int8 slot's
    ``shape`` is that of one leaf; in a block of stacked leaves its codes and scales
    carry the block's leading axis."""
    if isinstance(slot, quantization.QuantizedArray):
        stacked = jnp.ndim(slot.codes) - len(block_layout.blocks_shape(slot.shape))
        return tuple(jnp.shape(slot.codes)[:stacked]) + slot.shape
    shape = getattr(slot, "shape", None)
    return None if shape is None else tuple(shape)


# ------------------------------------------------------------------------------ engine


def init(rule: LeafRule, layout: Layout, params: base.Params) -> Any:
    """``rule``'s state for ``params``, in ``layout``."""
    leaves, treedef = jax.tree.flatten(params)
    leaves = as_arrays(leaves)
    check_inexact(rule, "init", params, leaves)
    per_block = [
        # A leaf alone: laid out like its parameter (see sharding.py). Stacked leaves
        # (single-device only, as grouped() documents): the rule under vmap.
        sharding.init_leaf_like(rule, leaves[block[0]])
        if len(block) == 1
        else jax.vmap(rule.init_leaf)(jnp.stack([leaves[i] for i in block]))
        for block in layout.blocks(params)
    ]
    slot_trees = [
        layout.pack(treedef, [slots[k] for slots in per_block]) for k in range(rule.num_slots)
    ]
    return rule.to_state(sharding.init_shared_like(rule.init_shared, leaves), slot_trees)


def run(
    rule: LeafRule,
    layout: Layout,
    updates: base.Updates,
    state: Any,
    params: base.Params | None,
    *,
    apply: bool = False,
) -> tuple[Any, Any]:
    """One step of ``rule`` over the tree, its state in ``layout``: returns (updates,
    state), or with ``apply=True`` (params + updates in each parameter's dtype, state)."""
    shared, slot_trees = rule.from_state(state, none_tree=updates is None)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = as_arrays(leaves)
    check_inexact(rule, "update", updates, leaves)
    blocks = layout.blocks(updates)
    slot_lists = [layout.unpack(rule.name, treedef, t, len(blocks)) for t in slot_trees]
    per_block = [tuple(s[b] for s in slot_lists) for b in range(len(blocks))]
    _check_shapes(rule, layout, updates, leaves, blocks, per_block)
    if params is None:
        # the tree None is its own parameters: nothing to apply an update to
        if rule.needs_params or (apply and updates is not None):
            raise ValueError(
                f"rmsjax.{rule.name}.update: this transformation needs the parameters; "
                "call update(updates, state, params)."
            )
        param_leaves: list = [None] * len(leaves)
    else:
        param_leaves = as_arrays(params_like(rule.name, treedef, updates, params))
        check_params(rule.name, updates, leaves, param_leaves, rule.needs_params)

    new_shared, context = rule.step_shared(shared)
    step_leaf = leaf_stepper(rule, context, apply, leaves, in_turn_lib.worth_it(per_block))
    step_block = _block_stepper(rule, context, apply, leaves)
    in_flight = _InFlight(_traced(leaves))
    out_leaves: list = [None] * len(leaves)
    new_slot_lists: list[list] = [[] for _ in range(rule.num_slots)]
    for block, own in zip(blocks, per_block):
        if len(block) == 1:
            out, slots = step_leaf(leaves[block[0]], own, param_leaves[block[0]])
            out_leaves[block[0]] = out
        else:
            ps = [param_leaves[i] for i in block]
            gs = in_flight.wait([leaves[i] for i in block])
            outs, slots = step_block(gs, own, ps)
            in_flight.started(slots, outs)
            for i, out in zip(block, outs):
                out_leaves[i] = out
        for k, s in enumerate(slots):
            new_slot_lists[k].append(s)
    new_state = rule.to_state(new_shared, [layout.pack(treedef, s) for s in new_slot_lists])
    return treedef.unflatten(out_leaves), new_state


IN_FLIGHT = 1 << 20
"""Elements of stacked blocks whose steps may be under way at once; see :class:`_InFlight`."""


class _InFlight:
    """Runs the steps of stacked blocks in turn, :data:`IN_FLIGHT` elements at a time.

    A block's step stacks its gradients into a temporary, and without momentum its
    updates into another. XLA CPU orders a step's kernels by their data alone, and ran
    every block's stacking first: the temporaries of all blocks were alive at once, 8
    bytes per parameter of the whole tree for ``grouped(rmsprop(...))`` (a peak of 20
    against 12 with per-leaf state), 4 with momentum. Here a block's gradients are read
    only once the last state array (or without state, the last output) of the block
    ``IN_FLIGHT`` elements before it is written: its first gradient passes through a
    select on an integer zero computed from that array, which XLA can neither fold nor
    compute earlier. So the temporaries are bounded by the budget, not by the tree, and
    stay in cache: on 1000 leaves of 16k the stacked step ran in about half the time
    (docs/performance.md, "The grouped layout"). The values are the same, bit for bit;
    op by op (under no trace) nothing needs ordering."""

    def __init__(self, traced: bool):
        self.traced = traced
        self.started_blocks: list[tuple[Any, int]] = []  # (written last, elements)

    def started(self, slots: Any, outs: list) -> None:
        # the last array written, of the state if any; a block of empty leaves has none
        arrays = [a for a in jax.tree.leaves(slots) or outs if a.size]
        if self.traced and arrays:
            self.started_blocks.append((arrays[-1], sum(out.size for out in outs)))

    def wait(self, gs: list) -> list:
        """``gs``, read after the latest block with ``IN_FLIGHT`` elements after it."""
        elements = sum(g.size for g in gs)
        for written, size in reversed(self.started_blocks):
            if elements >= IN_FLIGHT:
                value = written.real if jnp.iscomplexobj(written) else written
                done = in_turn_lib.zero_after(jnp.max(value)) == 0  # always True
                return [jnp.where(done, gs[0], -gs[0]), *gs[1:]]
            elements += size
        return gs


def leaf_stepper(
    rule: LeafRule, context: Any, apply: bool, leaves: Sequence[Any], in_turn: bool = False
) -> Callable:
    """``(g, slots, param) -> (update or new param, slots)`` for one leaf.

    Under a trace (inside ``jit``, ``grad``, ``vmap``...) the per-leaf step is itself
    wrapped in ``jax.jit``: JAX then traces and lowers it once per distinct leaf shape and
    dtype, and every other leaf of that shape is a call to the same function, which XLA
    inlines before it optimizes. The compiled program, and so every number, is the same
    as with the step written out leaf by leaf; a model with thousands of same-shaped
    leaves traces and lowers in a fraction of the time. Outside a trace the leaves run
    op by op, as any eager JAX code does.

    With ``in_turn``, under a trace, a leaf whose slots are all int8 has them encoded one
    after another (:func:`in_turn.step`): the same values, without XLA's copies of the
    old codes (op by op there is nothing to copy).
    """
    in_turn = in_turn and _traced(leaves)

    def step(g, slots, param):
        if in_turn and in_turn_lib.applies(rule, g, slots):
            return in_turn_lib.step(rule, context, apply, g, slots, param)
        update, slots = rule.update_leaf(g, slots, context, param)
        return (base.apply_leaf(param, update) if apply else update), slots

    return jit_under_trace(step, leaves)


def _block_stepper(rule: LeafRule, context: Any, apply: bool, leaves: Sequence[Any]) -> Callable:
    """``(gradient leaves, block slots, parameter leaves) -> (outputs, block slots)`` for
    a block of stacked leaves: the rule runs under ``jax.vmap`` and each row is handed
    back (added to its parameter when ``apply``). Jitted under a trace, as
    :func:`leaf_stepper` is."""
    in_axes = (0, 0, None, 0 if rule.needs_params else None)
    step = jax.vmap(rule.update_leaf, in_axes=in_axes)

    def block_step(gs, own, ps):
        p = jnp.stack(ps) if rule.needs_params else None
        u, slots = step(jnp.stack(gs), own, context, p)
        rows = [u[row] for row in range(len(gs))]
        if apply:
            rows = [base.apply_leaf(p_row, u_row) for p_row, u_row in zip(ps, rows)]
        return rows, slots

    return jit_under_trace(block_step, leaves)


def jit_under_trace(fn: Callable, leaves: Sequence[Any]) -> Callable:
    """``jax.jit(fn)`` when ``leaves`` are tracers (see :func:`leaf_stepper`), else ``fn``."""
    if _traced(leaves):
        return jax.jit(fn)
    return fn


def _traced(leaves: Sequence[Any]) -> bool:
    """Whether a step runs under a trace (``jit``, ``grad``, ``vmap``...): some leaf is a tracer."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
