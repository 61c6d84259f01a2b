"""Gradient clipping: ``clip`` (each element) and ``clip_by_global_norm`` (the whole tree)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, fusion, numerics, validate


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
    :math:`|g_i|^2`; None leaves are skipped.

    Args:
      updates: a pytree of arrays (the argument's name is optax's).

    Returns:
      A scalar array (float32, or wider if a leaf is wider).

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])})
    Array(5., dtype=float32)
    """
    leaves = jax.tree.leaves(updates)
    total = jnp.zeros([], jnp.float32)
    for leaf in leaves:
        leaf = jnp.asarray(leaf)
        leaf = leaf.astype(numerics.compute_dtype(leaf.dtype))
        total = total + jnp.sum(numerics.abs_sq(leaf))
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> base.GradientTransformation:
    r"""Rescales the updates so that their global norm is at most ``max_norm``.

    With :math:`n = \|g\|_2` the norm of all elements of all leaves together:

    .. math:: u = g \ \text{if}\ n < \text{max\_norm},\ \text{else}\ (g / n)\,\text{max\_norm}

    so the direction is kept and only the length shrinks, the same numbers as
    ``optax.clip_by_global_norm``. The norm couples the leaves, so this transformation is
    not fused with its neighbours in a ``chain``. Place it first, on the raw gradients.

    Args:
      max_norm: the largest global norm allowed, > 0.

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
    validate.check_range(name, "max_norm", max_norm, 0.0, low_open=True)
    validate.check_finite(name, "max_norm", max_norm)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        norm = global_norm(updates)
        keep = norm < max_norm

        def clip_leaf(g):
            dtype = numerics.compute_dtype(g.dtype)
            g_c = g.astype(dtype)
            clipped = (g_c / norm.astype(dtype)) * jnp.asarray(max_norm, dtype)
            return jnp.where(keep, g_c, clipped).astype(g.dtype)

        return jax.tree.map(clip_leaf, updates), state

    return base.GradientTransformation(base.init_empty_state, update_fn)
