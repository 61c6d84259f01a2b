"""The arithmetic the rules share: their compute dtype, squared moduli, bias-correction
factors as optax computes them, a ceiling below overflow, and saturating counts."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def compute_dtype(dtype: Any) -> Any:
    """The dtype rules compute in: float32 for half-precision leaves, else the leaf's own."""
    return jnp.promote_types(dtype, jnp.float32)


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2`, real: ``x * x`` for real ``x``, ``(conj(x) * x).real`` for complex
    ``x`` (the same values, bit for bit, as optax computes a complex second moment)."""
    if jnp.iscomplexobj(x):
        return (jnp.conj(x) * x).real
    return x * x


@functools.partial(jax.jit, inline=True)
def bias_correction_factor(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count``, jitted and inlined as optax computes it, so that eager and
    jitted steps get optax's factor bit for bit (eager ``pow`` can differ by an ulp)."""
    return 1 - decay**count


def finite_ceiling(x: jax.Array, *stored: Any) -> jax.Array:
    """``x`` clipped at the largest value that is finite in its dtype and in the dtype
    of each ``stored`` slot, so that an overflowing square (a gradient above 1.8e19 in
    float32, above 256 in a float16 state) never leaves an infinite moment in the state.
    A no-op, bit for bit, on every finite value below that ceiling; NaN stays NaN."""
    top = float(jnp.finfo(x.dtype).max)
    if jnp.iscomplexobj(x):  # a complex second moment: its real part holds the value
        return jnp.where(x.real > top, jnp.asarray(top, x.dtype), x)
    for slot in stored:
        dtype = getattr(slot, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            top = min(top, float(jnp.finfo(dtype).max))
    # jnp.minimum(x, top)'s values, NaN included; with minimum XLA CPU recomputed the moment
    # in the consumer and copied the old state first (16M float32 steps ran 2x slower).
    return jnp.where(x > top, jnp.asarray(top, x.dtype), x)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` as int32, saturating at its largest (int8 counts widened first)."""
    count, top = jnp.asarray(count), jnp.iinfo(jnp.int32).max
    count = (jnp.minimum(count, top) if count.dtype.itemsize >= 4 else count).astype(jnp.int32)
    return jnp.where(count < top, count + 1, top)


def zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


# ------------------------------------------------------------ second moments in range
# A second moment spans twice the exponent range of its gradients: a float32 gradient of
# 1e30 has a square of 1e60, one of 1e-30 a square of 1e-60, neither a float32. So that a
# step never depends on the gradients' scale (as RMSprop's and Adagrad's do not), a slot
# keeps the moment while it lies in [LOW, HIGH], else a negative number: above HIGH
# -nu * 2^-(2 k) (k = MomentRange.shift; "huge"); below LOW -sqrt(nu) (tiny mode; "tiny").
# The two negative ranges do not overlap (TINY_ROOT separates them). The ordinary case
# computes optax's formula, each fallback the same formula on operands scaled by a power
# of two (exact), so ordinary steps stay bit for bit. The fallback is computed for every
# element of every step: a one-leaf step took 1.08-1.31x optax's time with it on a
# 2-core CPU, 0.99-1.09x without (docs/numerics.md, "Cost").


class MomentRange(NamedTuple):
    """Where a slot of one dtype holds a second moment directly, and how it holds the
    rest. ``shift`` is ``k`` above: huge moments are kept as ``-nu * 2^-2k``."""

    low: float
    high: float
    shift: int
    tiny_root: float
    tiny_shift: int


_RANGES = {
    # 8-bit exponents (float32, bfloat16, int8's scales): moments up to 2^256 (every float32
    # gradient's square) as -nu * 2^-152, in (2^-52, 2^104]; tiny ones as roots, under
    # 2^-53, 20 bits above float32's smallest normal, under which XLA CPU flushes squares.
    8: MomentRange(low=2.0**-106, high=2.0**100, shift=76, tiny_root=2.0**-52.5, tiny_shift=76),
    # float16: 65504^2 = 2^32 as -nu * 2^-20, in (2^-6, 2^12]; roots under 2^-7.
    5: MomentRange(low=2.0**-14, high=2.0**14, shift=10, tiny_root=2.0**-6.5, tiny_shift=10),
    # float64: squares up to 2^2048 as -nu * 2^-1048; roots under 2^-450.
    11: MomentRange(low=2.0**-900, high=2.0**900, shift=524, tiny_root=2.0**-300, tiny_shift=500),
}


def _bit_layout(dtype: Any) -> tuple[Any, int, int]:
    """float32 or float64's integer type of its width, one exponent step, and inf's bits."""
    info = jnp.finfo(dtype)
    integer = jnp.int32 if info.bits == 32 else jnp.int64
    one = 1 << info.nmant
    return integer, one, ((1 << (info.bits - 1 - info.nmant)) - 1) * one


def _shift_limit(dtype: Any) -> int:
    """The largest exponent shift that can leave a finite number finite and non-zero (254)."""
    _, one, infinity = _bit_layout(dtype)
    return infinity // one - 1


def scale_exponent(x: jax.Array, k: Any) -> jax.Array:
    """``x * 2**k`` for float32 or float64 ``x`` and an integer ``k`` (a Python int or an
    integer array that broadcasts against ``x``), computed on the exponent bits.

    Exact where ``x`` and the result are normal numbers. Where the result would fall
    under the normal range it is 0, where it would overflow it is ``inf`` (both without
    ``x``'s sign: the moments this serves are squared or non-negative); inf and NaN stay
    themselves. XLA treats a product by a constant as algebra it may reorder:
    it rewrites ``(x * c) * (x * c)`` as ``(x * x) * (c * c)`` when ``x`` is a constant,
    and there ``x * x`` overflows and ``c * c`` underflows. Integer arithmetic on the
    bits is not reordered.
    """
    integer, one, infinity = _bit_layout(x.dtype)
    bits = jax.lax.bitcast_convert_type(x, integer)
    magnitude = bits & (infinity | (one - 1))  # the bits of |x|
    known = isinstance(k, int)  # a known sign needs one range check, not two
    # Beyond +-(exponent fields - 1) every result is 0 or inf already; clamped there, the
    # bit arithmetic below cannot wrap around (k = -256 wrapped a float32 into its sign)
    limit = _shift_limit(x.dtype)
    k = max(-limit, min(limit, k)) if known else jnp.clip(jnp.asarray(k, integer), -limit, limit)
    step = k * one
    result = jax.lax.bitcast_convert_type(bits + step, x.dtype)
    # (the bounds are moved, not the magnitudes: magnitude + step could wrap around)
    down = min(step, 0) if known else jnp.minimum(step, 0)
    up = max(step, 0) if known else jnp.maximum(step, 0)
    if not known or k < 0:
        # zero and subnormal x land here too
        result = jnp.where(magnitude >= one - down, result, jnp.zeros_like(x))
    if not known or k > 0:
        result = jnp.where(magnitude < infinity - up, result, jnp.full_like(x, jnp.inf))
        result = jnp.where(magnitude >= one, result, jnp.zeros_like(x))
    return jnp.where(magnitude >= infinity, x, result)  # inf and NaN stay themselves


def shift_bits(
    x: jax.Array, k: int, *, magnitude: bool = False, floor: int | None = None
) -> jax.Array:
    """``x * 2**k`` for a normal ``x >= 0`` (or ``|x| * 2**k`` with ``magnitude=True``)
    and a Python int ``k``, on the exponent bits with integer saturation: ``inf`` above
    the normal range; 0 under it, or under ``2**floor`` when ``floor`` is given; with
    ``k < 0``, 0 for a negative ``x`` (without ``magnitude``). With ``k > 0`` a zero or
    negative ``x`` gives a wrong value: the callers pass none there. A few integer
    operations per element (the general, exact form is :func:`scale_exponent`).

    No result is subnormal, and with ``floor`` none is so small that squaring it or
    scaling it by a weight underflows: where the floating-point unit does not flush
    underflows to zero (a process that imported torch, for one), every underflowing
    operation takes a slow microcode path, and this is computed for every element of
    every step. Measured on one leaf of 16M, that made RMSprop's step 1.6x slower."""
    integer, one, infinity = _bit_layout(x.dtype)
    limit = _shift_limit(x.dtype)
    k = max(-limit, min(limit, k))  # see scale_exponent
    bits = jax.lax.bitcast_convert_type(x, integer)
    bits = bits & (infinity | (one - 1)) if magnitude else jnp.maximum(bits, 0)
    if k < 0:
        bias = (infinity // one) >> 1
        smallest = one * max(1, bias + floor) if floor is not None else one
        bits = jnp.where(bits + k * one >= smallest, bits + k * one, 0)
    else:
        bits = jnp.minimum(bits, infinity - k * one) + k * one
    return jax.lax.bitcast_convert_type(bits, x.dtype)


def rsqrt_inline(x: jax.Array) -> jax.Array:
    """``1 / sqrt(x)`` for float32 ``x``, in multiplies, adds and bit operations only: an
    estimate from the exponent bits and three Newton steps, within 1 ulp of the rounded
    value for every normal ``x > 0``, as XLA's own ``rsqrt`` on a CPU (Lomont, Fast
    inverse square root, 2003). Like ``jax.lax.rsqrt`` it gives ``inf`` at 0, 0 at
    ``inf``, and NaN below 0 and at NaN.

    XLA counts a square root, a reciprocal square root or a division as expensive and
    never computes one twice: a value that needs one and is read by several kernels is
    written to memory in full. These operations are cheap to XLA, so each kernel that
    needs the value recomputes it where it stands (the step of an int8 momentum buffer,
    whose block scale and codes are computed in two kernels besides the parameter's)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    y = jax.lax.bitcast_convert_type(jnp.int32(0x5F375A86) - jnp.right_shift(bits, 1), x.dtype)
    for _ in range(3):
        # (x y) y, not x (y y): y y under- or overflows at the ends of the range; the
        # correction is added last, so the final step rounds once more, not twice
        y = y + y * (0.5 - 0.5 * ((x * y) * y))
    y = jnp.where(x == 0, jnp.inf, y)
    y = jnp.where(x == jnp.inf, 0.0, y)
    return jnp.where(x < 0, jnp.nan, y)


def reciprocal_inline(x: jax.Array) -> jax.Array:
    """``1 / x`` for float32 ``x >= 0``, in multiplies and adds (an estimate from the
    exponent bits, four Newton steps): see :func:`rsqrt_inline` for why. ``inf`` at 0,
    0 from 2^125 up (where the estimate falls under float32's normal range; the moments'
    roots and ``eps`` stay far below), NaN at NaN."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    y = jax.lax.bitcast_convert_type(jnp.int32(0x7EF311C3) - bits, x.dtype)
    for _ in range(4):
        y = y + y * (1.0 - x * y)
    y = jnp.where(x == 0, jnp.inf, y)
    return jnp.where(x >= 2.0**125, 0.0, y)


@jax.custom_jvp
def rsqrt(x: jax.Array) -> jax.Array:
    """``jax.lax.rsqrt``, differentiated as ``-(y / 2) * (dx / x)``, not as JAX's
    ``dx * (rsqrt(x) / x)``, which overflows for ``x`` under 2e-26 (a moment held scaled
    up); and as 0 at ``x = 0``, where a rule selects a zero gradient's step away and JAX's
    ``0 * inf`` is NaN (both factors stay finite: transposed, 0 * inf is NaN again)."""
    return jax.lax.rsqrt(x)


@rsqrt.defjvp
def _rsqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y, positive = jax.lax.rsqrt(x), x > 0
    finite_y = jnp.where(positive, y, 0)
    return y, jnp.where(positive, -(0.5 * finite_y) * (dx / jnp.where(positive, x, 1)), 0)


@jax.custom_jvp
def sqrt(x: jax.Array) -> jax.Array:
    """``jnp.sqrt``, differentiated as 0 at ``x = 0`` (see :func:`rsqrt`): the moment of a
    weight whose gradient has always been 0."""
    return jnp.sqrt(x)


@sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y, positive = jnp.sqrt(x), x > 0
    return y, jnp.where(positive, (0.5 * dx) / jnp.where(positive, y, 1), 0)


def binary_exponent(x: jax.Array) -> jax.Array:
    """``e`` in ``x = f 2**e``, ``f`` in [0.5, 1), with ``2**+-e`` normal; 0 at 0, inf, NaN."""
    info = jnp.finfo(x.dtype)
    return jnp.clip(jnp.frexp(x)[1], info.minexp, -info.minexp)


def inverse_root(
    value: jax.Array, eps_squared: Any, eps_linear: Any, eps_in_sqrt: bool, inline: bool = False
) -> jax.Array:
    """A second moment's scaling: ``1 / sqrt(value + eps_squared)``, or with
    ``eps_in_sqrt=False`` ``1 / (sqrt(value) + eps_linear)``, computed as optax computes
    it; with ``inline`` (float32 ``value`` only) from :func:`rsqrt_inline` and
    :func:`reciprocal_inline`, within a few ulp of it, which XLA recomputes in every
    kernel that reads it instead of keeping it in memory."""
    if eps_in_sqrt:
        x = value + eps_squared
        return rsqrt_inline(x) if inline else rsqrt(x)
    if not inline:
        return 1 / (sqrt(value) + eps_linear)
    return reciprocal_inline(sqrt_inline(value) + eps_linear)


def sqrt_inline(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for float32 ``x >= 0`` as ``x * rsqrt_inline(x)`` (see
    :func:`rsqrt_inline` for why): 0 at 0, ``inf`` at ``inf``, within 2 ulp elsewhere."""
    root = jnp.where(x == 0, 0.0, x * rsqrt_inline(x))
    return jnp.where(x == jnp.inf, jnp.inf, root)


def moment_range(slot_dtype: Any) -> MomentRange:
    """The :class:`MomentRange` of a slot kept in ``slot_dtype`` (int8 slots: float32)."""
    dtype = jnp.dtype(slot_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.dtype(jnp.float32)
    return _RANGES[jnp.finfo(dtype).nexp]


def needs_tiny_mode(slot_dtype: Any, eps: Any, eps_in_sqrt: bool) -> bool:
    """Whether moments under the slot's ``low`` can change a step: with ``eps`` much
    larger than them they cannot (an ``eps`` of 1e-8 hides every moment under 1e-31
    entirely). True for a concrete ``eps`` that small, 0 included; False for a traced
    one (then moments under ``low`` read as 0, as they would in optax)."""
    if eps is None:
        return False
    limits = moment_range(slot_dtype)
    floor = limits.low if eps_in_sqrt else limits.low**0.5
    return float(eps) < floor * 2.0**24


def accumulate_moment(
    old: jax.Array,
    g: jax.Array,
    combine: Any,
    slot_dtype: Any,
    tiny: bool,
    square: Any = None,
    inline: bool = False,
):
    """``combine(square(g), old)`` in the moment encoding, from ``old`` in that encoding.

    ``square`` is ``|g|^2`` by default; a rule that keeps a statistic of the squares
    (the row-wise mean, say) passes its own, of degree 2 in ``g``.

    With ``inline`` (int8 slots, float32 only) the tiny fallback takes its square root with
    :func:`sqrt_inline`, which XLA recomputes where the moment is encoded.

    ``combine`` is the rule's own formula, e.g. ``lambda sq, nu: (1 - d) * sq + d * nu``
    (RMSprop) or ``lambda sq, s: sq + s`` (Adagrad); it must be homogeneous (scaling
    both operands by ``c`` scales the result by ``c``). ``old`` and ``g`` are in the
    compute dtype (float32 or float64); so is the result, ready to be stored in a slot
    of ``slot_dtype``.
    """
    limits = moment_range(slot_dtype)
    square = abs_sq if square is None else square
    k = limits.shift
    negative = old < 0
    huge = old <= -limits.tiny_root if tiny else negative
    # Powers of two are applied to the exponent bits, with integer saturation: products
    # by constants are algebra XLA may reorder (it rewrites (x*c)*(x*c) as (x*x)*(c*c),
    # where x*x overflows and c*c flushes to 0), and the fallback must cost next to no
    # time on the ordinary step, which computes it too (see shift_bits).
    decoded = jnp.where(huge, shift_bits(-old, 2 * k), old)  # the true old moment, or inf
    if tiny:
        decoded = jnp.where(negative & ~huge, old * old, decoded)
    # optax's formula where the true moment fits: the ordinary case, bit for bit
    nu = combine(square(g), decoded)
    # elsewhere the same sum in units of 2^(2k), where every operand fits; what falls
    # under the normal range there is under 2^-126 of a moment above 2^100: it is 0
    # (operands under 2^-90 of the unit, and gradients under 2^-45, count as 0: they are
    # under 2^-38 of any sum that takes this path, and squaring or weighting them would
    # underflow; see shift_bits)
    old_down = jnp.where(huge, -old, shift_bits(old, -2 * k, floor=-90))
    nu_down = combine(square(shift_bits(g, -k, magnitude=True, floor=-45)), old_down)
    result = jnp.where(nu > limits.high, -nu_down, nu)  # NaN fails the test: it stays
    if not tiny:
        return result
    t = limits.tiny_shift
    # A direct moment is clipped where its scaled value would overflow; it only reaches
    # here when its weight in ``combine`` is under about 2^-68 (a decay of ~0).
    ceiling = jnp.asarray(2.0 ** (-t // 2), old.dtype)
    root_up = scale_exponent(old, t)
    old_up = jnp.where(
        negative & ~huge, root_up * root_up, scale_exponent(jnp.clip(old, 0, ceiling), 2 * t)
    )
    nu_up = combine(square(scale_exponent(g, t)), old_up)
    narrow = limits is _RANGES[8] and old.dtype == jnp.float64  # float32's range, float64 leaf
    positive = nonzero = nu_up > 0  # (a float64 gradient under ~1e-170 squares to 0 even scaled up)
    if narrow:
        nonzero = positive | (square(jnp.where(g != 0, 1.0, 0.0).astype(g.dtype)) > 0)
    is_tiny, root = (nu < limits.low) & nonzero, sqrt_inline(nu_up) if inline else sqrt(nu_up)
    # A root under the smallest normal number (a moment under 2^-252 in float32) is held as
    # that number, not 0, where eps = 0 would step by g / 0: the step is then at most
    # 1 / sqrt(1 - decay) (storage.store_moment floors a float64 leaf's at float32's).
    smallest = jnp.asarray(jnp.finfo(old.dtype).tiny, old.dtype)
    if narrow:  # a root lost to underflow: float32's floor, which the slot holds
        smallest = jnp.where(positive, smallest, jnp.finfo(jnp.float32).tiny)
    return jnp.where(is_tiny, -jnp.maximum(scale_exponent(root, -t), smallest), result)


def moment_operands(nu: jax.Array, slot_dtype: Any, tiny: bool, eps: Any):
    """The operands of a step on a moment ``nu`` in the encoding: ``(scale, value,
    eps_squared, eps_linear)`` with ``value == nu_true * scale**2`` in range,
    ``eps_squared == eps * scale**2`` and ``eps_linear == eps * scale``. A step computes
    ``g * scale`` over ``sqrt(value + eps_squared)`` or ``sqrt(value) + eps_linear``,
    which is the step on the true moment. For a moment held directly (the ordinary
    case) ``scale`` is 1 and the others are ``nu`` and ``eps`` themselves, so the step is
    optax's, bit for bit. Above the range ``eps`` is under 2^-100 of the moment and
    counts as 0; in ``tiny`` mode ``eps`` is concrete and scaled exactly here."""
    limits = moment_range(slot_dtype)
    dtype = nu.dtype
    negative = nu < 0
    one = jnp.asarray(1.0, dtype)
    zero = jnp.asarray(0.0, dtype)
    down = jnp.asarray(2.0**-limits.shift, dtype)
    if not tiny:
        eps_huge = jnp.where(negative, zero, eps)
        return jnp.where(negative, down, one), jnp.abs(nu), eps_huge, eps_huge
    t = limits.tiny_shift
    huge = nu <= -limits.tiny_root
    small = negative & ~huge
    scale = jnp.where(huge, down, jnp.where(small, jnp.asarray(2.0**t, dtype), one))
    root_up = scale_exponent(nu, t)
    value = jnp.where(small, root_up * root_up, jnp.abs(nu))
    eps = float(eps)
    eps_squared = jnp.where(huge, zero, jnp.where(small, eps * 2.0 ** (2 * t), eps))
    eps_linear = jnp.where(huge, zero, jnp.where(small, eps * 2.0**t, eps))
    return scale, value, eps_squared.astype(dtype), eps_linear.astype(dtype)


def decode_moment(nu: jax.Array) -> jax.Array:
    """The true second moment of a real slot value ``nu`` in the encoding, in the
    compute dtype of ``nu``'s (float32 for half-precision slots): inf where the moment
    exceeds that dtype. A complex slot (never encoded) is returned as it is."""
    if jnp.iscomplexobj(nu):
        return nu
    limits = moment_range(nu.dtype)
    value = nu.astype(compute_dtype(nu.dtype))
    huge = nu <= -limits.tiny_root
    decoded = jnp.where(huge, scale_exponent(-value, 2 * limits.shift), value * value)
    return jnp.where(nu < 0, decoded, value)
