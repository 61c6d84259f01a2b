"""``sgd``, ``rmsprop`` and ``adagrad``: chains of the core rules, with optax's keyword
names and defaults, so that porting from optax is a change of import."""

from __future__ import annotations

from typing import Any

from rmsjax._src import base, combine, rms, rss, scaling, validate
from rmsjax._src import momentum as momentum_lib


def sgd(
    learning_rate: base.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> base.GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    ``chain(trace(momentum), scale_by_learning_rate(learning_rate))``: the learning rate
    sits outside the momentum buffer, as in optax and torch.

    Args:
      learning_rate: a scalar >= 0 or a schedule.
      momentum: the momentum decay in [0, 1], or None for none.
      nesterov: use Nesterov momentum.
      accumulator_dtype: dtype of the momentum buffer; None keeps the parameters'.

    Returns:
      A :class:`GradientTransformation`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.sgd(0.1, momentum=0.9)
    >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
    Array([-0.1, -0.1], dtype=float32)
    """
    name = "sgd"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    validate.check_bool(name, "nesterov", nesterov)
    validate.check_float_dtype(name, "accumulator_dtype", accumulator_dtype)
    return combine.named_chain(
        name,
        momentum_lib.optional_trace(name, momentum, nesterov, accumulator_dtype=accumulator_dtype),
        scaling.scale_by_learning_rate(learning_rate),
    )


def rmsprop(
    learning_rate: base.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""RMSprop: each update divided by the root of a decaying average of squared
    gradients, then scaled by the learning rate, then (optionally) momentum.

    ``chain(scale_by_rms(...), scale_by_learning_rate(learning_rate), trace(momentum))``,
    argument for argument the same as ``optax.rmsprop``, with the same numbers (but
    where optax's would overflow or be NaN, and for ``centered=True`` where the variance
    is float32 rounding, as at the first bias-corrected step under ``jit``; see
    docs/numerics.md).

    .. math::

        \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,g_t^2, \quad
        b_t = \mu\,b_{t-1} + \eta\,g_t/\sqrt{\nu_t + \epsilon}, \quad
        \theta_t = \theta_{t-1} - b_t

    Args:
      learning_rate: :math:`\eta`, a scalar >= 0 or a schedule.
      decay: :math:`\rho` in [0, 1).
      eps: :math:`\epsilon` >= 0.
      initial_scale: the starting value of :math:`\nu`.
      eps_in_sqrt: add ``eps`` inside the root (else outside, as torch does).
      centered: divide by the root of the variance estimate (Graves, 2013).
      momentum: :math:`\mu` in [0, 1], or None for none.
      nesterov: use Nesterov momentum.
      bias_correction: divide the average by :math:`1-\rho^t`.
      storage: how every state array (the averages and the momentum buffer) is kept
        between steps: None (the parameters' dtypes), ``"float32"``, ``"bfloat16"`` or
        ``"int8"`` (8-bit block-wise for parameters of 4096 elements or more); see
        docs/memory.md. Not an optax argument; the default gives optax's numbers on
        float32 leaves.

    Returns:
      A :class:`GradientTransformation`.

    .. warning:: the learning rate here sits inside the momentum buffer (optax, Keras,
       TF1); torch keeps it outside and adds ``eps`` outside the root. For torch's
       numbers use :func:`rmsjax.compat.torch_rmsprop`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.rmsprop(0.01, momentum=0.9)
    >>> params = {"w": jnp.ones(2)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, tx.init(params), params)
    >>> rj.apply_updates(params, updates)["w"]
    Array([0.96837723, 1.0316228 ], dtype=float32)

    References:
      Hinton, lecture 6e (2012); Graves, arXiv:1308.0850 (2013).
    """
    name = "rmsprop"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    rms.check_arguments(
        name, decay, eps, initial_scale, eps_in_sqrt, bias_correction, centered, storage
    )
    validate.check_bool(name, "nesterov", nesterov)
    return combine.named_chain(
        name,
        rms.scale_by_rms(
            decay,
            eps,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            bias_correction=bias_correction,
            centered=centered,
            storage=storage,
        ),
        scaling.scale_by_learning_rate(learning_rate),
        momentum_lib.optional_trace(name, momentum, nesterov, storage=storage),
    )


def adagrad(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""Adagrad: each update divided by the root of the running sum of squared gradients,
    then scaled by the learning rate; as ``optax.adagrad``, with the same numbers.

    .. math::

        s_t = s_{t-1} + g_t^2, \qquad \theta_t = \theta_{t-1} - \eta\,g_t/\sqrt{s_t + \epsilon}

    Args:
      learning_rate: :math:`\eta`, a scalar >= 0 or a schedule.
      initial_accumulator_value: :math:`s_0` >= 0.
      eps: :math:`\epsilon` >= 0, inside the root.
      storage: how the sum is kept between steps: None (the parameters' dtypes),
        ``"float32"``, ``"bfloat16"`` or ``"int8"`` (8-bit block-wise for parameters of
        4096 elements or more); see docs/memory.md. Not an optax argument; the default
        gives optax's numbers on float32 leaves.

    Returns:
      A :class:`GradientTransformation`.

    .. warning:: torch starts the sum at 0 and adds ``eps`` (1e-10) outside the root;
       use :func:`rmsjax.compat.torch_adagrad` for its numbers.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
    >>> tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))[0]
    Array([-0.1,  0.1], dtype=float32)

    References:
      Duchi, Hazan and Singer, JMLR 12 (2011).
    """
    name = "adagrad"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    rss.check_arguments(name, initial_accumulator_value, eps, True, storage)
    return combine.named_chain(
        name,
        rss.scale_by_rss(initial_accumulator_value, eps, storage=storage),
        scaling.scale_by_learning_rate(learning_rate),
    )
