"""The block layout of int8 state: how a tensor is cut into the blocks of 256 elements
that each have one scale (the codes themselves are in :mod:`rmsjax._src.quantization`).

Blocks are 256 consecutive elements of the row-major tensor, so they follow the last
axis. When the last axis is a multiple of 256 the codes have shape
``(*shape[:-1], shape[-1] // 256, 256)``: every axis of the parameter is kept, and the
state can be sharded like the parameter. Otherwise the tensor is read as one flat
vector, zero-padded at its end to a multiple of 256, with codes of shape
``(ceil(size / 256), 256)``; when 256 is a multiple of the last axis (64, 128, ...) each
block holds whole rows, so sharding the first axis of the codes matches sharding the
parameter's first axis. Padding per row instead would cost up to 4x for 64-wide
embedding tables.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

BLOCK_SIZE = 256
"""Elements per quantization block (one float32 ``scale`` each)."""


def _cuts_last_axis(shape: tuple[int, ...]) -> bool:
    """Whether the blocks of an array of ``shape`` cut its last axis and keep the others
    (a last axis that is a multiple of 256), rather than read it as one flat vector."""
    return bool(shape) and shape[-1] % BLOCK_SIZE == 0


def blocks_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the codes for an array of ``shape`` (see the module's notes)."""
    shape = tuple(shape)
    if _cuts_last_axis(shape):
        return (*shape[:-1], shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    return (-(-math.prod(shape) // BLOCK_SIZE), BLOCK_SIZE)


_BLOCK_VIEW: contextvars.ContextVar[bool] = contextvars.ContextVar("block_view", default=False)


@contextlib.contextmanager
def block_view() -> Iterator[None]:
    """While tracing under it, arrays given to :func:`~rmsjax._src.quantization.quantize`
    and read from :func:`~rmsjax._src.quantization.dequantize` are taken to be in the
    codes' block layout already (shape ``codes.shape``): no reshape, padding or slice
    between the codes and the values. A kernel that reads old codes and writes new ones
    then touches them at the same index only, and XLA can write the new codes over the
    old (see :mod:`rmsjax._src.in_turn`)."""
    token = _BLOCK_VIEW.set(True)
    try:
        yield
    finally:
        _BLOCK_VIEW.reset(token)


def in_block_view() -> bool:
    """Whether a trace runs under :func:`block_view`."""
    return _BLOCK_VIEW.get()


_LEAF: contextvars.ContextVar[tuple[tuple[int, ...], NamedSharding] | None] = (
    contextvars.ContextVar("leaf", default=None)
)


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """The sharding ``x``'s type carries on a mesh with Explicit axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.mesh.axis_names:
        return None
    if AxisType.Explicit not in tuple(sharding.mesh.axis_types):
        return None
    return sharding


def splitting(x: jax.Array) -> NamedSharding | None:
    """:func:`explicit_sharding` where it splits ``x`` along some axis, else None."""
    sharding = explicit_sharding(x)
    if sharding is None or all(entry is None for entry in sharding.spec):
        return None
    return sharding


@contextlib.contextmanager
def stepping(leaf: jax.Array) -> Iterator[None]:
    """While tracing the step of ``leaf``: where ``leaf``'s type carries its sharding (a
    mesh with Explicit axes), an array of its shape read back from its blocks in another
    layout (see :func:`from_blocks`) is resharded to it, as the step's arithmetic with
    the leaf's gradient needs; elsewhere, nothing."""
    sharding = splitting(leaf)
    token = _LEAF.set(None if sharding is None else (tuple(leaf.shape), sharding))
    try:
        yield
    finally:
        _LEAF.reset(token)


def _shards(sharding: NamedSharding, entry: object) -> int:
    """How many parts ``entry`` of ``sharding``'s spec splits an axis into."""
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sharding.mesh.shape[name] for name in names if name is not None)


def _entries(sharding: NamedSharding, ndim: int) -> list:
    return [*sharding.spec, *(None,) * (ndim - len(sharding.spec))]


def _resharded(x: jax.Array, sharding: NamedSharding, entries: list) -> jax.Array:
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec(*entries)))


