"""``scale_by_rms``: RMSprop's decaying average of squared gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, fusion, moments, numerics, validate
from rmsjax._src import storage as storage_lib
from rmsjax._src.step_checks import nan_where_negative


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`.

    Attributes:
      count: number of updates so far (int32 scalar, saturating).
      nu: the decaying average of squared gradients, one array per parameter (a
        :class:`QuantizedArray` for large parameters with ``storage="int8"``). A
        centered rule with int8 or bfloat16 state keeps the variance ``nu - mu^2``
        here instead (see :func:`rmsjax.to_optax_state`, which adds ``mu^2`` back).
      mu: the decaying average of gradients when ``centered=True``, else None.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's
    nu: base.Updates
    mu: base.Updates | None


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    centered: bool = False,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""Divides updates by the root of a decaying average of squared gradients.

    For each element, with gradient :math:`g_t` and :math:`\rho` = ``decay``:

    .. math::

        \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,g_t^2, \qquad
        u_t = g_t / \sqrt{\nu_t + \epsilon}\ \ (\text{or } g_t / (\sqrt{\nu_t} + \epsilon))

    With ``centered=True`` (Graves, 2013) a decaying mean :math:`\mu_t` of the gradients
    is kept too and :math:`\nu_t - \mu_t^2` replaces :math:`\nu_t`; that difference is
    clamped at zero, so rounding never makes it negative (optax and torch can return
    NaN there). With ``bias_correction=True``, :math:`\nu_t` and :math:`\mu_t` are divided
    by :math:`1-\rho^t` before use. Arithmetic is in float32 for half-precision leaves;
    the state keeps each parameter's dtype unless ``storage`` says otherwise.

    Args:
      decay: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon` >= 0, added inside the root (``eps_in_sqrt=True``, optax,
        Keras and TF1) or outside it (torch).
      eps_in_sqrt: where ``eps`` goes, see above.
      initial_scale: the starting value of :math:`\nu` (TF1 uses 1.0), >= 0.
      bias_correction: divide the averages by :math:`1-\rho^t`.
      centered: use the variance :math:`\nu_t - \mu_t^2` instead of :math:`\nu_t`.
      storage: how the state is kept between steps: None (each parameter's dtype),
        ``"float32"``, ``"bfloat16"``, or ``"int8"`` (8-bit block-wise, 1.016 bytes per
        element on whole blocks, for parameters of 4096 elements or more; :math:`\sqrt{\nu}` is
        quantized). The step itself always computes in float32 or wider; see
        docs/memory.md.

    Returns:
      A :class:`GradientTransformation` with state :class:`ScaleByRmsState`.

    .. warning:: the peers disagree on ``eps``: torch adds it outside the root, Keras,
       TF1 and optax inside. See :mod:`rmsjax.compat` for exact presets.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.scale_by_rms(decay=0.9)
    >>> state = tx.init(jnp.zeros(3))
    >>> tx.update(jnp.array([1.0, -1.0, 0.0]), state)[0]
    Array([ 3.1622775, -3.1622775,  0.       ], dtype=float32)

    References:
      Hinton, Neural Networks for Machine Learning, lecture 6e (2012);
      Graves, Generating Sequences With Recurrent Neural Networks, arXiv:1308.0850.
    """
    check_arguments(
        "scale_by_rms", decay, eps, initial_scale, eps_in_sqrt, bias_correction, centered, storage
    )
    decay, eps, initial_scale = (validate.as_float(v) for v in (decay, eps, initial_scale))
    return fusion.rule_transformation(
        rms_rule(decay, eps, eps_in_sqrt, initial_scale, bias_correction, centered, storage)
    )


def check_arguments(
    function: str,
    decay: Any,
    eps: Any,
    initial_scale: Any,
    eps_in_sqrt: Any,
    bias_correction: Any,
    centered: Any,
    storage: Any,
) -> None:
    """The checks of :func:`scale_by_rms`' arguments, made by it and by the aliases built
    on it (their errors name ``function``, the one the user called)."""
    validate.check_decay(function, "decay", decay)
    validate.check_non_negative(function, "eps", eps)
    validate.check_non_negative(function, "initial_scale", initial_scale)
    for flag, value in [
        ("eps_in_sqrt", eps_in_sqrt),
        ("bias_correction", bias_correction),
        ("centered", centered),
    ]:
        validate.check_bool(function, flag, value)
    storage_lib.check_storage(function, storage)


