"""Rules that act on each leaf on its own, and the one loop that runs them.

Most optimizer rules (RMSprop's average, Adagrad's sum, momentum, scaling by a learning
rate) are elementwise: leaf ``i`` of the output depends only on leaf ``i`` of the
gradient, of the state and of the parameters, plus a few scalars shared by all leaves
(a step count, a learning rate from a schedule). Such a rule is written once, for one
leaf, as a :class:`LeafRule`. :func:`elementwise_transformation` turns it into a
:class:`GradientTransformation`, and ``chain`` composes adjacent rules into one
:class:`LeafRule`, so that a chain walks the pytree once and each leaf's whole update
(optionally with the parameter update) is one piece of straight-line code. The same
per-leaf functions run whether or not the rules are fused, so fused and unfused chains
give bit-identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import base, numerics, sharding

Slots = tuple  # the per-leaf state of a rule: a tuple of arrays (or small pytrees)


class LeafRule(NamedTuple):
    """An elementwise rule, described for one leaf.

    Attributes:
      name: the public constructor's name, used in error messages.
      init_shared: ``() -> shared``, the scalars shared by all leaves (a count, say).
      step_shared: ``shared -> (new_shared, context)``, run once per step; ``context``
        is handed to every leaf's update (a bias correction factor, a learning rate).
      init_leaf: ``param -> slots``, the rule's state for one parameter leaf.
      update_leaf: ``(g, slots, context, param) -> (g, slots)`` for one leaf; ``param``
        is None when ``update`` was called without parameters.
      to_state: ``(shared, slot_trees) -> state``, the rule's public state NamedTuple.
      from_state: ``state -> (shared, slot_trees)``; raises TypeError on a foreign state.
      num_slots: how many slots each leaf holds.
      needs_params: whether ``update_leaf`` reads ``param``.
      slots_match_leaf: whether every slot has the leaf's shape (checked at trace time).
      complex_refusal: None when the rule takes complex leaves (as optax's rules do),
        else why it cannot (``"storage='int8' keeps real values only"``, say); the
        engine then rejects complex leaves at ``init`` and ``update`` with that reason.
    """

    name: str
    init_shared: Callable[[], Any]
    step_shared: Callable[[Any], tuple[Any, Any]]
    init_leaf: Callable[[jax.Array], Slots]
    update_leaf: Callable[[jax.Array, Slots, Any, Any], tuple[jax.Array, Slots]]
    to_state: Callable[[Any, Sequence[Any]], Any]
    from_state: Callable[[Any], tuple[Any, tuple]]
    num_slots: int
    needs_params: bool = False
    slots_match_leaf: bool = True
    complex_refusal: str | None = None


def no_shared() -> tuple:
    return ()


def no_step(shared: Any) -> tuple[Any, None]:
    return shared, None


def is_optax_state(state: Any) -> bool:
    """Whether ``state`` is one of optax's state types (a NamedTuple from optax)."""
    return type(state).__module__.split(".")[0] == "optax"


def expect_state(rule_name: str, state: Any, state_type: type) -> None:
    """Raises a TypeError when ``update`` is handed another rule's state."""
    if is_optax_state(state):
        raise TypeError(
            f"rmsjax.{rule_name}.update: got optax's {type(state).__name__} (from "
            f"{type(state).__module__}), not rmsjax's {state_type.__name__}: the two libraries "
            "lay their states out differently. Convert an optax state once with "
            "rmsjax.from_optax_state(optax_state, like=tx.init(params))."
        )
    if not isinstance(state, state_type):
        raise TypeError(
            f"rmsjax.{rule_name}.update: expected a {state_type.__name__} (the state "
            f"returned by this transformation's init), got {type(state).__name__}. Was the "
            "state created by a different optimizer, or its chain reordered?"
        )


def expect_state_tuple(name: str, state: Any, count: int) -> None:
    """Raises a TypeError unless ``state`` is the tuple of ``count`` states a chain keeps."""
    if not isinstance(state, tuple) or len(state) != count:
        raise TypeError(
            f"rmsjax.{name}.update: expected the tuple of {count} states that "
            f"init returned, got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, tuple) else "")
            + ". Was the state created by a different optimizer?"
        )


# ----------------------------------------------------------------------------- checks


def as_arrays(leaves: Sequence[Any]) -> list:
    """The leaves as arrays: python and numpy scalars become 0-d arrays, as in optax."""
    return [x if isinstance(x, jax.Array) or x is None else jnp.asarray(x) for x in leaves]


def check_inexact(rule: LeafRule, where: str, tree: Any, leaves: list) -> None:
    """Raises a TypeError unless every leaf is floating point (or complex, where the rule
    takes complex leaves), naming the first leaf that is not."""
    for i, leaf in enumerate(leaves):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.complexfloating) and rule.complex_refusal is not None:
            raise TypeError(
                f"rmsjax.{rule.name}.{where}: leaf {_path_of(tree, i)} has dtype {dtype}; "
                f"this transformation takes real leaves only ({rule.complex_refusal}). Use "
                "the default storage, or split the leaf into its real and imaginary parts."
            )
        if not jnp.issubdtype(dtype, jnp.inexact):
            path = _path_of(tree, i)
            raise TypeError(
                f"rmsjax.{rule.name}.{where}: leaf {path} has dtype {dtype}; optimizers "
                "update floating-point (or complex) leaves only. Leave it out of the trained "
                "tree (replace it by None, e.g. with eqx.filter(model, eqx.is_inexact_array)) "
                "or cast it to a float dtype."
            )


