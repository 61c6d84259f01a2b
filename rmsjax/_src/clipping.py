"""Gradient clipping: ``clip`` (each element) and ``clip_by_global_norm`` (the whole tree)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, fusion, numerics, tree_checks, validate


def clip(max_delta: float) -> base.GradientTransformation:
    r"""Clips every element of the updates to :math:`[-\delta, \delta]`.

    .. math:: u = \min(\max(g, -\delta), \delta)

    An elementwise rule: inside ``chain`` it is fused with its elementwise neighbours.

    Args:
      max_delta: :math:`\delta` >= 0.

    Returns:
      A stateless :class:`GradientTransformation` (state :class:`EmptyState`).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.clip(1.0)
    >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(jnp.zeros(3)))[0]
    Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    name = "clip"
    validate.check_non_negative(name, "max_delta", max_delta)

    def update_leaf(g, param):
        delta = jnp.asarray(max_delta, g.dtype)
        return jnp.clip(g, -delta, delta)

    rule = elementwise.stateless_rule(
        name,
        update_leaf,
        complex_refusal="complex values have no order to clip by; clip_by_global_norm takes them",
    )
    return fusion.rule_transformation(rule)


def global_norm(updates: base.Updates) -> jax.Array:
    r"""The Euclidean norm of all the elements of a pytree, :math:`\sqrt{\sum_i g_i^2}`.

    Squares are summed in float32 for half-precision leaves; a complex element counts
    :math:`|g_i|^2`; None leaves are skipped. The elements are first scaled by the power
    of two that brings the largest magnitude into [0.5, 1), so no square overflows or
    underflows: a norm of 1e21 (gradients of 1e20) is 1e21, not inf as a plain sum of
    squares gives in float32, and one of 1e-29 is not 0. The scaling is exact, so where
    the plain sum neither overflows nor underflows the result is optax's, bit for bit.
    It costs one more pass over the elements (their largest magnitude).

    Args:
      updates: a pytree of arrays (the argument's name is optax's).

    Returns:
      A scalar array (float32, or wider if a leaf is wider): inf only where the norm
      itself exceeds the dtype's largest number.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])})
    Array(5., dtype=float32)
    >>> rj.global_norm({"a": jnp.array([3e20]), "b": jnp.array([[4e20]])})
    Array(5.e+20, dtype=float32)
    """
    tree_checks.refuse_eight_bit_floats("global_norm", updates)
    root, exponent = _scaled_norm(jax.tree.leaves(updates))
    return jnp.ldexp(root, exponent)


def _scaled_norm(leaves: list) -> tuple[jax.Array, jax.Array]:
    """``(root, exponent)``: the norm of ``leaves`` is ``root * 2**exponent``, and
    ``root`` is the norm of the leaves divided by ``2**exponent``, the power of two that
    brings their largest magnitude into [0.5, 1) (as near as a normal number allows).
    The sum of the scaled squares cannot overflow (each is at most 16) and is the plain
    sum's, divided by ``4**exponent`` exactly, wherever the plain sum is finite and
    normal: numbers scaled by a power of two round as the unscaled ones do."""
    arrays = [jnp.asarray(leaf) for leaf in leaves]
    arrays = [x.astype(numerics.compute_dtype(x.dtype)) for x in arrays]
    real = jnp.result_type(jnp.float32, *(jnp.finfo(x.dtype).dtype for x in arrays))
    largest = jnp.zeros([], real)
    for x in arrays:
        largest = jnp.maximum(largest, jnp.max(jnp.abs(x), initial=0).astype(real))
    # (e is 0 for 0, inf and NaN, whose sums come out 0, inf and NaN, as optax's do)
    exponent = numerics.binary_exponent(largest)
    # Divided by 2^exponent, not multiplied by 2^-exponent (the same numbers): where
    # the leaves are constants XLA folds the factor into one too, and rewrites
    # (x * c) * (x * c) as (x * x) * (c * c), which overflows; behind the barrier the
    # divisor is no constant, and a quotient is not reordered.
    unit = _power_of_two(exponent, real)
    total = jnp.zeros([], real)
    for x in arrays:
        total = total + jnp.sum(numerics.abs_sq(x / unit.astype(jnp.finfo(x.dtype).dtype)))
    return jnp.sqrt(total), exponent


