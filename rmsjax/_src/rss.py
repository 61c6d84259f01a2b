"""``scale_by_rss``: Adagrad's running sum of squared gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from rmsjax._src import base, elementwise, fusion, moments, numerics, validate
from rmsjax._src import storage as storage_lib


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`.

    Attributes:
      sum_of_squares: the running sum of squared gradients, one array per parameter,
        starting at ``initial_accumulator_value`` (a :class:`QuantizedArray` for large
        parameters with ``storage="int8"``).
      count: with ``storage="int8"`` or ``"bfloat16"``, the number of updates so far
        (int32 scalar, saturating), which varies the sums' rounding from step to step;
        else None. (Last, so that ``ScaleByRssState(sum_of_squares)`` still builds
        the state of the other options.)
    """

    sum_of_squares: base.Updates
    count: Any = None


def scale_by_rss(
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    eps_in_sqrt: bool = True,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""Divides updates by the root of the running sum of squared gradients (Adagrad).

    For each element:

    .. math::

        s_t = s_{t-1} + g_t^2, \qquad
        u_t = g_t / \sqrt{s_t + \epsilon}\ \ (\text{or } g_t / (\sqrt{s_t} + \epsilon))

    Where the sum is zero (a zero initial value and only zero gradients so far) the
    update is zero, as in optax, whatever ``eps`` is. Arithmetic is in float32 for
    half-precision leaves; the state keeps each parameter's dtype unless ``storage`` says
    otherwise.

    Args:
      initial_accumulator_value: :math:`s_0` >= 0 (optax, Keras and TF1 use 0.1,
        torch 0).
      eps: :math:`\epsilon` >= 0, inside the root (optax, Keras) or outside (torch).
      eps_in_sqrt: where ``eps`` goes.
      storage: how the sum is kept between steps: None (each parameter's dtype),
        ``"float32"``, ``"bfloat16"``, or ``"int8"`` (8-bit block-wise, 1.016 bytes per
        element on whole blocks, for parameters of 4096 elements or more; :math:`\sqrt{s}` is
        quantized). The step itself always computes in float32 or wider; see
        docs/memory.md.

    Returns:
      A :class:`GradientTransformation` with state :class:`ScaleByRssState`.

    .. warning:: the peers differ in the initial accumulator and in where ``eps`` goes;
       see :mod:`rmsjax.compat` for exact presets.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
    >>> state = tx.init(jnp.zeros(3))
    >>> tx.update(jnp.array([2.0, -0.5, 0.0]), state)[0]
    Array([ 1., -1.,  0.], dtype=float32)

    References:
      Duchi, Hazan and Singer, Adaptive Subgradient Methods for Online Learning and
      Stochastic Optimization, JMLR 12 (2011).
    """
    check_arguments("scale_by_rss", initial_accumulator_value, eps, eps_in_sqrt, storage)
    initial_accumulator_value, eps = map(validate.as_float, (initial_accumulator_value, eps))
    return fusion.rule_transformation(
        rss_rule(initial_accumulator_value, eps, eps_in_sqrt, storage)
    )


def check_arguments(
    function: str, initial_accumulator_value: Any, eps: Any, eps_in_sqrt: Any, storage: Any
) -> None:
    """The checks of :func:`scale_by_rss`' arguments, made by it and by :func:`adagrad`
    (whose errors name ``function``, the one the user called)."""
    validate.check_non_negative(function, "initial_accumulator_value", initial_accumulator_value)
    validate.check_non_negative(function, "eps", eps)
    validate.check_bool(function, "eps_in_sqrt", eps_in_sqrt)
    storage_lib.check_storage(function, storage)


def _add(square, total):  # Adagrad's sum, in the order optax computes it
    return square + total


def rss_rule(
    initial_accumulator_value: Any, eps: Any, eps_in_sqrt: bool, storage: base.Storage | None = None
) -> elementwise.LeafRule:
    """The per-leaf form of :func:`scale_by_rss` (unchecked arguments)."""
    read_back = storage_lib.reads_back(storage)
    # A low-precision sum is rounded without bias, with a random number that must
    # change from step to step even where the gradient does not (rounding.dither).
    counted = storage in ("int8", "bfloat16")

    def init_leaf(param):
        return (storage_lib.init_slot(param, initial_accumulator_value, storage, signed=False),)

    def step_shared(count):
        count = numerics.safe_increment(count)
        return count, count

    def update_leaf(g, slots, context, param):
        del param
        count = context if counted else None  # the step count (step_shared) salts it
        dtype = numerics.compute_dtype(g.dtype)
        g_c = g.astype(dtype)
        # The sum in numerics' encoding: itself in range, scaled outside it.
        moment = moments.accumulate(
            slots[0], g_c, _add, eps, eps_in_sqrt, dtype, read_back=read_back, salt=count
        )
        value = moment.value
        seen = moments.ever_nonzero(moment, g_c != 0, eps)
        # int8 state: recomputed where a following int8 momentum encodes it (see
        # numerics.inverse_root)
        scaling = numerics.inverse_root(
            value, moment.eps_squared, moment.eps_linear, eps_in_sqrt, moment.inline
        )
        scaling = jnp.where(seen, scaling, 0.0)
        update = scaling * moment.scaled(g_c)
        # as optax's: the wider of the gradient's dtype and the state's
        out = storage_lib.update_dtype(g, slots, storage)
        return update.astype(out), (moment.stored,)

    rule = elementwise.declared_rule(
        "scale_by_rss",
        ScaleByRssState,
        (elementwise.Slot("sum_of_squares"),),
        shared_field="count" if counted else None,
        init_shared=numerics.zero_count if counted else None,
        step_shared=step_shared if counted else None,
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        complex_refusal=storage_lib.complex_refusal(storage),
    )
    return storage_lib.checking_moment_slots(rule, "sum_of_squares", storage, counted)
