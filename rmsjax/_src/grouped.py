"""``grouped``: run an elementwise chain on blocks of same-shaped leaves.

A model with thousands of small leaves pays for each leaf, not for each number: every
state array is one more buffer handed to and returned from the compiled step, and one
more kernel. :func:`grouped` keeps the optimizer state in blocks instead: leaves of the
same shape and dtype are stacked, up to ``block_size`` at a time, and each block's state
is one array. The rule is the same per-leaf function, run under ``jax.vmap`` on the
block, so the numbers are those of the per-leaf chain, bit for bit but for an ulp or
two per step where XLA contracts a multiply-add in one kernel only (see ``grouped``).
Parameters and updates keep the user's tree; only the state changes layout. See
``docs/performance.md`` for the measurements behind the defaults.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, engine, fusion, leaf_groups, tree_checks, validate
from rmsjax._src.leaf_groups import DEFAULT_MAX_STACKED_SIZE, leaf_blocks


class GroupedState(NamedTuple):
    """State of :func:`grouped`.

    Attributes:
      inner: the wrapped transformation's state, with its own types (for ``rmsprop`` the
        tuple of ``ScaleByRmsState``, ``ScaleByLearningRateState`` and ``TraceState``),
        in which every per-leaf tree is replaced by a tuple of blocks. Block ``b`` stacks,
        along a new leading axis, the leaves listed in ``leaf_blocks(params)[b]`` (indices
        into ``jax.tree.leaves(params)``); a block of one leaf holds that leaf's state as
        it is, without the leading axis. Scalars such as step counts are unchanged.
        :func:`ungroup_state` turns it back into the per-leaf state.
      structure: the tree structure, leaf shapes and dtypes of the parameters it was
        made for, static data (nothing saved: a restored state takes its target's, so
        restore against the parameters it was saved with). Each step makes its blocks
        from them and checks its gradients' structure and shapes against them: blocks of
        same-shaped leaves cannot tell a renamed or reordered leaf apart, and blocks made
        from the gradients would stack other leaves together where a gradient's dtype is
        not its parameter's; either way one leaf's state would go to another. None: no checks.
    """

    inner: Any
    structure: Any = None


def _stack_slots(per_leaf: list) -> Any:
    """One block's slot pytree from the leaves' slot pytrees (a block of one: as is)."""
    if len(per_leaf) == 1:
        return per_leaf[0]
    return jax.tree.map(lambda *rows: jnp.stack(rows), *per_leaf)


def _unstack_slots(block: tuple, stacked: Any) -> list:
    if len(block) == 1:
        return [stacked]
    return [jax.tree.map(lambda a, row=row: a[row], stacked) for row in range(len(block))]


def grouped(
    tx: base.GradientTransformation,
    *,
    block_size: int | None = None,
    max_stacked_size: int = DEFAULT_MAX_STACKED_SIZE,
) -> base.GradientTransformation:
    """Runs an elementwise transformation with its state in blocks of stacked leaves.

    ``tx`` must be made of elementwise rules only: ``rmsprop``, ``adagrad``, ``sgd``,
    the compat presets, and chains of ``scale_by_rms``, ``scale_by_rss``, ``trace``,
    ``scale_by_learning_rate``, ``add_decayed_weights`` (without a mask), ... Not
    ``rowwise_adagrad`` or ``factored_rmsprop``, whose state is per row or column, and
    no wrapper: ``masked``, ``inject_hyperparams`` and ``accumulate_gradients`` go around
    ``grouped`` (``inject_hyperparams(lambda learning_rate:
    grouped(rmsprop(learning_rate)))(learning_rate=1e-3)``). Updates, parameters and
    the numbers are the same as with ``tx`` (bit for bit but for an ulp or two per step
    in a few kernels, ``grouped(adagrad)`` on leaves of 2-8 elements among them, see
    docs/performance.md); the state holds one array per block of up to
    ``block_size`` same-shaped leaves instead of one per leaf (:class:`GroupedState`).
    On models with thousands of small leaves this makes the jitted step and its
    compilation markedly cheaper (on 3000 leaves of 1k elements 0.53-0.83x optax's step
    time and 0.24-0.65x its compile time over five runs on a 2-core CPU; see
    ``benchmarks/RESULTS.md``);
    for a few large leaves it changes nothing. Use it with :func:`update_and_apply` or
    :func:`make_train_step` to fuse the parameter update too. Blocks are made from the
    parameters ``init`` was given; a gradient may have another dtype than its parameter
    (float32 gradients for bfloat16 parameters), but the gradients of the leaves stacked
    in one block must share one.

    Put non-elementwise parts around it: ``chain(clip_by_global_norm(1.0),
    grouped(rmsprop(1e-3)))``.

    .. warning:: the state layout depends on the parameters' shapes and on
       ``block_size``; convert it with :func:`ungroup_state` to read per-leaf values or
       to resume with the ungrouped ``tx``. Blocks stack leaves, so they are meant for
       single-device steps; for sharded parameters keep the per-leaf layout.

    Args:
      tx: a transformation built only from elementwise rules.
      block_size: at most this many leaves per block (>= 1), or None (the default) for
        :func:`auto_block_size` of each group's leaf count: 8 to 32.
      max_stacked_size: leaves with more elements than this are not stacked (each is a
        block of one); by default 32768.

    Returns:
      A :class:`GradientTransformation` with state :class:`GroupedState`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> tx = rj.grouped(rj.rmsprop(0.1))
    >>> state = tx.init(params)
    >>> state.inner[0].nu[0].shape  # one block holding both leaves
    (2, 2)
    >>> rj.update_and_apply(tx, {"a": jnp.ones(2), "b": -jnp.ones(2)}, state, params)[0]["b"]
    Array([1.3162278, 1.3162278], dtype=float32)
    """
    validate.check_transformation("grouped", "tx", tx)
    rule = fusion.leaf_rule_of(tx)
    if rule is None and fusion.name_of(tx) is None:  # optax.adam is an optax.chain
        raise TypeError(
            f"rmsjax.grouped: tx must be built from rmsjax's elementwise rules (rmsprop, "
            f"adagrad, sgd, scale_by_rms, trace, ...); got {fusion.other_parts_of(tx)}, a "
            "transformation from another library, whose state rmsjax cannot stack."
        )
    if rule is None:
        raise TypeError(
            "rmsjax.grouped: tx must be built only from elementwise rules (rmsprop, "
            "adagrad, sgd, scale_by_rms, trace, ...); this one holds "
            f"{fusion.other_parts_of(tx)}. Chain such parts outside: "
            "chain(clip_by_global_norm(1.0), grouped(rmsprop(1e-3))); wrap apply_if_finite, "
            "masked, inject_hyperparams and accumulate_gradients around grouped."
        )
    not_elementwise = [slot.field for slot in rule.slots if slot.axes is not None]
    if not_elementwise:
        raise TypeError(
            "rmsjax.grouped: tx must be built only from elementwise rules; this one keeps "
            f"statistics over rows or columns of each leaf ({', '.join(not_elementwise)}), "
            "which stacked blocks would sum in another order, with other rounding. Use it "
            "without grouped."
        )
    validate.check_count("grouped", "block_size", block_size, allow_none=True)
    validate.check_count("grouped", "max_stacked_size", max_stacked_size)

    def blocks(tree):
        return leaf_blocks(tree, block_size=block_size, max_stacked_size=max_stacked_size)

    def unpack(rule_name, treedef, held, count):
        if not isinstance(held, tuple) or len(held) != count:
            held = len(held) if isinstance(held, tuple) else type(held).__name__
            raise ValueError(
                f"rmsjax.grouped.update: the state holds {held} blocks, and "
                f"grouped(block_size={block_size}, max_stacked_size={max_stacked_size}) "
                f"makes {count} of the parameters' leaves. Was the state made with other "
                "settings, or for parameters of other shapes or dtypes? ungroup_state "
                "(with the grouped optimizer that made it) and then group_state convert it."
            )
        return list(held)

    layout = engine.Layout(
        name="grouped",
        blocks=blocks,
        pack=lambda treedef, per_block: tuple(per_block),
        unpack=unpack,
    )

    def init_fn(params):
        with elementwise.naming_wrapper("grouped", "init"):
            inner_state = engine.init(rule, layout, params)
        made_for = base.TreeStructure(
            base.structure_of(params), leaf_groups.signature("grouped.init", params)
        )
        return GroupedState(inner_state, made_for)

    def step(updates, state, params, apply):
        held = _inner_of("grouped.update", state, updates)
        with elementwise.naming_wrapper("grouped", "update"):
            now = layout
            if state.structure is not None and state.structure.leaves is not None:
                made = _blocks_made(rule.name, state.structure.leaves, updates, blocks_of)
                now = layout._replace(blocks=lambda tree: made)
            out, inner_state = engine.run(rule, now, updates, held, params, apply=apply)
        return out, GroupedState(inner_state, state.structure)

    def blocks_of(leaves):
        return leaf_groups.blocks_of(leaves, block_size, max_stacked_size)

    def update_fn(updates, state, params=None, **extra):
        return step(updates, state, params, apply=False)

    def update_and_apply_fn(updates, state, params, **extra):
        return step(updates, state, params, apply=True)

    update = fusion.Update(update_fn, rule=rule, layout=layout, fused_step=update_and_apply_fn)
    return base.GradientTransformation(init_fn, update)


def _blocks_made(rule_name: str, made_for: Any, updates: Any, blocks_of: Any) -> tuple:
    """The blocks of the parameters the state was made for (``made_for``: their leaves'
    shapes and dtypes), once the gradients stacked in each block share a shape and a
    dtype. Blocks read from the gradients instead would stack other leaves together
    when a gradient's dtype is not its parameter's, and hand one leaf's state to
    another. A gradient may have a shard's shape of its parameter's (each dimension
    dividing it: inside ``shard_map``); the state's blocks are then checked against it."""
    leaves = tree_checks.as_arrays(jax.tree.leaves(updates), f"rmsjax.{rule_name}.update", updates)
    path = functools.partial(tree_checks.path_of, updates)
    for index, (leaf, (shape, _)) in enumerate(zip(leaves, made_for)):
        if not _shard_of(tuple(jnp.shape(leaf)), shape):
            raise ValueError(
                f"rmsjax.grouped.update: the update at {path(index)} has shape "
                f"{tuple(jnp.shape(leaf))} but the parameter the state was made for has "
                f"{shape} (or, inside shard_map, a shard of it). Initialise the optimizer "
                "with parameters of the gradients' shapes."
            )
    made = blocks_of(made_for)
    for block in made:
        first = leaves[block[0]]
        for index in block[1:]:
            leaf = leaves[index]
            if jnp.shape(leaf) != jnp.shape(first):  # shards of one shape, sharded apart
                raise ValueError(
                    "rmsjax.grouped.update: the gradients of the leaves stacked in one block "
                    f"of state must share a shape; the update at {path(block[0])} has shape "
                    f"{jnp.shape(first)} and at {path(index)} {jnp.shape(leaf)} (both "
                    f"parameters {made_for[index][0]}). Shard same-shaped parameters alike, "
                    "or use tx without grouped."
                )
            if jnp.result_type(leaf) != jnp.result_type(first):
                raise TypeError(
                    "rmsjax.grouped.update: the gradients of the leaves stacked in one "
                    f"block of state must share a dtype; the update at {path(block[0])} is "
                    f"{jnp.result_type(first)} and at {path(index)} {jnp.result_type(leaf)} "
                    f"(both parameters {made_for[index][1]}). Give each parameter dtype one "
                    "gradient dtype (the parameters' own, say), or use tx without grouped."
                )
    return made