def _power_of_two(exponent: jax.Array, dtype) -> jax.Array:
    """``2**exponent`` in ``dtype``, which XLA treats as no constant (see above)."""
    return jax.lax.optimization_barrier(jnp.ldexp(jnp.ones([], dtype), exponent))


def clip_by_global_norm(max_norm: float) -> base.GradientTransformation:
    r"""Rescales the updates so that their global norm is at most ``max_norm``.

    With :math:`n = \|g\|_2` the norm of all elements of all leaves together:

    .. math:: u = g \ \text{if}\ n < \text{max\_norm},\ \text{else}\ (g / n)\,\text{max\_norm}

    so the direction is kept and only the length shrinks, the same numbers as
    ``optax.clip_by_global_norm`` wherever optax's sum of squares does not overflow.
    Where it does (a norm above 1.8e19 in float32, exploding gradients), optax's norm is
    inf and every update 0; here the norm is taken as :func:`global_norm` takes it, and
    the updates are clipped to ``max_norm`` as for any other norm. The norm couples the
    leaves, so this transformation is not fused with its neighbours in a ``chain``.
    Place it first, on the raw gradients.

    Args:
      max_norm: the largest global norm allowed, > 0 and at least float32's smallest
        normal number (XLA on a CPU reads smaller numbers as 0, and zero gradients
        then came out NaN, as in optax); ``float("inf")`` clips nothing, as in optax.

    Returns:
      A stateless :class:`GradientTransformation` (state :class:`EmptyState`).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.clip_by_global_norm(1.0)
    >>> tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))[0]["w"]
    Array([0.6, 0.8], dtype=float32)

    References:
      Pascanu, Mikolov and Bengio, On the difficulty of training recurrent neural
      networks, ICML 2013 (arXiv:1211.5063).
    """
    name = "clip_by_global_norm"
    clips = validate.concrete_value(max_norm) != float("inf")  # inf: none, as in optax
    if clips:
        validate.check_range(name, "max_norm", max_norm, 0.0, low_open=True)
        validate.check_finite(name, "max_norm", max_norm)
        validate.check_normal(name, "max_norm", max_norm)
    max_norm = validate.as_float(max_norm)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        # float or complex leaves (not 8-bit floats): an integer gradient was clipped,
        # then truncated (ones of a norm over max_norm came out 0), or let through with
        # max_norm=inf
        leaves = [jnp.asarray(g) for g in jax.tree.leaves(updates)]
        tree_checks.check_inexact(name, "update", updates, leaves)
        if not clips:
            # (also where the norm passes float32's maximum: optax's updates are NaN)
            return jax.tree.map(jnp.asarray, updates), state
        root, exponent = _scaled_norm(jax.tree.leaves(updates))
        keep = jnp.ldexp(root, exponent) < max_norm
        # (g * 2^-e) / (norm * 2^-e) is g / norm, bit for bit, and stays right where
        # the norm itself exceeds float32 (gradients of 1e20 and more). (A quotient
        # by 2^e here would be merged with the one by the root: XLA rewrites
        # (g / a) / b as g / (a * b), and a * b is the norm again.)
        scale = _power_of_two(-exponent, root.dtype)

        def clip_leaf(g):
            g = jnp.asarray(g)  # a Python float leaf, eagerly
            dtype = numerics.compute_dtype(g.dtype)
            g_c = g.astype(dtype)
            scaled = g_c * scale.astype(jnp.finfo(dtype).dtype)
            clipped = (scaled / root.astype(dtype)) * jnp.asarray(max_norm, dtype)
            return jnp.where(keep, g_c, clipped).astype(g.dtype)

        return jax.tree.map(clip_leaf, updates), state

    return fusion.wrapper_transformation(name, base.init_empty_state, update_fn, None)
