r"""How optimizer state is stored: the ``storage`` option and 8-bit block-wise quantization.

Rules compute in float32 (or wider); ``storage`` decides only the format a state array
is kept in between steps:

- ``None``: the parameter's dtype (the default, as optax);
- ``"float32"`` or ``"bfloat16"``: that dtype, whatever the parameter's;
- ``"int8"``: :class:`QuantizedArray`, one byte per element plus one float32 scale per
  block of 256 elements (1.016 bytes per element). Arrays with fewer than
  :data:`MIN_QUANTIZED_SIZE` elements stay float32: their state is small and the
  rounding would cost more than it saves.

An int8 state is dequantized, updated in float32 and requantized inside each step, so
the state's dtypes and shapes never change from one step to the next (no recompiles).

**Code maps.** Each byte indexes a table of values in [-1, 1] (or [0, 1]); an element
is stored as the table entry nearest to ``x / absmax`` of its block. A linear table
would round every element under 1/254 of its block's maximum to zero, and second
moments span many decades within a block, so the tables are *dynamic*: a decade
:math:`[10^{-k-1}, 10^{-k}]` holds linearly spaced entries, their number halving from
one decade to the next (Dettmers et al., 2021, describe this kind of map). The signed
table (for momentum buffers and mean gradients) spans 6 decades with 127 entries on
each side of zero and code 0 meaning 0; the non-negative table spans 7 decades with 256
entries. Second moments are stored as :math:`\sqrt{\nu}` with the non-negative table,
so the 7 decades of the table cover 14 decades of :math:`\nu`, and the rounding error
lands where the update feels it (the update divides by :math:`\sqrt{\nu}`).

**Rounding.** Signed values go to the nearest entry. Second moments go to one of the two
entries around them, the upper one with the probability that makes the stored
:math:`\nu` right on average (stochastic rounding); the random number is a hash of the
new value's bits and its position (:func:`dither`), so the step stays deterministic and
needs no random state. Rounding to nearest would freeze an Adagrad sum, or an average
with a decay close to 1, once its changes fall under half a table step; measured on the
digits benchmark it left Adagrad's final loss 2% above float32 state, the unbiased
rounding 0.0%.

**Block layout.** Blocks are 256 consecutive elements of the row-major tensor, so they
follow the last axis. When the last axis is a multiple of 256 the codes have shape
``(*shape[:-1], shape[-1] // 256, 256)``: every axis of the parameter is kept, and the
state can be sharded like the parameter. Otherwise the tensor is read as one flat
vector, zero-padded at its end to a multiple of 256, with codes of shape
``(ceil(size / 256), 256)``; when 256 is a multiple of the last axis (64, 128, ...) each
block holds whole rows, so sharding the first axis of the codes matches sharding the
parameter's first axis. Padding per row instead would cost up to 4x for 64-wide
embedding tables.

References:
  Dettmers, Lewis, Shleifer and Zettlemoyer, 8-bit Optimizers via Block-wise
  Quantization, ICLR 2022, arXiv:2110.02861.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import numerics

STORAGE_OPTIONS = (None, "float32", "bfloat16", "int8")
"""The accepted values of the ``storage`` option."""

BLOCK_SIZE = 256
"""Elements per quantization block (one float32 ``absmax`` each)."""

MIN_QUANTIZED_SIZE = 4096
"""Arrays with fewer elements than this keep float32 state under ``storage="int8"``."""


_DECADES = {True: 6, False: 7}  # signed, non-negative


def _count(decades: int, k: int) -> int:
    """Entries in decade ``k`` (values in [10^-k-1, 10^-k]): halving per decade."""
    return 2 ** (decades - k)


def _magnitudes(decades: int) -> np.ndarray:
    """0, then the midpoints of equal bins of each decade (smallest decade first), then 1."""
    parts = [np.zeros(1)]
    for k in reversed(range(decades)):
        edges = np.linspace(0.1, 1.0, _count(decades, k) + 1)
        parts.append(10.0**-k * (edges[:-1] + edges[1:]) / 2)
    parts.append(np.ones(1))
    return np.concatenate(parts)


_MAGNITUDES = {signed: _magnitudes(d).astype(np.float32) for signed, d in _DECADES.items()}

SIGNED_TABLE = np.concatenate([-_MAGNITUDES[True][:0:-1], _MAGNITUDES[True]])
"""Values of the 255 signed codes -127..127, sorted; code ``c`` is
``sign(c) * magnitude[|c|]`` and code 0 is 0 (6 decades, 126 + 1 entries per side)."""
NONNEGATIVE_TABLE = _MAGNITUDES[False]
"""Values of the 256 non-negative codes -128..127, sorted; code -128 is 0 (7 decades)."""

# Code = table index - offset, so that the signed code 0 is the value 0.
_OFFSET = {True: 127, False: 128}


def _table(signed: bool) -> np.ndarray:
    return SIGNED_TABLE if signed else NONNEGATIVE_TABLE


def _bin_of(y: jax.Array, signed: bool) -> jax.Array:
    """For each ``y`` in [0, 1], the index of the magnitude whose bin holds it, give or
    take one entry where rounding falls on a bin's edge.

    With ``D`` decades, decade ``k`` has ``n = 2^(D-k)`` entries starting at index
    ``n - 1``, so the decade of ``y`` and its bin within the decade give the index
    directly: a few elementwise operations instead of a binary search over the table.
    """
    decades = _DECADES[signed]
    k = sum((y < np.float32(10.0**-j)).astype(jnp.int32) for j in range(1, decades))
    powers = jnp.asarray((10.0 ** np.arange(decades)).astype(np.float32))
    scaled = y * jnp.take(powers, k, mode="clip")  # in [0.1, 1] but in the last decade
    count = jnp.left_shift(1, decades - k)
    bin_ = jnp.floor((scaled - np.float32(0.1)) * (count.astype(jnp.float32) / np.float32(0.9)))
    return count - 1 + jnp.clip(bin_.astype(jnp.int32), 0, count - 1)


def _nearest_magnitude(y: jax.Array, signed: bool) -> jax.Array:
    """Index of the magnitude nearest to each ``y`` in [0, 1] (ties to the smaller):
    the entry of :func:`_bin_of` or one of its two neighbours. Exact, and about 10x
    faster than ``searchsorted`` on a CPU."""
    magnitudes = jnp.asarray(_MAGNITUDES[signed])
    guess = _bin_of(y, signed)
    best, best_error = guess, jnp.abs(jnp.take(magnitudes, guess, mode="clip") - y)
    for step in (-1, 1):  # the lower neighbour first: ties go to the smaller entry
        candidate = jnp.clip(guess + step, 0, magnitudes.shape[0] - 1)
        error = jnp.abs(jnp.take(magnitudes, candidate, mode="clip") - y)
        closer = (error < best_error) | ((error == best_error) & (candidate < best))
        best = jnp.where(closer, candidate, best)
        best_error = jnp.where(closer, error, best_error)
    return best


def dither(x: jax.Array) -> jax.Array:
    """A number in [0, 1) per element, a hash of the element's float32 bits and of its
    position in the array: as good as random for rounding, yet reproducible and free of
    any random state (the murmur3 finalizer; Appleby, 2008). The value changes whenever
    the element does, so its rounding does too."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    position = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
    h = bits ^ (position * jnp.uint32(0x9E3779B9))
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _dithered_magnitude(y: jax.Array, u: jax.Array) -> jax.Array:
    """Index of one of the two non-negative table entries ``lo <= y <= hi`` around each
    ``y`` in [0, 1]: ``hi`` where ``u < (y^2 - lo^2) / (hi^2 - lo^2)``. With ``u`` a
    :func:`dither`, the stored square ``T[c]^2`` is ``y^2`` on average, so small
    increments of a second moment are not lost to rounding (unbiased stochastic
    rounding)."""
    magnitudes = jnp.asarray(_MAGNITUDES[False])
    top = magnitudes.shape[0] - 1
    guess = _bin_of(y, False)  # y lies between this entry's neighbours
    lower = jnp.where(jnp.take(magnitudes, guess, mode="clip") > y, guess - 1, guess)
    lower = jnp.clip(lower, 0, top - 1)
    low = jnp.take(magnitudes, lower, mode="clip")
    high = jnp.take(magnitudes, lower + 1, mode="clip")
    up = (y * y - low * low) / (high * high - low * low)
    return jnp.where(u < up, lower + 1, lower)


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """An array of float32 values stored in 8 bits per element, block by block.

    A pytree whose children are ``codes`` (int8) and ``absmax`` (float32, one per block of
    256); the logical ``shape`` and whether the table is ``signed`` are static, so the
    pytree's structure, shapes and dtypes are fixed for a given parameter. Read it with
    :func:`dequantize`.

    Attributes:
      codes: int8 array ``(*blocks, 256)``, indices into the code table.
      absmax: float32 array ``blocks``, each block's scale.
      shape: the shape of the stored array.
      signed: True for signed values (momentum, means); False for a non-negative array
        stored as its square root (second moments).
    """

    __slots__ = ("codes", "absmax", "shape", "signed")

    def __init__(self, codes: Any, absmax: Any, shape: tuple[int, ...], signed: bool):
        self.codes = codes
        self.absmax = absmax
        self.shape = tuple(shape)
        self.signed = bool(signed)

    def tree_flatten(self):
        return (self.codes, self.absmax), (self.shape, self.signed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        blocks = getattr(self.absmax, "shape", "?")
        return f"QuantizedArray(shape={self.shape}, signed={self.signed}, blocks={blocks})"


def blocks_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the codes for an array of ``shape`` (see the module's notes)."""
    shape = tuple(shape)
    if shape and shape[-1] % BLOCK_SIZE == 0:
        return (*shape[:-1], shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    return (-(-math.prod(shape) // BLOCK_SIZE), BLOCK_SIZE)


def _to_blocks(x: jax.Array) -> jax.Array:
    target = blocks_shape(x.shape)
    flat = x.reshape(-1)
    pad = math.prod(target) - flat.size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(target)


def _from_blocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def quantize(x: Any, *, signed: bool) -> QuantizedArray:
    r"""Stores ``x`` in 8 bits per element, block-wise (see :mod:`rmsjax._src.storage`).

    For each block :math:`B` of 256 elements, with :math:`y = x` (``signed=True``) or
    :math:`y = \sqrt{\max(x, 0)}` (``signed=False``):

    .. math::

        a_B = \max_{i \in B} |y_i|, \qquad
        c_i = \operatorname{argmin}_j\, |T_j - y_i / a_B|

    where :math:`T` is the signed or non-negative code table. Zeros stay exactly zero;
    a block of zeros has :math:`a_B = 0`.

    Args:
      x: a floating-point array; with ``signed=False`` it should be non-negative
        (negative values are stored as 0).
      signed: choose the signed table (momentum, means) or store the square root with
        the non-negative table (second moments).

    Returns:
      A :class:`QuantizedArray` of ``x``'s shape.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> q = rj.quantize(jnp.linspace(-1.0, 1.0, 4096), signed=True)
    >>> q.codes.shape, q.codes.dtype, q.absmax.shape
    ((16, 256), dtype('int8'), (16,))
    >>> float(jnp.max(jnp.abs(rj.dequantize(q) - jnp.linspace(-1.0, 1.0, 4096)))) < 0.01
    True
    """
    x = jnp.asarray(x, jnp.float32)
    blocks = _to_blocks(x)
    values = blocks if signed else jnp.sqrt(jnp.maximum(blocks, 0.0))
    return _quantize_blocks(values, blocks, x.shape, signed)


def _quantize_blocks(values: jax.Array, blocks: jax.Array, shape: Any, signed: bool):
    """Codes for ``values`` (already square-rooted for a non-negative table), dithered
    by the bits of ``blocks`` (the values as given)."""
    absmax = jnp.max(jnp.abs(values), axis=-1)
    # A NaN must not turn into a finite value: it makes its whole block NaN instead.
    absmax = jnp.where(jnp.any(jnp.isnan(values), axis=-1), jnp.nan, absmax)
    scale = jnp.where(absmax > 0, absmax, 1.0)
    normalized = values / scale[..., None]
    if signed:
        index = _nearest_magnitude(jnp.abs(normalized), signed)
        codes = jnp.where(normalized < 0, -index, index).astype(jnp.int8)
    else:
        index = _dithered_magnitude(normalized, dither(blocks))
        codes = (index - _OFFSET[signed]).astype(jnp.int8)
    return QuantizedArray(codes, absmax, shape, signed)


def dequantize(q: QuantizedArray) -> jax.Array:
    """The float32 values a :class:`QuantizedArray` stands for.

    Args:
      q: the quantized array.

    Returns:
      A float32 array of shape ``q.shape``: ``T[c] * absmax`` per element, squared for
      a non-negative (``signed=False``) array.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.dequantize(rj.quantize(jnp.full((64, 64), 4.0), signed=False))[0, :3]
    Array([4., 4., 4.], dtype=float32)
    """
    values = _table_values(q)
    if not q.signed:
        values = values * values
    return _from_blocks(values, q.shape)


def _table_values(q: QuantizedArray) -> jax.Array:
    """``T[c] * absmax`` per element, in blocks (the root, for a non-negative table)."""
    table = jnp.asarray(_table(q.signed))
    index = q.codes.astype(jnp.int32) + _OFFSET[q.signed]
    return jnp.take(table, index, mode="clip") * q.absmax[..., None]


# ------------------------------------------------------------ second-moment slots
# A second moment in a slot is in numerics' moment encoding (see numerics.py): the
# value itself in range, a negative number outside it. An int8 slot keeps its root.


def load_moment(slot: Any, dtype: Any, tiny: bool) -> jax.Array:
    """A second-moment slot's values in the compute ``dtype``, in the encoding."""
    if not isinstance(slot, QuantizedArray):
        return slot.astype(dtype)
    limits = numerics.moment_range(jnp.float32)
    root = _from_blocks(_table_values(slot), slot.shape)
    huge = root > np.float32(limits.high**0.5)
    root_down = numerics.scale_exponent(root, -limits.shift)
    value = jnp.where(huge, -(root_down * root_down), root * root)
    if tiny:
        value = jnp.where((root > 0) & (root < np.float32(limits.low**0.5)), -root, value)
    return value.astype(dtype)


def slot_dtype(slot: Any) -> Any:
    """The dtype a slot keeps its values in (float32 for an int8 slot's scales)."""
    return jnp.float32 if isinstance(slot, QuantizedArray) else slot.dtype


def store_moment(value: jax.Array, slot: Any) -> Any:
    """A second moment in the encoding, in the format of ``slot``."""
    if not isinstance(slot, QuantizedArray):
        return value.astype(slot.dtype)
    limits = numerics.moment_range(jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    blocks = _to_blocks(value)
    huge = blocks <= np.float32(-limits.tiny_root)
    root = jnp.where(
        huge,
        numerics.scale_exponent(jnp.sqrt(-blocks), limits.shift),
        jnp.where(blocks < 0, -blocks, jnp.sqrt(blocks)),
    )
    return _quantize_blocks(root, blocks, value.shape, False)


# ---------------------------------------------------------------- the storage option


def check_storage(function: str, storage: Any) -> None:
    """Raises ValueError unless ``storage`` is one of :data:`STORAGE_OPTIONS`."""
    if not (storage is None or (isinstance(storage, str) and storage in STORAGE_OPTIONS)):
        allowed = ", ".join(repr(option) for option in STORAGE_OPTIONS)
        raise ValueError(f"rmsjax.{function}: storage must be one of {allowed}, got {storage!r}")


def complex_refusal(storage: str | None) -> str | None:
    """Why a state kept as ``storage`` cannot hold complex values (None: it can)."""
    return None if storage is None else f"storage={storage!r} keeps real values only"


def init_slot(param: Any, fill: Any, storage: str | None, *, signed: bool) -> Any:
    """A state array for ``param`` filled with ``fill``, in the format ``storage`` asks.

    ``signed`` picks the code table under ``"int8"``: True for values of either sign,
    False for non-negative ones (second moments). Without ``storage`` the slot has the
    parameter's dtype (for a complex parameter a second moment is then complex with a
    zero imaginary part, as optax keeps it, and computed with optax's operations).
    """
    shape = jnp.shape(param)
    if storage is None:
        return jnp.full(shape, fill, jnp.result_type(param))
    if storage == "int8":
        full = jnp.full(shape, fill, jnp.float32)
        return full if math.prod(shape) < MIN_QUANTIZED_SIZE else quantize(full, signed=signed)
    return jnp.full(shape, fill, jnp.dtype(storage))


def load(slot: Any, dtype: Any) -> jax.Array:
    """A state slot's values in the compute ``dtype``."""
    if isinstance(slot, QuantizedArray):
        return dequantize(slot).astype(dtype)
    return slot.astype(dtype)


def store(value: jax.Array, slot: Any) -> Any:
    """``value`` in the format of ``slot`` (same dtype, or requantized)."""
    if isinstance(slot, QuantizedArray):
        return quantize(value, signed=slot.signed)
    return value.astype(slot.dtype)
