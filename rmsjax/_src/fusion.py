"""What a transformation can do beyond ``update``, carried in the type of its ``update``.

``chain`` fuses neighbouring elementwise rules into one walk of the tree, and
``update_and_apply`` (so ``make_train_step``) writes each parameter in the same loop as
its optimizer step. Both need to know, of a transformation they are handed, whether it
is an elementwise rule and whether it has a fused step with the parameter update. That
knowledge is an :class:`Update`: the ``update`` function of every transformation rmsjax
builds is one, a frozen object that is called like the function and names its
capabilities as typed fields. Every rule and wrapper (``chain``, ``apply_if_finite``,
``inject_hyperparams``, ``masked``, ``accumulate_gradients``) and every transformation
that is neither (``clip_by_global_norm``, a masked ``add_decayed_weights``) builds its
transformation here, with :func:`rule_transformation` or :func:`wrapper_transformation`
(``grouped``, a rule with its state in blocks, builds its :class:`Update` with its own
layout), and reads its inner transformation's capabilities with :func:`leaf_rule_of` and
:func:`fused_step_of`, so none of them can drop a capability by accident.

A transformation from elsewhere (optax's) has a plain function as ``update`` and no
capabilities: it runs unfused, with the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rmsjax._src import base, engine
from rmsjax._src.elementwise import LeafRule, stateless_rule

FusedStep = Callable[..., tuple[base.Params, base.OptState]]
"""``(updates, state, params, **extra) -> (new params, new state)``."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Update:
    """An ``update`` function with its capabilities.

    Calling it is calling ``function``. Compared and hashed by identity, as a function is.

    Attributes:
      function: ``(updates, state, params=None, **extra) -> (updates, state)``.
      rule: the :class:`LeafRule` the transformation runs, or None when it is not an
        elementwise rule.
      layout: where ``rule``'s state lives: :data:`engine.PER_LEAF` for every rule and
        chain, which ``chain`` can fuse with its neighbours; blocks for ``grouped``,
        which holds the rule's state in a ``GroupedState`` of its own.
      fused_step: the step with the parameter update in the same loop, when the
        transformation has one of its own (a wrapper around a rule, ``grouped``); None
        for a plain rule, whose fused step is the engine's, and where nothing fuses.
      name: the public constructor of a wrapper (``chain``, ``masked``...), for its repr;
        a rule is named by its rule, and in errors, when run in another layout, by
        that layout's wrapper (``grouped``, see :func:`name_of`).
      other_parts: for a chain that is not one rule, its parts that are not elementwise
        rules, as (what, where): ``("masked", "[0]")`` for a state's ``state[0]``;
        ``grouped`` names them when it refuses the chain.
    """

    function: Callable[..., tuple[base.Updates, base.OptState]]
    rule: LeafRule | None = None
    layout: engine.Layout = engine.PER_LEAF
    fused_step: FusedStep | None = None
    name: str | None = None
    other_parts: tuple[tuple[str, str], ...] = ()

    def __call__(
        self,
        updates: base.Updates,
        state: base.OptState,
        params: base.Params | None = None,
        **extra,
    ) -> tuple[base.Updates, base.OptState]:
        return self.function(updates, state, params, **extra)

    @property
    def __name__(self) -> str:  # what jax names a jitted update after, as for a function
        return getattr(self.function, "__name__", "update")

    def __repr__(self) -> str:
        kind = "rule" if self.rule is not None else "wrapper"
        name = self.rule.name if self.rule is not None else (self.name or self.__name__)
        fused = "fused" if self.rule is not None or self.fused_step is not None else "unfused"
        layout = "" if self.layout.name is None else f", {self.layout.name} state"
        return f"<rmsjax update: {kind} {name}, {fused}{layout}>"


def rule_transformation(
    rule: LeafRule, layout: engine.Layout = engine.PER_LEAF
) -> base.GradientTransformation:
    """The transformation that runs ``rule`` with its state in ``layout``."""

    def init_fn(params):
        return engine.init(rule, layout, params)

    def update_fn(updates, state, params=None, **extra):
        del extra
        return engine.run(rule, layout, updates, state, params)

    return base.GradientTransformation(init_fn, Update(update_fn, rule=rule, layout=layout))


