"""Rules that act on each leaf on its own: what a rule is, and how rules compose.

Most optimizer rules (RMSprop's average, Adagrad's sum, momentum, scaling by a learning
rate) are elementwise: leaf ``i`` of the output depends only on leaf ``i`` of the
gradient, of the state and of the parameters, plus a few scalars shared by all leaves
(a step count, a learning rate from a schedule). Such a rule is written once, for one
leaf, as a :class:`LeafRule`; :func:`compose` makes one rule of several, which is how
``chain`` fuses neighbours, so that a chain walks the pytree once and each leaf's whole
update (optionally with the parameter update) is one piece of straight-line code. The
engine that runs a rule over a tree is in ``engine.py``; ``fusion.py`` makes the
transformation. The same per-leaf functions run whether or not the rules are fused, so
fused and unfused chains give bit-identical numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, NoReturn

import jax

from rmsjax._src import base, numerics, step_checks

Slots = tuple  # the per-leaf state of a rule: a tuple of arrays (or small pytrees)


class Slot(NamedTuple):
    """One array a rule keeps for each parameter leaf, declared against the parameter.

    The declaration is all the library needs to know of a rule's per-leaf state: the
    engine checks each slot's shape with it, the rule's state NamedTuple is built and
    read from the fields (:func:`declared_rule`), and a sharded parameter's slot is laid
    out from its axes (``sharding.py``), none of it guessed from shapes.

    Attributes:
      field: the field of the rule's state NamedTuple that holds this slot's tree.
      axes: ``param_shape -> axes``: for each dimension of the slot, the dimension of the
        parameter it runs along. None (the default): shaped like the parameter. A
        statistic of each row of a matrix is ``lambda shape: tuple(range(len(shape) - 1))``
        and a scalar placeholder ``lambda shape: ()``. A slot stored in 8 bits (a
        ``QuantizedArray``) declares the array it stands for.
    """

    field: str
    axes: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None

    def axes_for(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The parameter's dimension along which each of the slot's runs."""
        if self.axes is None:
            return tuple(range(len(param_shape)))
        return tuple(self.axes(tuple(param_shape)))

    def shape_for(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The slot's shape for a parameter of ``param_shape``."""
        return tuple(param_shape[axis] for axis in self.axes_for(param_shape))


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
      from_state: ``(state, none_tree=False) -> (shared, slot_trees)``; raises TypeError
        on a foreign state. With ``none_tree`` (the updates are the tree ``None``, as
        ``init(None)`` makes a state for) a slot tree may be None.
      slots: the per-leaf slots, declared (:class:`Slot`), in the order of ``init_leaf``'s.
      needs_params: whether ``update_leaf`` reads ``param``.
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
    from_state: Callable[..., tuple[Any, tuple]]
    slots: tuple[Slot, ...] = ()
    needs_params: bool = False
    complex_refusal: str | None = None

    @property
    def num_slots(self) -> int:
        return len(self.slots)


def declared_rule(
    name: str,
    state_type: type,
    slots: Sequence[Slot],
    *,
    init_leaf: Callable[[jax.Array], Slots],
    update_leaf: Callable[[jax.Array, Slots, Any, Any], tuple[jax.Array, Slots]],
    shared_field: str | None = None,
    init_shared: Callable[[], Any] | None = None,
    step_shared: Callable[[Any], tuple[Any, Any]] | None = None,
    needs_params: bool = False,
    complex_refusal: str | None = None,
) -> LeafRule:
    """A :class:`LeafRule` whose state is ``state_type``, built from its declaration.

    ``state_type``'s fields are ``shared_field`` (the shared scalars, a step count, when
    the rule has them) and each slot's ``field``; fields the rule does not fill (a mean
    it does not keep) are None. ``update`` then refuses another rule's state, or one
    made with options that left a field it needs empty, naming the field.
    """
    slots = tuple(slots)
    fields = tuple(state_type._fields)  # type: ignore[attr-defined]
    declared = [slot.field for slot in slots] + ([shared_field] if shared_field else [])
    unknown = [field for field in declared if field not in fields]
    assert not unknown, f"{state_type.__name__} has no field {unknown}"

    def to_state(shared, slot_trees):
        values = {slot.field: tree for slot, tree in zip(slots, slot_trees, strict=True)}
        if shared_field is not None:
            values[shared_field] = shared
        return state_type(**{field: values.get(field) for field in fields})

    def from_state(state, none_tree=False):
        expect_state(name, state, state_type)
        trees = tuple(getattr(state, slot.field) for slot in slots)
        for slot, tree in zip(slots, trees):
            if tree is None and not none_tree:
                example = " (centered=False, say)" if slot.field == "mu" else ""
                raise TypeError(
                    f"rmsjax.{name}.update: the state's {slot.field} is None, and this "
                    f"transformation keeps one; the state was made by a {name} with "
                    f"other options{example}, or for parameters that were None."
                )
        for field in fields:
            # a field this rule leaves empty that holds arrays (a centered mean handed to
            # an uncentered rule) would be dropped from the new state without a word; a
            # step count it does not keep is dropped, as the conversions do (and
            # optax.tree_utils.tree_set(state, count=...) fills every count field)
            if (
                field not in declared
                and field != "count"
                and jax.tree.leaves(getattr(state, field))
            ):
                example = " (centered=True, say)" if field == "mu" else ""
                raise TypeError(
                    f"rmsjax.{name}.update: the state's {field} holds arrays, and this "
                    f"transformation keeps none; the state was made by a {name} with "
                    f"other options{example}, and its {field} would be lost."
                )
        shared = getattr(state, shared_field) if shared_field else ()
        if shared is None:
            raise TypeError(
                f"rmsjax.{name}.update: the state's {shared_field} is None, and this "
                f"transformation keeps one; the state was made by a {name} with other "
                "options (another storage, say)."
            )
        if shared_field == "count":
            step_checks.check_step_count(name, shared)
        return shared, trees

    return LeafRule(
        name=name,
        init_shared=init_shared or no_shared,
        step_shared=step_shared or no_step,
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        to_state=to_state,
        from_state=from_state,
        slots=slots,
        needs_params=needs_params,
        complex_refusal=complex_refusal,
    )


def no_shared() -> tuple:
    return ()


def no_step(shared: Any) -> tuple[Any, None]:
    return shared, None


def is_optax_state(state: Any) -> bool:
    """Whether ``state`` is one of optax's state types (a NamedTuple from optax)."""
    return type(state).__module__.split(".")[0] == "optax"


def expect_state(
    rule_name: str, state: Any, state_type: type, optax_route: tuple[str, str] | None = None
) -> None:
    """A TypeError for another rule's state; an optax one holding the same is told how to
    convert it (``optax_route``: the advice for one optax type from_optax_state refuses)."""
    kind = ("an " if state_type.__name__[0] in "AEIOU" else "a ") + state_type.__name__
    if is_optax_state(state):
        theirs, where = type(state).__name__, f"rmsjax.{rule_name}.update: got optax's"
        if base.optax_counterpart(state_type.__name__, theirs):
            route = "Convert it with rmsjax.from_optax_state(state, like=tx.init(params))."
        elif optax_route is not None and theirs == optax_route[0]:
            route = optax_route[1]
        else:
            raise TypeError(
                f"{where} {theirs}, the state of another transformation, where this one "
                f"keeps {kind}. Was the state created by a different optimizer, or its chain "
                "reordered?"
            )
        raise TypeError(
            f"{where} {theirs} (from {type(state).__module__}), not rmsjax's "
            f"{state_type.__name__}: the two libraries lay their states out differently. {route}"
        )
    if not isinstance(state, state_type):
        raise TypeError(
            f"rmsjax.{rule_name}.update: expected {kind} (the state "
            f"returned by this transformation's init), got {type(state).__name__}. Was the "
            "state created by a different optimizer, or its chain reordered?"
        )


def in_part(name: str, index: int, part: str, error: Exception) -> Exception:
    """``error``, raised by the part ``part`` of the chain the user built as ``name``
    (``rmsprop``, say), re-worded to name ``name`` first and the part at fault after:
    ``rmsjax.rmsprop.update: its part scale_by_rms (state[0]): ...``."""
    message = str(error)
    prefix = f"rmsjax.{part}."
    if name == part or not message.startswith(prefix):
        return error
    where, _, detail = message[len(prefix) :].partition(": ")
    return type(error)(f"rmsjax.{name}.{where}: its part {part} (state[{index}]): {detail}")


def raise_in_part(name: str, index: int, part: str, error: Exception) -> NoReturn:
    """Raises :func:`in_part`'s error, or ``error`` as it came (its cause kept) when it
    is not one of rmsjax's messages (a user's schedule raised it, say)."""
    renamed = in_part(name, index, part, error)
    if renamed is error:
        raise error
    raise renamed from error


@contextlib.contextmanager
def naming_wrapper(name: str, where: str | None, role: str = "inner") -> Iterator[None]:
    """Re-words the errors the inner transformation of the wrapper the user built as
    ``name`` raises in ``where`` (``init``, ``update``) to name the wrapper first and the
    inner transformation after: ``rmsjax.masked.update: its inner rmsprop: ...``. For a
    function the user called with a transformation, ``where`` is None and ``role``
    names the argument: ``rmsjax.effective_step_sizes: its tx rmsprop: ...``."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = str(error)
        head, colon, detail = message.partition(": ")
        if type(error) not in (TypeError, ValueError) or not colon:
            raise
        if not head.startswith("rmsjax.") or " " in head:
            raise
        inner = head[len("rmsjax.") :]
        if inner.endswith((".init", ".update")):
            inner = inner.rpartition(".")[0]
        if inner == name:
            raise
        called = name if where is None else f"{name}.{where}"
        raise type(error)(f"rmsjax.{called}: its {role} {inner}: {detail}") from error


def expect_state_tuple(name: str, state: Any, count: int) -> None:
    """Raises a TypeError unless ``state`` is the tuple of ``count`` states a chain keeps."""
    if not isinstance(state, tuple) or len(state) != count:
        got = type(state).__name__  # a NamedTuple state (EmptyState) by its name
        if type(state) is tuple:
            got = f"a tuple of {len(state)} ({', '.join(type(s).__name__ for s in state)})"
        raise TypeError(
            f"rmsjax.{name}.update: expected the tuple of {count} states that init "
            f"returned, got {got}. Was the state created by a different optimizer?"
        )


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
        from_state=lambda state, none_tree=False: (state, ()),
        needs_params=needs_params,
        complex_refusal=complex_refusal,
    )


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

    def from_state(state, none_tree=False):
        expect_state(name, state, state_type)
        step_checks.check_step_count(name, state.count)
        return state.count, ()

    return LeafRule(
        name=name,
        init_shared=numerics.zero_count,
        step_shared=step_shared,
        init_leaf=lambda param: (),
        update_leaf=lambda g, slots, factor, param: (update_leaf(g, factor, param), ()),
        to_state=lambda count, trees: state_type(count),
        from_state=from_state,
        needs_params=needs_params,
    )


# -------------------------------------------------------------------------- composition


def compose(rules: Sequence[LeafRule], name: str = "chain", first: int = 0) -> LeafRule:
    """One rule that runs ``rules`` in order on each leaf; its state is the tuple of
    their states, exactly as ``chain`` would hold them. Errors name ``name`` and the part
    at fault, by its index in the chain's state (the first rule is part ``first``)."""
    rules = tuple(rules)
    counts = [r.num_slots for r in rules]
    offsets = [sum(counts[:i]) for i in range(len(rules))]

    def split(flat: Sequence[Any]) -> list[Sequence[Any]]:
        return [flat[o : o + n] for o, n in zip(offsets, counts)]

    def each(call):  # call(index, rule) for every rule, its errors named as the part's
        results = []
        for index, r in enumerate(rules):
            try:  # (a schedule's value is checked in step_shared)
                results.append(call(index, r))
            except (TypeError, ValueError) as error:
                raise_in_part(name, first + index, r.name, error)
        return results

    def step_shared(shared):
        stepped = each(lambda index, r: r.step_shared(shared[index]))
        return tuple(s for s, _ in stepped), tuple(c for _, c in stepped)

    def init_leaf(param):
        return tuple(slot for own in each(lambda _, r: r.init_leaf(param)) for slot in own)

    def update_leaf(g, slots, context, param):
        new_slots: list = []
        for r, own, ctx in zip(rules, split(slots), context):
            g, own = r.update_leaf(g, tuple(own), ctx, param)
            new_slots.extend(own)
        return g, tuple(new_slots)

    def to_state(shared, slot_trees):
        return tuple(r.to_state(s, t) for r, s, t in zip(rules, shared, split(slot_trees)))

    def from_state(state, none_tree=False):
        expect_state_tuple(name, state, len(rules))
        parts = each(lambda index, r: r.from_state(state[index], none_tree))
        return tuple(p[0] for p in parts), tuple(t for p in parts for t in p[1])

    return LeafRule(
        name=name,
        init_shared=lambda: tuple(r.init_shared() for r in rules),
        step_shared=step_shared,
        init_leaf=init_leaf,
        update_leaf=update_leaf,
        to_state=to_state,
        from_state=from_state,
        slots=tuple(slot for r in rules for slot in r.slots),
        needs_params=any(r.needs_params for r in rules),
        complex_refusal=next(
            (f"{r.name}: {r.complex_refusal}" for r in rules if r.complex_refusal), None
        ),
    )