def _holds_variance(centered: bool, slots: tuple) -> bool:
    """Whether a centered rule's first slot holds the variance ``w = nu - mu^2`` rather
    than ``nu``: with int8 or bfloat16 state (:func:`storage.coarse`). Rounding ``nu`` and
    ``mu`` separately would lose every variance under the rounding error of ``nu`` (a
    block's small elements, whose ``nu - mu^2`` then clamps to 0; with bfloat16 state,
    gradients whose mean is large beside their spread); ``w`` follows Welford's update
    ``w' = d w + d (1 - d) (g - mu)^2``, which subtracts nothing."""
    return centered and storage_lib.coarse(slots[0])


def _divide(x: jax.Array, c: Any, inline: bool) -> jax.Array:
    """``x / c``; where the step is computed inline (int8 state), ``x`` times ``1 / c``
    (a scalar's, or a reciprocal computed inline)."""
    if not inline:
        return x / c
    return x * (1 / c if jnp.ndim(c) == 0 else numerics.reciprocal_inline(c))


def rms_rule(
    decay: Any,
    eps: Any,
    eps_in_sqrt: bool,
    initial_scale: Any,
    bias_correction: bool,
    centered: bool,
    storage: base.Storage | None = None,
) -> elementwise.LeafRule:
    """The per-leaf form of :func:`scale_by_rms` (unchecked arguments)."""
    # With a normal eps > 0 in float32 the scaling is finite (the average is >= 0 and
    # below overflow); eps = 0, a subnormal eps (XLA on a CPU flushes it to 0) or a
    # traced one can make it infinite.
    concrete_eps = validate.concrete_value(eps)
    guard_zero = concrete_eps is None or not concrete_eps >= validate.SMALLEST_NORMAL
    read_back = storage_lib.reads_back(storage)

    def weighted(weight, x):
        # weight * x, and 0 where the weight is 0 (the old moment's at a decay of 0, the
        # centered gap's at 0 or 1): an operand beyond float32 (an old moment, a gap's
        # square) reads as inf in the ordinary formula, and 0 * inf is NaN
        concrete = validate.concrete_value(weight)
        if concrete == 0:
            return jnp.zeros_like(x)
        if concrete is not None:
            return weight * x
        return jnp.where(weight == 0, jnp.zeros_like(x), weight * x)

    def combine(square, old):  # optax's formula, in the order optax computes it
        return nan_where_negative((1 - decay) * square + weighted(decay, old), decay)

    def combine_variance(half_gap_square, old):  # see _holds_variance
        variance = weighted(decay, old) + weighted(4 * decay * (1 - decay), half_gap_square)
        return nan_where_negative(variance, decay)

    def step_shared(count):
        count = numerics.safe_increment(count)
        # The factors 1 - decay**t, as optax computes them (None without correction),
        # and the count, which salts the rounding of int8 and bfloat16 moments.
        correction = numerics.bias_correction_factor(decay, count) if bias_correction else None
        return count, (count, correction)

    def init_leaf(param):
        nu = storage_lib.init_slot(param, initial_scale, storage, signed=False)
        if not centered:
            return (nu,)
        return nu, storage_lib.init_slot(param, 0.0, storage, signed=True)

    def second_moment(g_c, slots, count, dtype, variance):
        """The new second moment in numerics' encoding (itself in range, scaled outside
        it, so that no gradient's square overflows or underflows; see numerics.py): of
        ``nu``, or with ``variance`` of ``w`` (see _holds_variance)."""
        if not variance:
            return moments.accumulate(
                slots[0], g_c, combine, eps, eps_in_sqrt, dtype, read_back=read_back, salt=count
            )
        # w' = d w + d (1 - d) (g - mu)^2 = d w + 4 d (1 - d) ((g - mu) / 2)^2. The half
        # gap cannot overflow, but under 2^-126 it is no normal number (and flushed to 0
        # on a CPU). Where such variances count (eps = 0: tiny mode), for operands under
        # 2^-100 the gap is passed as it is and halved inside the square, after numerics
        # has scaled it into range.
        mu_old = storage_lib.load(slots[1], dtype)
        gap, square = 0.5 * g_c - 0.5 * mu_old, None
        if numerics.needs_tiny_mode(jnp.float32, concrete_eps, eps_in_sqrt):
            small = (jnp.abs(g_c) < 2.0**-100) & (jnp.abs(mu_old) < 2.0**-100)
            gap = jnp.where(small, g_c - mu_old, gap)

            def square(x):
                return jnp.where(small, 0.25 * (x * x), x * x)

        return moments.accumulate(
            slots[0],
            gap,
            combine_variance,
            eps,
            eps_in_sqrt,
            dtype,
            square=square,
            read_back=read_back,
            salt=count,
        )

    def zero_variance_scaling(nu_hat, scale, inline):
        """The scaling where a centered variance is 0 (a constant gradient, a decay of
        0): eps alone, which counts as 0 above the range, so the step is g / sqrt(eps)
        (g / eps with eps outside the root), unscaled: scaled, it was g / 0 = inf for a
        gradient of 1e18. It does not depend on nu_hat: with eps = 0 its derivative
        through nu_hat, 0 * inf, made every gradient through the step NaN, selected or
        not. In range it is the same number, bit for bit."""
        zero = 0 * jax.lax.stop_gradient(nu_hat)
        if eps_in_sqrt:
            unscaled = numerics.inverse_root(eps + zero, 0, 0, True, inline)
        else:
            unscaled = numerics.inverse_root(zero, 0, eps + zero, False, inline)
        return _divide(unscaled, scale, inline)

    def times_gradient(scaling, g_scaled, g_c):
        """scaling * g, where a zero gradient gives a zero update even if the scaling is
        infinite (eps = 0 with a zero average), instead of 0 * inf = NaN."""
        if not guard_zero:
            return scaling * g_scaled
        # Only there: at a zero gradient elsewhere the update's derivative stays the
        # scaling. (The scaling is also kept out of the product there: 0 * inf in a
        # branch not taken still makes every derivative through the step NaN.)
        zero_step = (g_c == 0) & ~jnp.isfinite(scaling)
        finite = jnp.where(zero_step, jnp.zeros_like(scaling), scaling)
        return jnp.where(zero_step, g_c, finite * g_scaled)

    def update_leaf(g, slots, context, param):
        del param
        count, correction = context
        dtype = numerics.compute_dtype(g.dtype)
        g_c = g.astype(dtype)
        variance = _holds_variance(centered, slots)
        moment = second_moment(g_c, slots, count, dtype, variance)
        new_slots: tuple = (moment.stored,)
        scale, nu_scaled = moment.scale, moment.value
        # With int8 state the step is computed again in each kernel that encodes a
        # block (see numerics.inverse_root): no square root or division in it.
        inline = moment.inline
        c = None if correction is None else correction.astype(dtype)
        nu_hat = nu_scaled if c is None else _divide(nu_scaled, c, inline)
        if centered:
            mu = moments.decaying_average(g_c, storage_lib.load(slots[1], dtype), decay)
            mu_slot, mu = storage_lib.keep(mu, slots[1], read_back)
            new_slots += (mu_slot,)
            mu_hat = mu * scale
            if variance:
                # nu/c - (mu/c)^2 with nu = w + mu^2 is w/c - mu^2 (1 - c) / c^2
                if c is not None:
                    mu_c = _divide(mu_hat, c, inline)
                    nu_hat = jnp.maximum(nu_hat - numerics.abs_sq(mu_c) * (1 - c), 0)
            else:
                mu_hat = mu_hat if c is None else _divide(mu_hat, c, inline)
                nu_hat = jnp.maximum(nu_hat - numerics.abs_sq(mu_hat), 0)
        scaling = numerics.inverse_root(
            nu_hat, moment.eps_squared, moment.eps_linear, eps_in_sqrt, moment.inline
        )
        if centered:
            scaling = jnp.where(nu_hat > 0, scaling, zero_variance_scaling(nu_hat, scale, inline))
        update = times_gradient(scaling, moment.scaled(g_c), g_c)
        # in the dtype of optax's g / sqrt(nu + eps): the wider of the gradient's and the
        # state's (float32 updates for bfloat16 gradients of float32 parameters)
        out = storage_lib.update_dtype(g, slots, storage)
        return update.astype(out), new_slots

    slots = (elementwise.Slot("nu"),) + ((elementwise.Slot("mu"),) if centered else ())
    rule = elementwise.declared_rule(
        "scale_by_rms",
        ScaleByRmsState,
        slots,
        shared_field="count",
        init_shared=numerics.zero_count,
        step_shared=step_shared,
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        complex_refusal=storage_lib.complex_refusal(storage),
    )
    return storage_lib.checking_moment_slots(rule, "nu", storage, counted=True)
