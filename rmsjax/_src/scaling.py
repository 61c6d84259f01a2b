"""``scale`` by a constant and ``scale_by_learning_rate`` (a constant or a schedule)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, fusion, numerics, step_checks, validate


def _scale_leaf(g: jax.Array, factor: Any) -> jax.Array:
    dtype = numerics.compute_dtype(g.dtype)
    if isinstance(factor, (int, float)):
        return (factor * g.astype(dtype)).astype(g.dtype)
    return (jnp.asarray(factor, dtype) * g.astype(dtype)).astype(g.dtype)


def scale(step_size: float) -> base.GradientTransformation:
    """Multiplies every update by ``step_size``.

    Args:
      step_size: a finite scalar (negative values flip the sign).

    Returns:
      A stateless :class:`GradientTransformation` (state :class:`EmptyState`).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.scale(-0.5).update(jnp.ones(2), rj.EmptyState())[0]
    Array([-0.5, -0.5], dtype=float32)
    """
    validate.check_finite("scale", "step_size", step_size)
    step_size = validate.as_float(step_size)

    rule = elementwise.stateless_rule("scale", lambda g, param: _scale_leaf(g, step_size))
    return fusion.rule_transformation(rule)


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`: the step count a schedule reads."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's


def scale_by_learning_rate(
    learning_rate: base.ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> base.GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (or ``+`` with ``flip_sign=False``).

    ``learning_rate`` may be a constant or a schedule, a function of the step count
    (see :mod:`rmsjax.schedules`); the schedule is evaluated at counts 0, 1, 2, ...
    The state holds the count in both cases, so switching a constant for a schedule
    keeps the state's layout (and checkpoints) unchanged. ``None``, the default as in
    optax, scales by nothing: the result is :func:`identity`, whatever ``flip_sign``.

    Args:
      learning_rate: a scalar >= 0, a schedule, or None.
      flip_sign: negate, so that the result can be added to the parameters.

    Returns:
      A :class:`GradientTransformation` with state :class:`ScaleByLearningRateState`
      (:class:`EmptyState` for ``None``).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.scale_by_learning_rate(0.1)
    >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
    Array([-0.1, -0.1], dtype=float32)
    """
    name = "scale_by_learning_rate"
    validate.check_bool(name, "flip_sign", flip_sign)
    if learning_rate is None:
        return fusion.identity()
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    sign = -1 if flip_sign else 1

    def factor_at(count):
        return sign * step_checks.rate_at(f"{name}.update", "learning_rate", learning_rate, count)

    return fusion.rule_transformation(
        elementwise.counted_rule(
            name,
            ScaleByLearningRateState,
            factor_at,
            lambda g, factor, param: _scale_leaf(g, factor),
        )
    )
