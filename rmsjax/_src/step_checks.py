"""Checks of what a transformation is handed when it runs, made at trace time: the
step count in a state, a schedule's value, a buffer's dtype for its parameter.
(Hyperparameters are checked where the optimizer is built, in :mod:`validate`.)"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rmsjax._src.validate import INT32_MAX, as_float, concrete_value, is_real_dtype


def accumulator_dtype_for(function: str, param: Any, accumulator_dtype: Any) -> Any:
    """The dtype of a buffer for ``param``: ``accumulator_dtype``, or None's default
    (the parameter's). A real one for a complex parameter is refused at init, naming the
    argument: the buffer would drop the imaginary part (optax's does, with a warning)."""
    if accumulator_dtype is None:
        return jax.numpy.result_type(param)
    dtype = jax.numpy.dtype(accumulator_dtype)
    complex_param = jax.numpy.iscomplexobj(param)
    if complex_param != jax.numpy.issubdtype(dtype, np.complexfloating):
        why = (
            "a real buffer would drop the imaginary part"
            if complex_param
            else "a complex buffer would make its updates complex"
        )
        raise TypeError(
            f"rmsjax.{function}.init: accumulator_dtype must be a "
            f"{'complex' if complex_param else 'real'} dtype or None for a parameter of "
            f"dtype {jax.numpy.result_type(param)} ({why}), got {dtype}"
        )
    return dtype


def rate_at(function: str, argument: str, rate: Any, count: Any) -> Any:
    """A constant ``rate``, or a schedule's value at ``count`` (checked by
    :func:`scalar_schedule_value`), as a float: what a learning rate is at a step."""
    if callable(rate):
        rate = scalar_schedule_value(function, argument, rate(count))
    return as_float(rate)


def scalar_schedule_value(function: str, argument: str, value: Any, hint: str = "") -> Any:
    """A schedule's value, checked at trace time to be a scalar: a schedule that returns
    an array would otherwise be broadcast over each leaf, or fail inside the step, and a
    real number: None, a string or a complex number failed inside the step with Python's
    own errors, and True stepped as 1. ``hint`` ends the message."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        real = is_real_dtype(dtype)
    if not real:
        kind = f"{value!r} ({type(value).__name__})"
        if dtype is not None:
            kind = f"a value of dtype {dtype}"
        raise TypeError(
            f"rmsjax.{function}: the {argument} schedule must return a real number (an "
            f"integer or a float), got {kind}{hint}"
        )
    shape = np.shape(value)
    if shape != ():
        raise ValueError(
            f"rmsjax.{function}: the {argument} schedule must return a scalar, got a value "
            f"of shape {shape}"
        )
    return value


def check_step_count(name: str, count: Any) -> None:
    """Raises unless a state's step ``count`` is an integer scalar: one of another shape
    (set by hand, or a batch of counts outside ``vmap``) gave each element its own bias
    correction or schedule value in silence, and a float one counted in floats."""
    dtype = getattr(count, "dtype", None)
    if dtype is None:  # a Python number
        integer = isinstance(count, int) and not isinstance(count, bool)
    else:
        integer = jax.numpy.issubdtype(dtype, jax.numpy.integer)
    if not integer:
        held = f"an array of dtype {dtype}" if dtype is not None else f"{count!r}"
        hint = ""
        if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating):
            hint = (
                " (optax.tree_utils.tree_cast casts counts too: cast only the floating "
                'leaves, or keep the state in bfloat16 with storage="bfloat16")'
            )
        raise TypeError(
            f"rmsjax.{name}.update: the state's count must be an integer scalar (int32, "
            f"as init makes it), got {held}{hint}"
        )
    if np.shape(count) != ():
        raise ValueError(
            f"rmsjax.{name}.update: the state's count must be a scalar, got an array of "
            f"shape {np.shape(count)}"
        )
    concrete = not isinstance(count, jax.core.Tracer)
    # (an array spanning other processes' devices cannot be read here: left unchecked)
    if (
        concrete
        and getattr(count, "is_fully_addressable", True)
        and not 0 <= int(count) <= INT32_MAX
    ):
        raise ValueError(
            f"rmsjax.{name}.update: the state's count must be in [0, 2**31 - 1] (int32), "
            f"got {count}"
        )


def nan_where_negative(moment: Any, hyperparameter: Any) -> Any:
    """``moment``, NaN where it is negative, when ``hyperparameter`` (a decay, an initial
    value) is traced and so unchecked (validation.md): out of range it makes a second
    moment negative, which the encoding of moments beyond float32 would read as one held
    scaled (steps of 1e-24, a weight frozen in silence) and a factored average would step
    by finite, wrong amounts, where optax's square root shows NaN. A checked value never
    gives one: ``moment`` is returned as it is, and the step's program is unchanged."""
    if concrete_value(hyperparameter) is not None:
        return moment
    return jax.numpy.where(moment < 0, jax.numpy.full_like(moment, jax.numpy.nan), moment)
