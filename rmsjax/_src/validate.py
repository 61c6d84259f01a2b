"""Checks of concrete hyperparameters, made where an optimizer is built.

Values that are traced (inside ``jit``, ``grad`` or ``vmap``, for meta-learning) and
schedules (callables) pass unchecked: their values are not known when the optimizer is
built, and checking them at run time would cost a host round trip every step.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NoReturn

import jax
import numpy as np


def concrete_value(value: Any) -> float | None:
    """The value as a python float, or None when it is traced or not a real scalar."""
    if value is None or callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # not something numpy can read (an abstract value, say)
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        return None
    return None if np.iscomplexobj(array) else float(array)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float(value: Any) -> Any:
    """An integer (Python, NumPy or JAX, traced too) as a float; any other value as it
    is. Hyperparameters of any real dtype are numbers, but arithmetic keeps an integer's
    dtype: ``-1 * np.uint8(2)`` raises, ``jnp.uint8(0) - 2`` wraps around to 254, a
    NumPy int64 of 2**32 is 0 under ``jit`` (int32), and a Python int beyond int32
    raises an OverflowError inside the step. Call it after the checks (which refuse
    integers beyond float32)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.integer):
        return value
    if isinstance(value, jax.Array):
        return value.astype(jax.numpy.float32)
    return float(value)


def is_real_dtype(dtype: Any) -> bool:
    """An integer or floating dtype: not bool (True stepped as 1), not complex (its
    imaginary part would be dropped)."""
    return bool(
        jax.numpy.issubdtype(dtype, jax.numpy.integer)
        or jax.numpy.issubdtype(dtype, jax.numpy.floating)
    )


def _shown(value: Any) -> str:
    """``repr(value)``, but a concrete JAX scalar as its number and dtype (``1.5
    (float32 array)``, not ``Array(1.5, dtype=float32)``: inject_hyperparams hands its
    values to the optimizer as arrays)."""
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        numeric = jax.numpy.issubdtype(value.dtype, jax.numpy.number) or value.dtype == bool
        if value.shape == () and numeric:  # not a PRNG key (no item()), say
            return f"{value.item()!r} ({value.dtype} array)"
    return repr(value)


def _fail(function: str, argument: str, allowed: str, value: Any) -> NoReturn:
    raise ValueError(f"rmsjax.{function}: {argument} must be {allowed}, got {_shown(value)}")


def _wrong_type(function: str, argument: str, allowed: str, value: Any) -> NoReturn:
    raise TypeError(
        f"rmsjax.{function}: {argument} must be {allowed}, got {_shown(value)} "
        f"({type(value).__name__})"
    )


