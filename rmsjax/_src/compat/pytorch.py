"""Presets that reproduce PyTorch's torch.optim RMSprop and Adagrad step for step."""

from __future__ import annotations

from rmsjax._src import base, combine, rms, rss, scaling, validate
from rmsjax._src import storage as storage_lib
from rmsjax._src.compat.parts import (
    check_how_to_run,
    coupled_decay,
    flip,
    inverse_time_decay,
    is_zero,
    momentum_or_identity,
    named_rate,
    real_only,
    tensor_rate,
)

# ---------------------------------------------------------------------------- PyTorch


def torch_rmsprop(
    lr: base.ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    *,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""``torch.optim.RMSprop``, with its argument names, order and defaults.

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
      lr: learning rate >= 0 (a one-element torch tensor is read as its float, once),
        or a schedule of the step count (0, 1, 2, ...): what a
        ``torch.optim.lr_scheduler`` stepped once per optimizer step gives.
      alpha: decay of the squared-gradient average, in [0, 1).
      eps: added to the root, outside it, >= 0.
      weight_decay: coupled (L2) weight decay >= 0, added to the gradient.
      momentum: in [0, 1); 0 for none. The learning rate stays outside the buffer.
      centered: divide by the root of the variance estimate instead.
      capturable, foreach, differentiable: how torch runs its step (on CUDA graphs, over
        a list of tensors at once, under autograd); accepted (True or False; ``foreach``
        also None) so that a torch call ports as it is, in torch's positions. They change
        nothing here: a jitted JAX step is all three.
      maximize: ascend the objective (negate the gradient first).

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers on float32 leaves (on
        half-precision leaves the preset computes in float32, the peer in the leaf's
        dtype: docs/porting.md).
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
    name = "compat.torch_rmsprop"
    storage_lib.check_storage(name, storage)
    lr = tensor_rate(lr)
    validate.check_learning_rate(name, "lr", lr)
    validate.check_decay(name, "alpha", alpha)
    validate.check_non_negative(name, "eps", eps)
    validate.check_non_negative(name, "weight_decay", weight_decay)
    validate.check_decay(name, "momentum", momentum)
    validate.check_bool(name, "centered", centered)
    validate.check_bool(name, "maximize", maximize)
    check_how_to_run(name, capturable=capturable, foreach=foreach, differentiable=differentiable)
    return combine.named_chain(
        name,
        flip(maximize),
        coupled_decay(weight_decay),
        real_only(
            rms.scale_by_rms(alpha, eps, eps_in_sqrt=False, centered=centered, storage=storage),
            "torch",
        ),
        momentum_or_identity(momentum, storage),
        scaling.scale_by_learning_rate(named_rate(name, "lr", lr)),
    )


def torch_adagrad(
    lr: base.ScalarOrSchedule = 1e-2,
    lr_decay: float = 0,
    weight_decay: float = 0,
    initial_accumulator_value: float = 0,
    eps: float = 1e-10,
    foreach: bool | None = None,
    *,
    maximize: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    storage: base.Storage | None = None,
) -> base.GradientTransformation:
    r"""``torch.optim.Adagrad``, with its argument names, order and defaults.

    With :math:`g_t` the gradient (negated when ``maximize``) and :math:`t` = 1, 2, ...:

    .. math::

        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \quad (\text{coupled weight decay}) \\
        s_t &= s_{t-1} + g_t^2, \qquad s_0 = \mathtt{initial\_accumulator\_value} \\
        \theta_t &= \theta_{t-1} - \frac{\mathrm{lr}_t}{1 + (t-1)\,\mathrm{lr\_decay}}\,
                    \frac{g_t}{\sqrt{s_t} + \epsilon}

    The chain: ``scale(-1)`` if ``maximize``, ``add_decayed_weights(weight_decay)``,
    ``scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False)`` and
    ``scale_by_learning_rate`` of :func:`inverse_time_decay` (of ``lr`` itself when
    ``lr_decay`` is 0).

    Args:
      lr: learning rate >= 0 (a one-element torch tensor is read as its float, once),
        or a schedule of the step count (0, 1, 2, ...): what a
        ``torch.optim.lr_scheduler`` stepped once per optimizer step gives; torch
        applies ``lr_decay`` on top of it, and so does this preset.
      lr_decay: >= 0, see the equation.
      weight_decay: coupled (L2) weight decay >= 0, added to the gradient.
      initial_accumulator_value: :math:`s_0` >= 0.
      eps: added to the root, outside it, >= 0.
      foreach, differentiable, fused: how torch runs its step (over a list of tensors
        at once, under autograd, in one fused kernel); accepted (True or False;
        ``foreach`` and ``fused`` also None) so that a torch call ports as it is. They
        change nothing here: a jitted JAX step is all three.
      maximize: ascend the objective (negate the gradient first). Keyword-only, as in
        torch.

      storage: how the optimizer state is kept between steps: None (each
        parameter's dtype), "float32", "bfloat16" or "int8" (see docs/memory.md). Not a
        peer argument; the default keeps the peer's numbers on float32 leaves (on
        half-precision leaves the preset computes in float32, the peer in the leaf's
        dtype: docs/porting.md).
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
    name = "compat.torch_adagrad"
    storage_lib.check_storage(name, storage)
    lr = tensor_rate(lr)
    validate.check_learning_rate(name, "lr", lr)
    validate.check_non_negative(name, "lr_decay", lr_decay)
    validate.check_non_negative(name, "weight_decay", weight_decay)
    validate.check_non_negative(name, "initial_accumulator_value", initial_accumulator_value)
    validate.check_non_negative(name, "eps", eps)
    validate.check_bool(name, "maximize", maximize)
    check_how_to_run(name, foreach=foreach, differentiable=differentiable, fused=fused)
    lr = named_rate(name, "lr", lr)
    rate = lr if is_zero(lr_decay) else inverse_time_decay(lr, lr_decay)
    return combine.named_chain(
        name,
        flip(maximize),
        coupled_decay(weight_decay),
        real_only(
            rss.scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False, storage=storage),
            "torch",
        ),
        scaling.scale_by_learning_rate(rate),
    )