def wrapper_transformation(
    name: str,
    init_fn: base.TransformInitFn,
    update_fn: Callable[..., tuple[base.Updates, base.OptState]],
    fused_step: FusedStep | None,
    other_parts: tuple[tuple[str, str], ...] = (),
) -> base.GradientTransformation:
    """A transformation that is not a rule, with its fused step (None if it has none);
    ``name`` is the public constructor that made it."""
    update = Update(update_fn, fused_step=fused_step, name=name, other_parts=other_parts)
    return base.GradientTransformation(init_fn, update)


def stepped_wrapper(
    name: str,
    init_fn: base.TransformInitFn,
    step: Callable[..., tuple[Any, base.OptState]],
    fuses: bool,
    other_parts: tuple[tuple[str, str], ...] = (),
) -> base.GradientTransformation:
    """:func:`wrapper_transformation` of a wrapper written as one function,
    ``step(updates, state, params, extra, apply)``: its ``update`` runs it with
    ``apply=False``, and its fused step, when ``fuses``, with ``apply=True``."""

    def update_fn(updates, state, params=None, **extra):
        return step(updates, state, params, extra, False)

    def update_and_apply_fn(updates, state, params, **extra):
        return step(updates, state, params, extra, True)

    fused = update_and_apply_fn if fuses else None
    return wrapper_transformation(name, init_fn, update_fn, fused, other_parts)


def _capabilities(tx: Any) -> Update | None:
    update = getattr(tx, "update", None)
    return update if isinstance(update, Update) else None


def name_of(tx: Any) -> str | None:
    """The public constructor that made ``tx`` (its rule's name, or its wrapper's), as its
    errors name it; None for a transformation from elsewhere."""
    update = _capabilities(tx)
    if update is None:
        return None
    if update.rule is None:
        return update.name
    # a rule run in another layout is named by the wrapper that chose it (grouped)
    return update.rule.name if update.layout is engine.PER_LEAF else update.layout.name


def other_parts_of(tx: Any) -> str:
    """What keeps ``tx`` from being one elementwise rule, for an error: its parts that
    are not rules, with where their state is (``optax.clip (state[0])``), or itself."""
    return "; ".join(f"{what} (state{where})" if where else what for what, where in _others(tx))


def _others(tx: Any) -> tuple[tuple[str, str], ...]:
    update = _capabilities(tx)
    if update is not None:
        # rmsjax's own parts named as optax's are, so that clip_by_global_norm is told
        # from optax.clip_by_global_norm
        return update.other_parts or ((f"rmsjax.{name_of(tx)}", ""),)
    # another library's (optax's): named by the function that built it, as far as its
    # update tells
    function = getattr(tx, "update", None)
    maker = getattr(function, "__qualname__", "").split(".<locals>")[0]
    library = getattr(function, "__module__", "").split(".")[0]
    return ((f"{library}.{maker}" if maker and library else "a transformation from elsewhere", ""),)


def parts_not_rules(tx: Any, index: int) -> tuple[tuple[str, str], ...]:
    """:func:`other_parts_of` ``tx``, as (what, where) pairs, for the chain that holds
    it at ``index`` (see :attr:`Update.other_parts`)."""
    return tuple((what, f"[{index}]{where}") for what, where in _others(tx))


def leaf_rule_of(tx: Any) -> LeafRule | None:
    """The rule of a transformation that runs one with per-leaf state, else None:
    what ``chain`` can fuse with its neighbours."""
    update = _capabilities(tx)
    if update is None or update.rule is None or update.layout is not engine.PER_LEAF:
        return None
    return update.rule


def rule_and_layout_of(tx: Any) -> tuple[LeafRule, engine.Layout] | None:
    """``(rule, layout)`` of a transformation that runs a rule in any layout, else None."""
    update = _capabilities(tx)
    if update is None or update.rule is None:
        return None
    return update.rule, update.layout


def fused_step_of(tx: Any) -> FusedStep | None:
    """``tx``'s step with the parameter update in the same loop, or None when it has
    none (a transformation from another library, or a wrapper around one)."""
    update = _capabilities(tx)
    if update is None:
        return None
    if update.fused_step is not None or update.rule is None:
        return update.fused_step
    rule, layout = update.rule, update.layout

    def fused(updates, state, params, **extra):
        del extra
        return engine.run(rule, layout, updates, state, params, apply=True)

    return fused


def identity() -> base.GradientTransformation:
    """A transformation that returns the updates unchanged.

    It is an elementwise rule with nothing to do, so a chain holding it (``rmsprop``
    without momentum, say) still fuses into one pass over the leaves.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.identity()
    >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
    Array([1., 1.], dtype=float32)
    """
    return rule_transformation(stateless_rule("identity", lambda g, param: g))