def _path_of(tree: Any, index: int) -> str:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return jax.tree_util.keystr(paths[index][0]) or "<root>"


def _flatten_like(rule_name: str, what: str, treedef: Any, tree: Any) -> list:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"rmsjax.{rule_name}.update: the tree structure of the updates differs from "
            f"that of the {what}.\n  updates: {treedef}\n  {what}: "
            f"{jax.tree.structure(tree)}\nInitialise the optimizer with parameters of the "
            "same structure as the gradients."
        ) from error


def params_like(rule_name: str, treedef: Any, updates: Any, params: Any) -> list:
    """The parameter leaves that go with the update leaves. Where ``updates`` holds None
    (a leaf left out of this step) the parameter is skipped, as optax does."""
    try:
        pruned = jax.tree.map(
            lambda g, p: None if g is None else p, updates, params, is_leaf=base.is_none
        )
    except (ValueError, TypeError):
        pruned = params  # let _flatten_like report the two structures
    return _flatten_like(rule_name, "parameters", treedef, pruned)


def _check_shapes(rule_name: str, updates: Any, leaves: list, slot_lists: list) -> None:
    for i, g in enumerate(leaves):
        for slots in slot_lists:
            shape = getattr(slots[i], "shape", None)
            if shape is not None and tuple(shape) != tuple(jnp.shape(g)):
                raise ValueError(
                    f"rmsjax.{rule_name}.update: the update at {_path_of(updates, i)} has "
                    f"shape {tuple(jnp.shape(g))} but the state holds {tuple(shape)}. "
                    "Initialise the optimizer with parameters of the gradients' shapes."
                )


# ------------------------------------------------------------------------------ engine


def init(rule: LeafRule, params: base.Params) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    leaves = as_arrays(leaves)
    check_inexact(rule, "init", params, leaves)
    # Each leaf's state is laid out like the leaf (see sharding.py); counts replicated.
    per_leaf = [sharding.init_leaf_like(rule, p) for p in leaves]
    slot_trees = [
        treedef.unflatten([slots[k] for slots in per_leaf]) for k in range(rule.num_slots)
    ]
    return rule.to_state(sharding.init_shared_like(rule.init_shared, leaves), slot_trees)


