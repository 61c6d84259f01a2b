"""Diagnostics: each weight's effective step size, read from an optimizer's state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, hyperparams, numerics, rms, rss, storage

SecondMomentState = rms.ScaleByRmsState | rss.ScaleByRssState


class StepSizeSummary(NamedTuple):
    """Summary of the effective step sizes of one parameter leaf (float32 scalars).

    Attributes:
      min: the smallest step size of the leaf's elements.
      mean: their arithmetic mean.
      geometric_mean: :math:`\\exp(\\text{mean}(\\log s))`; step sizes span decades,
        so this is the typical value to plot on a log axis.
      max: the largest.
    """

    min: jax.Array
    mean: jax.Array
    geometric_mean: jax.Array
    max: jax.Array


def _is_second_moment(node: Any) -> bool:
    return isinstance(node, (rms.ScaleByRmsState, rss.ScaleByRssState))


def _is_stop(node: Any) -> bool:
    return _is_second_moment(node) or isinstance(node, hyperparams.InjectHyperparamsState)


def find_second_moment(state: base.OptState) -> tuple[SecondMomentState, dict[str, Any]]:
    """The one :class:`ScaleByRmsState` or :class:`ScaleByRssState` inside ``state``, and
    the hyperparameters of the :func:`inject_hyperparams` state around it (or ``{}``).

    Searches any nesting of tuples, lists, dicts and NamedTuples (``chain``, ``masked``,
    ``apply_if_finite``, ``accumulate_gradients`` states and the like).

    Raises:
      ValueError: if there is none, or more than one.
    """
    found: list[tuple[SecondMomentState, dict[str, Any]]] = []

    def visit(node: Any, hyper: dict[str, Any]) -> None:
        if _is_second_moment(node):
            found.append((node, hyper))
            return
        if isinstance(node, hyperparams.InjectHyperparamsState):
            visit(node.inner_state, {**hyper, **node.hyperparams})
            return
        children = jax.tree.leaves(node, is_leaf=lambda x: x is not node and _is_stop(x))
        if len(children) == 1 and children[0] is node:  # an array or other leaf
            return
        for child in children:
            if _is_stop(child):
                visit(child, hyper)

    visit(state, {})
    if len(found) != 1:
        raise ValueError(
            "rmsjax.effective_step_sizes: state must hold exactly one ScaleByRmsState or "
            f"ScaleByRssState (the state of rmsprop, adagrad, scale_by_rms or scale_by_rss), "
            f"found {len(found)}."
        )
    return found[0]


def _is_slot(x: Any) -> bool:
    return isinstance(x, storage.QuantizedArray)


def _load(slot: Any) -> jax.Array:
    return storage.load(slot, jnp.float32)


def _load_moment(slot: Any) -> jax.Array:
    """A second moment's true values (see numerics' encoding), in float32 or wider."""
    if isinstance(slot, storage.QuantizedArray):
        return storage.dequantize(slot)
    return numerics.decode_moment(slot)


def _denominator_base(moment: SecondMomentState) -> Any:
    """The tree of ``v`` in float32 (8-bit stored slots decoded)."""
    if isinstance(moment, rss.ScaleByRssState):
        return jax.tree.map(_load_moment, moment.sum_of_squares, is_leaf=_is_slot)
    if moment.mu is None:
        return jax.tree.map(_load_moment, moment.nu, is_leaf=_is_slot)
    return jax.tree.map(
        # an int8 centered state holds the variance itself (see rms._holds_variance)
        lambda nu, mu: (
            _load_moment(nu) if _is_slot(nu) else jnp.maximum(_load_moment(nu) - _load(mu) ** 2, 0)
        ),
        moment.nu,
        moment.mu,
        is_leaf=_is_slot,
    )


def effective_step_sizes(
    state: base.OptState,
    learning_rate: float | jax.Array | None = None,
    eps: float | jax.Array | None = None,
    *,
    eps_in_sqrt: bool = True,
) -> base.Updates:
    r"""Each weight's effective learning rate, :math:`\eta / \sqrt{v + \epsilon}`.

    ``v`` is RMSprop's average of squared gradients (``nu``, less ``mu**2`` when
    centered) or Adagrad's sum (``sum_of_squares``), read from the optimizer's state:
    a gradient element :math:`g` moves its weight by about :math:`\eta\,g/\sqrt{v+\epsilon}`,
    so this is the step per unit of gradient. Bias correction and momentum are not
    included. Computed in float32, jittable, one pass over the state.

    Args:
      state: the state of ``rmsprop``, ``adagrad``, ``scale_by_rms`` or ``scale_by_rss``,
        alone or inside any chain or wrapper; it must hold exactly one of those two rules.
      learning_rate: :math:`\eta`; None reads ``learning_rate`` from an
        :func:`inject_hyperparams` state around the rule, else uses 1.
      eps: :math:`\epsilon`; None reads ``eps`` from an :func:`inject_hyperparams` state,
        else uses 0. Pass the optimizer's value for exact numbers.
      eps_in_sqrt: ``eps`` inside the root (optax, Keras) or outside it (torch):
        :math:`\eta / (\sqrt{v} + \epsilon)`.

    Returns:
      A pytree with the parameters' structure, each leaf an array of the leaf's shape.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
    >>> _, state = tx.update(jnp.array([2.0, 0.5]), tx.init(jnp.zeros(2)))
    >>> rj.effective_step_sizes(state, learning_rate=0.1, eps=0.0)
    Array([0.05, 0.2 ], dtype=float32)
    """
    moment, hyper = find_second_moment(state)
    if learning_rate is None:
        learning_rate = hyper.get("learning_rate", 1.0)
    if eps is None:
        eps = hyper.get("eps", 0.0)
    lr = jnp.asarray(learning_rate, jnp.float32)
    eps_ = jnp.asarray(eps, jnp.float32)

    def leaf(v):
        if eps_in_sqrt:
            return lr / jnp.sqrt(v + eps_)
        return lr / (jnp.sqrt(v) + eps_)

    return jax.tree.map(leaf, _denominator_base(moment))


def step_size_summary(
    state: base.OptState,
    learning_rate: float | jax.Array | None = None,
    eps: float | jax.Array | None = None,
    *,
    eps_in_sqrt: bool = True,
) -> Any:
    r"""Per-leaf summaries (min, mean, geometric mean, max) of
    :func:`effective_step_sizes`: a few float32 scalars per leaf, cheap to compute and to
    log at every step, inside a jitted training step.

    Elements whose step size is infinite (a zero average with ``eps=0``: weights whose
    gradient has always been zero) count as infinite in ``max`` and ``mean``.

    Args:
      state: as for :func:`effective_step_sizes`.
      learning_rate: as for :func:`effective_step_sizes`.
      eps: as for :func:`effective_step_sizes`.
      eps_in_sqrt: as for :func:`effective_step_sizes`.

    Returns:
      A pytree with the parameters' structure whose leaves are :class:`StepSizeSummary`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.rmsprop(0.01, decay=0.9, eps=1e-8)
    >>> params = {"w": jnp.zeros(3)}
    >>> _, state = tx.update({"w": jnp.array([1.0, 0.1, 0.01])}, tx.init(params))
    >>> summary = rj.step_size_summary(state, learning_rate=0.01, eps=1e-8)
    >>> summary["w"].min, summary["w"].max
    (Array(0.03162277, dtype=float32), Array(3.1606977, dtype=float32))
    """
    sizes = effective_step_sizes(state, learning_rate, eps, eps_in_sqrt=eps_in_sqrt)

    def summarize(s):
        return StepSizeSummary(
            min=jnp.min(s),
            mean=jnp.mean(s),
            geometric_mean=jnp.exp(jnp.mean(jnp.log(s))),
            max=jnp.max(s),
        )

    return jax.tree.map(summarize, sizes)