def _shard_of(shape: tuple[int, ...], full: tuple[int, ...]) -> bool:
    """Whether ``shape`` is ``full`` or a shard of it: each dimension divides ``full``'s."""
    return len(shape) == len(full) and all(
        n == f or (0 < n and f % n == 0) for n, f in zip(shape, full)
    )


def _inner_of(function: str, state: Any, tree: Any) -> Any:
    """``state.inner``, once ``state`` is a GroupedState made for ``tree``'s structure."""
    if not isinstance(state, GroupedState):
        raise TypeError(
            f"rmsjax.{function}: expected the GroupedState that init returned, got "
            f"{type(state).__name__}. A per-leaf state can be converted with "
            "group_state(tx, state, params)."
        )
    if state.structure is not None and state.structure.treedef != base.structure_of(tree):
        stepping = function.endswith("update")
        what = "updates" if stepping else "params"
        hint = (
            "Initialise the optimizer with parameters of the gradients' structure."
            if stepping
            else "Pass the parameters the state was made for."
        )
        raise ValueError(
            f"rmsjax.{function}: the tree structure of the {what} differs from that of the "
            "parameters the state was made for; "
            f"{tree_checks.difference(state.structure.treedef, tree, ('parameters', what))}."
            f"\n  {what}: {base.structure_of(tree)}\n  state: "
            f"{state.structure.treedef}\n{hint}"
        )
    return state.inner


