"""``chain``: run transformations one after another, fusing elementwise neighbours."""

from __future__ import annotations

from typing import Any

from rmsjax._src import base, elementwise, engine, fusion, validate


def chain(*transforms: base.GradientTransformation) -> base.GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states.

    Adjacent elementwise rules (``scale_by_rms``, ``scale_by_rss``, ``trace``,
    ``scale_by_learning_rate``, ...) are fused: the chain walks the pytree once and runs
    every fused rule on a leaf before moving to the next leaf, which keeps the traced
    graph small for models with many leaves. Fusion never changes the numbers, nor the
    state's layout. Transformations from optax can be chained too.

    Args:
      *transforms: the transformations to apply, first to last.

    Returns:
      A :class:`GradientTransformation` whose ``update`` accepts keyword extras and
      passes them to the parts that take them.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.chain(rj.scale_by_rms(decay=0.9), rj.scale(-0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> tx.update(jnp.array([1.0, -2.0]), state)[0]
    Array([-0.31622776,  0.31622776], dtype=float32)
    """
    for i, transform in enumerate(transforms):
        validate.check_transformation("chain", f"transforms[{i}]", transform)
    return named_chain("chain", *transforms)


def named_chain(name: str, *transforms: base.GradientTransformation) -> base.GradientTransformation:
    """:func:`chain`, whose errors name ``name``: the public constructor the user called
    (``rmsprop``, ``compat.torch_rmsprop``), not the chain it is built of."""
    # Extras are normalised once, here: every part's update takes them (optax's plain
    # transformations get an update that drops them).
    given = transforms
    transforms = tuple(base.with_extra_args_support(t) for t in transforms)
    rules = [fusion.leaf_rule_of(t) for t in transforms]
    present = [r for r in rules if r is not None]
    if len(present) == len(rules):
        return fusion.rule_transformation(elementwise.compose(present, name))
    fused_steps = [fusion.fused_step_of(t) for t in transforms]
    part_names = [fusion.name_of(t) for t in transforms]

    # Split into segments: maximal runs of elementwise rules, and single other parts.
    segments: list[tuple[int, int, elementwise.LeafRule | None]] = []
    start = 0
    while start < len(transforms):
        stop = start
        while stop < len(transforms) and rules[stop] is not None:
            stop += 1
        if stop - start >= 2:
            run = [r for r in rules[start:stop] if r is not None]  # all of them
            segments.append((start, stop, elementwise.compose(run, name, first=start)))
        elif stop == start:
            stop = start + 1
            segments.append((start, stop, None))
        else:
            segments.append((start, stop, rules[start]))
        start = stop

    def init_fn(params):
        states = []
        for index, t in enumerate(transforms):
            try:
                states.append(t.init(params))
            except (TypeError, ValueError) as error:  # named as an update's error is
                part = part_names[index]
                if part is None:
                    raise
                elementwise.raise_in_part(name, index, part, error)
        return tuple(states)

    def run_segment(begin, end, rule, updates, state, params, extra, apply):
        """One segment's step: ``(updates, [its states], applied)``, ``applied`` when
        the segment added the updates to ``params`` (``apply`` only for the last), its
        ``updates`` then being the new parameters."""
        own = state[begin:end]
        if rule is None:
            fused = fused_steps[begin]
            if apply and fused is not None:
                # e.g. a grouped(...) part last: it applies the updates itself.
                updates, s = fused(updates, own[0], params, **extra)
                return updates, [s], True
            updates, s = transforms[begin].update(updates, own[0], params, **extra)
            return updates, [s], False
        own_state = own if end - begin > 1 else own[0]
        updates, s = engine.run(rule, engine.PER_LEAF, updates, own_state, params, apply=apply)
        return updates, list(s) if end - begin > 1 else [s], apply

    def run_segments(updates, state, params, extra, apply):
        elementwise.expect_state_tuple(name, state, len(transforms))
        new_state: list = []
        applied = False
        for index, (begin, end, rule) in enumerate(segments):
            last = index == len(segments) - 1
            try:
                updates, states, applied = run_segment(
                    begin, end, rule, updates, state, params, extra, apply and last
                )
            except (TypeError, ValueError) as error:
                # A part's own error, re-worded to name the chain the user built first.
                part = part_names[begin] if end - begin == 1 else None
                if part is None:
                    raise
                elementwise.raise_in_part(name, begin, part, error)
            new_state.extend(states)
        if apply and not applied:
            updates = base.apply_updates(params, updates)
        return updates, tuple(new_state)

    # The parameter update joins the last part's loop when that part is a rule, or a
    # wrapper with a fused step of its own; otherwise there is nothing to fuse it into.
    last_fuses = segments[-1][2] is not None or fused_steps[-1] is not None
    others = tuple(
        part
        for i, (t, rule) in enumerate(zip(given, rules))
        if rule is None
        for part in fusion.parts_not_rules(t, i)
    )
    return fusion.stepped_wrapper(name, init_fn, run_segments, last_fuses, others)


def step_of(tx: base.GradientTransformation, apply: bool) -> Any:
    """``tx.update``, or with ``apply`` the step that also updates the parameters
    (:func:`update_and_apply`): what a wrapper calls on its inner transformation."""
    if not apply:
        return tx.update
    return lambda updates, state, params, **extra: update_and_apply(
        tx, updates, state, params, **extra
    )


def update_and_apply(
    tx: base.GradientTransformation,
    updates: base.Updates,
    state: base.OptState,
    params: base.Params,
    **extra: Any,
) -> tuple[base.Params, base.OptState]:
    """``tx.update`` followed by ``apply_updates``, fused into the same leaf loop.

    Returns ``(new_params, new_state)``, bit-identical to::

        updates, state = tx.update(updates, state, params, **extra)
        params = rj.apply_updates(params, updates)

    (but for an ulp where XLA contracts a multiply-add in one program and not in the
    other: ``apply_if_finite`` on a ``(4, 3)`` leaf, see docs/porting.md). For an
    elementwise chain (every alias in rmsjax) each leaf's optimizer step and
    parameter update is one piece of code, which compiles faster and, with donated
    buffers, writes each parameter in place.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.sgd(0.1)
    >>> params = jnp.ones(2)
    >>> rj.update_and_apply(tx, jnp.ones(2), tx.init(params), params)[0]
    Array([0.9, 0.9], dtype=float32)
    """
    validate.check_transformation("update_and_apply", "tx", tx)
    fused = fusion.fused_step_of(tx)
    if fused is not None:
        return fused(updates, state, params, **extra)
    new_updates, new_state = base.with_extra_args_support(tx).update(
        updates, state, params, **extra
    )
    return base.apply_updates(params, new_updates), new_state