def laid_out_as(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` resharded as ``like`` where their types carry different layouts on a mesh
    with Explicit axes (new codes as the old: a step returns the state as ``init`` laid
    it out); elsewhere ``x`` itself."""
    return _resharded_to(x, explicit_sharding(like))


def _resharded_to(x: jax.Array, want: NamedSharding | None) -> jax.Array:
    sharding = explicit_sharding(x)
    if sharding is None or want is None:
        return x
    if _entries(sharding, x.ndim) == _entries(want, x.ndim):
        return x
    return jax.sharding.reshard(x, want)


def _by_rows(x: jax.Array) -> jax.Array:
    """``x``, split along its first axis only where a mesh with Explicit axes splits
    others too: a block of whole rows holds the columns of every device, so the codes
    keep the first axis's split alone (as ``init`` lays them out, see
    :func:`~rmsjax._src.specs.derived_spec`), and the rows flatten into blocks as they
    lie."""
    sharding = splitting(x)
    if sharding is None or x.ndim < 2:
        return x
    first, *others = _entries(sharding, x.ndim)
    if all(entry is None for entry in others):
        return x
    return _resharded(x, sharding, [first])


def to_blocks(x: jax.Array) -> jax.Array:
    """``x`` in the block layout of its codes: ``blocks_shape(x.shape)``, zero-padded."""
    if _BLOCK_VIEW.get():
        return x
    target = blocks_shape(x.shape)
    # On a mesh with Explicit axes a reshape keeps a split axis split only where its
    # parts are whole blocks; elsewhere the axis is gathered first (and the codes laid
    # out as init lays them out by the caller, see laid_out_as).
    if _cuts_last_axis(x.shape):  # the other axes kept, so a sharded one stays one
        sharding = splitting(x)
        if sharding is not None:
            entries = _entries(sharding, x.ndim)
            if (x.shape[-1] // BLOCK_SIZE) % _shards(sharding, entries[-1]):
                x = _resharded(x, sharding, [*entries[:-1], None])
        return x.reshape(target)
    x = _by_rows(x)
    sharding = splitting(x)
    if sharding is not None and target[0] % _shards(sharding, _entries(sharding, x.ndim)[0]):
        x = _resharded(x, sharding, [])
    flat = x.reshape(-1)
    pad = math.prod(target) - flat.size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(target)


def from_blocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The array of ``shape`` that ``blocks`` (its block layout) holds: the inverse of
    :func:`to_blocks`. Leading axes beyond the layout's (leaves stacked by
    ``rj.grouped``) are kept: one array of ``shape`` for each."""
    if _BLOCK_VIEW.get():
        return blocks
    shape = tuple(shape)
    cut = _cuts_last_axis(shape)
    lead = blocks.shape[: max(0, blocks.ndim - len(blocks_shape(shape)))]
    sharding = splitting(blocks)
    if sharding is not None and not lead:  # (see to_blocks: whole blocks on each part)
        entries = _entries(sharding, blocks.ndim)
        if cut and entries[-1] is not None:  # a block's parts on several devices
            blocks = _resharded(blocks, sharding, [*entries[:-1], None])
        elif not cut and (entries[1] is not None or shape[0] % _shards(sharding, entries[0])):
            blocks = _resharded(blocks, sharding, [])
    if cut:
        out = blocks.reshape(*lead, *shape)
    else:
        # (a slice, not indexing, which on a sharded array outside jit is a gather)
        flat = jax.lax.slice_in_dim(blocks.reshape(*lead, -1), 0, math.prod(shape), axis=-1)
        out = flat.reshape(*lead, *shape)
    leaf = _LEAF.get()
    if leaf is not None and not lead and leaf[0] == tuple(shape):
        out = _resharded_to(out, leaf[1])  # as the step's arithmetic needs it
    return out