def read_number(function: str, argument: str, value: Any, *, schedule: bool = False):
    """A hyperparameter as a python float, or None when it is traced (or a schedule,
    where ``schedule`` allows one).

    Raises TypeError for what is not a real number (a bool, a string, None, a list, a
    complex number, a function where no schedule is allowed) and ValueError for an
    array that is not a scalar, naming the function, the argument and the value.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    allowed = "a real number or a schedule" if schedule else "a real number"
    if callable(value):
        if schedule:
            return None
        _wrong_type(function, argument, allowed, value)
    if value is None or isinstance(value, (bool, np.bool_, str, bytes, list, tuple, dict)):
        _wrong_type(function, argument, allowed, value)
    if not isinstance(value, (int, float, np.generic, np.ndarray, jax.Array)):
        # a torch or TensorFlow tensor reads as a number here, but not inside the step
        kind = type(value).__name__
        _wrong_type(function, argument, f"{allowed} (float({argument}) converts a {kind})", value)
    if isinstance(value, int):  # beyond int64 NumPy would make it an object array
        try:
            return float(value)
        except OverflowError:  # beyond float64 (it is no infinity: say so)
            pass
        _fail(function, argument, f"finite in float32 (at most {FLOAT32_MAX:.8g})", value)
    try:
        array = np.asarray(value)
    except Exception:  # not something numpy can read (an abstract value, say)
        _wrong_type(function, argument, allowed, value)
    # integers and floats, bfloat16 and the other ml_dtypes floats included
    if not (
        np.issubdtype(array.dtype, np.integer)
        or jax.numpy.issubdtype(array.dtype, jax.numpy.floating)
    ):
        _wrong_type(function, argument, allowed, value)
    if array.shape != ():
        _fail(function, argument, f"a scalar, not an array of shape {array.shape}", value)
    return float(array)


def _check_representable(function: str, argument: str, number: float, value: Any) -> None:
    """Rejects infinities, and values that overflow float32 (the dtype the step
    computes in unless x64 is on), where they would turn every update infinite."""
    if math.isinf(number):
        _fail(function, argument, "a finite number", value)
    if abs(number) > FLOAT32_MAX and not jax.config.read("jax_enable_x64"):
        _fail(function, argument, f"finite in float32 (at most {FLOAT32_MAX:.8g})", value)


def check_range(
    function: str,
    argument: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    schedule: bool = False,
) -> None:
    """Raises ValueError unless ``low <= value <= high`` (bounds open where asked) and
    the value is finite in float32; TypeError unless it is a real scalar (see
    :func:`read_number`).

    NaN always fails. The message names the function, the argument, the range and the
    value, e.g. ``rmsjax.rmsprop: decay must be in [0, 1), got 1.5``.
    """
    number = read_number(function, argument, value, schedule=schedule)
    if number is None:
        return
    too_low = low is not None and (number < low or (low_open and number == low))
    too_high = high is not None and (number > high or (high_open and number == high))
    if math.isnan(number) or too_low or too_high:
        allowed = describe_range(low, high, low_open, high_open)
        if math.isnan(number):  # ("must be >= 0, got nan" read as if NaN were out of range)
            allowed = f"a number {allowed} (not NaN)"
        _fail(function, argument, allowed, value)
    _check_representable(function, argument, number, value)
    if low_open and not jax.config.read("jax_enable_x64") and float(np.float32(number)) == low:
        # (1e-46 > 0, but float32 holds it as 0: the bound the step would meet)
        allowed = describe_range(low, high, low_open, high_open)
        _fail(function, argument, f"{allowed} in float32, the dtype the step computes in", value)


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


LARGEST_DECAY = float(np.nextafter(np.float32(1), np.float32(0)))
"""The largest float32 number under 1 (1 - 2^-24): a decay above it rounds to 1 where the
step computes in float32, and ``1 - decay`` (or a bias correction's ``1 - decay**t``) to 0."""


def check_decay(function: str, argument: str, value: Any) -> None:
    """Decay rates: in [0, 1), and under 1 once rounded to float32 (unless x64 is on)."""
    check_range(function, argument, value, 0.0, 1.0, high_open=True)
    number = read_number(function, argument, value)
    if number is not None and number > LARGEST_DECAY and not jax.config.read("jax_enable_x64"):
        _fail(
            function,
            argument,
            f"in [0, 1) and at most {LARGEST_DECAY!r}, the largest float32 number under 1 "
            "(float32 rounds larger ones to 1, where 1 - decay is 0)",
            value,
        )


def check_momentum(function: str, argument: str, value: Any) -> None:
    """Momentum decays: in [0, 1]; 1 (no decay of the buffer) is allowed, as in optax."""
    check_range(function, argument, value, 0.0, 1.0)


def check_nesterov(function: str, momentum: Any, nesterov: Any) -> None:
    """``nesterov=True`` needs a momentum: without one the flag would do nothing."""
    if momentum is None and isinstance(nesterov, (bool, np.bool_)) and nesterov:
        raise ValueError(
            f"rmsjax.{function}: nesterov=True needs a momentum, got momentum=None; "
            "pass a momentum in [0, 1] or nesterov=False"
        )


def check_non_negative(function: str, argument: str, value: Any) -> None:
    check_range(function, argument, value, 0.0)


def check_finite(function: str, argument: str, value: Any) -> None:
    """Any real number that is finite in float32 (see :func:`check_range`)."""
    number = read_number(function, argument, value)
    if number is not None and math.isnan(number):
        _fail(function, argument, "a finite number (not NaN)", value)
    if number is not None:
        _check_representable(function, argument, number, value)


SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)
"""float32's smallest normal number, 2^-126: XLA on a CPU flushes smaller ones to 0."""


def check_normal(function: str, argument: str, value: Any) -> None:
    """Raises ValueError for a concrete positive ``value`` under :data:`SMALLEST_NORMAL`."""
    number = read_number(function, argument, value)
    if number is not None and 0 < number < SMALLEST_NORMAL:
        _fail(function, argument, "at least float32's smallest normal number, 1.1754944e-38", value)


