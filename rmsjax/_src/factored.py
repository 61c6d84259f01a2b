"""A factored second moment (Adafactor-style): row and column averages of a matrix."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, combine, elementwise, fusion, numerics, scaling, validate
from rmsjax._src import momentum as momentum_lib
from rmsjax._src.step_checks import nan_where_negative


class ScaleByFactoredRmsState(NamedTuple):
    """State of :func:`scale_by_factored_rmsprop`; float32 (float64 for float64
    parameters), one entry of each field per parameter.

    Attributes:
      nu_row: for a factored parameter of shape ``(..., n, m)``, the decaying average of
        each row's mean squared gradient, shape ``(..., n)``; else a placeholder.
      nu_col: likewise for the columns, shape ``(..., m)``; else a placeholder.
      nu: for a parameter that is not factored (a scalar, a vector, a small matrix),
        the full decaying average of squared gradients; else a placeholder.

    A placeholder is a scalar of the state's dtype, not an empty array (checkpointers such as orbax
    refuse to save arrays of size zero), and it holds the leaf's scale exponent ``E``:
    the moments are kept in units of :math:`4^E`. ``E`` is 0 (the moments are
    themselves) unless the gradients leave float32's comfortable range, above about
    1e12 or below 1e-12; it then moves by whole powers of two, so that no square
    overflows or underflows whatever the gradients' scale.
    """

    nu_row: base.Updates
    nu_col: base.Updates
    nu: base.Updates


def is_factored(shape: tuple[int, ...], min_dim_size_to_factor: int) -> bool:
    """Whether a parameter of ``shape`` gets a factored second moment: it has two or more
    axes and its last two both have at least ``min_dim_size_to_factor`` entries."""
    return len(shape) >= 2 and min(shape[-2:]) >= min_dim_size_to_factor


def scale_by_factored_rmsprop(
    decay: float = 0.9, eps: float = 1e-30, *, min_dim_size_to_factor: int = 32
) -> base.GradientTransformation:
    r"""Divides updates by the root of a factored (rank-one) estimate of the decaying
    average of squared gradients: :math:`n + m` numbers of state per :math:`n \times m`
    matrix instead of :math:`nm`.

    For a parameter whose last two axes are :math:`n \times m` (both at least
    ``min_dim_size_to_factor``; leading axes are a batch of matrices), with
    :math:`\rho` = ``decay`` and :math:`s = g_t^2 + \epsilon`:

    .. math::

        R_t = \rho R_{t-1} + (1-\rho)\,\tfrac{1}{m}\textstyle\sum_j s_{\cdot j}, \quad
        C_t = \rho C_{t-1} + (1-\rho)\,\tfrac{1}{n}\textstyle\sum_i s_{i \cdot}, \quad
        \hat\nu_t = \frac{R_t C_t^\top}{\operatorname{mean}(R_t)}, \quad
        u_t = g_t / \sqrt{\hat\nu_t}

    :math:`\hat\nu` is the rank-one matrix with :math:`R` as its row means and
    :math:`C` as its column means (Shazeer and Stern, 2018). Other parameters keep the
    full average :math:`\nu_t = \rho\,\nu_{t-1} + (1-\rho)\,s` and
    :math:`u_t = g_t/\sqrt{\nu_t}`, as :func:`scale_by_rms` with ``eps`` added to
    :math:`g^2` instead of :math:`\nu`. A zero gradient gives a zero update. The state
    is float32 (or wider) whatever the parameters' dtype.

    Args:
      decay: :math:`\rho` in [0, 1).
      eps: :math:`\epsilon` >= 0, added to every squared gradient (Adafactor's
        :math:`\epsilon_1`), so that :math:`\hat\nu > 0` where gradients vanish.
      min_dim_size_to_factor: factor a parameter only if its last two axes both have at
        least this many entries (an integer >= 1); 32 factors a table with 64-wide rows
        (optax's Adafactor uses 128).

    Returns:
      A :class:`GradientTransformation` with state :class:`ScaleByFactoredRmsState`.

    .. warning:: the rank-one estimate matches :func:`scale_by_rms` only when the
       squared gradients' matrix is itself rank one; elsewhere individual elements get
       larger or smaller steps than RMSprop would give them.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.scale_by_factored_rmsprop(decay=0.0, min_dim_size_to_factor=2)
    >>> g = jnp.array([[1.0, 2.0], [2.0, 4.0]])  # a rank-one g*g is recovered exactly
    >>> tx.update(g, tx.init(g))[0]
    Array([[1., 1.],
           [1., 1.]], dtype=float32)

    References:
      Shazeer and Stern, Adafactor: Adaptive Learning Rates with Sublinear Memory Cost,
      ICML 2018, arXiv:1804.04235.
    """
    name = "scale_by_factored_rmsprop"
    validate.check_decay(name, "decay", decay)
    validate.check_non_negative(name, "eps", eps)
    validate.check_count(name, "min_dim_size_to_factor", min_dim_size_to_factor)
    decay, eps = validate.as_float(decay), validate.as_float(eps)
    return fusion.rule_transformation(factored_rms_rule(decay, eps, min_dim_size_to_factor))


def _mean(x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """The mean as a sum of ``x / n``: no partial sum overflows where every element is
    finite (a plain sum of values near the float32 maximum is infinite)."""
    return jnp.sum(x / x.shape[axis], axis=axis, keepdims=keepdims)


@jax.custom_jvp
def _ratio(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x / y``, also where ``y`` is near the float32 maximum: XLA on CPU divides by
    multiplying with ``1 / y``, which flushes to zero above 2**126, so there both sides
    are first scaled down by 2**64 (exactly: a power of two).

    Differentiated as ``(dx - (x / y) dy) / y``, not as JAX's ``dx / y - x dy / y^2``:
    ``y^2`` underflows to 0 for a row average under 1e-19 (``eps`` alone, a leaf whose
    gradient has always been 0), and ``0 * inf`` made every derivative through the
    step NaN."""
    # the scale depends on y, so that XLA cannot cancel it out of the quotient
    scale = jnp.where(y > 2.0**100, jnp.asarray(2.0**-64, y.dtype), jnp.ones_like(y))
    return (x * scale) / (y * scale)


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
    (x, y), (dx, dy) = primals, tangents
    quotient = _ratio(x, y)
    return quotient, _ratio(dx - quotient * dy, y)


# Where the largest gradient (or root of a moment) of a leaf may sit, in units of its
# scale 2^E, before E moves: 2^+-40 leaves 48 binades for squares on either side.
_EXPONENT_SLACK = 40


def _exponent(g: jax.Array, moments: list, exponent: jax.Array, eps: Any) -> jax.Array:
    """The leaf's new scale exponent ``E``: the old one while the largest gradient and
    the largest moment's root lie under 2^(E+40) and the largest non-zero gradient
    above 2^(E-40); else the exponent of the larger of the two (the moments then move by
    an exact power of 4, never outside float32). ``eps * 4^-E`` stays finite."""
    # (initial=0: a leaf with no elements has empty gradients and moments)
    largest = jnp.max(jnp.abs(g), initial=0.0)
    top = jnp.max(jnp.stack([jnp.max(m, initial=0.0) for m in moments])) if moments else 0.0
    # exponents of the largest gradient and of the largest moment's root (true units)
    g_exp = jnp.frexp(largest)[1].astype(g.dtype)
    m_exp = jnp.frexp(jnp.sqrt(top))[1].astype(g.dtype) + exponent
    empty_g, empty_m = largest == 0, top <= 0
    target = jnp.where(empty_m, g_exp, jnp.where(empty_g, m_exp, jnp.maximum(g_exp, m_exp)))
    # Up when a square could overflow; down only when the gradients' squares could
    # underflow (small moments alone, eps say, are no reason to move).
    up = ~(empty_g & empty_m) & (target - exponent > _EXPONENT_SLACK)
    down = ~empty_g & (target - exponent < -_EXPONENT_SLACK)
    new = jnp.where(up | down, target, exponent)
    concrete = validate.concrete_value(eps)
    if concrete is None or concrete > 0:
        # eps * 4^-E must stay finite: E >= (log2(eps) - 100) / 2
        floor = jnp.floor((jnp.log2(jnp.asarray(eps, g.dtype)) - 100) / 2)
        new = jnp.maximum(new, floor)
    return new


def factored_rms_rule(decay: Any, eps: Any, min_dim_size_to_factor: int) -> elementwise.LeafRule:
    """The per-leaf form of :func:`scale_by_factored_rmsprop` (unchecked arguments)."""
    name = "scale_by_factored_rmsprop"

    def axes(which: int):
        # The parameter's dimensions each slot runs along: the row statistic drops the
        # last, the column statistic the second-to-last; unfactored, the full average.
        # A slot a leaf does not use is a scalar placeholder.
        def of(shape: tuple[int, ...]) -> tuple[int, ...]:
            n = len(shape)
            if is_factored(shape, min_dim_size_to_factor):
                return (tuple(range(n - 1)), (*range(n - 2), n - 1), ())[which]
            return ((), (), tuple(range(n)))[which]

        return of

    declared = tuple(
        elementwise.Slot(field, axes(i)) for i, field in enumerate(("nu_row", "nu_col", "nu"))
    )

    def init_leaf(param):
        dtype = numerics.compute_dtype(jnp.result_type(param))
        shape = tuple(jnp.shape(param))
        return tuple(jnp.zeros(slot.shape_for(shape), dtype) for slot in declared)

    def update_leaf(g, slots, context, param):
        del context, param
        shape = tuple(jnp.shape(g))
        dtype = slots[0].dtype
        g_c = g.astype(dtype)
        factored = is_factored(shape, min_dim_size_to_factor)
        # The moments are held in units of 4^E, E an integer kept in the leaf's scalar
        # placeholder (0 unless the gradients leave float32's comfortable range): so no
        # square overflows or underflows, whatever the gradients' scale.
        moments = slots[:2] if factored else slots[2:]
        exponent = slots[2] if factored else slots[0]
        new_exponent = _exponent(g_c, moments, exponent, eps)
        # Powers of two applied on the bits (exact, and not constants XLA could
        # reorder) only where E is not 0: elsewhere the values themselves, through
        # which derivatives (of a loss after unrolled steps, say) flow.
        shift = (2 * (exponent - new_exponent)).astype(jnp.int32)
        moments = [jnp.where(shift == 0, m, numerics.scale_exponent(m, shift)) for m in moments]
        scaled = new_exponent != 0
        e = new_exponent.astype(jnp.int32)
        g_s = jnp.where(scaled, numerics.scale_exponent(g_c, -e), g_c)
        eps_s = jnp.where(scaled, numerics.scale_exponent(jnp.asarray(eps, dtype), -2 * e), eps)
        squares = g_s * g_s + eps_s
        if factored:
            row = decay * moments[0] + (1 - decay) * _mean(squares, axis=-1)
            col = decay * moments[1] + (1 - decay) * _mean(squares, axis=-2)
            row, col = numerics.finite_ceiling(row), numerics.finite_ceiling(col)
            row, col = nan_where_negative(row, decay), nan_where_negative(col, decay)
            row_mean = _mean(row, axis=-1, keepdims=True)
            # (a matrix whose averages are all 0 in units of 4^E, beside one that holds
            # an outlier, has an estimate of 0, not 0 / 0: its elements step as below)
            row_mean = jnp.where(row_mean > 0, row_mean, jnp.ones_like(row_mean))
            nu_hat = _ratio(row, row_mean)[..., :, None] * col[..., None, :]
            new_slots = (row, col, new_exponent)
        else:
            nu_hat = numerics.finite_ceiling(decay * moments[0] + (1 - decay) * squares)
            nu_hat = nan_where_negative(nu_hat, decay)
            new_slots = (new_exponent, slots[1], nu_hat)
        # a zero gradient gives a zero update, also where nu_hat is 0 (eps = 0); the
        # root is not taken there, or 0 * inf in the branch not taken would make every
        # derivative through the step NaN
        zero_step = (g_c == 0) & ~(nu_hat > 0)
        lost = (nu_hat == 0) & (g_c != 0)
        root = numerics.rsqrt(jnp.where(zero_step | lost, jnp.ones_like(nu_hat), nu_hat))
        update = jnp.where(zero_step, g_c, g_s * root)
        # A gradient more than 2^126 below the leaf's largest (one huge outlier among
        # ordinary gradients) has an average of 0 in units of 4^E: it steps as on its
        # own first step, g / sqrt((1 - decay) g^2 + eps), which is at most
        # 1 / sqrt(1 - decay), instead of 0 / 0 (computed as sign(g) over the root of
        # 1 - decay + (sqrt(eps) / g)^2: that ratio squared may overflow to inf, and
        # the step is 0 then, as it is to float32; with eps = 0 (or flushed to 0) the
        # ratio is 0 even where 1 / g overflows, and the step is sign(g) / sqrt(1 - decay)).
        # Its derivative is cut, as where a moment is held scaled (docs/numerics.md):
        # 1 / g of a tiny gradient made every derivative through the step NaN.
        g_lost = jax.lax.stop_gradient(jnp.where(lost, g_c, jnp.ones_like(g_c)))
        inverse = 1 / g_lost
        inverse = jnp.where(jnp.isfinite(inverse), inverse, jnp.finfo(dtype).max)
        ratio = jnp.sqrt(jnp.asarray(eps, dtype)) * inverse
        alone = jnp.sign(g_lost) * jax.lax.rsqrt((1 - decay) + ratio * ratio)
        update = jnp.where(lost, alone.astype(dtype), update)
        return update.astype(g.dtype), new_slots

    return elementwise.declared_rule(
        name,
        ScaleByFactoredRmsState,
        declared,
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        complex_refusal="the factored second moment is written for real leaves",
    )


def factored_rmsprop(
    learning_rate: base.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-30,
    momentum: float | None = None,
    nesterov: bool = False,
    min_dim_size_to_factor: int = 32,
) -> base.GradientTransformation:
    r"""RMSprop with a factored second moment: :math:`n + m` numbers of state per
    :math:`n \times m` matrix (see :func:`scale_by_factored_rmsprop`).

    ``chain(scale_by_factored_rmsprop(decay, eps, min_dim_size_to_factor),
    scale_by_learning_rate(learning_rate), trace(momentum))``, the same order as
    :func:`rmsprop` (the learning rate sits inside the momentum buffer):

    .. math::

        b_t = \mu\,b_{t-1} + \eta\,g_t / \sqrt{\hat\nu_t}, \qquad
        \theta_t = \theta_{t-1} - b_t

    Args:
      learning_rate: :math:`\eta`, a scalar >= 0 or a schedule.
      decay: :math:`\rho` in [0, 1).
      eps: :math:`\epsilon` >= 0, added to every squared gradient.
      momentum: :math:`\mu` in [0, 1], or None for none (momentum keeps a full buffer).
      nesterov: use Nesterov momentum.
      min_dim_size_to_factor: factor matrices whose last two axes both have at least
        this many entries.

    Returns:
      A :class:`GradientTransformation`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.factored_rmsprop(1e-3)
    >>> state = tx.init({"w": jnp.zeros((512, 256)), "b": jnp.zeros(256)})
    >>> state[0].nu_row["w"].shape, state[0].nu_col["w"].shape, state[0].nu["b"].shape
    ((512,), (256,), (256,))

    References:
      Shazeer and Stern, arXiv:1804.04235 (2018); Hinton, lecture 6e (2012).
    """
    name = "factored_rmsprop"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    validate.check_decay(name, "decay", decay)
    validate.check_non_negative(name, "eps", eps)
    validate.check_bool(name, "nesterov", nesterov)
    validate.check_count(name, "min_dim_size_to_factor", min_dim_size_to_factor)
    parts = [
        scale_by_factored_rmsprop(decay, eps, min_dim_size_to_factor=min_dim_size_to_factor),
        scaling.scale_by_learning_rate(learning_rate),
    ]
    # an identity without momentum keeps the state's layout (3 parts) the same
    parts.append(momentum_lib.optional_trace(name, momentum, nesterov))
    return combine.named_chain(name, *parts)
