"""``grouped``: run an elementwise chain on blocks of same-shaped leaves.

A model with thousands of small leaves pays for each leaf, not for each number: every
state array is one more buffer handed to and returned from the compiled step, and one
more kernel. :func:`grouped` keeps the optimizer state in blocks instead: leaves of the
same shape and dtype are stacked, up to ``block_size`` at a time, and each block's state
is one array. The rule is the same per-leaf function, run under ``jax.vmap`` on the
block, so the numbers are those of the per-leaf chain, bit for bit, for every
elementwise rule. Parameters and updates keep the user's tree; only the state changes
layout. See ``docs/performance.md`` for the measurements behind the defaults.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, engine, fusion, tree_checks, validate
from rmsjax._src.quantization import QuantizedArray

MIN_BLOCK_SIZE = 8
MAX_BLOCK_SIZE = 32


def auto_block_size(count: int) -> int:
    """Leaves per block for a group of ``count`` same-shaped leaves (``block_size=None``).

    Two costs pull apart: each block is one more state buffer handed to and returned
    from the compiled step, and a few more kernels, so fewer, larger blocks are cheaper;
    but XLA CPU compiles one small kernel of its own for each row position in a block
    (the parameter update reads its row at a fixed offset), so larger blocks compile
    more kernels. The balance, measured on 1000-3000 leaves, is near sqrt(count / 4)
    rows, rounded up to a power of two and kept between 8 and 32: 8 for up to 256
    leaves, 16 up to 1024, 32 above.

    >>> import rmsjax as rj
    >>> [rj.auto_block_size(n) for n in (1, 256, 1000, 3000)]
    [8, 8, 16, 32]
    """
    validate.check_count("auto_block_size", "count", count)
    size = MIN_BLOCK_SIZE
    while size < MAX_BLOCK_SIZE and 4 * size * size < count:
        size *= 2
    return size


DEFAULT_MAX_STACKED_SIZE = 1 << 15
"""Leaves with more elements than this are left in blocks of one (a reshape, no copy).
Stacking copies the gradients, 8 more bytes of traffic per parameter, into temporaries
the engine keeps within a budget (``engine.IN_FLIGHT``), where they stay in cache. On a
2-core CPU, against leaves left alone, stacked blocks stepped 0.8-0.95x as long on 1000
leaves of 16k, as long on 500 of 32k, and 1.15x as long on 250 of 64k, and compiled in a
third to a half of the time at all three sizes (docs/performance.md)."""


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
      structure: the tree structure of the parameters it was made for, held as static
        data (no array: nothing to save), which each step compares with its gradients'.
        Blocks of same-shaped leaves cannot tell a renamed or reordered leaf apart;
        without this check its state would go to another leaf. None skips the check.
    """

    inner: Any
    structure: Any = None


def leaf_blocks(
    params: base.Params,
    *,
    block_size: int | None = None,
    max_stacked_size: int = DEFAULT_MAX_STACKED_SIZE,
) -> tuple[tuple[int, ...], ...]:
    """The blocks :func:`grouped` stacks: tuples of indices into ``jax.tree.leaves(params)``.

    Leaves are grouped by shape and dtype, groups ordered by their first leaf, leaves in
    tree order; each group is cut into blocks of at most ``block_size`` leaves
    (``None``: :func:`auto_block_size` of the group's leaf count). Leaves
    with more than ``max_stacked_size`` elements get a block each. Only shapes and
    dtypes are read, so ``params`` may hold arrays, tracers or ``jax.ShapeDtypeStruct``.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.leaf_blocks([jnp.zeros(3), jnp.zeros(2), jnp.zeros(3)], block_size=8)
    ((0, 2), (1,))
    """
    validate.check_count("leaf_blocks", "block_size", block_size, allow_none=True)
    validate.check_count("leaf_blocks", "max_stacked_size", max_stacked_size)
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for index, leaf in enumerate(jax.tree.leaves(params)):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) and not tree_checks.is_number(
            leaf
        ):
            # jnp.result_type would read a string leaf as the name of a dtype
            raise TypeError(
                f"rmsjax.leaf_blocks: params leaf {tree_checks.path_of(params, index)} is "
                f"{leaf!r} ({type(leaf).__name__}); leaves must be arrays, numbers or "
                "jax.ShapeDtypeStruct"
            )
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(jnp.shape(leaf))
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        size = 1
        for dim in shape:
            size *= dim
        key: tuple[Any, ...] = (shape, jnp.dtype(dtype))
        if size > max_stacked_size:
            key = key + (index,)  # a group of its own
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(index)
    blocks: list[tuple[int, ...]] = []
    for key in order:
        members = groups[key]
        size = auto_block_size(len(members)) if block_size is None else block_size
        blocks.extend(
            tuple(members[start : start + size]) for start in range(0, len(members), size)
        )
    return tuple(blocks)


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
    the numbers are the same as with ``tx``; the state holds one array per block of up to
    ``block_size`` same-shaped leaves instead of one per leaf (:class:`GroupedState`).
    On models with thousands of small leaves this makes the jitted step and its
    compilation markedly cheaper (on 3000 leaves of 1k elements 0.53-0.80x optax's step
    time and 0.20-0.38x its compile time on a 2-core CPU; see ``benchmarks/RESULTS.md``);
    for a few large leaves it changes nothing. Use it with :func:`update_and_apply` or
    :func:`make_train_step` to fuse the parameter update too.

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
    if rule is None:
        raise TypeError(
            "rmsjax.grouped: tx must be built only from elementwise rules (rmsprop, "
            "adagrad, sgd, scale_by_rms, trace, ...); this one holds "
            f"{fusion.other_parts_of(tx)}. Chain such parts outside: "
            "chain(clip_by_global_norm(1.0), grouped(rmsprop(1e-3))); wrap masked, "
            "inject_hyperparams and accumulate_gradients around grouped."
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

    layout = engine.Layout(name="grouped", blocks=blocks, pack=_pack, unpack=_unpack)
    inner = fusion.rule_transformation(rule, layout)

    def init_fn(params):
        with elementwise.naming_wrapper("grouped", "init"):
            inner_state = inner.init(params)
        return GroupedState(inner_state, base.TreeStructure(base.structure_of(params)))

    def update_fn(updates, state, params=None, **extra):
        held = _inner_of("grouped.update", state, updates)
        with elementwise.naming_wrapper("grouped", "update"):
            return _wrap(inner.update(updates, held, params), state)

    fused = fusion.fused_step_of(inner)
    assert fused is not None  # a rule always has one

    def update_and_apply_fn(updates, state, params, **extra):
        held = _inner_of("grouped.update", state, updates)
        with elementwise.naming_wrapper("grouped", "update"):
            return _wrap(fused(updates, held, params), state)

    update = fusion.Update(update_fn, rule=rule, layout=layout, fused_step=update_and_apply_fn)
    return base.GradientTransformation(init_fn, update)


def _pack(treedef: Any, per_block: list) -> tuple:
    del treedef
    return tuple(per_block)


def _unpack(rule_name: str, treedef: Any, blocks: Any, count: int) -> list:
    del rule_name, treedef
    if not isinstance(blocks, tuple) or len(blocks) != count:
        held = len(blocks) if isinstance(blocks, tuple) else type(blocks).__name__
        raise ValueError(
            f"rmsjax.grouped.update: the state holds {held} blocks but the updates "
            f"make {count}. Initialise the optimizer with parameters of the "
            "gradients' shapes and dtypes (and the same block_size)."
        )
    return list(blocks)


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
            f"parameters the state was made for.\n  {what}: {base.structure_of(tree)}\n  state: "
            f"{state.structure.treedef}\n{hint}"
        )
    return state.inner


