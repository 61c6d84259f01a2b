"""Presets that reproduce Keras 3's keras.optimizers RMSprop and Adagrad step for step."""

from __future__ import annotations

from rmsjax._src import base, combine, rms, rss, scaling, validate
from rmsjax._src import storage as storage_lib
from rmsjax._src.compat.parts import (
    check_non_negative,
    check_rate,
    decoupled_decay,
    momentum_or_identity,
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
    storage: base.Storage | None = None,
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
    name = "compat.keras_rmsprop"
    storage_lib.check_storage(name, storage)
    check_rate(name, "learning_rate", learning_rate)
    validate.check_decay(name, "rho", rho)
    validate.check_decay(name, "momentum", momentum)
    check_non_negative(name, "epsilon", epsilon)
    validate.check_bool(name, "centered", centered)
    if weight_decay is not None:
        check_non_negative(name, "weight_decay", weight_decay)
    return combine.named_chain(
        name,
        rms.scale_by_rms(rho, epsilon, eps_in_sqrt=True, centered=centered, storage=storage),
        scaling.scale_by_learning_rate(learning_rate),
        momentum_or_identity(momentum, storage),
        decoupled_decay(weight_decay, learning_rate),
    )


def keras_adagrad(
    learning_rate: base.ScalarOrSchedule = 1e-3,
    initial_accumulator_value: float = 0.1,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    *,
    storage: base.Storage | None = None,
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
    name = "compat.keras_adagrad"
    storage_lib.check_storage(name, storage)
    check_rate(name, "learning_rate", learning_rate)
    check_non_negative(name, "initial_accumulator_value", initial_accumulator_value)
    check_non_negative(name, "epsilon", epsilon)
    if weight_decay is not None:
        check_non_negative(name, "weight_decay", weight_decay)
    return combine.named_chain(
        name,
        rss.scale_by_rss(initial_accumulator_value, epsilon, eps_in_sqrt=True, storage=storage),
        scaling.scale_by_learning_rate(learning_rate),
        decoupled_decay(weight_decay, learning_rate),
    )
