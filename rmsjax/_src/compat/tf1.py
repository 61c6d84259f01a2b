"""Presets that reproduce TensorFlow 1's tf.compat.v1.train RMSprop and Adagrad step for step."""

from __future__ import annotations

from rmsjax._src import base, combine, rms, rss, scaling, validate
from rmsjax._src import storage as storage_lib
from rmsjax._src.compat.parts import (
    check_how_to_run,
    momentum_or_identity,
    real_only,
)

# ------------------------------------------------------------------------------- TF1


def tf1_rmsprop(
    learning_rate: base.ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    use_locking: bool = False,
    centered: bool = False,
    name: str = "RMSProp",
    *,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""``tf.compat.v1.train.RMSPropOptimizer``, with its argument names, order and
    defaults.

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
      use_locking: accepted (True or False) so that a TF1 call ports as it is, in
        TF1's position; a JAX step shares no variables to lock.
      centered: divide by the root of the variance estimate instead.
      name: accepted (a string) so that a TF1 call ports as it is.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers on float32 leaves (on
        half-precision leaves the preset computes in float32, the peer in the leaf's
        dtype: docs/porting.md).
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
    function = "compat.tf1_rmsprop"
    check_how_to_run(function, use_locking=use_locking, name=name)
    del name  # the peer's name for the optimizer: nothing to do here
    storage_lib.check_storage(function, storage)
    validate.check_learning_rate(function, "learning_rate", learning_rate)
    validate.check_decay(function, "decay", decay)
    validate.check_decay(function, "momentum", momentum)
    validate.check_non_negative(function, "epsilon", epsilon)
    validate.check_bool(function, "centered", centered)
    return combine.named_chain(
        function,
        real_only(
            rms.scale_by_rms(
                decay,
                epsilon,
                eps_in_sqrt=True,
                initial_scale=1.0,
                centered=centered,
                storage=storage,
            ),
            "tf1",
        ),
        scaling.scale_by_learning_rate(learning_rate),
        momentum_or_identity(momentum, storage),
    )


def tf1_adagrad(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    use_locking: bool = False,
    name: str = "Adagrad",
    *,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""``tf.compat.v1.train.AdagradOptimizer``, with its argument names, order and
    defaults.

    TensorFlow 1's kernel (``ApplyAdagrad``) has no epsilon:

    .. math::

        s_t = s_{t-1} + g_t^2, \qquad \theta_t = \theta_{t-1} - \eta_t\,g_t / \sqrt{s_t}

    The chain: ``scale_by_rss(initial_accumulator_value, eps=0.0)`` and
    ``scale_by_learning_rate(learning_rate)``.

    Args:
      learning_rate: >= 0 (no default, as in TF1), or a schedule of the step count.
      initial_accumulator_value: :math:`s_0` > 0 (TF1 rejects 0, which would divide
        by zero).
      use_locking, name: accepted (True or False; a string) so that a TF1 call ports as
        it is; a JAX step shares no variables to lock.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers on float32 leaves (on
        half-precision leaves the preset computes in float32, the peer in the leaf's
        dtype: docs/porting.md).
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
    function = "compat.tf1_adagrad"
    check_how_to_run(function, use_locking=use_locking, name=name)
    del name  # the peer's name for the optimizer: nothing to do here
    storage_lib.check_storage(function, storage)
    validate.check_learning_rate(function, "learning_rate", learning_rate)
    validate.check_range(
        function, "initial_accumulator_value", initial_accumulator_value, 0.0, low_open=True
    )
    validate.check_finite(function, "initial_accumulator_value", initial_accumulator_value)
    return combine.named_chain(
        function,
        real_only(
            rss.scale_by_rss(initial_accumulator_value, 0.0, eps_in_sqrt=True, storage=storage),
            "tf1",
        ),
        scaling.scale_by_learning_rate(learning_rate),
    )