def run(
    rule: LeafRule,
    updates: base.Updates,
    state: Any,
    params: base.Params | None,
    *,
    apply: bool = False,
) -> tuple[Any, Any]:
    """One step of ``rule`` over the tree: returns (updates, state), or with
    ``apply=True`` (params + updates in each parameter's dtype, state)."""
    shared, slot_trees = rule.from_state(state)
    leaves, treedef = jax.tree.flatten(updates)
    leaves = as_arrays(leaves)
    check_inexact(rule, "update", updates, leaves)
    slot_lists = [_flatten_like(rule.name, "state", treedef, t) for t in slot_trees]
    if rule.slots_match_leaf:
        _check_shapes(rule.name, updates, leaves, slot_lists)
    if params is None:
        if rule.needs_params or apply:
            raise ValueError(
                f"rmsjax.{rule.name}.update: this transformation needs the parameters; "
                "call update(updates, state, params)."
            )
        param_leaves = [None] * len(leaves)
    else:
        param_leaves = as_arrays(params_like(rule.name, treedef, updates, params))

    new_shared, context = rule.step_shared(shared)
    step_leaf = leaf_stepper(rule, context, apply, leaves)
    out_leaves = []
    new_slot_lists: list[list] = [[] for _ in range(rule.num_slots)]
    for i, (g, p) in enumerate(zip(leaves, param_leaves)):
        g, slots = step_leaf(g, tuple(s[i] for s in slot_lists), p)
        out_leaves.append(g)
        for k, s in enumerate(slots):
            new_slot_lists[k].append(s)
    new_state = rule.to_state(new_shared, [treedef.unflatten(s) for s in new_slot_lists])
    return treedef.unflatten(out_leaves), new_state


def leaf_stepper(rule: LeafRule, context: Any, apply: bool, leaves: Sequence[Any]) -> Callable:
    """``(g, slots, param) -> (update or new param, slots)`` for one leaf.

    Under a trace (inside ``jit``, ``grad``, ``vmap``...) the per-leaf step is itself
    wrapped in ``jax.jit``: JAX then traces and lowers it once per distinct leaf shape and
    dtype, and every other leaf of that shape is a call to the same function, which XLA
    inlines before it optimizes. The compiled program, and so every number, is the same
    as with the step written out leaf by leaf; a model with thousands of same-shaped
    leaves traces and lowers in a fraction of the time. Outside a trace the leaves run
    op by op, as any eager JAX code does.
    """

    def step(g, slots, param):
        update, slots = rule.update_leaf(g, slots, context, param)
        return (base.apply_leaf(param, update) if apply else update), slots

    return jit_under_trace(step, leaves)


def jit_under_trace(fn: Callable, leaves: Sequence[Any]) -> Callable:
    """``jax.jit(fn)`` when ``leaves`` are tracers (see :func:`leaf_stepper`), else ``fn``."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return jax.jit(fn)
    return fn


def stateless_rule(
    name: str,
    update_leaf: Callable[[jax.Array, Any], jax.Array],
    *,
    needs_params: bool = False,
    complex_refusal: str | None = None,
) -> LeafRule:
    """A :class:`LeafRule` with no state (:class:`EmptyState`): ``update_leaf(g, param)``
    returns the leaf's new update.

    As in optax, ``update`` takes any state (None, a placeholder) and hands it back
    unchanged: there is nothing in it to lose."""

    return LeafRule(
        name=name,
        init_shared=base.EmptyState,
        step_shared=no_step,
        init_leaf=lambda param: (),
        update_leaf=lambda g, slots, context, param: (update_leaf(g, param), ()),
        to_state=lambda state, trees: state,
        from_state=lambda state: (state, ()),
        num_slots=0,
        needs_params=needs_params,
        complex_refusal=complex_refusal,
    )


def identity() -> base.GradientTransformation:
    """A transformation that returns the updates unchanged.

    It is an elementwise rule with nothing to do, so a chain holding it (``rmsprop``
    without momentum, say) still fuses into one pass over the leaves.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.identity()
    >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
    Array([1., 1.], dtype=float32)
    """
    return elementwise_transformation(stateless_rule("identity", lambda g, param: g))


def counted_rule(
    name: str,
    state_type: type,
    factor_at: Callable[[jax.Array], Any],
    update_leaf: Callable[[jax.Array, Any, Any], jax.Array],
    *,
    needs_params: bool = False,
) -> LeafRule:
    """A :class:`LeafRule` whose only state is a step count, ``state_type(count)``: each
    step evaluates ``factor_at(count)`` once (a learning rate from a schedule, say) and
    ``update_leaf(g, factor, param)`` returns each leaf's new update."""

    def step_shared(count):
        return numerics.safe_increment(count), factor_at(count)

    def from_state(state):
        expect_state(name, state, state_type)
        return state.count, ()

    return LeafRule(
        name=name,
        init_shared=numerics.zero_count,
        step_shared=step_shared,
        init_leaf=lambda param: (),
        update_leaf=lambda g, slots, factor, param: (update_leaf(g, factor, param), ()),
        to_state=lambda count, trees: state_type(count),
        from_state=from_state,
        num_slots=0,
        needs_params=needs_params,
    )


