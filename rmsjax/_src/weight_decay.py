"""``add_decayed_weights``: L2 weight decay added to the updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rmsjax._src import base, elementwise, engine, fusion, masks, numerics, validate


def add_decayed_weights(
    weight_decay: float = 0.0,
    mask: Any | Callable[[base.Params], Any] | None = None,
) -> base.GradientTransformation:
    r"""Adds ``weight_decay * params`` to the updates: :math:`u = g + \lambda\,\theta`.

    Placed before an adaptive rule this is torch's coupled weight decay (the decay is
    rescaled with the gradient); placed after it and before the learning rate, it is
    decoupled weight decay (AdamW style). Needs ``params`` in ``update``.

    Without a mask this is an elementwise rule that ``chain`` fuses with its neighbours;
    with one it is a separate step of the chain. The state is :class:`EmptyState` in both
    cases, so adding a mask does not change the layout of a checkpoint.

    Args:
      weight_decay: :math:`\lambda` >= 0.
      mask: where to decay: a pytree of python bools with the parameters' structure (or
        a prefix of it), or a function from the parameters to one, e.g.
        ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)`` to leave biases and norm
        scales alone. None decays every leaf.

    Returns:
      A stateless :class:`GradientTransformation`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.add_decayed_weights(0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> tx.update(jnp.zeros(2), tx.init(params), params)[0]
    Array([ 0.1, -0.2], dtype=float32)
    >>> import jax
    >>> tx = rj.add_decayed_weights(0.1, mask={"w": True, "b": False})
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    >>> tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)[0]["b"]
    Array([0.], dtype=float32)
    """
    name = "add_decayed_weights"
    if callable(weight_decay):
        raise TypeError(
            f"rmsjax.{name}: weight_decay must be a number here, got the schedule "
            f"{weight_decay!r}; for a scheduled decay use "
            "rj.inject_hyperparams(rj.add_decayed_weights)(weight_decay=schedule)."
        )
    validate.check_non_negative(name, "weight_decay", weight_decay)
    validate.check_finite(name, "weight_decay", weight_decay)
    weight_decay = validate.as_float(weight_decay)

    def update_leaf(g, param):
        out = jnp.result_type(g, param)  # as optax's g + weight_decay * param
        # (in the wider of the two: a complex parameter's decay kept its real part alone
        # where the gradient was real)
        dtype = numerics.compute_dtype(out)
        return (g.astype(dtype) + weight_decay * param.astype(dtype)).astype(out)

    rule = elementwise.stateless_rule(name, update_leaf, needs_params=True)
    if mask is None:
        return fusion.rule_transformation(rule)

    def init_fn(params):
        if jax.tree.leaves(params):  # fail early on a malformed mask, or one of another tree
            mask_tree = masks.resolve_mask(name, mask, params)
            masks.select(mask_tree, params, function=name, what="parameters")
        return base.EmptyState()

    def update_fn(updates, state, params=None, **extra):
        # Stateless: any state is handed back as it came, as in the unmasked form.
        del extra
        if params is None:
            raise ValueError(
                f"rmsjax.{name}.update: this transformation needs the parameters; "
                "call update(updates, state, params)."
            )
        if updates is None:
            return None, state
        mask_tree = masks.resolve_mask(name, mask, params)
        chosen = masks.select(mask_tree, updates, function=name)
        decayed, _ = engine.run(
            rule,
            engine.PER_LEAF,
            chosen,
            base.EmptyState(),
            masks.select(mask_tree, params, function=name, what="parameters"),
        )
        return masks.merge(mask_tree, decayed, updates), state

    return fusion.wrapper_transformation(name, init_fn, update_fn, None)
