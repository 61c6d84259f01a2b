r"""8-bit block-wise quantization: :class:`QuantizedArray`, :func:`quantize` and
:func:`dequantize`, the format ``storage="int8"`` keeps optimizer state in.

**Codes.** An int8 code is a small floating-point number, read from its bits: no table,
no search. A block's scale is a power of two :math:`2^E`, with :math:`E` the largest
binary exponent in the block, so every element divided by it lies in [0, 2). Under 2 the
codes come in segments of octaves, with fewer mantissa bits the further a segment lies
below the block's largest values. Second moments are stored as their square root with
64 codes in the top octave (steps of 0.8-1.6%), 32 per octave in the next 2 (1.6-3.1%),
8 per octave in the next 15 (6-12%) and 1 per octave in the last 5, down to
:math:`2^{-22}`: a block's moments may span 13 decades, as with the decimal table of
Dettmers et al. Momentum buffers and mean gradients have a sign and 32 codes in the top
octave, 16 per octave in the next 3, 8 per octave in the next 4, 2 per octave in the next
5 and 1 in the last 4, down to :math:`2^{-16}`: rounded to nearest, a value moves only
when its change is at least half a code step, so a momentum buffer, whose values change
by a tenth of themselves per step at a decay of 0.9, needs fine codes through the
decades where most of a block's values lie. Within a segment consecutive codes are
consecutive float32 numbers with its mantissa, so encoding clears an element's low
mantissa bits and decoding shifts a code back into place: a few integer operations per
element, and no table lookup or search. Precision is finest near the block's largest
values, which steps feel most, as in Dettmers et al.'s dynamic codes, in octaves instead
of decades.

**Rounding.** Signed values go to the nearest code. Second moments go to one of the two
codes around them, the upper one with the probability that makes the stored
:math:`\nu` right on average (stochastic rounding, see :mod:`rmsjax._src.rounding`):
rounding to nearest would freeze an Adagrad sum, or an average with a decay close to 1,
once its changes fall under half a code step.

**Block layout**: see :mod:`rmsjax._src.block_layout`.

References:
  Dettmers, Lewis, Shleifer and Zettlemoyer, 8-bit Optimizers via Block-wise
  Quantization, ICLR 2022, arXiv:2110.02861 (block-wise scales, non-linear codes);
  Micikevicius et al., FP8 Formats for Deep Learning, arXiv:2209.05433 (8-bit floats).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import validate
from rmsjax._src.block_layout import blocks_shape, from_blocks, in_block_view, to_blocks
from rmsjax._src.rounding import dither

_SEGMENTS = {
    True: ((5, 1), (4, 3), (3, 4), (1, 5), (0, 4)),  # signed: 126 codes under 2
    False: ((6, 1), (5, 2), (3, 15), (0, 5)),  # roots: 253 under 2
}
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)
_LARGEST = {True: 127, False: 254}  # the largest magnitude: the value 2
# Code = magnitude - offset: the signed code 0 is 0, the non-negative codes -127..127.
_OFFSET = {True: 0, False: 127}


class _Segment(NamedTuple):
    shift: int  # 23 - mantissa bits: how far a magnitude's bits are shifted
    top_octave: int  # the first octave under 2 it holds (octave o is [2^-o, 2^-o+1))
    lowest: int  # its smallest magnitude
    delta: int  # magnitude = (float32 bits >> shift) - delta


def _segments(signed: bool) -> tuple[_Segment, ...]:
    out, octave, top = [], 0, _LARGEST[signed]
    for bits, octaves in _SEGMENTS[signed]:
        count = octaves << bits
        lowest = top - count  # the segment's codes are lowest .. top - 1 (and 2 above)
        bottom = (127 - (octave + octaves - 1)) << 23  # float32 bits of its smallest value
        out.append(_Segment(23 - bits, octave, lowest, (bottom >> (23 - bits)) - lowest))
        octave, top = octave + octaves, lowest
    assert top == 1, "a format's segments must use every magnitude but 0"
    return tuple(out)


_SEGMENT = {signed: _segments(signed) for signed in (True, False)}


def _magnitudes(signed: bool) -> np.ndarray:
    """The value of each magnitude 0, 1, ..., largest, as the codes' bits define it."""
    m = np.arange(_LARGEST[signed] + 1, dtype=np.int64)
    segments = _SEGMENT[signed]
    k = sum((m < seg.lowest).astype(np.int64) for seg in segments[:-1])
    shift = np.array([seg.shift for seg in segments])[k]
    delta = np.array([seg.delta for seg in segments])[k]
    values = ((m + delta) << shift).astype(np.uint32).view(np.float32)
    return np.where(m == 0, np.float32(0), values)


