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

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, block_layout, quantization, sharding, storage, tree_paths
from rmsjax._src import in_turn as in_turn_lib
from rmsjax._src.elementwise import LeafRule
from rmsjax._src.tree_checks import (
    as_arrays,
    check_inexact,
    check_params,
    check_slots,
    flatten_like,
    leaves_up_to,
    params_like,
)

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
    the place of a framework's variable around its parameter (:func:`tree_paths.is_variable`)
    instead of going inside it: its codes and scales do not have the parameter's shape,
    and flax's ``nnx.Optimizer``, which keeps a variable per array of the state, would
    store them as a mapping inside the variable after its first step."""
    tree = treedef.unflatten(per_leaf)
    if not any(isinstance(slot, quantization.QuantizedArray) for slot in per_leaf):
        return tree

    def unwrap(x):
        inside = jax.tree.leaves(x, is_leaf=lambda y: isinstance(y, quantization.QuantizedArray))
        held = len(inside) == 1 and isinstance(inside[0], quantization.QuantizedArray)
        return inside[0] if tree_paths.is_variable(x) and held else x

    return jax.tree.map(unwrap, tree, is_leaf=tree_paths.is_variable)


def _unpack_per_leaf(rule_name: str, treedef: Any, tree: Any, count: int) -> list:
    """Each leaf's slot from a slot tree, in the order of the updates' ``treedef``. Where
    the updates hold a framework's variable, an int8 slot stands in its place
    (:func:`_pack_per_leaf`), so both trees are read with their variables unwrapped."""
    try:
        return leaves_up_to(treedef, tree)
    except (ValueError, TypeError):
        pass
    held = jax.tree.structure(tree_paths.held_values(treedef.unflatten(range(count))))
    if held != treedef:
        try:
            return leaves_up_to(held, tree_paths.held_values(tree))
        except (ValueError, TypeError):
            pass
    return flatten_like(rule_name, "state", treedef, tree)


PER_LEAF = Layout(name=None, blocks=_each_leaf_alone, pack=_pack_per_leaf, unpack=_unpack_per_leaf)
"""Each leaf's slots in trees shaped like the parameters (optax's layout)."""


# ------------------------------------------------------------------------------ engine


def init(rule: LeafRule, layout: Layout, params: base.Params) -> Any:
    """``rule``'s state for ``params``, in ``layout``."""
    leaves, treedef = jax.tree.flatten(params)
    leaves = as_arrays(leaves, f"rmsjax.{rule.name}.init", params)
    check_inexact(rule.name, "init", params, leaves, rule.complex_refusal)
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
    leaves = as_arrays(leaves, f"rmsjax.{rule.name}.update", updates)
    check_inexact(rule.name, "update", updates, leaves, rule.complex_refusal)
    blocks = layout.blocks(updates)
    slot_lists = [layout.unpack(rule.name, treedef, t, len(blocks)) for t in slot_trees]
    per_block = [tuple(s[b] for s in slot_lists) for b in range(len(blocks))]
    if params is None:
        # the tree None is its own parameters: nothing to apply an update to
        if rule.needs_params or (apply and updates is not None):
            raise ValueError(
                f"rmsjax.{rule.name}.update: this transformation needs the parameters; "
                "call update(updates, state, params)."
            )
        param_leaves: list = [None] * len(leaves)
    else:
        param_leaves = as_arrays(
            params_like(rule.name, treedef, updates, params), f"rmsjax.{rule.name}.update", params
        )
        check_params(rule.name, updates, leaves, param_leaves, rule.needs_params, apply)
    # after the parameters: an update unlike its parameter is the gradients' fault, and
    # said so (a state's shape can be a placeholder's or a factor's, which confused)
    check_slots(rule, layout.name, updates, leaves, blocks, per_block)

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
    traced = _traced(leaves)  # once: the step below runs for every leaf
    in_turn = in_turn and traced

    def step(g, slots, param):
        with block_layout.stepping(g):
            if in_turn and in_turn_lib.applies(rule, g, slots):
                return in_turn_lib.step(rule, context, apply, g, slots, param)
            if traced and in_turn_lib.padded(rule, g, slots):
                return in_turn_lib.step(rule, context, apply, g, slots, param, ordered=False)
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
        stacked = jnp.stack(gs)
        p = jnp.stack(ps) if rule.needs_params else None
        # in turn: the rows first, the int8 slots left as they were, then each slot
        in_turn = _traced(gs) and in_turn_lib.applies_to_block(rule, own)
        with storage.slots_kept() if in_turn else contextlib.nullcontext():
            u, slots = step(stacked, own, context, p)
        rows = [u[row] for row in range(len(gs))]
        if apply:
            rows = [base.apply_leaf(p_row, u_row) for p_row, u_row in zip(ps, rows)]
        if in_turn:
            slots = in_turn_lib.encode_block(rule, context, stacked, own, rows)
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
