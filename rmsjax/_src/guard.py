"""``apply_if_finite``: skip steps whose gradients hold a NaN or an infinity."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, combine, elementwise, fusion, numerics, sharding, validate


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
      notfinite_count: consecutive non-finite steps so far (int32; 0 after a good step).
      last_finite: whether the last step's gradients, updates and new inner state were
        all finite (bool scalar).
      total_notfinite: non-finite steps since ``init`` (int32, saturating).
      inner_state: the wrapped transformation's state.
    """

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: base.OptState


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every floating leaf of ``tree`` is finite (a bool
    scalar); integer and boolean leaves (counts, int8 codes) are finite by nature."""
    leaves = [
        leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def stays_finite(new: Any, old: Any) -> jax.Array:
    """True when no floating element of the state ``new`` is non-finite where ``old``
    held a finite one: a state may hold inf by design (``reduce_on_plateau``'s best
    value starts at inf), and a step is skipped only for what it turned non-finite.
    Where the two trees or a leaf's shape differ, every element of ``new`` is checked."""
    new_leaves, new_def = jax.tree.flatten(new)
    old_leaves, old_def = jax.tree.flatten(old)
    if new_def != old_def:
        return all_finite(new)
    checks = []
    for n, o in zip(new_leaves, old_leaves):
        if not jnp.issubdtype(jnp.result_type(n), jnp.inexact):
            continue
        if jnp.shape(n) == jnp.shape(o) and jnp.issubdtype(jnp.result_type(o), jnp.inexact):
            checks.append(jnp.all(jnp.isfinite(n) | ~jnp.isfinite(o)))
        else:
            checks.append(jnp.all(jnp.isfinite(n)))
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _negative_zeros(tree: Any) -> Any:
    # -0.0 rather than +0.0: p + (-0.0) is p bit for bit for every p, -0.0 included,
    # whereas (-0.0) + (+0.0) is +0.0.
    return jax.tree.map(lambda u: jnp.full(jnp.shape(u), -0.0, jnp.result_type(u)), tree)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def apply_if_finite(
    inner: base.GradientTransformation, max_consecutive_errors: int
) -> base.GradientTransformation:
    """Runs ``inner`` only on steps whose gradients, updates and new state are all finite.

    On a step where any element of the gradients, of the updates ``inner`` returns or of
    its new state is NaN or infinite (a NaN gradient, a schedule that yields NaN, an
    inner rule that overflows), the updates are zero and
    ``inner``'s state is returned unchanged, bit for bit, so ``apply_updates`` leaves
    the parameters exactly as they were; the counters record the skip. A finite step
    resets the consecutive count. After more than ``max_consecutive_errors`` bad steps
    in a row the step is applied anyway (as in optax), so a run whose gradients stay
    non-finite fails visibly instead of silently freezing. optax looks at the gradients
    alone: once such a forced step has put NaN into ``inner``'s state, optax counts the
    next finite gradients as finite steps (and applies their NaN updates), while this
    keeps counting them as bad steps, as their updates are not finite: from then on every
    step is applied, a later non-finite gradient in a leaf still finite included (optax,
    its count reset by the finite gradients, skips that one).

    Both outcomes are computed and one is selected with ``jnp.where`` (no ``lax.cond``),
    which keeps the step a single straight-line program that XLA fuses, vmaps and
    donates buffers through. Under :func:`update_and_apply` the parameters themselves
    are selected, so a skipped step returns them bit-identical.

    Args:
      inner: the transformation to guard, usually the whole optimizer.
      max_consecutive_errors: how many non-finite steps in a row are skipped, an integer >= 0.

    Returns:
      A :class:`GradientTransformation` with state :class:`ApplyIfFiniteState`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.apply_if_finite(rj.sgd(0.1), max_consecutive_errors=3)
    >>> state = tx.init(jnp.ones(2))
    >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state)
    >>> updates, int(state.notfinite_count), bool(state.last_finite)
    (Array([-0., -0.], dtype=float32), 1, False)

    References:
      ``optax.apply_if_finite``, whose state fields this keeps and whose steps it takes
      wherever the gradients' finiteness decides the same as the updates' and state's.
    """
    validate.check_transformation("apply_if_finite", "inner", inner)
    name = "apply_if_finite"
    validate.check_count(name, "max_consecutive_errors", max_consecutive_errors, minimum=0)

    inner = base.with_extra_args_support(inner)

    def counters():
        return jnp.zeros([], jnp.int32), jnp.asarray(True), jnp.zeros([], jnp.int32)

    def init_fn(params):
        # the counters are replicated over the parameters' mesh, if they have one
        notfinite, last_finite, total = sharding.init_shared_like(counters, jax.tree.leaves(params))
        with elementwise.naming_wrapper(name, "init"):
            inner_state = inner.init(params)
        return ApplyIfFiniteState(
            notfinite_count=notfinite,
            last_finite=last_finite,
            total_notfinite=total,
            inner_state=inner_state,
        )

    def step(updates, state, params, extra, apply):
        elementwise.expect_state(name, state, ApplyIfFiniteState)
        with elementwise.naming_wrapper(name, "update"):
            new_updates, new_inner = combine.step_of(inner, apply)(
                updates, state.inner_state, params, **extra
            )
        # The gradients, and what the inner transformation made of them (the new
        # parameters, with apply): a schedule that yields NaN or a rule that overflows
        # is caught as well as a NaN gradient (in the state, what turned non-finite: a
        # state may hold inf by design).
        finite = all_finite((updates, new_updates)) & stays_finite(new_inner, state.inner_state)
        notfinite_count = jnp.where(
            finite, jnp.zeros([], jnp.int32), numerics.safe_increment(state.notfinite_count)
        )
        total = jnp.where(
            finite, state.total_notfinite, numerics.safe_increment(state.total_notfinite)
        )
        keep_new = jnp.logical_or(finite, notfinite_count > max_consecutive_errors)
        if apply:  # a skipped step returns the parameters themselves
            new_updates = jax.tree.map(
                lambda n, p: None if p is None else jnp.where(keep_new, n, p),
                new_updates,
                params,
                is_leaf=base.is_none,
            )
        else:
            new_updates = _select(keep_new, new_updates, _negative_zeros(new_updates))
        new_inner = _select(keep_new, new_inner, state.inner_state)
        return new_updates, ApplyIfFiniteState(notfinite_count, finite, total, new_inner)

    fuses = fusion.fused_step_of(inner) is not None
    return fusion.stepped_wrapper(name, init_fn, step, fuses)
