r"""How optimizer state is stored: the ``storage`` option and 8-bit block-wise quantization.

Rules compute in float32 (or wider); ``storage`` decides only the format a state array
is kept in between steps:

- ``None``: the parameter's dtype (the default, as optax);
- ``"float32"`` or ``"bfloat16"``: that dtype, whatever the parameter's;
- ``"int8"``: :class:`QuantizedArray`, one byte per element plus one float32 scale per
  block of 256 elements (1.016 bytes per element). Arrays with fewer than
  :data:`MIN_QUANTIZED_SIZE` elements stay float32: their state is small and the
  rounding would cost more than it saves.

A step computes in float32 from the decoded state and stores its new state. With
``"bfloat16"`` it goes on with the values the new state holds (:func:`keep`), so it
needs no float32 copy of its state and lowers the step's peak memory as well as the
memory between steps; with ``"int8"`` it goes on with the unrounded values
(:func:`reads_back` says why). The state's dtypes and shapes never change from one
step to the next (no recompiles).

The int8 format (codes, rounding, block layout) is in :mod:`rmsjax._src.quantization`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import typing
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import base, block_layout, numerics
from rmsjax._src.block_layout import from_blocks, to_blocks
from rmsjax._src.quantization import (  # noqa: F401  (QuantizedArray, (de)quantize: re-exported)
    QuantizedArray,
    block_top,
    decoded_blocks,
    dequantize,
    encode_blocks,
    exponent_field,
    quantize,
    root_exponent_field,
)
from rmsjax._src.rounding import round_bfloat16
from rmsjax._src.step_checks import nan_where_negative

STORAGE_OPTIONS = (None, *typing.get_args(base.Storage))
"""The accepted values of the ``storage`` option."""

_LARGEST_ROOT = np.sqrt(np.float32(np.finfo(np.float32).max))

_BYTE_OFFSET = 12
"""How far :func:`store_moment` shifts its roots' exponent fields down to fit a byte."""

MIN_QUANTIZED_SIZE = 4096
"""Arrays with fewer elements than this keep float32 state under ``storage="int8"``."""

# ------------------------------------------------------------ second-moment slots
# A second moment in a slot is in numerics' moment encoding (see numerics.py): the
# value itself in range, a negative number outside it. An int8 slot keeps its root.


def load_moment(slot: Any, dtype: Any, tiny: bool) -> jax.Array:
    """A second-moment slot's values in the compute ``dtype``, in the encoding."""
    if not isinstance(slot, QuantizedArray):
        return slot.astype(dtype)
    limits = numerics.moment_range(jnp.float32)
    root = from_blocks(decoded_blocks(slot), slot.shape)
    huge = root > np.float32(limits.high**0.5)
    root_down = numerics.shift_bits(root, -limits.shift, floor=-45)  # no underflow below
    # (a block beyond float32, with a negative scale, holds -root / 2^shift: the
    # encoding's -moment / 2^(2 shift) is minus its square)
    value = jnp.where(huge, -(root_down * root_down), root * jnp.abs(root))
    if tiny:
        value = jnp.where((root > 0) & (root < np.float32(limits.low**0.5)), -root, value)
    return value.astype(dtype)


_SLOTS_KEPT: contextvars.ContextVar[tuple[bool, Any]] = contextvars.ContextVar(
    "slots_kept", default=(False, None)
)


@contextlib.contextmanager
def slots_kept(but: Any = None) -> Iterator[None]:
    """While tracing under it, storing a value in an int8 slot other than ``but`` returns
    the slot as it was: a step traced so computes its update and the new ``but`` alone,
    and each new int8 slot is computed apart (see :mod:`rmsjax._src.in_turn`)."""
    token = _SLOTS_KEPT.set((True, but))
    try:
        yield
    finally:
        _SLOTS_KEPT.reset(token)


def _kept(slot: QuantizedArray) -> bool:
    keeping, but = _SLOTS_KEPT.get()
    return keeping and slot is not but