def _blocks_mismatch(function: str, held: Any, blocks: tuple, params: Any) -> ValueError:
    return ValueError(
        f"rmsjax.{function}: the state holds {held} blocks, and params "
        f"({jax.tree.structure(params)}) make {len(blocks)}: {blocks}. Pass the parameters "
        "the state was made for."
    )


def _layout_of(function: str, tx: base.GradientTransformation):
    found = fusion.rule_and_layout_of(tx)
    if found is None or found[1].name != "grouped":
        hint = " For a grouped part in a chain, pass it and its state." if found is None else ""
        raise TypeError(
            f"rmsjax.{function}: tx must be the transformation rmsjax.grouped returned, "
            f"got {fusion.name_of(tx) or type(tx).__name__}.{hint}"
        )
    return found


def _check_slot(function: str, declared: Any, where: str, slot: Any, leaf_shape: tuple, lead=()):
    """Raises unless ``slot`` (a leaf's, or with ``lead`` a block's) has the shape its
    declaration gives a parameter of ``leaf_shape``."""
    have, want = tree_checks.slot_shape(slot), lead + declared.shape_for(leaf_shape)
    if have is not None and have != want:
        raise ValueError(
            f"rmsjax.{function}: the state's {declared.field} for {where} has shape {have}, "
            f"and params make it {want}. Pass the parameters the state was made for."
        )