_VALUES = {signed: _magnitudes(signed) for signed in (True, False)}

SIGNED_TABLE = np.concatenate([-_VALUES[True][:0:-1], _VALUES[True]])
"""Values of the 255 signed codes -127..127, sorted: 0 and +-(2^-16 .. 2), 32 codes in
the top octave under 2 and fewer below (a block's values are divided by its scale, see
:class:`QuantizedArray` and the module's notes)."""
NONNEGATIVE_TABLE = _VALUES[False]
"""Values of the 255 non-negative codes -127..127, sorted: 0 and 2^-22 .. 2, 64 codes
in the top octave under 2 and fewer below."""


def _magnitude_value(m: jax.Array, signed: bool) -> jax.Array:
    """The value of magnitude ``m`` (int32), from its bits. Each segment's shift is a
    constant, selected by ``m``'s range (shifts by an array are not vectorized on a
    CPU)."""
    # (``*_like``: on a mesh with Explicit axes a select takes operands laid out alike)
    bits = jnp.zeros_like(m, jnp.int32)  # magnitude 0 stays 0
    for seg in reversed(_SEGMENT[signed]):  # from the bottom: higher segments override
        bits = jnp.where(m >= seg.lowest, jnp.left_shift(m + seg.delta, seg.shift), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _magnitudes_around(y: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each ``y`` in [0, 2]: the largest magnitude ``m`` whose value ``lo <= y`` (at
    most the second largest), ``lo``, and the next value ``hi``. Within a segment,
    consecutive magnitudes are consecutive float32 numbers with its mantissa, so ``lo``
    is ``y`` with its lower mantissa bits cleared and ``m`` is ``y``'s bits shifted."""
    segments = _SEGMENT[signed]
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    octave = 127 - jnp.right_shift(bits, 23)  # -1 for 2 itself
    m = jnp.zeros_like(y, jnp.int32)  # under the smallest non-zero value
    mask = jnp.zeros_like(y, jnp.int32)  # lo = 0
    step = jnp.full_like(y, _VALUES[signed][1:2].view(np.int32)[0], jnp.int32)  # hi: the smallest
    bottom = sum(octaves for _, octaves in _SEGMENTS[signed])
    for seg in reversed(segments):  # from the bottom: higher segments override
        inside = octave < bottom
        m = jnp.where(inside, jnp.right_shift(bits, seg.shift) - seg.delta, m)
        mask = jnp.where(inside, np.int32(-(1 << seg.shift)), mask)
        step = jnp.where(inside, np.int32(1 << seg.shift), step)
        bottom = seg.top_octave
    low_bits = bits & mask
    top = m >= _LARGEST[signed]  # 2 itself: between the second largest and 2
    m = jnp.where(top, _LARGEST[signed] - 1, m)
    low = jax.lax.bitcast_convert_type(low_bits, jnp.float32)
    high = jax.lax.bitcast_convert_type(low_bits + step, jnp.float32)
    low = jnp.where(top, _VALUES[signed][-2], low)
    high = jnp.where(top, np.float32(2), high)
    return m, low, high


def _nearest_magnitude(y: jax.Array) -> jax.Array:
    """The signed format's magnitude nearest to each ``y`` in [0, 2] (a tie goes up)."""
    m, low, high = _magnitudes_around(y, True)
    return m + (y + y >= low + high).astype(jnp.int32)


def _dithered_magnitude(y: jax.Array, u: jax.Array) -> jax.Array:
    """One of the two non-negative magnitudes ``lo <= y <= hi`` around each ``y`` in
    [0, 2]: ``hi`` where ``u (hi^2 - lo^2) < y^2 - lo^2``. With ``u`` a :func:`dither`
    the stored square is ``y^2`` on average, so small increments of a second moment are
    not lost to rounding (unbiased stochastic rounding)."""
    m, low, high = _magnitudes_around(y, False)
    up = u * (high * high - low * low) < y * y - low * low
    return m + up.astype(jnp.int32)


def exponent_field(x: jax.Array) -> jax.Array:
    """The biased exponent field of float32 ``x`` (0 for zeros and subnormals, 255 for
    inf and NaN)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.right_shift(bits, 23) & 0xFF


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
    """An array of float32 values stored in 8 bits per element, block by block.

    A pytree whose children are ``codes`` (int8) and ``scale`` (float32, one per block of
    256); the logical ``shape`` and whether the values are ``signed`` are static, so the
    pytree's structure, shapes and dtypes are fixed for a given parameter. Read it with
    :func:`dequantize`.

    Attributes:
      codes: int8 array ``(*blocks, 256)``, each a small float (see the module's notes).
      scale: float32 array ``blocks``: a power of two, the largest binary exponent of
        the block's values (of their roots, when not ``signed``); each stored value is
        its code's value times the scale. (In an optimizer's second moments, negative
        where the roots pass float32's range, and NaN in a block that holds a NaN: see
        ``storage.store_moment``.)
      shape: the shape of the stored array.
      signed: True for signed values (momentum, means); False for a non-negative array
        stored as its square root (second moments).
    """

    __slots__ = ("codes", "scale", "shape", "signed")

    def __init__(self, codes: Any, scale: Any, shape: tuple[int, ...], signed: bool):
        # codes and scale: checked where read (tree utilities rebuild it with any leaves)
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise TypeError(
                f"rmsjax.QuantizedArray: shape must be a tuple of integers >= 0, got {shape!r}"
            )
        validate.check_bool("QuantizedArray", "signed", signed)
        self.codes = codes
        self.scale = scale
        self.shape = tuple(int(d) for d in shape)
        self.signed = bool(signed)

    def tree_flatten(self):
        return (self.codes, self.scale), (self.shape, self.signed)

    def tree_flatten_with_keys(self):
        # named paths (``.codes``, ``.scale``) for logging, ``tree_get`` and frameworks
        # that rebuild a state by its paths (flax's nnx.Optimizer)
        keys = (jax.tree_util.GetAttrKey("codes"), jax.tree_util.GetAttrKey("scale"))
        return tuple(zip(keys, (self.codes, self.scale))), (self.shape, self.signed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        blocks = getattr(self.scale, "shape", "?")
        return f"QuantizedArray(shape={self.shape}, signed={self.signed}, blocks={blocks})"


def quantize(x: Any, *, signed: bool) -> QuantizedArray:
    r"""Stores ``x`` in 8 bits per element, block-wise (see docs/memory.md for the format).

    For each block :math:`B` of 256 elements, with :math:`y = x` (``signed=True``) or
    :math:`y = \sqrt{\max(x, 0)}` (``signed=False``):

    .. math::

        s_B = 2^{E_B},\ E_B = \max_{i \in B} \lfloor \log_2 |y_i| \rfloor, \qquad
        c_i \approx y_i / s_B \in [-2, 2]

    where :math:`c_i` is one of the format's small floats (see the module's notes): the
    nearest one (signed), or one of the two around :math:`y_i / s_B`, chosen so that the
    stored square is right on average (non-negative). Zeros stay exactly zero. A block
    that holds an inf or a NaN has an infinite scale, and every element of it decodes
    to inf or NaN (``[1.0, inf]`` to ``[nan, inf]``; a NaN may come back as inf): a value
    that is not finite is never turned into a finite one (but with ``signed=False`` a
    negative value, ``-inf`` included, is stored as 0), and its neighbours in the block
    are lost with it (an optimizer's int8 state stores finite moments only: see
    docs/memory.md). Within 4x of the block's largest magnitude the relative error of
    :math:`y` is at most 3.1% (signed: within 8x, and 6.25% within 128x), so with
    ``signed=False`` that of ``x``, its square, at most 6.3% (right on average); it
    grows by steps below that, to the smallest codes, :math:`2^{-16}` (signed) and
    :math:`2^{-22}` of the scale. ``quantize(dequantize(q))`` may round again: where a
    block's largest value was rounded up to the top code, the block's scale doubles.

    Args:
      x: a real array (floating point, integer or bool, read as float32); with
        ``signed=False`` non-negative (negative values are stored as 0).
      signed: choose the signed codes (momentum, means) or store the square root with
        the non-negative codes (second moments).

    Returns:
      A :class:`QuantizedArray` of ``x``'s shape.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> q = rj.quantize(jnp.linspace(-1.0, 1.0, 4096), signed=True)
    >>> q.codes.shape, q.codes.dtype, q.scale.shape
    ((16, 256), dtype('int8'), (16,))
    >>> float(jnp.max(jnp.abs(rj.dequantize(q) - jnp.linspace(-1.0, 1.0, 4096)))) < 0.04
    True
    """
    validate.check_real_array("quantize", "x", x)
    validate.check_bool("quantize", "signed", signed)
    x = jnp.asarray(x, jnp.float32)
    blocks = to_blocks(x)
    if signed:
        values, exponents = blocks, exponent_field(blocks)
    else:
        blocks = jnp.maximum(blocks, 0.0)
        values, exponents = jnp.sqrt(blocks), root_exponent_field(blocks)
    top = block_top(exponents)
    scale = _power_of_two(top - 127)  # 0 for a block of zeros, inf for 255
    return encode_blocks(values, blocks, top, scale, x.shape, signed)


def root_exponent_field(x: jax.Array) -> jax.Array:
    """The exponent field of ``sqrt(x)`` for ``x >= 0`` (or more, for subnormals), from
    ``x``'s own: no square root. A square root halves the unbiased exponent (rounding
    down); inf and NaN keep 255, and zero gives 0, so that a block's zeros do not raise
    its scale above roots stored as they are (the tiny encoding's, far below
    ``sqrt`` of the smallest normal)."""
    e = exponent_field(x)
    root = jnp.where(e == 255, 255, jnp.right_shift(jnp.maximum(e, 1) + 127, 1))
    return jnp.where(x == 0, 0, root)


def block_top(exponents: jax.Array) -> jax.Array:
    """The largest of each block's ``exponents`` (exponent fields, 0-255), as int32: a
    block's scale is ``2^(top - 127)``, infinite at 255 (inf or NaN), so that every
    element of the block decodes to inf or NaN: a NaN is never turned into a finite value.

    The scale comes from the exponents alone. The values can then be computed where the
    codes are, and need not be kept in memory for the maximum (XLA on a CPU writes out
    whatever a reduction reads): the kernel that computes the exponents takes the larger
    of each pair, so the reduction reads half a byte per element. (A ``select``, not
    ``maximum``: XLA CPU hands an elementwise maximum to its reduction library, which
    then reads both halves in full.)"""
    exponents = exponents.astype(jnp.uint8)
    even, odd = exponents[..., 0::2], exponents[..., 1::2]
    return jnp.max(jnp.where(even > odd, even, odd), axis=-1).astype(jnp.int32)


def encode_blocks(values, blocks, top, scale, shape, signed: bool, salt=None) -> QuantizedArray:
    """The :class:`QuantizedArray` with block scales ``scale`` whose codes stand for
    ``values / 2^(top - 127)`` (``top`` per block, ``values`` under ``2^(top - 126)``):
    the nearest code (``signed``) or, for roots, one of the two around, dithered by the
    bits of ``blocks`` (the values as given) and ``salt`` (see
    :func:`~rmsjax._src.rounding.dither`)."""
    # |values| / 2^(top-127) as two products by normal powers of two, exact where the
    # quotient is normal (it is under 2^-126 only far below the smallest code).
    first = jnp.clip(127 - top, -126, 127)
    second = (127 - top) - first  # 0 or -1
    normalized = jnp.abs(values) * _power_of_two(first)[..., None]
    normalized = normalized * _power_of_two(second)[..., None]
    if signed:
        m = _nearest_magnitude(normalized)
        # scaled by 2^127 the value 2 would be 2^128, inf: float32's largest rounds down
        m = jnp.where(top[..., None] == 254, jnp.minimum(m, _LARGEST[True] - 1), m)
        codes = jnp.where(values < 0, -m, m)
    else:
        m = _dithered_magnitude(normalized, dither(blocks, salt))
        codes = m - _OFFSET[False]
    return QuantizedArray(codes.astype(jnp.int8), scale, shape, signed)


def _power_of_two(k: jax.Array) -> jax.Array:
    """2^k for integers ``k`` in [-126, 127], from its bits."""
    return jax.lax.bitcast_convert_type(jnp.left_shift(k + 127, 23), jnp.float32)


def dequantize(q: QuantizedArray) -> jax.Array:
    """The float32 values a :class:`QuantizedArray` stands for.

    Args:
      q: the quantized array.

    Returns:
      A float32 array of shape ``q.shape`` (after the codes' leading axes, for leaves
      stacked by ``rj.grouped``): each code's value times its block's scale,
      squared for a non-negative (``signed=False``) array; ``inf`` for a second moment
      above float32's range (a block with a negative scale, which only an optimizer's
      state holds: see ``storage.store_moment``).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.dequantize(rj.quantize(jnp.full((64, 64), 4.0), signed=False))[0, :3]
    Array([4., 4., 4.], dtype=float32)
    """
    validate.check_instance("dequantize", "q", q, QuantizedArray, "a QuantizedArray")
    check_consistent("dequantize", q)
    values = decoded_blocks(q)
    if not q.signed:
        # a root rounded up to 2^64 (the top code of float32's largest numbers) squares
        # to float32's largest; a negative scale holds moments beyond float32
        square = jnp.minimum(values * values, jnp.where(values <= 2.0**64, _FLOAT32_MAX, jnp.inf))
        values = jnp.where(values < 0, jnp.inf, square)
    return from_blocks(values, q.shape)  # stacked leaves (rj.grouped's) each their own


def check_consistent(function: str, q: QuantizedArray, what: Any = "q") -> None:
    """int8 codes in the block layout of ``q.shape`` (after any stacked leading axes)
    and one scale per block: a QuantizedArray built by hand with another shape was
    decoded into a raw reshape error, or cut short without a word. ``what`` names
    ``q`` in the error: a string, or a function that returns one (called only then)."""
    if in_block_view():  # in_turn's view: q.shape is the codes' own, by construction
        return
    for field, dtype in (("codes", "int8"), ("scale", "float32")):
        got = getattr(getattr(q, field), "dtype", type(getattr(q, field)).__name__)
        if got != dtype:
            what = what() if callable(what) else what
            raise TypeError(
                f"rmsjax.{function}: {what}.{field} must be an array of {dtype}, got {got}"
            )
    codes_shape, scale_shape = tuple(jnp.shape(q.codes)), tuple(jnp.shape(q.scale))
    expected = blocks_shape(q.shape)
    lead = len(codes_shape) - len(expected)
    if lead < 0 or codes_shape[lead:] != expected or scale_shape != codes_shape[:-1]:
        what = what() if callable(what) else what
        raise ValueError(
            f"rmsjax.{function}: {what} stands for an array of shape {q.shape}, whose codes "
            f"have shape {expected} and scales {expected[:-1]}; got codes of shape "
            f"{codes_shape} and scales of shape {scale_shape}"
        )


def decoded_blocks(q: QuantizedArray) -> jax.Array:
    """Each code's value times its block's scale, in blocks (the root, for a
    non-negative array)."""
    codes = q.codes.astype(jnp.int32)
    if q.signed:
        magnitude = _magnitude_value(jnp.abs(codes), True)
        value = jnp.where(codes < 0, -magnitude, magnitude)
    else:
        value = _magnitude_value(codes + _OFFSET[False], False)
    return value * q.scale[..., None]
