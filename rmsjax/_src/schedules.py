"""Learning-rate schedules: functions from the step count to a scalar.

Each computes as optax's schedule of the same name does, so that it returns optax's
value, dtype and weak type for a count (an int32 array, a python int or a float):
float32 by default, and under ``jax_enable_x64`` float64 or float32 as optax's
arithmetic gives. They work under ``jit`` and are evaluated at counts 0, 1, 2, ... by
``scale_by_learning_rate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from rmsjax._src import base, validate


def _reachable(count):
    """``count``, or a Python int beyond int32 as a float: it cannot reach JAX as an
    int, and optax's arithmetic turns it into a float anyway."""
    if isinstance(count, int) and abs(count) > validate.INT32_MAX:
        return float(count)
    return count


def constant_schedule(value: float) -> base.Schedule:
    """The same ``value`` at every step.

    >>> import rmsjax as rj
    >>> rj.schedules.constant_schedule(0.1)(5)  # the value as given, as in optax
    0.1
    """
    validate.check_finite("schedules.constant_schedule", "value", value)
    return lambda count: value  # as optax: the value as given (traced, too)


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> base.Schedule:
    """Holds ``init_value`` for ``transition_begin`` steps, moves linearly to
    ``end_value`` over ``transition_steps`` steps, then holds ``end_value``.

    >>> import rmsjax as rj
    >>> float(rj.schedules.linear_schedule(1.0, 0.0, transition_steps=4)(1))
    0.75
    """
    name = "schedules.linear_schedule"
    validate.check_finite(name, "init_value", init_value)
    validate.check_finite(name, "end_value", end_value)
    validate.check_count(name, "transition_steps", transition_steps)
    validate.check_count(name, "transition_begin", transition_begin, minimum=0)
    # as floats: the difference of two unsigned values must not wrap around
    init_value, end_value = validate.as_float(init_value), validate.as_float(end_value)

    def schedule(count):
        done = jnp.clip(count - transition_begin, 0, transition_steps)
        fraction = 1 - done / transition_steps
        return jnp.asarray((init_value - end_value) * fraction + end_value)

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> base.Schedule:
    """``init_value * decay_rate ** ((count - transition_begin) / transition_steps)``,
    held at ``init_value`` before ``transition_begin``; with ``staircase`` the exponent is
    rounded down; ``end_value`` bounds the result (below for ``decay_rate < 1``).

    >>> import rmsjax as rj
    >>> float(rj.schedules.exponential_decay(1.0, transition_steps=10, decay_rate=0.5)(20))
    0.25
    """
    name = "schedules.exponential_decay"
    validate.check_finite(name, "init_value", init_value)
    validate.check_count(name, "transition_steps", transition_steps)
    validate.check_range(name, "decay_rate", decay_rate, 0.0, low_open=True)
    validate.check_count(name, "transition_begin", transition_begin, minimum=0)
    validate.check_bool(name, "staircase", staircase)
    if end_value is not None:
        validate.check_finite(name, "end_value", end_value)
    # as floats: an integer's arithmetic wraps or overflows in int32
    init_value, decay_rate = validate.as_float(init_value), validate.as_float(decay_rate)
    end_value = validate.as_float(end_value)

    def schedule(count):
        elapsed = count - transition_begin
        exponent = elapsed / transition_steps
        if staircase:
            exponent = jnp.floor(exponent)
        value = jnp.where(elapsed <= 0, init_value, init_value * jnp.power(decay_rate, exponent))
        if end_value is not None:
            value = _bounded(value, end_value, decay_rate)
        return jnp.asarray(value)

    return schedule


