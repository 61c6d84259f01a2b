r"""Presets that reproduce PyTorch, Keras 3 and TensorFlow 1 optimizers step for step.

The peers agree on what RMSprop and Adagrad are and disagree on the details: where
``eps`` goes (inside or outside the root), the accumulator's starting value, whether
the learning rate sits inside the momentum buffer, how weight decay couples, and
torch's ``lr_decay``. Each preset here takes its peer's own argument names and
defaults and is a chain of rmsjax's core rules, in the order that reproduces the
peer's arithmetic, plus two small parts the peers need and the core has no use for:

- :func:`decoupled_weight_decay`: Keras' ``p <- p - lr * wd * p`` before the step,
  with the (possibly scheduled) learning rate;
- :func:`inverse_time_decay`: torch Adagrad's ``lr / (1 + (t - 1) * lr_decay)``.

Each preset's chain has the same parts in the same places whatever its arguments; a
part the peer leaves out for these arguments (no momentum, no weight decay, no sign
flip) is held by :func:`rmsjax.identity`, whose state is empty. So the position of, say, the
second-moment state in the state tuple depends only on the preset, and every part is
an elementwise rule: the whole step (and with ``update_and_apply`` the parameter
update) runs in one pass over the pytree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, combine, elementwise, momentum, rms, rss, scaling, validate
from rmsjax._src import storage as storage_lib
from rmsjax._src import weight_decay as weight_decay_lib

# ------------------------------------------------------------------------ small parts


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: the step count its learning rate reads."""

    count: jax.Array


def decoupled_weight_decay(
    weight_decay: float, learning_rate: base.ScalarOrSchedule
) -> base.GradientTransformation:
    r"""Keras' decoupled weight decay: adds :math:`-\eta_t\,\lambda\,\theta` to the updates.

    Keras 3 shrinks every variable by :math:`\theta \leftarrow \theta - \eta_t\lambda\theta`
    before the optimizer's own step, with the learning rate :math:`\eta_t` of that step
    (a schedule is evaluated at the same count as the step's). Placed last in a chain,
    after the learning rate and momentum, the decay term reaches the parameters
    without passing through the second moment or the momentum buffer, which is the
    same thing. Needs ``params`` in ``update``.

    Args:
      weight_decay: :math:`\lambda` >= 0.
      learning_rate: :math:`\eta`, a scalar >= 0 or a schedule of the step count
        (0, 1, 2, ...); pass the same one as to ``scale_by_learning_rate``.

    Returns:
      A :class:`GradientTransformation` with state :class:`DecoupledWeightDecayState`.

    >>> import jax.numpy as jnp
    >>> from rmsjax import compat
    >>> tx = compat.decoupled_weight_decay(0.5, learning_rate=0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> tx.update(jnp.zeros(2), tx.init(params), params)[0]
    Array([-0.05,  0.1 ], dtype=float32)

    References:
      Loshchilov and Hutter, Decoupled Weight Decay Regularization, ICLR 2019.
    """
    name = "decoupled_weight_decay"
    validate.check_non_negative(name, "weight_decay", weight_decay)
    validate.check_finite(name, "weight_decay", weight_decay)
    validate.check_learning_rate(name, "learning_rate", learning_rate)

    def factor_at(count):
        rate = (
            validate.scalar_schedule_value(name, "learning_rate", learning_rate(count))
            if callable(learning_rate)
            else learning_rate
        )
        return rate * weight_decay

    def update_leaf(g, factor, param):
        dtype = elementwise.compute_dtype(g.dtype)
        shrink = jnp.asarray(factor, dtype) * param.astype(dtype)
        return (g.astype(dtype) - shrink).astype(g.dtype)

    return elementwise.elementwise_transformation(
        elementwise.counted_rule(
            name, DecoupledWeightDecayState, factor_at, update_leaf, needs_params=True
        )
    )