def _made_for(function: str, state: GroupedState, params: Any) -> Any:
    """Parameters standing for those the state was made for (their shapes and dtypes),
    once ``params`` has their shapes; ``params`` itself for a state that kept none."""
    made_for = None if state.structure is None else state.structure.leaves
    if made_for is None:
        return params
    leaves, treedef = jax.tree.flatten(params)
    for index, (leaf, (shape, _)) in enumerate(zip(leaves, made_for)):
        if tuple(jnp.shape(leaf)) != shape:
            raise ValueError(
                f"rmsjax.{function}: params at {tree_checks.path_of(params, index)} has "
                f"shape {tuple(jnp.shape(leaf))} but the parameter the state was made for "
                f"has {shape}. Pass the parameters the state was made for."
            )
    return treedef.unflatten([jax.ShapeDtypeStruct(*leaf) for leaf in made_for])


def ungroup_state(
    tx: base.GradientTransformation, state: GroupedState, params: base.Params
) -> base.OptState:
    """The per-leaf state of the transformation ``tx`` wraps, from ``tx``'s grouped state.

    The result is the grouped state's values laid out per leaf: what the ungrouped
    transformation holds after the same steps (but for the ulps its kernels may round
    apart, see :func:`grouped`), to inspect per leaf, save, or resume without grouping.

    Args:
      tx: the transformation returned by :func:`grouped`.
      state: its :class:`GroupedState`.
      params: parameters (or ``jax.ShapeDtypeStruct``) of the tree the state was made for.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> tx = rj.grouped(rj.adagrad(0.1))
    >>> rj.ungroup_state(tx, tx.init(params), params)[0].sum_of_squares["b"]
    Array([0.1, 0.1], dtype=float32)
    """
    name = "ungroup_state"
    rule, layout = _layout_of(name, tx)
    inner = _inner_of(name, state, params)
    with elementwise.naming_wrapper(name, None, role="tx"):  # a state of another optimizer
        shared, slot_trees = rule.from_state(inner)
    leaves, treedef = jax.tree.flatten(params)
    blocks = layout.blocks(_made_for(name, state, params))
    per_leaf_trees = []
    for declared, trees in zip(rule.slots, slot_trees):
        if not isinstance(trees, tuple) or len(trees) != len(blocks):
            held = len(trees) if isinstance(trees, tuple) else type(trees).__name__
            raise _blocks_mismatch(name, held, blocks, params)
        per_leaf: list = [None] * len(leaves)
        for block, stacked in zip(blocks, trees):
            lead = () if len(block) == 1 else (len(block),)
            where = f"the block of leaves {block}"
            _check_slot(name, declared, where, stacked, jnp.shape(leaves[block[0]]), lead)
            for i, slot in zip(block, _unstack_slots(block, stacked)):
                per_leaf[i] = slot
        per_leaf_trees.append(treedef.unflatten(per_leaf))
    return rule.to_state(shared, per_leaf_trees)