def elementwise_transformation(rule: LeafRule) -> base.GradientTransformation:
    """Makes a transformation of a :class:`LeafRule`; ``chain`` can fuse it."""

    def init_fn(params):
        return init(rule, params)

    def update_fn(updates, state, params=None, **extra):
        del extra
        return run(rule, updates, state, params)

    update_fn.leaf_rule = rule  # type: ignore[attr-defined]
    return base.GradientTransformation(init_fn, update_fn)


def leaf_rule_of(tx: Any) -> LeafRule | None:
    """The :class:`LeafRule` behind a transformation, or None if it has none."""
    return getattr(getattr(tx, "update", None), "leaf_rule", None)


# -------------------------------------------------------------------------- composition


def compose(rules: Sequence[LeafRule], name: str = "chain") -> LeafRule:
    """One rule that runs ``rules`` in order on each leaf; its state is the tuple of
    their states, exactly as ``chain`` would hold them."""
    rules = tuple(rules)
    counts = [r.num_slots for r in rules]
    offsets = [sum(counts[:i]) for i in range(len(rules))]

    def split(flat: Sequence[Any]) -> list[Sequence[Any]]:
        return [flat[o : o + n] for o, n in zip(offsets, counts)]

    def step_shared(shared):
        stepped = [r.step_shared(s) for r, s in zip(rules, shared)]
        return tuple(s for s, _ in stepped), tuple(c for _, c in stepped)

    def init_leaf(param):
        return tuple(slot for r in rules for slot in r.init_leaf(param))

    def update_leaf(g, slots, context, param):
        new_slots: list = []
        for r, own, ctx in zip(rules, split(slots), context):
            g, own = r.update_leaf(g, tuple(own), ctx, param)
            new_slots.extend(own)
        return g, tuple(new_slots)

    def to_state(shared, slot_trees):
        return tuple(r.to_state(s, t) for r, s, t in zip(rules, shared, split(slot_trees)))

    def from_state(state):
        expect_state_tuple(name, state, len(rules))
        parts = [r.from_state(s) for r, s in zip(rules, state)]
        return tuple(p[0] for p in parts), tuple(t for p in parts for t in p[1])

    return LeafRule(
        name=name,
        init_shared=lambda: tuple(r.init_shared() for r in rules),
        step_shared=step_shared,
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        to_state=to_state,
        from_state=from_state,
        num_slots=sum(counts),
        needs_params=any(r.needs_params for r in rules),
        slots_match_leaf=all(r.slots_match_leaf for r in rules),
        complex_refusal=next(
            (f"{r.name}: {r.complex_refusal}" for r in rules if r.complex_refusal), None
        ),
    )
