"""Which leaves :func:`~rmsjax._src.grouped.grouped` stacks into one block of state.

Leaves of one shape and dtype are stacked, a block at a time. The choice is made from
each leaf's shape and dtype only (a *signature*), so it can be made from arrays,
tracers or ``jax.ShapeDtypeStruct`` alike, and remade from the signature a
``GroupedState`` keeps of the parameters it was made for.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rmsjax._src import base, tree_checks, validate

Signature = tuple[tuple[tuple[int, ...], Any], ...]
"""Each leaf's ``(shape, dtype)``, in tree order."""

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


def signature(function: str, tree: Any) -> Signature:
    """Each leaf's ``(shape, dtype)``; a leaf without them is a TypeError naming
    ``function``, the public function called."""
    out = []
    for index, leaf in enumerate(jax.tree.leaves(tree)):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) and not tree_checks.is_number(
            leaf
        ):
            # jnp.result_type would read a string leaf as the name of a dtype
            raise TypeError(
                f"rmsjax.{function}: params leaf {tree_checks.path_of(tree, index)} is "
                f"{leaf!r} ({type(leaf).__name__}); leaves must be arrays, numbers or "
                "jax.ShapeDtypeStruct"
            )
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(jnp.shape(leaf))
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        out.append((shape, jnp.dtype(dtype)))
    return tuple(out)


def blocks_of(
    leaves: Signature, block_size: int | None, max_stacked_size: int
) -> tuple[tuple[int, ...], ...]:
    """:func:`leaf_blocks` of a tree whose leaves have these shapes and dtypes."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for index, (shape, dtype) in enumerate(leaves):
        size = 1
        for dim in shape:
            size *= dim
        key: tuple[Any, ...] = (shape, dtype)
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


def leaf_blocks(
    params: base.Params,
    *,
    block_size: int | None = None,
    max_stacked_size: int = DEFAULT_MAX_STACKED_SIZE,
) -> tuple[tuple[int, ...], ...]:
    """The blocks :func:`~rmsjax._src.grouped.grouped` stacks: tuples of indices into
    ``jax.tree.leaves(params)``.

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
    return blocks_of(signature("leaf_blocks", params), block_size, max_stacked_size)
