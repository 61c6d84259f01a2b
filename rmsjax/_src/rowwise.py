"""Row-wise Adagrad: one accumulator per row, for embedding tables."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from rmsjax._src import base, combine, elementwise, fusion, moments, numerics, scaling, validate
from rmsjax._src import storage as storage_lib


class ScaleByRowwiseRssState(NamedTuple):
    """State of :func:`scale_by_rowwise_rss`.

    Attributes:
      sum_of_squares: per parameter, a float32 array of shape ``param.shape[:-1]``: the
        running sum over steps of each row's mean squared gradient (full-shaped for
        scalars and vectors, which are accumulated element by element).
    """

    sum_of_squares: base.Updates


def _is_rowwise(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


def scale_by_rowwise_rss(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> base.GradientTransformation:
    r"""Divides each row of the updates by the root of a running sum of row-mean
    squared gradients: Adagrad with one accumulator per row.

    For a parameter with two or more axes, a *row* is a slice along its last axis
    (a row of an embedding table, of width :math:`D`); for row :math:`r`:

    .. math::

        a_{r,t} = a_{r,t-1} + \frac{1}{D}\sum_{j=1}^{D} g_{t,rj}^2, \qquad
        u_{t,rj} = g_{t,rj} / (\sqrt{a_{r,t}} + \epsilon)

    as FBGEMM's and TorchRec's row-wise Adagrad compute it. Scalars and vectors have no
    rows and keep one accumulator per element (plain Adagrad). The accumulators are
    float32 whatever the parameters' dtype: :math:`4/D` bytes per parameter of a table.
    Where an accumulator is zero (only zero gradients so far, with a zero initial value)
    the update is zero.

    Args:
      initial_accumulator_value: :math:`a_0` >= 0 (FBGEMM and TorchRec use 0).
      eps: :math:`\epsilon` >= 0, added outside the root.

    Returns:
      A :class:`GradientTransformation` with state :class:`ScaleByRowwiseRssState`.

    .. warning:: a row that gets gradient in only a few of its entries (a sparse
       update) still adds its mean to the whole row's accumulator; this is the
       intended behaviour for embedding rows, not for dense layers with
       heterogeneous columns.

    The state keeps no row length: ``update(g, state)`` without ``params`` cannot
    tell a gradient of another width (``(n, 1)`` for an ``(n, D)`` table) from the
    table's own, and steps it. Pass ``params`` (as :func:`update_and_apply` and
    :func:`make_train_step` do) to have every leaf's shape checked.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.scale_by_rowwise_rss(eps=0.0)
    >>> g = jnp.array([[1.0, 7.0], [0.0, 0.0]])  # row means of g*g: 25 and 0
    >>> tx.update(g, tx.init(g))[0]
    Array([[0.2, 1.4],
           [0. , 0. ]], dtype=float32)

    References:
      Duchi, Hazan and Singer, JMLR 12 (2011); FBGEMM's
      ``EXACT_ROWWISE_ADAGRAD`` and TorchRec's ``RowWiseAdagrad``.
    """
    name = "scale_by_rowwise_rss"
    validate.check_non_negative(name, "initial_accumulator_value", initial_accumulator_value)
    validate.check_non_negative(name, "eps", eps)
    initial_accumulator_value, eps = map(validate.as_float, (initial_accumulator_value, eps))
    return fusion.rule_transformation(rowwise_rss_rule(initial_accumulator_value, eps))


def rowwise_rss_rule(initial_accumulator_value: Any, eps: Any) -> elementwise.LeafRule:
    """The per-leaf form of :func:`scale_by_rowwise_rss` (unchecked arguments)."""
    name = "scale_by_rowwise_rss"

    def accumulator_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:-1] if _is_rowwise(shape) else shape

    def init_leaf(param):
        shape = accumulator_shape(tuple(jnp.shape(param)))
        return (jnp.full(shape, storage_lib.moment_fill(initial_accumulator_value), jnp.float32),)

    def update_leaf(g, slots, context, param):
        del context, param
        shape = tuple(jnp.shape(g))
        dtype = numerics.compute_dtype(g.dtype)
        g_c = g.astype(dtype)
        rowwise = _is_rowwise(shape)

        def squares(x):
            if not rowwise:
                return x * x
            if shape[-1] == 0:  # rows without elements: no squares to add (not 0 / 0)
                return jnp.zeros(shape[:-1], x.dtype)
            return jnp.mean(x * x, axis=-1)

        def add(square, total):  # FBGEMM's order: the accumulator first
            return total + square

        # The accumulator in numerics' encoding: itself in range, scaled outside it,
        # so that no gradient's square overflows or underflows (see numerics.py).
        moment = moments.accumulate(slots[0], g_c, add, eps, False, dtype, squares)
        scale, value = moment.scale, moment.value
        nonzero = jnp.any(g_c != 0, axis=-1) if rowwise else g_c != 0
        seen = moments.ever_nonzero(moment, nonzero, eps)
        scaling_ = jnp.where(seen, 1 / (numerics.sqrt(value) + moment.eps_linear), 0.0)
        if rowwise:
            scaling_, scale = scaling_[..., None], scale[..., None]
        return (scaling_ * (g_c * scale)).astype(g.dtype), (moment.stored,)

    def accumulator_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
        # one sum per row (the last axis reduced), or per element for a vector
        return tuple(range(len(accumulator_shape(shape))))

    return elementwise.declared_rule(
        name,
        ScaleByRowwiseRssState,
        (elementwise.Slot("sum_of_squares", accumulator_axes),),
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        complex_refusal="the row-wise sum is written for real leaves",
    )


def rowwise_adagrad(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> base.GradientTransformation:
    r"""Row-wise Adagrad (FBGEMM, TorchRec): Adagrad with one float32 accumulator per row
    of each embedding table, :math:`4/D` bytes of state per parameter for rows of width
    :math:`D`.

    ``chain(scale_by_rowwise_rss(initial_accumulator_value, eps),
    scale_by_learning_rate(learning_rate))``:

    .. math::

        a_{r,t} = a_{r,t-1} + \operatorname{mean}_j g_{t,rj}^2, \qquad
        \theta_{t,rj} = \theta_{t-1,rj} - \eta\,g_{t,rj} / (\sqrt{a_{r,t}} + \epsilon)

    Scalars and vectors (biases) keep one accumulator per element.

    Args:
      learning_rate: :math:`\eta`, a scalar >= 0 or a schedule.
      initial_accumulator_value: :math:`a_0` >= 0.
      eps: :math:`\epsilon` >= 0, outside the root.

    Returns:
      A :class:`GradientTransformation`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.rowwise_adagrad(0.1)
    >>> table = jnp.zeros((1000, 64))
    >>> state = tx.init(table)
    >>> state[0].sum_of_squares.shape  # one float32 per row
    (1000,)

    References:
      Duchi, Hazan and Singer, JMLR 12 (2011); FBGEMM (``EXACT_ROWWISE_ADAGRAD``);
      TorchRec (``RowWiseAdagrad``).
    """
    name = "rowwise_adagrad"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    validate.check_non_negative(name, "initial_accumulator_value", initial_accumulator_value)
    validate.check_non_negative(name, "eps", eps)
    return combine.named_chain(
        name,
        scale_by_rowwise_rss(initial_accumulator_value, eps),
        scaling.scale_by_learning_rate(learning_rate),
    )
