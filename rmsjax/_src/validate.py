"""Checks of concrete hyperparameters, made where an optimizer is built.

Values that are traced (inside ``jit``, ``grad`` or ``vmap``, for meta-learning) and
schedules (callables) pass unchecked: their values are not known when the optimizer is
built, and checking them at run time would cost a host round trip every step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete_value(value: Any) -> float | None:
    """The value as a python float, or None when it is traced or not a scalar number."""
    if value is None or callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # not something numpy can read (an abstract value, say)
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array)


def _fail(function: str, argument: str, allowed: str, value: Any) -> None:
    raise ValueError(f"rmsjax.{function}: {argument} must be {allowed}, got {value!r}")


def check_range(
    function: str,
    argument: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError unless ``low <= value <= high`` (bounds open where asked).

    NaN always fails. The message names the function, the argument, the range and the
    value, e.g. ``rmsjax.rmsprop: decay must be in [0, 1), got 1.5``.
    """
    number = concrete_value(value)
    if number is None:
        return
    too_low = low is not None and (number < low or (low_open and number == low))
    too_high = high is not None and (number > high or (high_open and number == high))
    if math.isnan(number) or too_low or too_high:
        _fail(function, argument, describe_range(low, high, low_open, high_open), value)


def describe_range(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"in {left}{_fmt(low)}, {_fmt(high)}{right}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_fmt(high)}"
    return "a number"


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def check_decay(function: str, argument: str, value: Any) -> None:
    """Decay rates and momenta: in [0, 1)."""
    check_range(function, argument, value, 0.0, 1.0, high_open=True)


def check_momentum(function: str, argument: str, value: Any) -> None:
    """Momentum decays: in [0, 1]; 1 (no decay of the buffer) is allowed, as in optax."""
    check_range(function, argument, value, 0.0, 1.0)


def check_non_negative(function: str, argument: str, value: Any) -> None:
    check_range(function, argument, value, 0.0)


def check_finite(function: str, argument: str, value: Any) -> None:
    number = concrete_value(value)
    if number is not None and not math.isfinite(number):
        _fail(function, argument, "a finite number", value)


def check_learning_rate(function: str, argument: str, value: Any) -> None:
    """Learning rates: a finite number >= 0, or a schedule."""
    if value is not None and not callable(value) and concrete_value(value) is None:
        if not isinstance(value, jax.core.Tracer) and np.asarray(value).shape != ():
            _fail(function, argument, "a scalar or a schedule", value)
    check_range(function, argument, value, 0.0)
    check_finite(function, argument, value)


def check_bool(function: str, argument: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        _fail(function, argument, "True or False", value)