def inverse_time_decay(learning_rate: base.ScalarOrSchedule, lr_decay: float) -> base.Schedule:
    r"""torch Adagrad's learning-rate decay, as a schedule of the step count :math:`c`.

    .. math:: \eta_c = \frac{\mathrm{lr}_c}{1 + c\,\mathrm{lr\_decay}}

    where :math:`\mathrm{lr}_c` is ``learning_rate`` (or ``learning_rate(c)`` for a
    schedule) and :math:`c = t - 1` counts the steps before this one, as torch's
    ``lr / (1 + (step - 1) * lr_decay)``. A schedule stands for torch's learning-rate
    scheduler: torch divides the scheduler's current rate by the same factor.

    Args:
      learning_rate: a scalar >= 0 or a schedule.
      lr_decay: >= 0.

    Returns:
      A schedule (a function of the int32 step count).

    >>> from rmsjax import compat
    >>> schedule = compat.inverse_time_decay(0.1, lr_decay=0.5)
    >>> [round(float(schedule(c)), 4) for c in (0, 1, 2)]
    [0.1, 0.0667, 0.05]
    """
    name = "inverse_time_decay"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    validate.check_non_negative(name, "lr_decay", lr_decay)
    validate.check_finite(name, "lr_decay", lr_decay)

    def schedule(count):
        rate = (
            validate.scalar_schedule_value(name, "learning_rate", learning_rate(count))
            if callable(learning_rate)
            else learning_rate
        )
        return rate / (1 + jnp.asarray(count, jnp.float32) * lr_decay)

    return schedule


# ----------------------------------------------------------------------------- checks


def _is_zero(value: Any) -> bool:
    """True for a concrete zero (or None); a traced value counts as non-zero."""
    if value is None:
        return True
    number = validate.concrete_value(value)
    return number is not None and number == 0


def _check_rate(function: str, argument: str, value: Any) -> None:
    validate.check_learning_rate(function, argument, value)


def _check_non_negative(function: str, argument: str, value: Any) -> None:
    validate.check_non_negative(function, argument, value)
    validate.check_finite(function, argument, value)


def _flip(maximize: bool) -> base.GradientTransformation:
    return scaling.scale(-1.0) if maximize else elementwise.identity()


def _coupled_decay(value: float) -> base.GradientTransformation:
    if _is_zero(value):
        return elementwise.identity()
    return weight_decay_lib.add_decayed_weights(value)


def _decoupled_decay(value: float | None, learning_rate: Any) -> base.GradientTransformation:
    if _is_zero(value):
        return elementwise.identity()
    return decoupled_weight_decay(value, learning_rate)


def _momentum(value: float, storage: str | None) -> base.GradientTransformation:
    return (
        elementwise.identity() if _is_zero(value) else momentum.trace(decay=value, storage=storage)
    )


# ---------------------------------------------------------------------------- PyTorch


