"""Diagnostics: each weight's effective step size, measured on the optimizer itself."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import (
    base,
    elementwise,
    grouped,
    hyperparams_state,
    moments,
    numerics,
    rms,
    rss,
    storage,
    tree_paths,
)


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


def _moment_shapes(function: str, state: base.OptState) -> Any:
    """Zero gradients shaped like the parameters, read from the one RMSprop or Adagrad
    state inside ``state`` (whose moments are laid out like the parameters)."""
    found = []

    def visit(node: Any) -> None:
        if isinstance(node, grouped.GroupedState):
            raise ValueError(
                f"rmsjax.{function}: pass params (the parameters the optimizer updates): "
                "a grouped state holds its moments in blocks of stacked leaves, not in "
                "the parameters' tree, so the gradients' shapes cannot be read from it."
            )
        if _is_second_moment(node):
            found.append(node)
            return
        if isinstance(node, hyperparams_state.InjectHyperparamsState):
            visit(node.inner_state)
            return

        def is_part(x):  # a moment, or a state of its own below this one
            return x is not node and (_is_second_moment(x) or base.is_namedtuple(x))

        children = jax.tree.leaves(node, is_leaf=is_part)
        if len(children) == 1 and children[0] is node:
            return
        for child in children:
            visit(child)

    visit(state)
    if len(found) != 1:
        raise ValueError(
            f"rmsjax.{function}: pass params (the parameters the optimizer updates): "
            "without them the gradients' shapes are read from the state's one "
            f"ScaleByRmsState or ScaleByRssState, and this state holds {len(found)}."
        )
    moment = found[0]
    tree = moment.nu if isinstance(moment, rms.ScaleByRmsState) else moment.sum_of_squares

    def masked_out(x: Any) -> bool:  # rmsjax's or optax's MaskedNode: no shape to read
        return base.is_namedtuple(x) and type(x).__name__ == "MaskedNode"

    def zeros(slot: Any) -> jax.Array:
        if masked_out(slot):
            raise ValueError(
                f"rmsjax.{function}: pass params (the parameters the optimizer updates): "
                "the state keeps no moment for the leaves its mask leaves out, so their "
                "shapes cannot be read from it."
            )
        shape = slot.shape if isinstance(slot, storage.QuantizedArray) else jnp.shape(slot)
        return jnp.zeros(shape, jnp.float32)

    return jax.tree.map(
        zeros, tree, is_leaf=lambda x: isinstance(x, storage.QuantizedArray) or masked_out(x)
    )


def effective_step_sizes(
    tx: base.GradientTransformation, state: base.OptState, params: base.Params | None = None
) -> base.Updates:
    r"""Each weight's effective learning rate: how far ``tx``'s next step moves the weight
    per unit of its gradient, :math:`|\partial u_i / \partial g_i|` at :math:`g = 0`.

    Measured on the transformation itself (a forward-mode derivative of one
    ``tx.update``, whose new state is discarded), so it includes whatever the step
    includes: the learning rate at the next step's count (schedules, injected
    hyperparameters), ``eps`` wherever it goes, bias correction and momentum's share of
    the new gradient. For RMSprop it is :math:`\eta_{t+1} / \sqrt{\rho\,\nu_t + \epsilon}`
    (the next average keeps :math:`\rho\,\nu_t` of the present one), for Adagrad
    :math:`\eta / \sqrt{v_t + \epsilon}`. Where the step has no derivative at a zero
    gradient (``eps=0`` and a zero sum or average) it reports the zero update's: 0 for
    a weight whose Adagrad sum is still zero, the learning rate for a zero RMSprop
    average, though any gradient, however small, moves either by ``lr`` or
    ``lr / sqrt(1 - decay)``. Jittable; costs about one optimizer update. Around
    :func:`accumulate_gradients` it measures the next call too: 0 on a micro-step that
    only adds to the sum, and on the last one the derivative with respect to that
    micro-batch's gradient, taken at the accumulated mean; the optimizer it wraps,
    measured with ``state.inner_state``, gives the step sizes of the cycle's step.

    Measured at a zero gradient, it leaves out what depends on the gradients' size:
    ``clip_by_global_norm`` and ``clip`` are inactive there (a clipped step moves less),
    unless a part before them makes their input non-zero: coupled weight decay
    (``add_decayed_weights``, a torch preset's ``weight_decay``) hands the rule after it
    ``weight_decay * params``, not 0, so the figure is the derivative at that point,
    smaller than the formulas above where ``|weight_decay * param|`` is not small
    against the moment's root (and, with a clip it activates, the sum of a row of the
    step's Jacobian, not its diagonal); decoupled decay leaves it as above,
    and optax's rules with a root of a second moment (``optax.adam``) report NaN where
    that moment is 0 (the root's derivative at 0). With a concrete ``eps > 0``, a
    weight whose Adagrad sum is still 0 reports ``lr / sqrt(eps)``, or ``lr / eps``
    where ``eps`` is added outside the root (``rowwise_adagrad``, ``torch_adagrad``):
    the step of any small gradient, not 0.

    Args:
      tx: the optimizer whose state ``state`` is; any rmsjax (or optax) transformation
        whose update treats each gradient element on its own (an ``nnx.Optimizer``'s
        ``tx`` with its ``opt_state`` and ``nnx.state(model, nnx.Param)`` too).
      state: ``tx``'s state.
      params: the parameters; needed when ``tx`` reads them (weight decay) or when
        ``state`` does not hold exactly one RMSprop or Adagrad state laid out like the
        parameters (grouped, row-wise or factored state).

    Returns:
      A pytree with the parameters' structure, each leaf a float32 array of the leaf's
      shape.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
    >>> _, state = tx.update(jnp.array([2.0, 0.5]), tx.init(jnp.zeros(2)))
    >>> rj.effective_step_sizes(tx, state)
    Array([0.05, 0.2 ], dtype=float32)
    """
    return _step_sizes("effective_step_sizes", tx, state, params)


def _step_sizes(
    name: str, tx: base.GradientTransformation, state: base.OptState, params: base.Params | None
) -> base.Updates:
    """:func:`effective_step_sizes`, whose errors name ``name``, the function called."""
    if not isinstance(tx, tuple) or not callable(getattr(tx, "update", None)):
        raise TypeError(
            f"rmsjax.{name}: tx must be the optimizer (a GradientTransformation), got "
            f"{type(tx).__name__}; call it as {name}(tx, state, params)."
        )
    state, params = tree_paths.held_values(state), tree_paths.held_values(params)
    if params is None:
        zeros = _moment_shapes(name, state)
    else:
        base.check_float_leaves(
            name,
            params,
            "step sizes exist for floating-point (or complex) leaves only: pass the "
            "parameters the optimizer trains",
        )
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
    ones = jax.tree.map(jnp.ones_like, zeros)

    def update(grads: Any) -> Any:
        return tx.update(grads, state, params)[0]

    try:
        with elementwise.naming_wrapper(name, None, role="tx"), moments.measuring():
            _, derivative = jax.jvp(update, (zeros,), (ones,))
    except ValueError as error:
        if params is None and "needs the parameters" in str(error):
            raise ValueError(
                f"rmsjax.{name}: pass params ({name}(tx, state, params)): tx reads the "
                "parameters (weight decay, say)."
            ) from None
        raise
    return jax.tree.map(lambda d: jnp.abs(d).astype(jnp.float32), derivative)


def _summaries(leaves: list) -> list:
    """A :class:`StepSizeSummary` of each array of step sizes in ``leaves`` (None for
    None). Leaves of one shape and dtype are stacked and reduced together, four
    reductions per shape instead of per leaf, and the sizes are computed once, before
    the reductions: fused into each of them (XLA's choice), the derivative that gives
    them was computed four times, and a summary of 100 leaves took longer to compile
    than a step and several times its run time."""
    groups: dict = {}
    for index, s in enumerate(leaves):
        if s is not None:
            groups.setdefault((s.shape, s.dtype), []).append(index)
    out: list = [None] * len(leaves)
    for (shape, dtype), indices in groups.items():
        size = math.prod(shape)
        if size == 0:  # no step sizes to summarise (and no identity for min and max)
            nothing = jnp.full((), jnp.nan, dtype)
            for i in indices:
                out[i] = StepSizeSummary(nothing, nothing, nothing, nothing)
            continue
        stacked = jax.lax.optimization_barrier(jnp.stack([leaves[i].reshape(-1) for i in indices]))
        # The sum is of the sizes over the power of two that brings the largest under 1:
        # step sizes near float32's maximum (eps=0 and gradients of 1e-38) do not sum
        # past it, nor do tiny ones (moments above 2^100) fall under its normal range
        # (a fixed unit of 2^20 flushed sizes under 1e-32 to 0, and the mean was the
        # min); it rounds as the plain sum does wherever that is finite. The means stay
        # within [min, max]: of equal sizes near float32's maximum, either can round past.
        low, top = jnp.min(stacked, axis=1), jnp.max(stacked, axis=1)
        # (behind a barrier, XLA cannot fold the quotient and the product into nothing)
        unit = jax.lax.optimization_barrier(
            jnp.ldexp(jnp.ones_like(top), numerics.binary_exponent(top))
        )
        mean = jnp.sum(stacked / unit[:, None], axis=1) / size * unit
        mean = jnp.clip(mean, low, top)
        geometric = jnp.clip(jnp.exp(jnp.sum(jnp.log(stacked), axis=1) / size), low, top)
        for row, i in enumerate(indices):
            out[i] = StepSizeSummary(low[row], mean[row], geometric[row], top[row])
    return out


def step_size_summary(
    tx: base.GradientTransformation, state: base.OptState, params: base.Params | None = None
) -> Any:
    r"""Per-leaf summaries (min, mean, geometric mean, max) of
    :func:`effective_step_sizes`: four float32 scalars per leaf, to log from a jitted
    function (on hundreds of small leaves it costs one or two steps' time, and several
    times a step's compile time: docs/training.md, "Effective step sizes").

    Step sizes up to float32's maximum (``eps=0`` and gradients of 1e-38: about 3e29)
    are averaged without overflow; an infinite one would count as infinite in ``max``
    and ``mean``. Elements whose step size is 0 (an Adagrad sum that is still zero,
    with ``eps=0``) make ``geometric_mean`` 0. A leaf without elements has NaN in all four.

    Args:
      tx: as for :func:`effective_step_sizes`.
      state: as for :func:`effective_step_sizes`.
      params: as for :func:`effective_step_sizes`.

    Returns:
      A pytree with the parameters' structure whose leaves are :class:`StepSizeSummary`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.rmsprop(0.01, decay=0.9, eps=1e-8)
    >>> params = {"w": jnp.zeros(3)}
    >>> _, state = tx.update({"w": jnp.array([1.0, 0.1, 0.01])}, tx.init(params))
    >>> summary = rj.step_size_summary(tx, state, params)
    >>> summary["w"].min, summary["w"].max
    (Array(0.03333333, dtype=float32), Array(3.3314831, dtype=float32))
    """
    sizes = _step_sizes("step_size_summary", tx, state, params)

    leaves, treedef = jax.tree.flatten(sizes, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, _summaries(leaves))
