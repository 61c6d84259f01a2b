"""Presets that reproduce Keras 3's keras.optimizers RMSprop and Adagrad step for step."""

from __future__ import annotations

from typing import Any

import numpy as np

from rmsjax._src import base, combine, rms, rss, scaling, validate
from rmsjax._src import storage as storage_lib
from rmsjax._src.compat.parts import (
    check_how_to_run,
    decoupled_decay,
    momentum_or_identity,
    real_only,
    refuse_not_reproduced,
)

# ---------------------------------------------------------------------------- Keras 3


def keras_rmsprop(
    learning_rate: base.ScalarOrSchedule = 1e-3,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""``keras.optimizers.RMSprop`` (Keras 3), with its argument names, order and defaults.

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
      clipnorm, clipvalue, global_clipnorm: Keras' clipping options, in Keras'
        positions. Not reproduced inside the preset: anything but None is a ValueError
        that names what to compose instead (``rj.clip``, ``rj.clip_by_global_norm``).
      use_ema, loss_scale_factor, gradient_accumulation_steps: the same, for Keras'
        other options of every optimizer (``rj.accumulate_gradients`` around the preset
        for the last); ``ema_momentum`` and ``ema_overwrite_frequency`` are read only
        with ``use_ema``, as in Keras.
      name: accepted (None or a string) so that a Keras call ports as it is.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers on float32 leaves (on
        half-precision leaves the preset computes in float32, the peer in the leaf's
        dtype: docs/porting.md).
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
    function = "compat.keras_rmsprop"
    _check_base_options(
        function,
        clipnorm,
        clipvalue,
        global_clipnorm,
        use_ema,
        ema_overwrite_frequency,
        loss_scale_factor,
        gradient_accumulation_steps,
        name,
    )
    del name  # the peer's name for the optimizer: nothing to do here
    storage_lib.check_storage(function, storage)
    validate.check_learning_rate(function, "learning_rate", learning_rate)
    validate.check_decay(function, "rho", rho)
    validate.check_decay(function, "momentum", momentum)
    validate.check_non_negative(function, "epsilon", epsilon)
    validate.check_bool(function, "centered", centered)
    if weight_decay is not None:
        validate.check_non_negative(function, "weight_decay", weight_decay)
    return combine.named_chain(
        function,
        real_only(
            rms.scale_by_rms(rho, epsilon, eps_in_sqrt=True, centered=centered, storage=storage),
            "keras",
        ),
        scaling.scale_by_learning_rate(learning_rate),
        momentum_or_identity(momentum, storage),
        decoupled_decay(weight_decay, learning_rate),
    )


def keras_adagrad(
    learning_rate: base.ScalarOrSchedule = 1e-3,
    initial_accumulator_value: float = 0.1,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    *,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""``keras.optimizers.Adagrad`` (Keras 3), with its argument names, order and defaults.

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
      clipnorm, clipvalue, global_clipnorm: Keras' clipping options, in Keras'
        positions. Not reproduced inside the preset: anything but None is a ValueError
        that names what to compose instead (``rj.clip``, ``rj.clip_by_global_norm``).
      use_ema, loss_scale_factor, gradient_accumulation_steps: the same, for Keras'
        other options of every optimizer (``rj.accumulate_gradients`` around the preset
        for the last); ``ema_momentum`` and ``ema_overwrite_frequency`` are read only
        with ``use_ema``, as in Keras.
      name: accepted (None or a string) so that a Keras call ports as it is.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers on float32 leaves (on
        half-precision leaves the preset computes in float32, the peer in the leaf's
        dtype: docs/porting.md).
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
    function = "compat.keras_adagrad"
    _check_base_options(
        function,
        clipnorm,
        clipvalue,
        global_clipnorm,
        use_ema,
        ema_overwrite_frequency,
        loss_scale_factor,
        gradient_accumulation_steps,
        name,
    )
    del name  # the peer's name for the optimizer: nothing to do here
    storage_lib.check_storage(function, storage)
    validate.check_learning_rate(function, "learning_rate", learning_rate)
    validate.check_non_negative(function, "initial_accumulator_value", initial_accumulator_value)
    validate.check_non_negative(function, "epsilon", epsilon)
    if weight_decay is not None:
        validate.check_non_negative(function, "weight_decay", weight_decay)
    return combine.named_chain(
        function,
        real_only(
            rss.scale_by_rss(initial_accumulator_value, epsilon, eps_in_sqrt=True, storage=storage),
            "keras",
        ),
        scaling.scale_by_learning_rate(learning_rate),
        decoupled_decay(weight_decay, learning_rate),
    )


def _off(value: Any) -> bool:
    """Whether a Keras option is off: None, or a concrete 0 (not True, which reads as 1).
    (Unlike ``parts.is_zero``, a concrete JAX array counts by its value: these options
    decide the preset's structure, and are never injected.)"""
    return value is None or (validate.concrete_value(value) == 0 and value is not True)


def _positive_or_off(function: str, argument: str, value: Any) -> Any:
    """None for None or 0 (Keras clips nothing then); else a number > 0, or an error."""
    if _off(value) or value is False:
        return None
    validate.check_range(function, argument, value, 0.0, low_open=True)  # finite too
    return value


def _check_base_options(
    function: str,
    clipnorm: Any,
    clipvalue: Any,
    global_clipnorm: Any,
    use_ema: Any,
    ema_overwrite_frequency: Any,
    loss_scale_factor: Any,
    gradient_accumulation_steps: Any,
    name: Any,
) -> None:
    """Keras' options of every optimizer: a name is accepted; the others change the
    numbers and are composed around the preset instead, as each error says."""
    check_how_to_run(function, name=name)
    validate.check_bool(function, "use_ema", use_ema)
    preset = f"rmsjax.{function}(...)"
    # 0 is off, as in Keras; other values are checked as Keras takes them before the
    # advice below repeats them (a negative clip, 1.5 steps: no composition takes those)
    clipnorm, clipvalue, global_clipnorm = (
        _positive_or_off(function, argument, value)
        for argument, value in (
            ("clipnorm", clipnorm),
            ("clipvalue", clipvalue),
            ("global_clipnorm", global_clipnorm),
        )
    )
    # a factor of 1 scales nothing: off, as None is (a bool is no factor)
    if not isinstance(loss_scale_factor, (bool, np.bool_)):
        if validate.concrete_value(loss_scale_factor) == 1:
            loss_scale_factor = None
    if not _off(gradient_accumulation_steps):
        validate.check_count(
            function, "gradient_accumulation_steps", gradient_accumulation_steps, 2
        )
    else:
        gradient_accumulation_steps = None
    for argument, value, instead in [
        (
            "clipnorm",
            clipnorm,
            "Keras clips each variable's gradient to that norm on its own, which no rmsjax "
            "transformation does (rj.clip_by_global_norm clips them together); compose "
            "rj.chain(rj.GradientTransformation(lambda params: rj.EmptyState(), lambda g, "
            "state, params=None: (jax.tree.map(lambda x: x * "
            f"({clipnorm!r} / jnp.maximum(jnp.linalg.norm(x), {clipnorm!r})), g), state)), "
            f"{preset}), with jax, jax.numpy as jnp and rmsjax as rj imported",
        ),
        ("clipvalue", clipvalue, f"compose rj.chain(rj.clip({clipvalue!r}), {preset})"),
        (
            "global_clipnorm",
            global_clipnorm,
            f"compose rj.chain(rj.clip_by_global_norm({global_clipnorm!r}), {preset})",
        ),
        (
            "use_ema",
            use_ema,
            "keep Keras' moving average of the parameters beside the training loop: "
            "avg = params after the first step, then avg = ema_momentum * avg + "
            "(1 - ema_momentum) * params"
            + (
                f", and after every {ema_overwrite_frequency!r}th step (after its average) "
                "params = avg, as Keras' ema_overwrite_frequency does"
                if ema_overwrite_frequency
                else ""
            )
            + " (optax.ema starts from 0: another average)",
        ),
        (
            "loss_scale_factor",
            loss_scale_factor,
            "pass the gradients of the unscaled loss (Keras divides them by the factor)",
        ),
        (
            "gradient_accumulation_steps",
            gradient_accumulation_steps,
            f"compose rj.accumulate_gradients({preset}, {gradient_accumulation_steps!r}), "
            "which takes Keras' steps (Keras reads a schedule at the count of micro-batches: "
            "give the preset lambda count: schedule(k * count + k - 1), k the steps)",
        ),
    ]:
        refuse_not_reproduced(function, argument, value, instead)