def torch_rmsprop(
    lr: base.ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    maximize: bool = False,
    *,
    storage: str | None = None,
) -> base.GradientTransformation:
    r"""``torch.optim.RMSprop``, with its argument names and defaults.

    With :math:`g_t` the gradient (negated when ``maximize``):

    .. math::

        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \quad (\text{coupled weight decay}) \\
        v_t &= \alpha\,v_{t-1} + (1-\alpha)\,g_t^2, \qquad v_0 = 0 \\
        d_t &= \sqrt{v_t} + \epsilon \quad
              (\sqrt{\max(v_t - m_t^2, 0)} + \epsilon \text{ if centered},\
               m_t = \alpha\,m_{t-1} + (1-\alpha)\,g_t) \\
        b_t &= \mu\,b_{t-1} + g_t / d_t, \qquad
        \theta_t = \theta_{t-1} - \mathrm{lr}_t\,b_t

    (without momentum, :math:`\theta_t = \theta_{t-1} - \mathrm{lr}_t\,g_t/d_t`). The
    chain: ``scale(-1)`` if ``maximize``, ``add_decayed_weights(weight_decay)``,
    ``scale_by_rms(alpha, eps, eps_in_sqrt=False, centered=centered)``,
    ``trace(momentum)``, ``scale_by_learning_rate(lr)``; parts that are off for the
    given arguments hold an :class:`EmptyState`.

    Args:
      lr: learning rate >= 0, or a schedule of the step count (0, 1, 2, ...): what a
        ``torch.optim.lr_scheduler`` stepped once per optimizer step gives.
      alpha: decay of the squared-gradient average, in [0, 1).
      eps: added to the root, outside it, >= 0.
      weight_decay: coupled (L2) weight decay >= 0, added to the gradient.
      momentum: in [0, 1); 0 for none. The learning rate stays outside the buffer.
      centered: divide by the root of the variance estimate instead.
      maximize: ascend the objective (negate the gradient first).

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers exactly.
    Returns:
      A :class:`GradientTransformation`; its state is the tuple of its five parts'
      states (the second-moment :class:`ScaleByRmsState` third). ``update`` needs
      ``params`` when ``weight_decay`` is not 0.

    .. warning:: unlike optax, Keras and TF1, torch adds ``eps`` outside the root and
       keeps the learning rate outside the momentum buffer; the two forms of momentum
       differ as soon as the learning rate changes. Where rounding makes the centered
       variance negative torch returns NaN; rmsjax clamps it at 0. torch accepts
       ``alpha`` > 1 and ``momentum`` >= 1 (the average or the buffer then diverges);
       rmsjax rejects them.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> from rmsjax import compat
    >>> tx = compat.torch_rmsprop(lr=0.01, momentum=0.9)
    >>> params = jnp.array([1.0, 2.0])
    >>> updates, state = tx.update(jnp.array([0.5, -3.0]), tx.init(params), params)
    >>> [round(float(p), 6) for p in rj.apply_updates(params, updates)]  # as torch
    [0.9, 2.1]

    References:
      PyTorch documentation, ``torch.optim.RMSprop``; Hinton, lecture 6e (2012);
      Graves, arXiv:1308.0850 (2013).
    """
    name = "torch_rmsprop"
    storage_lib.check_storage(name, storage)
    _check_rate(name, "lr", lr)
    validate.check_decay(name, "alpha", alpha)
    _check_non_negative(name, "eps", eps)
    _check_non_negative(name, "weight_decay", weight_decay)
    validate.check_decay(name, "momentum", momentum)
    validate.check_bool(name, "centered", centered)
    validate.check_bool(name, "maximize", maximize)
    return combine.chain(
        _flip(maximize),
        _coupled_decay(weight_decay),
        rms.scale_by_rms(alpha, eps, eps_in_sqrt=False, centered=centered, storage=storage),
        _momentum(momentum, storage),
        scaling.scale_by_learning_rate(lr),
    )


def torch_adagrad(
    lr: base.ScalarOrSchedule = 1e-2,
    lr_decay: float = 0,
    weight_decay: float = 0,
    initial_accumulator_value: float = 0,
    eps: float = 1e-10,
    maximize: bool = False,
    *,
    storage: str | None = None,
) -> base.GradientTransformation:
    r"""``torch.optim.Adagrad``, with its argument names and defaults.

    With :math:`g_t` the gradient (negated when ``maximize``) and :math:`t` = 1, 2, ...:

    .. math::

        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \quad (\text{coupled weight decay}) \\
        s_t &= s_{t-1} + g_t^2, \qquad s_0 = \text{initial\_accumulator\_value} \\
        \theta_t &= \theta_{t-1} - \frac{\mathrm{lr}_t}{1 + (t-1)\,\mathrm{lr\_decay}}\,
                    \frac{g_t}{\sqrt{s_t} + \epsilon}

    The chain: ``scale(-1)`` if ``maximize``, ``add_decayed_weights(weight_decay)``,
    ``scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False)`` and
    ``scale_by_learning_rate`` of :func:`inverse_time_decay` (of ``lr`` itself when
    ``lr_decay`` is 0).

    Args:
      lr: learning rate >= 0, or a schedule of the step count (0, 1, 2, ...): what a
        ``torch.optim.lr_scheduler`` stepped once per optimizer step gives; torch
        applies ``lr_decay`` on top of it, and so does this preset.
      lr_decay: >= 0, see the equation.
      weight_decay: coupled (L2) weight decay >= 0, added to the gradient.
      initial_accumulator_value: :math:`s_0` >= 0.
      eps: added to the root, outside it, >= 0.
      maximize: ascend the objective (negate the gradient first).

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers exactly.
    Returns:
      A :class:`GradientTransformation`; its state is the tuple of its four parts'
      states (the :class:`ScaleByRssState` third). ``update`` needs ``params`` when
      ``weight_decay`` is not 0.

    .. warning:: optax and Keras start the accumulator at 0.1 and add ``eps`` inside
       the root; torch starts at 0 and adds ``eps`` (1e-10) outside. Where the sum is
       still 0 the update is 0 here; torch gives 0 too unless ``eps`` is 0 (then NaN).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> from rmsjax import compat
    >>> tx = compat.torch_adagrad(lr=0.1)
    >>> params = jnp.array([1.0, 2.0])
    >>> updates, state = tx.update(jnp.array([0.5, -3.0]), tx.init(params), params)
    >>> [round(float(p), 6) for p in rj.apply_updates(params, updates)]  # as torch
    [0.9, 2.1]

    References:
      PyTorch documentation, ``torch.optim.Adagrad``; Duchi, Hazan and Singer,
      JMLR 12 (2011).
    """
    name = "torch_adagrad"
    storage_lib.check_storage(name, storage)
    _check_rate(name, "lr", lr)
    _check_non_negative(name, "lr_decay", lr_decay)
    _check_non_negative(name, "weight_decay", weight_decay)
    _check_non_negative(name, "initial_accumulator_value", initial_accumulator_value)
    _check_non_negative(name, "eps", eps)
    validate.check_bool(name, "maximize", maximize)
    rate = lr if _is_zero(lr_decay) else inverse_time_decay(lr, lr_decay)
    return combine.chain(
        _flip(maximize),
        _coupled_decay(weight_decay),
        rss.scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False, storage=storage),
        scaling.scale_by_learning_rate(rate),
    )