def _bounded(value, end_value, decay_rate):
    """``value`` held at ``end_value``: from below for a decay (``decay_rate < 1``), from
    above for a growth; chosen in the step where the rate is traced."""
    rate = validate.concrete_value(decay_rate)
    if rate is not None:
        return (jnp.maximum if rate < 1 else jnp.minimum)(value, end_value)
    return jnp.where(decay_rate < 1, jnp.maximum(value, end_value), jnp.minimum(value, end_value))


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> base.Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over
    ``decay_steps`` steps, then constant (Loshchilov and Hutter, SGDR, 2017).

    >>> import rmsjax as rj
    >>> round(float(rj.schedules.cosine_decay_schedule(1.0, decay_steps=10)(5)), 6)
    0.5
    """
    name = "schedules.cosine_decay_schedule"
    validate.check_finite(name, "init_value", init_value)
    validate.check_count(name, "decay_steps", decay_steps)
    validate.check_range(name, "alpha", alpha, 0.0, 1.0)
    validate.check_range(name, "exponent", exponent, 0.0, low_open=True)
    init_value, alpha = validate.as_float(init_value), validate.as_float(alpha)
    return _cosine_decay(init_value, decay_steps, alpha, _exponent(exponent))


def _exponent(exponent: Any) -> Any:
    """A power's exponent: a Python int up to 100 as it is (``x ** 4`` is an integer
    power, as in optax, bit for bit); any other integer as a float. (A NumPy
    ``uint8(200)`` wrapped under ``jit``; and XLA distributes an integer power over the
    product ``0.5 * (1 + cos)``: from 128 on, ``0.5 ** e`` is 0 and ``2 ** e`` inf, so
    ``cosine ** 200`` was NaN under ``jit``, in optax too.)"""
    if isinstance(exponent, int) and abs(exponent) <= 100:
        return exponent
    return validate.as_float(exponent)


def _half_cosine(count: Any, decay_steps: int) -> Any:
    """``(1 + cos(pi * t / decay_steps)) / 2`` at ``t = min(count, decay_steps)``: from 1
    down to 0. The order of operations follows optax's, so both give the same float32
    values."""
    done = jnp.minimum(_reachable(count), float(decay_steps))
    return 0.5 * (1 + jnp.cos(math.pi * done / decay_steps))


def _cosine_decay(init_value: float, decay_steps: int, alpha: float, exponent: float):
    """:func:`cosine_decay_schedule` without its checks (the caller made them)."""

    def schedule(count):
        cosine = _half_cosine(count, decay_steps)
        return jnp.asarray(init_value * ((1 - alpha) * cosine**exponent + alpha))

    return schedule


def _cosine_between(start: float, end: float, decay_steps: int, exponent: float):
    """Half a cosine from ``start`` to ``end``, for an ``end / start`` beyond float32."""

    def schedule(count):
        # 1 at the start, 0 at the end: both exact
        weight = _half_cosine(count, decay_steps) ** exponent
        return jnp.asarray(start * weight + end * (1 - weight))

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> base.Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then
    cosine decay to ``end_value`` at step ``decay_steps`` (which counts the warm-up, as
    in optax).

    >>> import rmsjax as rj
    >>> s = rj.schedules.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
    >>> [round(float(s(t)), 3) for t in (0, 1, 2, 4, 6)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    name = "schedules.warmup_cosine_decay_schedule"
    for argument, value in [("init_value", init_value), ("peak_value", peak_value)]:
        validate.check_finite(name, argument, value)
    validate.check_finite(name, "end_value", end_value)  # above peak_value too, as in optax
    validate.check_range(name, "exponent", exponent, 0.0, low_open=True)
    validate.check_count(name, "warmup_steps", warmup_steps, minimum=0)
    validate.check_count(name, "decay_steps", decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"rmsjax.{name}: decay_steps must be > warmup_steps ({warmup_steps}), "
            f"got {decay_steps!r}"
        )
    init_value, peak_value, end_value = (
        validate.as_float(v) for v in (init_value, peak_value, end_value)
    )
    exponent = _exponent(exponent)
    # with no warm-up optax holds init_value before step 0
    warmup: Callable[[Any], Any] = (
        linear_schedule(init_value, peak_value, warmup_steps)
        if warmup_steps
        else lambda count: init_value
    )
    peak, end = validate.concrete_value(peak_value), validate.concrete_value(end_value)
    alpha: Any
    if peak is not None:
        alpha = 0.0 if peak == 0 else end_value / peak_value
    else:  # traced: chosen in the step
        alpha = jnp.where(peak_value == 0, 0.0, end_value / peak_value)
    cosine = _cosine_decay(peak_value, decay_steps - warmup_steps, alpha, exponent)
    if peak and end is not None and abs(end / peak) > validate.FLOAT32_MAX:
        # optax's alpha = end / peak is inf in float32 and its values NaN (1 - inf):
        # from peak to end without the ratio
        cosine = _cosine_between(peak_value, end_value, decay_steps - warmup_steps, exponent)

    def schedule(count):
        return jnp.where(count < warmup_steps, warmup(count), cosine(count - warmup_steps))

    return schedule


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> base.Schedule:
    """``init_value`` multiplied by every ``scale`` whose boundary step has been reached.

    >>> import rmsjax as rj
    >>> s = rj.schedules.piecewise_constant_schedule(1.0, {10: 0.1, 20: 0.5})
    >>> [round(float(s(t)), 4) for t in (0, 10, 25)]
    [1.0, 0.1, 0.05]
    """
    name = "schedules.piecewise_constant_schedule"
    validate.check_finite(name, "init_value", init_value)
    boundaries_and_scales = {} if boundaries_and_scales is None else boundaries_and_scales
    validate.check_instance(
        name, "boundaries_and_scales", boundaries_and_scales, Mapping, "a dict or None"
    )
    for boundary, factor in boundaries_and_scales.items():  # checked before sorting them
        validate.check_count(name, "a boundary", boundary, minimum=0)
        validate.check_range(name, f"the scale at boundary {boundary}", factor, 0.0)
    items = sorted(boundaries_and_scales.items())
    start = validate.concrete_value(init_value)  # None where traced: not checked
    traced = start is None or any(validate.concrete_value(f) is None for _, f in items)
    value = 0.0 if start is None else start
    for boundary, factor in items if not traced else ():
        # a value beyond float32 would be inf, and optax's arithmetic below NaN (0 * inf)
        value *= float(factor)
        if abs(value) > validate.FLOAT32_MAX:
            raise ValueError(
                f"rmsjax.{name}: the value from boundary {boundary} on, {value!r}, must be "
                "finite in float32 (at most 3.4028235e+38)"
            )
    if items:  # (without boundaries the value as given, as optax's)
        init_value = validate.as_float(init_value)

    def schedule(count):
        # optax's arithmetic, so that the value, its dtype and its weak type are optax's
        # for every count (an int32 array, a Python int, a float)
        count = _reachable(count)
        value: Any = init_value
        for boundary, factor in items:
            before = jnp.maximum(0.0, jnp.sign(boundary - count))  # 1 before it, else 0
            value = value * before + (1 - before) * factor * value
        return value

    return schedule