def group_state(
    tx: base.GradientTransformation, state: base.OptState, params: base.Params
) -> GroupedState:
    """The inverse of :func:`ungroup_state`: a per-leaf state made grouped for ``tx``.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> params = [jnp.ones(2), jnp.ones(2)]
    >>> tx = rj.grouped(rj.adagrad(0.1))
    >>> rj.group_state(tx, rj.adagrad(0.1).init(params), params).inner[0].sum_of_squares[0]
    Array([[0.1, 0.1],
           [0.1, 0.1]], dtype=float32)
    """
    name = "group_state"
    rule, layout = _layout_of(name, tx)
    if isinstance(state, GroupedState):
        raise TypeError(f"rmsjax.{name}: state is a GroupedState already; pass a per-leaf state.")
    with elementwise.naming_wrapper(name, None, role="tx"):  # a state of another optimizer
        shared, slot_trees = rule.from_state(state)
    blocks = layout.blocks(params)
    treedef = jax.tree.structure(params)
    param_leaves = jax.tree.leaves(params)
    grouped_trees = []
    for declared, tree in zip(rule.slots, slot_trees):
        try:
            leaves = tree_checks.leaves_up_to(treedef, tree)
        except (ValueError, TypeError):
            raise ValueError(
                f"rmsjax.{name}: the state's tree structure ({jax.tree.structure(tree)}) is "
                f"not that of params ({treedef}); "
                f"{tree_checks.difference(treedef, tree, ('params', 'state'))}. Pass the "
                "parameters the state was made for."
            ) from None
        for index, (slot, param) in enumerate(zip(leaves, param_leaves)):
            where = tree_checks.path_of(params, index)
            _check_slot(name, declared, where, slot, tuple(jnp.shape(param)))
        grouped_trees.append(tuple(_stack_slots([leaves[k] for k in b]) for b in blocks))
    made_for = base.TreeStructure(base.structure_of(params), leaf_groups.signature(name, params))
    return GroupedState(rule.to_state(shared, grouped_trees), made_for)