# ---------------------------------------------------------------------------- Keras 3


def keras_rmsprop(
    learning_rate: base.ScalarOrSchedule = 1e-3,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: float | None = None,
    *,
    storage: str | None = None,
) -> base.GradientTransformation:
    r"""``keras.optimizers.RMSprop`` (Keras 3), with its argument names and defaults.

    .. math::

        \theta &\leftarrow \theta - \eta_t\,\lambda\,\theta
                 \quad (\text{decoupled weight decay, before the step}) \\
        v_t &= \rho\,v_{t-1} + (1-\rho)\,g_t^2, \qquad v_0 = 0 \\
        b_t &= \mu\,b_{t-1} + \eta_t\,g_t / \sqrt{v_t + \epsilon}
              \quad (\sqrt{\max(v_t - m_t^2, 0) + \epsilon} \text{ if centered}) \\
        \theta_t &= \theta - b_t

    The chain: ``scale_by_rms(rho, epsilon, centered=centered)``,
    ``scale_by_learning_rate(learning_rate)``, ``trace(momentum)``, and
    :func:`decoupled_weight_decay` ``(weight_decay, learning_rate)``; parts that are
    off for the given arguments hold an :class:`EmptyState`.

    Args:
      learning_rate: >= 0, or a schedule of the step count (0, 1, 2, ...) as Keras'
        ``LearningRateSchedule`` takes ``optimizer.iterations``.
      rho: decay of the squared-gradient average, in [0, 1).
      momentum: in [0, 1); 0 for none. The learning rate sits inside the buffer.
      epsilon: added inside the root, >= 0.
      centered: divide by the root of the variance estimate instead.
      weight_decay: decoupled weight decay >= 0 scaled by the learning rate, or None.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers exactly.
    Returns:
      A :class:`GradientTransformation`; its state is the tuple of its four parts'
      states (the :class:`ScaleByRmsState` first). ``update`` needs ``params`` when
      ``weight_decay`` is set.

    .. warning:: Keras adds ``epsilon`` inside the root and keeps the learning rate
       inside the momentum buffer, unlike torch. Keras accepts a negative
       ``learning_rate``, ``rho`` outside [0, 1) or a negative ``weight_decay``, and
       silently drops a negative ``momentum``; rmsjax rejects them all. Keras'
       ``exclude_from_weight_decay`` has no counterpart: mask the parameters instead.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> from rmsjax import compat
    >>> tx = compat.keras_rmsprop(learning_rate=0.1)
    >>> params = jnp.array(10.0)
    >>> updates, state = tx.update(params, tx.init(params), params)  # loss = params**2 / 2
    >>> rj.apply_updates(params, updates)
    Array(9.683772, dtype=float32)

    References:
      Keras documentation, ``keras.optimizers.RMSprop``; Hinton, lecture 6e (2012).
    """
    name = "keras_rmsprop"
    storage_lib.check_storage(name, storage)
    _check_rate(name, "learning_rate", learning_rate)
    validate.check_decay(name, "rho", rho)
    validate.check_decay(name, "momentum", momentum)
    _check_non_negative(name, "epsilon", epsilon)
    validate.check_bool(name, "centered", centered)
    if weight_decay is not None:
        _check_non_negative(name, "weight_decay", weight_decay)
    return combine.chain(
        rms.scale_by_rms(rho, epsilon, eps_in_sqrt=True, centered=centered, storage=storage),
        scaling.scale_by_learning_rate(learning_rate),
        _momentum(momentum, storage),
        _decoupled_decay(weight_decay, learning_rate),
    )


