"""``inject_hyperparams``: hyperparameters as arrays in the state, changeable per step."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import (
    base,
    combine,
    elementwise,
    fusion,
    numerics,
    sharding,
    step_checks,
    validate,
)
from rmsjax._src.hyperparams_state import (
    Hyperparams,
    InjectHyperparamsState,
    check_entries,
    fits_int32,
    is_integer,
    refuse_lost,
)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    if isinstance(value, (jax.Array, np.ndarray)):
        return jnp.issubdtype(value.dtype, jnp.number) and not jnp.issubdtype(
            value.dtype, jnp.bool_
        )
    return False


def _is_stateful_schedule(value: Any) -> bool:
    return callable(value) and all(callable(getattr(value, m, None)) for m in ("init", "update"))


def _float_dtype(tree: Any, hyperparam_dtype: Any) -> Any:
    """The dtype of real hyperparameters: ``hyperparam_dtype``, else float32, or wider
    when a leaf of ``tree`` is wider (float64 parameters under x64)."""
    if hyperparam_dtype is not None:
        return hyperparam_dtype
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, (str, bytes)) or callable(leaf):
            continue  # no array: the inner optimizer names it (result_type read 'abc' as a dtype)
        leaf_dtype = jnp.result_type(leaf)
        if jnp.issubdtype(leaf_dtype, jnp.inexact) and not base.is_eight_bit_float(
            leaf_dtype
        ):  # (an 8-bit float leaf: the inner optimizer refuses it by name)
            dtype = jnp.promote_types(dtype, jnp.finfo(leaf_dtype).dtype)
    return dtype


def _not_a_schedule(key: str) -> str:
    """The end of a message about a callable argument that does not act as a schedule."""
    return f"; a function that is no schedule goes in static_args=({key!r},)"


def _refusal_as_given(build: Callable, values: Callable[[], dict]) -> None:
    """Raises the inner factory's refusal of ``values()`` (the caller's own numbers), or
    their own refusal (a schedule's value), alone: no second traceback of the build
    refused first. Anything else either does is no concern here."""
    try:
        build(values())
    except (TypeError, ValueError) as refusal:
        raise refusal from None
    except Exception:  # noqa: BLE001, S110  (a factory that needs arrays, say)
        pass


def inject_hyperparams(
    inner_factory: Callable[..., base.GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., base.GradientTransformation]:
    """Wraps an optimizer factory so that its numeric hyperparameters live in the state.

    ``inject_hyperparams(rj.rmsprop)(learning_rate=1e-3, decay=0.9)`` is a transformation
    that behaves as ``rj.rmsprop(1e-3, decay=0.9)``, but keeps ``learning_rate`` and
    ``decay`` as scalar arrays in ``state.hyperparams``. Each ``update`` rebuilds the
    optimizer from the values in the state, so you can read them (for logging) or replace
    them between steps (a learning-rate finder, a manual decay on plateau) and a jitted
    step sees new values of the same shape and dtype: it is not traced again.

    Arguments are sorted by their value, as optax sorts them:

    * python floats and float arrays are stored as ``hyperparam_dtype``; by default
      float32 (or float64 for float64 parameters), never a half-precision dtype, so a
      bfloat16 model does not round its learning rate to 3 significant digits; python
      ints are stored as int32;
    * callables (schedules, see :mod:`rmsjax.schedules`) are evaluated at the step count
      on every update, and their current value is stored, to be logged; a stateful
      schedule (an object with ``init()``, ``update(state, **extra)`` and
      ``__call__(state, **extra)``, as optax's ``StatefulSchedule``) keeps its state in
      ``state.hyperparams_states`` and sees the keyword extras of ``update``;
    * bools, None, strings, the names in ``static_args`` and python ints left at their
      default (a size that shapes the state, as ``factored_rmsprop``'s
      ``min_dim_size_to_factor``) are passed unchanged and fixed for the life of the
      optimizer. Unlike optax, which injects integer defaults too and so cannot rebuild
      such a factory under ``jit``.

    Args:
      inner_factory: a function returning a :class:`GradientTransformation`, such as
        :func:`rmsprop`, :func:`adagrad` or your own.
      static_args: a name, or names, of arguments to pass through unchanged: numeric
        ones that decide the state's structure or shapes, and callables that are not
        schedules (the ``mask`` of :func:`add_decayed_weights`, say), which would
        otherwise be called with the step count.
      hyperparam_dtype: the dtype of real-valued hyperparameters in the state, a
        floating dtype; None for float32 (float64 for float64 parameters). A
        half-precision one rounds them as it stores them: in float16 an ``eps`` of 1e-8
        is 0, in bfloat16 a decay of 0.9 is 0.8984.

    Returns:
      A function with ``inner_factory``'s signature that returns a
      :class:`GradientTransformation` with state :class:`InjectHyperparamsState`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, decay=0.9)
    >>> state = tx.init(jnp.ones(2, jnp.bfloat16))
    >>> state.hyperparams["learning_rate"]
    Array(0.1, dtype=float32)
    >>> state.hyperparams["learning_rate"] = 0.01  # stored as float32
    >>> updates, state = tx.update(jnp.ones(2, jnp.bfloat16), state)
    >>> updates
    Array([-0.0314941, -0.0314941], dtype=bfloat16)
    """
    name = "inject_hyperparams"
    if not callable(inner_factory):
        raise TypeError(f"rmsjax.{name}: inner_factory must be callable, got {inner_factory!r}")
    if isinstance(static_args, str):
        static_args = (static_args,)
    try:
        static_args = tuple(static_args)
    except TypeError:
        raise TypeError(
            f"rmsjax.{name}: static_args must be a name or an iterable of names, got "
            f"{static_args!r}"
        ) from None
    if not all(isinstance(arg, str) for arg in static_args):
        raise TypeError(f"rmsjax.{name}: static_args must hold names (str), got {static_args!r}")
    signature = inspect.signature(inner_factory)
    factory_name = getattr(inner_factory, "__name__", "the factory")
    unknown = set(static_args) - set(signature.parameters)
    if unknown:
        raise ValueError(
            f"rmsjax.{name}: static_args must name arguments of {factory_name}, got "
            f"{sorted(unknown)}; its arguments are {list(signature.parameters)}"
        )
    if hyperparam_dtype is not None:
        try:
            resolved = jnp.dtype(hyperparam_dtype)
        except TypeError:
            resolved = None
        if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
            raise ValueError(
                f"rmsjax.{name}: hyperparam_dtype must be None or a floating dtype, "
                f"got {hyperparam_dtype!r}"
            )
        hyperparam_dtype = resolved

    @functools.wraps(inner_factory)
    def wrapped(*args: Any, **kwargs: Any) -> base.GradientTransformation:
        where = f"{name}({factory_name})"
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"rmsjax.{where}: {error}; its arguments are {list(signature.parameters)}"
            ) from None
        passed = set(bound.arguments)
        bound.apply_defaults()
        schedules, stateful, numeric, fixed = {}, {}, {}, {}
        for key, value in bound.arguments.items():
            # an integer left at its default is a size or a count that shapes the
            # state (factored_rmsprop's min_dim_size_to_factor): it stays static
            default_count = key not in passed and is_integer(value)
            if key in static_args or isinstance(value, (bool, np.bool_)) or default_count:
                fixed[key] = value
            elif _is_stateful_schedule(value):
                stateful[key] = value
            elif callable(value):
                validate.check_schedule_signature(where, key, value, _not_a_schedule(key))
                schedules[key] = value
            elif _is_numeric(value):
                numeric[key] = value
            else:
                fixed[key] = value

        def cast(key, value, dtype):
            # ints stay int32 and real numbers take the float dtype, whatever comes in;
            # a copy, so that the state never holds the caller's array (a donated step
            # would delete it) nor one buffer twice (a donated step refuses it)
            if key in numeric and is_integer(numeric[key]) and fits_int32(value):
                return jnp.array(value, jnp.int32, copy=True)
            with np.errstate(over="ignore"):  # (a value the dtype cannot hold is refused)
                return jnp.array(value, dtype, copy=True)

        def template(key, dtype):
            # an entry's shape and dtype, as cast gives it (for check_entries)
            integer = is_integer(numeric[key]) and fits_int32(numeric[key])
            return np.zeros((), np.int32 if integer else dtype)

        def values_at(count, stored, schedule_states, dtype, extra):
            values = {key: cast(key, value, dtype) for key, value in stored.items()}
            for key, schedule in schedules.items():
                # (optax calls a mask function with the count too, and masks nothing)
                hint = _not_a_schedule(key)
                value = step_checks.scalar_schedule_value(where, key, schedule(count), hint)
                values[key] = cast(key, value, dtype)
            for key, schedule in stateful.items():
                value = schedule(schedule_states[key], **extra)
                values[key] = cast(key, step_checks.scalar_schedule_value(where, key, value), dtype)
            return values

        def build(values):
            return inner_factory(**fixed, **values)

        # Build once now, so that bad values fail where the optimizer is made.
        zero = jnp.zeros([], jnp.int32)
        fresh_states = {key: s.init() for key, s in stateful.items()}
        with elementwise.naming_wrapper(where, None):
            try:
                first = build(values_at(zero, numeric, fresh_states, jnp.float32, {}))
            except (TypeError, ValueError):
                # refused: again with the numbers as given, so that the message shows them
                # as the caller wrote them (1 - 2**-25 is 1.0 in float32, and was shown so)
                _refusal_as_given(
                    build,
                    lambda: {**values_at(zero, {}, fresh_states, jnp.float32, {}), **numeric},
                )
                raise
        validate.check_transformation(where, "inner_factory's result", first)

        def init_fn(params):
            dtype = _float_dtype(params, hyperparam_dtype)

            def fresh():
                schedule_states = {key: s.init() for key, s in stateful.items()}
                values = values_at(zero, numeric, schedule_states, dtype, {})
                return jnp.zeros([], jnp.int32), Hyperparams(values), schedule_states

            # the count and hyperparameters are replicated over the parameters' mesh
            count, values, schedule_states = sharding.init_shared_like(
                fresh, jax.tree.leaves(params)
            )
            for key, given in numeric.items():  # (the stored values may be traced)
                refuse_lost(f"{where}.init", key, given, jnp.result_type(values[key]))
            with elementwise.naming_wrapper(where, "init"):
                inner_state = build(dict(values)).init(params)
            return InjectHyperparamsState(count, values, schedule_states, inner_state)

        def step(updates, state, params, extra, apply):
            elementwise.expect_state(where, state, InjectHyperparamsState)
            unknown = set(state.hyperparams) - set(numeric) - set(schedules) - set(stateful)
            if unknown:
                raise KeyError(
                    f"rmsjax.{where}.update: state.hyperparams holds "
                    f"{sorted(unknown)}, which this optimizer does not inject; its "
                    f"hyperparameters are {sorted(set(numeric) | set(schedules) | set(stateful))}"
                )
            dtype = _float_dtype(updates, hyperparam_dtype)
            step_checks.check_step_count(where, state.count)
            missing = sorted(set(numeric) - set(state.hyperparams))
            if missing:
                raise KeyError(
                    f"rmsjax.{where}.update: state.hyperparams lacks {missing}, which "
                    f"this optimizer injects; its hyperparameters are {sorted(numeric)}"
                )
            check_entries(state.hyperparams, {key: template(key, dtype) for key in numeric})
            stored = {key: state.hyperparams[key] for key in numeric}
            values = values_at(state.count, stored, state.hyperparams_states, dtype, extra)
            # with apply, the inner optimizer's fused step, when it has one
            with elementwise.naming_wrapper(where, "update"):
                inner = base.with_extra_args_support(build(values))
                new_updates, inner_state = combine.step_of(inner, apply)(
                    updates, state.inner_state, params, **extra
                )
            schedule_states = {
                key: s.update(state.hyperparams_states[key], **extra) for key, s in stateful.items()
            }
            count = numerics.safe_increment(state.count)
            # a state built by hand may hold a plain dict (tree_set's come back as
            # Hyperparams, see the state's flattening): keep the container the state came
            # with, and in a plain dict the numeric entries as they came (a Python float
            # is a weakly typed array: cast, a compiled step would be traced again), so
            # that the state's structure and types (a scan's carry) stay the same
            if isinstance(state.hyperparams, Hyperparams):
                kept: dict = Hyperparams(values)
            else:
                kept = {**values, **{key: jnp.asarray(stored[key]) for key in numeric}}
            return new_updates, InjectHyperparamsState(count, kept, schedule_states, inner_state)

        fuses = fusion.fused_step_of(first) is not None
        return fusion.stepped_wrapper(where, init_fn, step, fuses)

    return wrapped
