"""The parts the presets share: Keras' decoupled weight decay, torch Adagrad's
inverse-time decay, the argument checks, and the parts a preset holds in a fixed place."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import (
    base,
    elementwise,
    fusion,
    momentum,
    numerics,
    scaling,
    step_checks,
    validate,
)
from rmsjax._src import weight_decay as weight_decay_lib

# ------------------------------------------------------------------------ small parts


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: the step count its learning rate reads."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's


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
    name = "compat.decoupled_weight_decay"
    validate.check_non_negative(name, "weight_decay", weight_decay)  # finite in float32 too
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    weight_decay, learning_rate = validate.as_float(weight_decay), validate.as_float(learning_rate)

    def factor_at(count):
        rate = step_checks.rate_at(f"{name}.update", "learning_rate", learning_rate, count)
        return rate * weight_decay

    def update_leaf(g, factor, param):
        dtype = numerics.compute_dtype(g.dtype)
        shrink = jnp.asarray(factor, dtype) * param.astype(dtype)
        return (g.astype(dtype) - shrink).astype(g.dtype)

    return fusion.rule_transformation(
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
    name = "compat.inverse_time_decay"
    validate.check_learning_rate(name, "learning_rate", learning_rate)
    validate.check_non_negative(name, "lr_decay", lr_decay)
    learning_rate, lr_decay = validate.as_float(learning_rate), validate.as_float(lr_decay)

    def schedule(count):
        rate = step_checks.rate_at(name, "learning_rate", learning_rate, count)
        # the default float: float32, or float64 with x64 on (where torch runs float64)
        count = jnp.asarray(count, jnp.result_type(float))
        return rate / (1 + count * lr_decay)

    return schedule


# ----------------------------------------------------------------------------- checks


def is_zero(value: Any) -> bool:
    """True for None or a Python or NumPy zero: the part it switches on is left out. A
    JAX array counts as non-zero whatever it holds, so that the state's structure does
    not depend on its value: ``inject_hyperparams`` builds the optimizer from concrete
    arrays in ``init`` and from traced ones in a jitted ``update`` (a part with a zero
    rate steps as none: ``g + 0 * m`` is ``g``)."""
    if value is None:
        return True
    if isinstance(value, jax.Array):
        return False
    number = validate.concrete_value(value)
    return number is not None and number == 0


def tensor_rate(value: Any) -> Any:
    """torch documents ``lr (float, Tensor)``: a one-element torch tensor is read as its
    float, once, where the preset is built (a tensor changed in place later is not
    followed: change the rate with a schedule or ``inject_hyperparams``)."""
    if type(value).__module__ == "torch" and callable(getattr(value, "numel", None)):
        if value.numel() == 1:
            return float(value.item())
    return value


def named_rate(function: str, argument: str, rate: base.ScalarOrSchedule) -> Any:
    """``rate``, a schedule wrapped so that a wrong value names the preset's update and
    its own argument (torch's ``lr``), not the learning_rate of the part it feeds."""
    if not callable(rate):
        return rate
    schedule = rate

    def checked(count: Any) -> Any:
        return step_checks.scalar_schedule_value(f"{function}.update", argument, schedule(count))

    return checked


def flip(maximize: bool) -> base.GradientTransformation:
    return scaling.scale(-1.0) if maximize else fusion.identity()


def coupled_decay(value: float) -> base.GradientTransformation:
    if is_zero(value):
        return fusion.identity()
    return weight_decay_lib.add_decayed_weights(value)


def decoupled_decay(value: float | None, learning_rate: Any) -> base.GradientTransformation:
    if value is None or is_zero(value):  # (None spelled out for the type checker)
        return fusion.identity()
    return decoupled_weight_decay(value, learning_rate)


def momentum_or_identity(value: float, storage: base.Storage | None) -> base.GradientTransformation:
    return fusion.identity() if is_zero(value) else momentum.trace(decay=value, storage=storage)


COMPLEX = {
    "torch": "torch steps a complex parameter as two real ones (torch.view_as_real), each "
    "with its own second moment: stack them, jnp.stack([z.real, z.imag], -1), for torch's "
    "numbers",
    "keras": "Keras squares a complex gradient (g * g, not |g|^2), which no rule here "
    "reproduces; rj.rmsprop and rj.adagrad step complex leaves as optax does",
    "tf1": "TF1 squares a complex gradient (g * g, not |g|^2), which no rule here "
    "reproduces; rj.rmsprop and rj.adagrad step complex leaves as optax does",
}
"""Why each peer's presets refuse complex leaves: the peer does not compute optax's
``|g|^2`` second moment, which the rules would."""


def real_only(rule: base.GradientTransformation, peer: str) -> base.GradientTransformation:
    """``rule`` (a preset's second moment), refusing complex leaves for ``peer``'s reason
    (whatever its storage: the default would refuse them too)."""
    leaf_rule = fusion.leaf_rule_of(rule)
    assert leaf_rule is not None, "a preset's second moment is an elementwise rule"
    return fusion.rule_transformation(leaf_rule._replace(complex_refusal=COMPLEX[peer]))


def check_how_to_run(function: str, **options: Any) -> None:
    """Peer options that choose how the peer runs a step, not what it computes (torch's
    ``capturable``, ``foreach``, ``differentiable`` and ``fused``, TF1's ``use_locking``,
    a ``name``): accepted so that a peer's call ports as it is, and checked. ``foreach``
    and ``fused`` may be None, as in torch."""
    for argument, value in options.items():
        flag = isinstance(value, (bool, np.bool_))
        if argument == "name":
            allowed, fits = "None or a string", value is None or isinstance(value, str)
        elif argument in ("foreach", "fused"):
            allowed, fits = "True, False or None", value is None or flag
        else:
            allowed, fits = "True or False", flag
        if not fits:
            raise TypeError(
                f"rmsjax.{function}: {argument} must be {allowed}, got {value!r} "
                f"({type(value).__name__})"
            )
        if argument == "name" and function.startswith("compat.keras") and "/" in (value or ""):
            raise ValueError(  # Keras' own rule: a name cannot hold '/'
                f"rmsjax.{function}: name must be a string without '/', got {value!r}"
            )


def refuse_not_reproduced(function: str, argument: str, value: Any, instead: str) -> None:
    """A ValueError for a peer option that changes the numbers and that the preset does
    not reproduce, given anything but its off value (None or False)."""
    if value is None or (isinstance(value, (bool, np.bool_)) and not value):
        return
    raise ValueError(
        f"rmsjax.{function}: {argument}={value!r} is not reproduced by the preset; {instead}"
    )