def keras_adagrad(
    learning_rate: base.ScalarOrSchedule = 1e-3,
    initial_accumulator_value: float = 0.1,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    *,
    storage: str | None = None,
) -> base.GradientTransformation:
    r"""``keras.optimizers.Adagrad`` (Keras 3), with its argument names and defaults.

    .. math::

        \theta &\leftarrow \theta - \eta_t\,\lambda\,\theta
                 \quad (\text{decoupled weight decay, before the step}) \\
        s_t &= s_{t-1} + g_t^2, \qquad s_0 = \text{initial\_accumulator\_value} \\
        \theta_t &= \theta - \eta_t\,g_t / \sqrt{s_t + \epsilon}

    The chain: ``scale_by_rss(initial_accumulator_value, epsilon)``,
    ``scale_by_learning_rate(learning_rate)`` and :func:`decoupled_weight_decay`
    ``(weight_decay, learning_rate)`` (an :class:`EmptyState` placeholder when None).

    Args:
      learning_rate: >= 0, or a schedule of the step count (0, 1, 2, ...).
      initial_accumulator_value: :math:`s_0` >= 0.
      epsilon: added inside the root, >= 0.
      weight_decay: decoupled weight decay >= 0 scaled by the learning rate, or None.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers exactly.
    Returns:
      A :class:`GradientTransformation`; its state is the tuple of its three parts'
      states (the :class:`ScaleByRssState` first).

    .. warning:: the same arithmetic as ``optax.adagrad`` (but with a default learning
       rate) and not torch's: torch starts the sum at 0 and adds ``eps`` outside the
       root. Keras accepts negative values here; rmsjax rejects them.

    >>> import jax.numpy as jnp
    >>> from rmsjax import compat
    >>> tx = compat.keras_adagrad(learning_rate=0.1)
    >>> params = jnp.ones(2)
    >>> updates, state = tx.update(jnp.array([0.3, -0.3]), tx.init(params), params)
    >>> [round(float(u), 6) for u in updates]  # 0.1 * 0.3 / sqrt(0.1 + 0.09 + 1e-7)
    [-0.068825, 0.068825]

    References:
      Keras documentation, ``keras.optimizers.Adagrad``; Duchi, Hazan and Singer,
      JMLR 12 (2011).
    """
    name = "keras_adagrad"
    storage_lib.check_storage(name, storage)
    _check_rate(name, "learning_rate", learning_rate)
    _check_non_negative(name, "initial_accumulator_value", initial_accumulator_value)
    _check_non_negative(name, "epsilon", epsilon)
    if weight_decay is not None:
        _check_non_negative(name, "weight_decay", weight_decay)
    return combine.chain(
        rss.scale_by_rss(initial_accumulator_value, epsilon, eps_in_sqrt=True, storage=storage),
        scaling.scale_by_learning_rate(learning_rate),
        _decoupled_decay(weight_decay, learning_rate),
    )


# ------------------------------------------------------------------------------- TF1