def check_learning_rate(function: str, argument: str, value: Any) -> None:
    """Learning rates: a finite number >= 0, or a schedule, a function of the step count
    (one that cannot take one argument failed inside the first step, unnamed)."""
    check_range(function, argument, value, 0.0, schedule=True)
    check_schedule_signature(function, argument, value)


def check_schedule_signature(function: str, argument: str, value: Any, hint: str = "") -> None:
    """Raises a TypeError where a callable ``value`` cannot be called with one argument,
    the step count (a function that cannot failed inside the first step, unnamed).
    ``hint`` ends the message."""
    if not callable(value):
        return
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin or an object without one: not checked
        return
    try:
        signature.bind(0)
    except TypeError:
        name = getattr(value, "__name__", type(value).__name__)
        raise TypeError(
            f"rmsjax.{function}: {argument} must be a number or a schedule, a function "
            f"of the step count (one argument), got {name}{signature}{hint}"
        ) from None


def check_float_dtype(function: str, argument: str, dtype: Any) -> None:
    """None, or a floating (or complex) dtype of 16 bits or more: state kept in an integer
    dtype would truncate, and 8-bit floats do not mix with float32 arithmetic in JAX."""
    if dtype is None:
        return
    allowed = "None or a floating (or complex) dtype of 16 bits or more"
    if not isinstance(dtype, (str, type, np.dtype)):  # an array or a number has a dtype too
        _wrong_type(function, argument, allowed, dtype)
    try:
        resolved = np.dtype(jax.numpy.dtype(dtype))
    except TypeError:
        _wrong_type(function, argument, allowed, dtype)
    if not jax.numpy.issubdtype(resolved, jax.numpy.inexact) or resolved.itemsize < 2:
        # (shown by its name: jnp.int32 is a class whose repr names its module)
        raise ValueError(f"rmsjax.{function}: {argument} must be {allowed}, got {resolved.name}")


INT32_MAX = 2**31 - 1
"""The largest count: step counts are int32 arrays in the state."""


def check_count(
    function: str, argument: str, value: Any, minimum: int = 1, allow_none: bool = False
) -> None:
    """A Python or NumPy integer of at least ``minimum`` (``None`` too, where it means
    "choose for me"): how many steps, leaves, entries or errors. A bool is refused."""
    if value is None and allow_none:
        return
    allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not integer:  # a bool, float, string, None, ...: the wrong type, as range(2.0) says
        if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0:
            _fail(function, argument, allowed, value)  # not a scalar
        if isinstance(value, jax.Array):  # a count injected by inject_hyperparams, say
            allowed += " (a Python integer: under inject_hyperparams, name it in static_args)"
        _wrong_type(function, argument, allowed, value)
    if value < minimum:
        _fail(function, argument, allowed, value)
    if value > INT32_MAX:  # steps are counted in int32: a larger one fails inside a step
        _fail(function, argument, f"at most {INT32_MAX} (2**31 - 1)", value)


def check_bool(function: str, argument: str, value: Any) -> None:
    """A flag: True or False (NumPy's too); anything else is the wrong type."""
    if not isinstance(value, (bool, np.bool_)):
        _wrong_type(function, argument, "True or False", value)


def check_real_array(function: str, argument: str, value: Any) -> None:
    """An array (or anything ``numpy.asarray`` reads) of real numbers: floating, integer
    or bool. A complex array would lose its imaginary part."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(value).dtype
        except Exception:
            _wrong_type(function, argument, "an array of real numbers", value)
    jnp = jax.numpy
    if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)):
        raise TypeError(
            f"rmsjax.{function}: {argument} must be an array of real numbers (floating, "
            f"integer or bool), got an array of dtype {np.dtype(dtype).name}"
        )


def check_instance(
    function: str, argument: str, value: Any, kind: type | tuple[type, ...], allowed: str
) -> None:
    if not isinstance(value, kind):
        _wrong_type(function, argument, allowed, value)


def check_transformation(function: str, argument: str, value: Any) -> None:
    """An optimizer: anything with callable ``init`` and ``update``, as rmsjax's and
    optax's gradient transformations are."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        _wrong_type(
            function,
            argument,
            "a GradientTransformation (with init and update, from rmsjax or optax)",
            value,
        )


def check_callable(function: str, argument: str, value: Any) -> None:
    if not callable(value):
        _wrong_type(function, argument, "callable", value)