def store_moment(value: jax.Array, slot: Any, unbiased: bool = False, salt: Any = None) -> Any:
    """A second moment in the encoding, in the format of ``slot``: int8 codes rounded
    without bias; with ``unbiased`` a bfloat16 slot too (:func:`round_bfloat16`), others
    to nearest. ``salt`` (the rule's step count, when it keeps one) varies the rounding
    from step to step (see :func:`rounding.dither`)."""
    if not isinstance(slot, QuantizedArray):
        if value.dtype == jnp.float64 and jnp.finfo(slot.dtype).nexp == 8:
            # a float64 leaf's tiny root under float32's normal range would be flushed to
            # 0 (bfloat16) or read as 0 (a subnormal float32): held at that floor instead
            floor = float(np.finfo(np.float32).tiny)
            value = jnp.where((value < 0) & (value > -floor), -floor, value)
        if unbiased and jnp.dtype(slot.dtype) == jnp.bfloat16:
            return round_bfloat16(value, salt)
        return value.astype(slot.dtype)
    if _kept(slot):
        return slot
    limits = numerics.moment_range(jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    blocks = to_blocks(value)
    huge = blocks <= np.float32(-limits.tiny_root)
    tiny = (blocks < 0) & ~huge
    # a huge moment's root in units of 2^shift. An infinite moment (a root rounded up
    # past the encoding's end, 2^280) is held as the largest, as float32 state saturates:
    # it would otherwise make its block's scale infinite and the block's other moments
    # NaN. Only a NaN marks its block (below).
    huge_root = jnp.minimum(jnp.sqrt(-blocks), _LARGEST_ROOT)
    root = jnp.where(
        huge,
        numerics.scale_exponent(huge_root, limits.shift),  # inf beyond float32
        jnp.where(tiny, -blocks, jnp.sqrt(blocks)),
    )
    # The roots' exponent fields, from the moments' bits (see block_top), up to 266
    # for a huge moment: an Adagrad sum beyond float32's largest number squared, which
    # the encoding holds, has a root beyond float32. A byte holds them shifted down by
    # _BYTE_OFFSET (255 marks a NaN), so a block whose roots are all under
    # 2^-114 takes a scale of 2^-114 instead of its own.
    exponents = root_exponent_field(jnp.abs(blocks))
    nonfinite = jnp.isnan(blocks)
    exponents = jnp.where(huge, exponents + limits.shift, exponents)
    exponents = jnp.where(tiny, exponent_field(blocks), exponents)
    shifted = jnp.clip(exponents - _BYTE_OFFSET, 1, 254)
    top = block_top(jnp.where(nonfinite, 255, jnp.where(exponents == 0, 0, shifted)))
    holds_nan = top == 255
    top = jnp.where(holds_nan | (top == 0), top, top + _BYTE_OFFSET)
    # A block whose largest root is beyond float32 keeps its roots in units of 2^shift
    # and a negative scale, -2^(top - 127 - shift), which says so (see load_moment). Its
    # other moments are under 2^-78 of its largest: their codes are 0.
    beyond = ~holds_nan & (top > 254)
    top = jnp.where(beyond, top - limits.shift, top)
    sign = jnp.where(beyond, np.int32(-(2**31)), np.int32(0))
    scale = jax.lax.bitcast_convert_type(jnp.left_shift(top, 23) | sign, jnp.float32)
    # a NaN's block gets a NaN scale, so that every moment of it reads as NaN: with an
    # infinite one, the step would read its roots as the largest moments and the block
    # would stop moving without a sign
    scale = jnp.where(holds_nan, np.float32(np.nan), scale)
    values = jnp.where(beyond[..., None], jnp.where(huge, huge_root, 0.0), root)
    return _laid_out_as(encode_blocks(values, blocks, top, scale, value.shape, False, salt), slot)


def keep_moment(
    value: jax.Array, slot: Any, read_back: bool, tiny: bool, salt: Any = None
) -> tuple[Any, jax.Array]:
    """``(new slot, moment)``: ``value`` (a second moment in the encoding) stored in the
    format of ``slot``, and the moment the step goes on with: ``value`` itself, or with
    ``read_back`` the value the new slot holds (see :func:`keep`).

    ``read_back`` is ``storage="bfloat16"``'s behaviour (:func:`reads_back`), and such a
    state rounds its moments without bias: to nearest, a moment whose change per step is
    under half of bfloat16's step (0.2-0.4%) would not change at all (an Adagrad sum
    after a few hundred steps, an average with a decay of 0.999). The moments of a
    bfloat16 parameter's own state (``storage=None``) are rounded to nearest, as optax
    rounds them."""
    new = store_moment(value, slot, unbiased=read_back, salt=salt)
    if read_back and _narrower(new, value.dtype):
        return new, load_moment(new, value.dtype, tiny)
    return new, value


def checking_moment_slots(rule: Any, field: str, storage: Any, counted: bool) -> Any:
    """``rule`` (a LeafRule), refusing where its state is read a second-moment slot that
    another ``storage`` made and that this rule would round otherwise, silently: int8
    codes in a rule that keeps no step count (their rounding's salt: an Adagrad sum
    stopped near 60 of 2000), and a bfloat16 slot where ``storage`` is ``"float32"`` or
    ``"int8"`` (rounded to nearest, RMSprop's average at a decay of 0.999 stopped at a
    quarter of its value)."""

    where = f"rmsjax.{rule.name}.update: the state's {field} is held in"

    def from_state(state: Any, none_tree: bool = False) -> Any:
        shared, trees = rule.from_state(state, none_tree)
        centered = len(trees) > 1 and jax.tree.leaves(trees[1])
        convert = (
            f"a centered state's {field} holds the variance {field} - mu^2, so cast "
            f"{field} + mu**2 to float32 (rj.to_optax_state computes it)"
            if centered
            else f"cast its {field} to float32"
        )
        for slot in jax.tree.leaves(trees[0], is_leaf=lambda x: isinstance(x, QuantizedArray)):
            if isinstance(slot, QuantizedArray) and not counted:
                raise TypeError(
                    f"{where} 8-bit blocks (made with storage='int8'), and this optimizer "
                    f"has storage={storage!r} and keeps no step count: the codes' rounding "
                    "would lose its salt and small changes of the moments with it. Step "
                    "the state with the optimizer that made it (storage='int8')."
                )
            if (
                not isinstance(slot, QuantizedArray)
                and storage in ("float32", "int8")
                and jnp.result_type(slot) == jnp.bfloat16
            ):
                raise TypeError(
                    f"{where} bfloat16 (made with storage='bfloat16', or with storage=None "
                    f"for bfloat16 parameters), and this optimizer has storage={storage!r}: "
                    "it would keep the moments in bfloat16, rounded to nearest, where "
                    "storage='bfloat16' rounds them without bias. Step the state with the "
                    f"optimizer that made it, or convert it for this one: {convert}."
                )
        return shared, trees

    return rule._replace(from_state=from_state)


def coarse(slot: Any) -> bool:
    """Whether ``slot`` rounds what it holds to 8 or 16 bits (int8 codes, bfloat16): where
    a centered rule keeps its variance ``nu - mu^2``, not ``nu``, whose rounding would
    swamp a variance that is a small part of it (see rms.py)."""
    return isinstance(slot, QuantizedArray) or getattr(slot, "dtype", None) == jnp.bfloat16


def slot_dtype(slot: Any) -> Any:
    """The dtype a slot keeps its values in (float32 for an int8 slot's scales)."""
    return jnp.float32 if isinstance(slot, QuantizedArray) else slot.dtype


def update_dtype(g: Any, slots: Any, storage: Any) -> Any:
    """The dtype of a rule's update, as optax's: the wider of the gradient's and the
    state's (float32 updates for bfloat16 gradients of float32 parameters); with a
    ``storage`` option, the gradient's."""
    if storage is not None:
        return g.dtype
    return jnp.result_type(g, *(slot_dtype(slot) for slot in slots))


# ---------------------------------------------------------------- the storage option


def check_storage(function: str, storage: Any) -> None:
    """Raises unless ``storage`` is one of :data:`STORAGE_OPTIONS`: a TypeError for
    what is not a string (a dtype, a bool), a ValueError for another string."""
    if storage is None or (isinstance(storage, str) and storage in STORAGE_OPTIONS):
        return
    allowed = ", ".join(repr(option) for option in STORAGE_OPTIONS)
    message = f"rmsjax.{function}: storage must be one of {allowed}, got {storage!r}"
    if not isinstance(storage, str):
        raise TypeError(f"{message} ({type(storage).__name__})")
    raise ValueError(message)


def complex_refusal(storage: base.Storage | None) -> str | None:
    """Why a state kept as ``storage`` cannot hold complex values (None: it can)."""
    if storage is None:
        return None
    return f"storage={storage!r} keeps real values only; the default storage keeps complex ones"


def init_slot(param: Any, fill: Any, storage: base.Storage | None, *, signed: bool) -> Any:
    """A state array for ``param`` filled with ``fill``, in the format ``storage`` asks.

    ``signed`` picks the code table under ``"int8"``: True for values of either sign,
    False for non-negative ones (second moments). Without ``storage`` the slot has the
    parameter's dtype (for a complex parameter a second moment is then complex with a
    zero imaginary part, as optax keeps it, and computed with optax's operations).
    """
    shape = jnp.shape(param)
    dtype = jnp.result_type(param) if storage is None else jnp.dtype(storage)
    if storage == "int8":
        dtype = jnp.float32
    # jnp.full of a 0-d array of the dtype is that array: a copy, so that the state
    # never holds the caller's array (a donated step would delete it) nor one buffer
    # twice (inject_hyperparams' initial_scale and a scalar parameter's second moment)
    fill = fill if signed else moment_fill(fill)
    full = jnp.array(jnp.full(shape, fill, dtype), copy=shape == ())
    if storage == "int8" and math.prod(shape) >= MIN_QUANTIZED_SIZE:
        return quantize(full, signed=signed)
    return full


def moment_fill(fill: Any) -> Any:
    """The initial value of a second moment: ``fill``, NaN where a traced one is
    negative (:func:`step_checks.nan_where_negative`)."""
    return nan_where_negative(fill, fill)


def load(slot: Any, dtype: Any) -> jax.Array:
    """A state slot's values in the compute ``dtype``."""
    if isinstance(slot, QuantizedArray):
        return dequantize(slot).astype(dtype)
    return slot.astype(dtype)


def reads_back(storage: base.Storage | None) -> bool:
    """Whether a rule with this ``storage`` option steps with the values its new state
    holds (see :func:`keep`): for ``"bfloat16"`` only. An int8 step goes on with the
    unrounded values: read back, its codes would be encoded a second time, from the old
    state, in the kernel that reads them (2.5x the step time and 9 bytes of temporaries
    per element on a CPU), and its rounding, coarser than bfloat16's, would reach the
    step at once."""
    return storage == "bfloat16"


def _narrower(slot: Any, dtype: Any) -> bool:
    return isinstance(slot, QuantizedArray) or jnp.dtype(slot.dtype) != jnp.dtype(dtype)


def keep(value: jax.Array, slot: Any, read_back: bool) -> tuple[Any, jax.Array]:
    """``(new slot, value)``: ``value`` stored in the format of ``slot``, and the value
    the step goes on with.

    With ``read_back`` that is the value the new slot holds (``value`` rounded to
    bfloat16), so the rest of the step reads the new state instead of a second,
    full-precision copy of it. A compiled step then needs no
    float32 temporary the size of the state, nor a copy of the old state: XLA computes
    each output array in one pass and writes it over its donated input (see
    docs/memory.md). Without it, or where the slot keeps ``value``'s dtype, it is
    ``value`` itself."""
    new = store(value, slot)
    if read_back and _narrower(new, value.dtype):
        return new, load(new, value.dtype)
    return new, value


def store(value: jax.Array, slot: Any) -> Any:
    """``value`` in the format of ``slot`` (same dtype, or requantized), held within the
    slot's finite range (see :func:`_within`)."""
    if isinstance(slot, QuantizedArray):
        if _kept(slot):
            return slot
        return _laid_out_as(quantize(_within(value, jnp.float32), signed=slot.signed), slot)
    return _within(value, slot.dtype).astype(slot.dtype)


def _laid_out_as(new: QuantizedArray, slot: QuantizedArray) -> QuantizedArray:
    """``new``'s codes and scales laid out as ``slot``'s, where a mesh with Explicit axes
    carries layouts in the types (elsewhere unchanged): each step returns the state as
    ``init`` laid it out."""
    codes = block_layout.laid_out_as(new.codes, slot.codes)
    scale = block_layout.laid_out_as(new.scale, slot.scale)
    return QuantizedArray(codes, scale, new.shape, new.signed)


def _within(value: jax.Array, dtype: Any) -> jax.Array:
    """A real ``value`` held at +-(the largest finite number of ``dtype``) where ``dtype``
    has fewer exponent bits than ``value`` (a float64 leaf's mean gradient of 1e40 in a
    float32 slot), so that the slot stays finite and a centered variance ``nu - mu^2``
    read from it defined. A no-op, bit for bit, on every value in range."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        return value
    if jnp.finfo(dtype).maxexp >= jnp.finfo(value.dtype).maxexp:
        # (bfloat16 slots of float32 values too: the same exponent range; a clamp for
        # the last 0.4% under float32's largest number costs a bfloat16 momentum step
        # 1.3x its time)
        return value
    top = float(jnp.finfo(dtype).max)
    # (selects, not minimum and maximum: see numerics.finite_ceiling)
    value = jnp.where(value > top, jnp.asarray(top, value.dtype), value)
    return jnp.where(value < -top, jnp.asarray(-top, value.dtype), value)