def _blocks_mismatch(function: str, held: Any, blocks: tuple, params: Any) -> ValueError:
    return ValueError(
        f"rmsjax.{function}: the state holds {held} blocks, and params "
        f"({jax.tree.structure(params)}) make {len(blocks)}: {blocks}. Pass the parameters "
        "the state was made for."
    )


def _wrap(result: tuple, state: GroupedState) -> tuple:
    out, inner_state = result
    return out, GroupedState(inner_state, state.structure)


def _layout_of(function: str, tx: base.GradientTransformation):
    found = fusion.rule_and_layout_of(tx)
    if found is None or found[1].name != "grouped":
        hint = " For a grouped part in a chain, pass it and its state." if found is None else ""
        raise TypeError(
            f"rmsjax.{function}: tx must be the transformation rmsjax.grouped returned, "
            f"got {fusion.name_of(tx) or type(tx).__name__}.{hint}"
        )
    return found


def _check_block_shape(function: str, block: tuple, stacked: Any, leaf_shape: tuple) -> None:
    """Raises unless a block's slot of parameter shape fits params' leaves (a slot of
    another shape, a count or a row statistic, is not compared)."""
    if isinstance(stacked, QuantizedArray):  # its shape is a leaf's, stacked or not
        have, want = tuple(stacked.shape), leaf_shape
    elif hasattr(stacked, "shape"):
        have = tuple(stacked.shape)
        want = leaf_shape if len(block) == 1 else (len(block), *leaf_shape)
        if len(have) != len(want):
            return
    else:
        return
    if have != want:
        raise ValueError(
            f"rmsjax.{function}: the state's block of leaves {block} has shape {have}, and "
            f"params make it {want}. Pass the parameters the state was made for."
        )


def ungroup_state(
    tx: base.GradientTransformation, state: GroupedState, params: base.Params
) -> base.OptState:
    """The per-leaf state of the transformation ``tx`` wraps, from ``tx``'s grouped state.

    The result is what the ungrouped transformation would hold after the same steps, bit
    for bit, so it can be inspected per leaf, saved, or used to resume without grouping.

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
    shared, slot_trees = rule.from_state(_inner_of(name, state, params))
    leaves, treedef = jax.tree.flatten(params)
    blocks = layout.blocks(params)
    per_leaf_trees = []
    for trees in slot_trees:
        if not isinstance(trees, tuple) or len(trees) != len(blocks):
            held = len(trees) if isinstance(trees, tuple) else type(trees).__name__
            raise _blocks_mismatch(name, held, blocks, params)
        per_leaf: list = [None] * len(leaves)
        for block, stacked in zip(blocks, trees):
            _check_block_shape(name, block, stacked, tuple(jnp.shape(leaves[block[0]])))
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
    shared, slot_trees = rule.from_state(state)
    blocks = layout.blocks(params)
    treedef = jax.tree.structure(params)
    grouped_trees = []
    for tree in slot_trees:
        try:
            leaves = tree_checks.leaves_up_to(treedef, tree)
        except (ValueError, TypeError):
            raise ValueError(
                f"rmsjax.{name}: the state's tree structure ({jax.tree.structure(tree)}) is "
                f"not that of params ({treedef}). Pass the parameters the state was made for."
            ) from None
        grouped_trees.append(tuple(_stack_slots([leaves[k] for k in b]) for b in blocks))
    return GroupedState(
        rule.to_state(shared, grouped_trees), base.TreeStructure(base.structure_of(params))
    )