def tf1_rmsprop(
    learning_rate: base.ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    centered: bool = False,
    *,
    storage: str | None = None,
) -> base.GradientTransformation:
    r"""``tf.compat.v1.train.RMSPropOptimizer``, with its argument names and defaults.

    TensorFlow 1's kernel (``ApplyRMSProp``, ``ApplyCenteredRMSProp``):

    .. math::

        ms_t &= ms_{t-1} + (g_t^2 - ms_{t-1})(1-\rho), \qquad ms_0 = 1 \\
        mom_t &= \mu\,mom_{t-1} + \eta_t\,g_t / \sqrt{ms_t + \epsilon}
                 \quad (\sqrt{\max(ms_t - mg_t^2, 0) + \epsilon} \text{ if centered}) \\
        \theta_t &= \theta_{t-1} - mom_t

    The chain: ``scale_by_rms(decay, epsilon, initial_scale=1.0, centered=centered)``,
    ``scale_by_learning_rate(learning_rate)``, ``trace(momentum)``; the same numbers as
    ``optax.rmsprop(learning_rate, decay, epsilon, initial_scale=1.0, ...)``.

    Args:
      learning_rate: >= 0 (no default, as in TF1), or a schedule of the step count
        (0, 1, 2, ...), the ``global_step`` a TF1 decay function reads.
      decay: :math:`\rho`, in [0, 1).
      momentum: :math:`\mu` in [0, 1).
      epsilon: added inside the root, >= 0.
      centered: divide by the root of the variance estimate instead.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers exactly.
    Returns:
      A :class:`GradientTransformation`; its state is the tuple of its three parts'
      states (the :class:`ScaleByRmsState` first).

    .. warning:: TF1 starts the mean square at 1, not 0: the first steps are far
       smaller than in Keras 2+/torch/optax defaults. TF1 checks none of these
       arguments; rmsjax rejects values outside the ranges above.

    >>> import jax.numpy as jnp
    >>> from rmsjax import compat
    >>> tx = compat.tf1_rmsprop(learning_rate=0.1)
    >>> updates, state = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))
    >>> round(float(updates[0]), 6)  # ms = 0.9 * 1 + 0.1 * 9: -0.1 * 3 / sqrt(1.8)
    -0.223607

    References:
      TensorFlow 1.15, ``tf.compat.v1.train.RMSPropOptimizer`` and the kernels in
      ``tensorflow/core/kernels/training_ops.cc``.
    """
    name = "tf1_rmsprop"
    storage_lib.check_storage(name, storage)
    _check_rate(name, "learning_rate", learning_rate)
    validate.check_decay(name, "decay", decay)
    validate.check_decay(name, "momentum", momentum)
    _check_non_negative(name, "epsilon", epsilon)
    validate.check_bool(name, "centered", centered)
    return combine.chain(
        rms.scale_by_rms(
            decay, epsilon, eps_in_sqrt=True, initial_scale=1.0, centered=centered, storage=storage
        ),
        scaling.scale_by_learning_rate(learning_rate),
        _momentum(momentum, storage),
    )


def tf1_adagrad(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    *,
    storage: str | None = None,
) -> base.GradientTransformation:
    r"""``tf.compat.v1.train.AdagradOptimizer``, with its argument names and defaults.

    TensorFlow 1's kernel (``ApplyAdagrad``) has no epsilon:

    .. math::

        s_t = s_{t-1} + g_t^2, \qquad \theta_t = \theta_{t-1} - \eta_t\,g_t / \sqrt{s_t}

    The chain: ``scale_by_rss(initial_accumulator_value, eps=0.0)`` and
    ``scale_by_learning_rate(learning_rate)``.

    Args:
      learning_rate: >= 0 (no default, as in TF1), or a schedule of the step count.
      initial_accumulator_value: :math:`s_0` > 0 (TF1 rejects 0, which would divide
        by zero).

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers exactly.
    Returns:
      A :class:`GradientTransformation`; its state is the tuple of its two parts'
      states (the :class:`ScaleByRssState` first).

    >>> import jax.numpy as jnp
    >>> from rmsjax import compat
    >>> tx = compat.tf1_adagrad(learning_rate=0.1)
    >>> tx.update(jnp.array([0.3]), tx.init(jnp.zeros(1)))[0]  # 0.1 * 0.3 / sqrt(0.19)
    Array([-0.06882472], dtype=float32)

    References:
      TensorFlow 1.15, ``tf.compat.v1.train.AdagradOptimizer`` and ``ApplyAdagrad``.
    """
    name = "tf1_adagrad"
    storage_lib.check_storage(name, storage)
    _check_rate(name, "learning_rate", learning_rate)
    validate.check_range(
        name, "initial_accumulator_value", initial_accumulator_value, 0.0, low_open=True
    )
    validate.check_finite(name, "initial_accumulator_value", initial_accumulator_value)
    return combine.chain(
        rss.scale_by_rss(initial_accumulator_value, 0.0, eps_in_sqrt=True, storage=storage),
        scaling.scale_by_learning_rate(learning_rate),
    )
