"""Momentum: ``trace`` (heavy ball, Nesterov) and ``ema`` (a decaying average)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, fusion, moments, numerics, step_checks, validate
from rmsjax._src import storage as storage_lib


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer, one array per parameter (a
    :class:`QuantizedArray` for large parameters with ``storage="int8"``)."""

    trace: base.Updates


class EmaState(NamedTuple):
    """State of :func:`ema`: the step count and the decaying average."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's
    ema: base.Updates


def _zero_buffer(name: str, param: Any, accumulator_dtype: Any) -> jax.Array:
    dtype = step_checks.accumulator_dtype_for(name, param, accumulator_dtype)
    return jnp.zeros(jnp.shape(param), dtype)


def trace(
    decay: float,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""Heavy-ball momentum: :math:`b_t = g_t + \beta\,b_{t-1}`, and the update is
    :math:`b_t` (or :math:`g_t + \beta\,b_t` with ``nesterov=True``).

    Placed after ``scale_by_learning_rate`` (as in :func:`rmsprop`) the learning rate sits
    inside the buffer (Keras, TF1, optax); placed before it, outside (torch). The two
    agree for a constant learning rate and differ under a schedule.

    Args:
      decay: :math:`\beta`, in [0, 1] (1 keeps every past update at full weight, as
        optax allows).
      nesterov: use Nesterov's form.
      accumulator_dtype: dtype of the buffer; None keeps each parameter's dtype.
      storage: how the buffer is kept between steps: None (``accumulator_dtype``, or
        each parameter's dtype), ``"float32"``, ``"bfloat16"``, or ``"int8"`` (8-bit
        block-wise with a signed code, 1.016 bytes per element on whole blocks, for parameters of
        4096 elements or more; see docs/memory.md). Give ``accumulator_dtype`` or
        ``storage``, not both.

    Returns:
      A :class:`GradientTransformation` with state :class:`TraceState`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.trace(decay=0.5)
    >>> state = tx.init(jnp.zeros(1))
    >>> u, state = tx.update(jnp.ones(1), state)
    >>> tx.update(jnp.ones(1), state)[0]
    Array([1.5], dtype=float32)
    """
    validate.check_momentum("trace", "decay", decay)
    validate.check_bool("trace", "nesterov", nesterov)
    validate.check_float_dtype("trace", "accumulator_dtype", accumulator_dtype)
    storage_lib.check_storage("trace", storage)
    if storage is not None and accumulator_dtype is not None:
        raise ValueError(
            "rmsjax.trace: accumulator_dtype must be None when storage is given, got "
            f"accumulator_dtype={accumulator_dtype!r} and storage={storage!r}; pass one of them."
        )

    decay = validate.as_float(decay)
    read_back = storage_lib.reads_back(storage)

    def init_leaf(param):
        if storage is not None:
            return (storage_lib.init_slot(param, 0.0, storage, signed=True),)
        return (_zero_buffer("trace", param, accumulator_dtype),)

    def update_leaf(g, slots, context, param):
        del context, param
        dtype = numerics.compute_dtype(g.dtype)
        g_c = g.astype(dtype)
        new = g_c + decay * storage_lib.load(slots[0], dtype)
        stored, new = storage_lib.keep(new, slots[0], read_back)
        update = g_c + decay * new if nesterov else new
        # in the dtype optax's g + decay * trace has: the wider of the two
        out = storage_lib.update_dtype(g, slots, storage)
        return update.astype(out), (stored,)

    return fusion.rule_transformation(
        elementwise.declared_rule(
            "trace",
            TraceState,
            (elementwise.Slot("trace"),),
            init_leaf=init_leaf,
            update_leaf=update_leaf,
            complex_refusal=storage_lib.complex_refusal(storage),
        )
    )


def optional_trace(
    function: str, momentum: Any, nesterov: bool, **kwargs: Any
) -> base.GradientTransformation:
    """The momentum part of an alias: ``trace(momentum, nesterov, **kwargs)``, or an
    :func:`identity` when ``momentum`` is None, so that the alias's state keeps the same
    layout with momentum or without. Checks name ``function``, the alias called."""
    validate.check_nesterov(function, momentum, nesterov)
    if momentum is None:
        return fusion.identity()
    validate.check_momentum(function, "momentum", momentum)
    return trace(decay=momentum, nesterov=nesterov, **kwargs)


def ema(
    decay: float, debias: bool = True, accumulator_dtype: Any = None
) -> base.GradientTransformation:
    r"""A decaying average of the updates: :math:`m_t = \beta\,m_{t-1} + (1-\beta)\,g_t`,
    returned as :math:`m_t / (1-\beta^t)` when ``debias=True``.

    Args:
      decay: :math:`\beta`, in [0, 1).
      debias: divide by :math:`1-\beta^t` so early averages are not biased to zero.
      accumulator_dtype: dtype of the average; None keeps each parameter's dtype.

    Returns:
      A :class:`GradientTransformation` with state :class:`EmaState`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.ema(decay=0.9)
    >>> tx.update(jnp.full(1, 2.0), tx.init(jnp.zeros(1)))[0]  # 0.1 * 2 / (1 - 0.9)
    Array([1.9999995], dtype=float32)
    """
    validate.check_decay("ema", "decay", decay)
    validate.check_bool("ema", "debias", debias)
    validate.check_float_dtype("ema", "accumulator_dtype", accumulator_dtype)
    decay = validate.as_float(decay)

    def step_shared(count):
        count = numerics.safe_increment(count)
        return count, numerics.bias_correction_factor(decay, count) if debias else None

    def init_leaf(param):
        return (_zero_buffer("ema", param, accumulator_dtype),)

    def update_leaf(g, slots, correction, param):
        del param
        dtype = numerics.compute_dtype(g.dtype)
        new = moments.decaying_average(g.astype(dtype), slots[0].astype(dtype), decay)
        update = new if correction is None else moments.debiased(new, correction.astype(dtype))
        out = jnp.result_type(g, storage_lib.slot_dtype(slots[0]))  # as optax's: the wider
        return update.astype(out), (storage_lib.store(new, slots[0]),)

    return fusion.rule_transformation(
        elementwise.declared_rule(
            "ema",
            EmaState,
            (elementwise.Slot("ema"),),
            shared_field="count",
            init_shared=numerics.zero_count,
            step_shared=step_shared,
            init_leaf=init_leaf,
            update_leaf=update_leaf,
        )
    )
