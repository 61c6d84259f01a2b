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

BLOCK_SIZE = 256
"""Elements per quantization block (one float32 ``scale`` each)."""


def blocks_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the codes for an array of ``shape`` (see the module's notes)."""
    shape = tuple(shape)
    if shape and shape[-1] % BLOCK_SIZE == 0:
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


def to_blocks(x: jax.Array) -> jax.Array:
    """``x`` in the block layout of its codes: ``blocks_shape(x.shape)``, zero-padded."""
    if _BLOCK_VIEW.get():
        return x
    target = blocks_shape(x.shape)
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
    lead = blocks.shape[: max(0, blocks.ndim - len(blocks_shape(shape)))]
    flat = blocks.reshape(*lead, -1)[..., : math.prod(shape)]
    return flat.reshape(*lead, *shape)
