"""``masked``: run a transformation on some leaves only (no weight decay on biases, say)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from rmsjax._src import base, combine, elementwise, fusion, tree_checks, validate
from rmsjax._src.masks import Mask, merge, resolve_mask, select


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transformation's state, built on the selected
    leaves only (a :class:`MaskedNode` stands for each of the others)."""

    inner_state: base.OptState


def masked(
    inner: base.GradientTransformation,
    mask: Mask | Callable[[base.Params], Mask],
    *,
    mask_compatible_extra_args: bool = False,
) -> base.GradientTransformation:
    """Applies ``inner`` to the leaves where ``mask`` is True; the others pass unchanged.

    The inner transformation sees a tree in which each unselected leaf is a
    :class:`MaskedNode`, so it keeps no state for them (Adagrad's sum for an embedding
    you freeze costs nothing), exactly as ``optax.masked`` lays its state out.

    Args:
      inner: the transformation to apply to the selected leaves.
      mask: a pytree of python bools with the structure of the parameters (or a prefix
        of it: one bool then covers a whole subtree), or a function that maps the
        parameters (or, when ``update`` gets no parameters, the updates) to such a tree.
        A mask counts as a function only when every leaf of it is callable, so a
        callable pytree of bools (an equinox Module) is a tree. The mask is structural:
        it is read when the step is traced, not per step.
      mask_compatible_extra_args: also mask the keyword extras of ``update`` that have
        the updates' tree structure (per-parameter tags, say), as optax does.

    Returns:
      A :class:`GradientTransformation` with state :class:`MaskedState`.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    >>> tx = rj.masked(rj.scale(0.0), {"w": True, "b": False})
    >>> updates, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(1)}, tx.init(params))
    >>> updates["w"], updates["b"]
    (Array([0., 0.], dtype=float32), Array([1.], dtype=float32))
    """
    name = "masked"
    validate.check_transformation(name, "inner", inner)
    if mask is None:  # a tree without leaves: it would select nothing, without a word
        raise TypeError(
            "rmsjax.masked: mask must be a pytree of bools or a function returning one, got None"
        )
    validate.check_bool(name, "mask_compatible_extra_args", mask_compatible_extra_args)
    inner = base.with_extra_args_support(inner)

    def init_fn(params):
        if params is not None and not jax.tree.leaves(params):
            # A tree without arrays (optax's tree_map_params calls init with an empty
            # placeholder) has nothing to mask: hand it on as it is.
            with elementwise.naming_wrapper(name, "init"):
                return MaskedState(inner.init(params))
        mask_tree = resolve_mask(name, mask, params)
        with elementwise.naming_wrapper(name, "init"):
            return MaskedState(inner.init(select(mask_tree, params, what="parameters")))

    def step(updates, state, params, extra, apply):
        elementwise.expect_state(name, state, MaskedState)
        # every gradient, masked out or not: one left out passes on unchanged, and an
        # integer one was added to its parameter (8-bit floats: see tree_checks)
        leaves = [jax.numpy.asarray(g) for g in jax.tree.leaves(updates)]
        tree_checks.check_inexact(name, "update", updates, leaves)
        if not jax.tree.leaves(updates) and not jax.tree.leaves(params):
            # nothing to mask, as in init: the inner state was made on the tree as it is
            with elementwise.naming_wrapper(name, "update"):
                out, inner_state = combine.step_of(inner, apply)(
                    updates, state.inner_state, params, **extra
                )
            return out, MaskedState(inner_state)
        mask_tree = resolve_mask(name, mask, updates if params is None else params)
        if mask_compatible_extra_args:
            structure = jax.tree.structure(updates)
            extra = {
                key: select(mask_tree, value) if jax.tree.structure(value) == structure else value
                for key, value in extra.items()
            }
        with elementwise.naming_wrapper(name, "update"):
            out, inner_state = combine.step_of(inner, apply)(
                select(mask_tree, updates),
                state.inner_state,
                select(mask_tree, params, what="parameters"),
                **extra,
            )
        # The leaves left out pass their updates on unchanged (added to their parameters
        # when the step applies them).
        others = base.apply_updates(params, updates) if apply else updates
        return merge(mask_tree, out, others), MaskedState(inner_state)

    return fusion.stepped_wrapper(name, init_fn, step, fusion.fused_step_of(inner) is not None)
