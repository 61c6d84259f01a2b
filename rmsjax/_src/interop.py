"""Interoperation with optax."""

from __future__ import annotations

from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import base, block_layout, numerics, storage, validate
from rmsjax._src.grouped import GroupedState


def as_optax(tx: base.GradientTransformation) -> Any:
    """Wraps ``tx`` as a genuine ``optax.GradientTransformationExtraArgs``.

    rmsjax transformations already work wherever optax calls ``init`` and ``update``
    (``optax.chain`` included); this is for code that checks ``isinstance`` against
    optax's types, and for an rmsjax transformation that needs extra arguments (an
    ``rj.chain`` holding ``optax.contrib.reduce_on_plateau``, which reads ``value``)
    inside optax's own wrappers (``optax.chain``, ``MultiSteps``, ``apply_if_finite``,
    ``masked``, ``multi_transform``): those hand extra arguments on only to an optax
    ``GradientTransformationExtraArgs``, and drop them for anything else. It needs optax
    installed.

    >>> import optax, rmsjax as rj
    >>> isinstance(rj.as_optax(rj.rmsprop(1e-3)), optax.GradientTransformation)
    True
    """
    validate.check_transformation("as_optax", "tx", tx)
    try:
        import optax
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("rmsjax.as_optax needs optax: pip install optax") from error
    return optax.GradientTransformationExtraArgs(tx.init, tx.update)


# ------------------------------------------------------------------ state migration


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not base.is_namedtuple(x)


def _fail(function: str, path: str, message: str) -> NoReturn:
    raise ValueError(
        f"rmsjax.{function}: at {path}: {message}. Pass as `like` the state of the "
        "equivalent optimizer in the other library (see docs/porting.md, 'From optax')."
    )


def _convert_leaf(function: str, path: str, like: Any, value: Any) -> Any:
    """``value`` in the format of the template leaf ``like``."""
    if not (_is_quantized(like) or _is_array_like(like)):
        _fail(function, path, f"`like` holds {like!r} ({type(like).__name__}), not an array")
    if value is None or not (
        _is_array_like(value) or isinstance(value, (int, float, storage.QuantizedArray))
    ):
        _fail(function, path, f"expected an array, got {type(value).__name__}")
    if _is_quantized(value):
        value = storage.dequantize(value)
    if tuple(np.shape(value)) != tuple(like.shape):  # (an int8 like's: the logical shape)
        _fail(function, path, f"expected shape {tuple(like.shape)}, got {tuple(np.shape(value))}")
    _check_value_fits(function, path, like, value)
    value = jnp.asarray(value)
    if _is_quantized(like):
        value = jnp.asarray(value, jnp.float32)
        if like.signed:
            return storage.quantize(value, signed=True)
        # optax's sum of squares is inf where it overflowed: held as the largest
        # moment, its block's other moments stay finite (an inf would make them NaN)
        value = jnp.where(jnp.isinf(value), validate.FLOAT32_MAX, value)
        q = storage.quantize(value, signed=False)
        # a NaN marks its block with a NaN scale, as a step stores it (storage.store_moment):
        # quantize's infinite scale read the NaN back as inf, which steps by 0
        holds_nan = jnp.isnan(block_layout.to_blocks(value)).any(axis=-1)
        scale = jnp.where(holds_nan, jnp.float32(jnp.nan), q.scale)
        return storage.QuantizedArray(q.codes, scale, q.shape, q.signed)
    if value.dtype == like.dtype and not getattr(value, "weak_type", False):
        return value
    # (a weakly typed scalar, optax's hyperparameter set from a Python float, would trace
    # a jitted step once more)
    return value.astype(like.dtype)


def _check_value_fits(function: str, path: str, like: Any, value: Any) -> None:
    """Refuses a ``value`` that ``like``'s dtype would change in silence: a complex one
    for a real slot (its imaginary part), a fractional, negative or too large count, a
    finite number the slot's float dtype holds as inf (a float64 moment of 1e49). Read
    before any conversion, with NumPy on the host for host values and by reductions on
    the device for arrays (one bool comes back); a traced value, and an array spanning
    other processes' devices, are left to the dtype. A second moment beyond float32 for
    int8 codes is held at float32's largest, as an overflowed optax sum is."""
    target = jnp.dtype(jnp.float32) if _is_quantized(like) else jnp.dtype(like.dtype)
    dtype = jnp.dtype(value.dtype if hasattr(value, "dtype") else np.result_type(value))
    if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
        target, jnp.complexfloating
    ):
        _fail(
            function,
            path,
            f"a {dtype} value cannot become {target}: its imaginary part would be lost",
        )
    if isinstance(value, jax.core.Tracer) or not getattr(value, "is_fully_addressable", True):
        return
    xp = jnp if isinstance(value, jax.Array) else np
    held = xp.asarray(value)
    if jnp.issubdtype(target, jnp.integer) and jnp.issubdtype(dtype, jnp.inexact):
        if not bool(xp.all(xp.isfinite(held) & (held == xp.round(held)))):
            _fail(function, path, f"expected whole numbers for {target}, got {_shown(held)}")
    if jnp.issubdtype(target, jnp.integer) and held.size:
        info = jnp.iinfo(target)
        low = 0 if path.endswith(".count") else info.min
        if float(xp.min(held)) < low or float(xp.max(held)) > info.max:
            _fail(
                function,
                path,
                f"expected {target} values in [{low}, {info.max}], got {_shown(held)}",
            )
    unsigned_codes = _is_quantized(like) and not like.signed  # (held at float32's largest)
    if (
        jnp.issubdtype(target, jnp.floating)
        and jnp.issubdtype(dtype, jnp.floating)
        and not unsigned_codes
    ):
        top = float(jnp.finfo(target).max)
        if float(jnp.finfo(dtype).max) > top and bool(
            xp.any(xp.isfinite(held) & (xp.abs(held) > top))
        ):
            _fail(function, path, f"{_shown(held)} holds numbers beyond {target}'s largest")


def _shown(held: Any) -> str:
    if np.size(held) == 1:
        return repr(np.asarray(held).item())
    first = np.asarray(held.ravel()[:3]).tolist()
    return f"an array of {held.dtype} (first elements {first})"


def _zeros_like(like: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like)


# rmsjax's second moments are encoded outside their dtype's range (numerics.py); optax
# holds the plain value (inf where it overflows).
_MOMENT_FIELDS = {"ScaleByRmsState": ("nu",), "ScaleByRssState": ("sum_of_squares",)}


def _is_quantized(x: Any) -> bool:
    return isinstance(x, storage.QuantizedArray)


def _true_moment(x: Any) -> Any:
    if x is None or _is_quantized(x) or not _is_array_like(x):
        return x
    return numerics.decode_moment(jnp.asarray(x)).astype(jnp.result_type(x))


def _centered_moment(other: Any, like: Any, to_optax: bool) -> Any:
    """A centered int8 or bfloat16 state holds the variance ``nu - mu^2`` where optax
    holds ``nu`` (see rms._holds_variance): add ``mu^2`` on the way out, take it off on
    the way in."""
    ours_nu = other.nu if to_optax else like.nu

    def convert(held, nu, mu):
        if not storage.coarse(held):
            return nu
        nu, mu = storage.load(nu, jnp.float32), storage.load(mu, jnp.float32)
        return nu + mu * mu if to_optax else jnp.maximum(nu - mu * mu, 0)

    nu = jax.tree.map(convert, ours_nu, other.nu, other.mu, is_leaf=_is_quantized)
    return other._replace(nu=nu)


def _stateless_mask(like: Any, other: Any) -> bool:
    """optax's ``add_decayed_weights(wd, mask)`` keeps ``MaskedState(EmptyState())``,
    rmsjax's an ``EmptyState``: neither holds anything, so either becomes the other."""
    names = {type(like).__name__, type(other).__name__}
    return (
        names == {"MaskedState", "EmptyState"}
        and not jax.tree.leaves(like)
        and not jax.tree.leaves(other)
    )


def _walk(function: str, path: str, like: Any, other: Any, to_optax: bool, parent: Any) -> Any:
    if like is None:
        # None stands for a parameter left out (a None leaf): nothing of the state is
        # dropped here, or the conversion would lose it without a word
        if jax.tree.leaves(other):
            _fail(function, path, f"`like` holds None, the state a {type(other).__name__}")
        return None
    if isinstance(like, GroupedState) or isinstance(other, GroupedState):
        # optax keeps no blocks: the per-leaf state is the one that converts
        how = (
            "convert rj.ungroup_state(grouped_tx, grouped_state, params) instead"
            if to_optax
            else "pass as `like` the per-leaf state of the optimizer rj.grouped wraps, and "
            "group the result with rj.group_state(grouped_tx, state, params)"
        )
        raise ValueError(
            f"rmsjax.{function}: at {path}: a GroupedState (from rj.grouped) keeps its "
            f"leaves in blocks, which optax does not: {how}."
        )
    if _is_quantized(like) or _is_array_like(like):
        return _convert_leaf(function, path, like, other)
    if base.is_namedtuple(like):
        if not base.is_namedtuple(other):
            _fail(function, path, f"expected a {type(like).__name__}, got {type(other).__name__}")
        if _stateless_mask(like, other):
            return like
        ours, theirs = (other, like) if to_optax else (like, other)
        if not base.optax_counterpart(type(ours).__name__, type(theirs).__name__):
            _fail(
                function,
                path,
                f"{_a(type(other).__name__)} cannot become {_a(type(like).__name__)}",
            )
        centered = type(ours).__name__ == "ScaleByRmsState" and ours.mu is not None
        if centered and {"nu", "mu"} <= set(other._fields):
            other = _centered_moment(other, like, to_optax)
        fields = {}
        for field in like._fields:
            sub = f"{path}.{field}"
            template = getattr(like, field)
            if field in other._fields:
                value = getattr(other, field)
                if to_optax and field in _MOMENT_FIELDS.get(type(other).__name__, ()):
                    value = jax.tree.map(_true_moment, value, is_leaf=_is_quantized)
                fields[field] = _walk(function, sub, template, value, to_optax, other)
            elif template is None or field == "count":
                fields[field] = _zeros_like(template)
            else:
                _fail(function, sub, f"{type(other).__name__} holds no {field!r}")
        for field in other._fields:
            # a step count the other library does not keep is dropped (see the docstrings);
            # any other field with arrays would be lost, and the optimizer changed with it
            if (
                field not in like._fields
                and field != "count"
                and jax.tree.leaves(getattr(other, field))
            ):
                _fail(
                    function,
                    f"{path}.{field}",
                    f"`like`, a {type(like).__name__}, has no place for {field!r}",
                )
        return type(like)(**fields)
    if isinstance(like, dict):
        if not isinstance(other, dict):
            _fail(function, path, f"expected a dict, got {type(other).__name__}")
        out = {}
        for key, template in like.items():
            sub = f"{path}[{key!r}]"
            if key in other:
                out[key] = _walk(function, sub, template, other[key], to_optax, other)
            elif type(template).__name__ == "WrappedScheduleState":
                # optax keeps a count per plain schedule; rmsjax reads the step count
                out[key] = type(template)(count=parent.count)
            else:
                _fail(function, sub, "missing")
        for key, value in other.items():
            # optax's count of a plain schedule is rmsjax's step count; anything else
            # `like` has no place for would be lost (a hyperparameter set in optax's
            # state, the moment of a leaf `like`'s parameters lack)
            kept_elsewhere = type(value).__name__ == "WrappedScheduleState"
            if key not in like and not kept_elsewhere and jax.tree.leaves(value):
                _fail(function, f"{path}[{key!r}]", "`like` has no place for it")
        return type(like)(out) if type(like) is not dict else out
    if isinstance(like, (tuple, list)):
        if not isinstance(other, (tuple, list)) or len(other) != len(like):
            length = len(other) if isinstance(other, (tuple, list)) else None
            _fail(
                function,
                path,
                f"expected a sequence of {len(like)} states, got {type(other).__name__}"
                + (f" of length {length}" if length is not None else ""),
            )
        return type(like)(
            _walk(function, f"{path}[{i}]", t, o, to_optax, other)
            for i, (t, o) in enumerate(zip(like, other))
        )
    # Any other pytree node of the parameters' tree (a flax or equinox container, say).
    like_leaves, treedef = jax.tree.flatten(like, is_leaf=_is_quantized)
    other_leaves = jax.tree.leaves(other, is_leaf=_is_quantized)
    if len(other_leaves) != len(like_leaves):
        _fail(function, path, f"expected {len(like_leaves)} arrays, got {len(other_leaves)}")
    return treedef.unflatten(
        [_convert_leaf(function, path, t, o) for t, o in zip(like_leaves, other_leaves)]
    )


def from_optax_state(optax_state: base.OptState, like: base.OptState) -> base.OptState:
    """The rmsjax state that continues an optax optimizer's state.

    rmsjax keeps its own fixed state schemas (``ScaleByRmsState(count, nu, mu)`` where
    optax has ``ScaleByRmsState(nu)``, a count in ``ScaleByLearningRateState`` where
    optax keeps ``EmptyState()`` for a constant learning rate, ...). This maps an optax
    state of ``sgd``, ``rmsprop``, ``adagrad`` or a chain of the transformations both
    libraries have onto the layout of ``like``, field by field, so that training
    continues exactly as optax would have: the first rmsjax step after the conversion
    gives optax's numbers bit for bit. Arrays are reused, with their shardings.

    Args:
      optax_state: the state of an optax optimizer, e.g. restored from a checkpoint.
      like: the state of the equivalent rmsjax optimizer, ``tx.init(params)`` or
        ``jax.eval_shape(tx.init, params)`` (only its layout is read).

    Returns:
      ``optax_state``'s values in ``like``'s layout.

    Raises:
      ValueError: naming the place where the two states do not correspond.

    >>> import jax.numpy as jnp, optax, rmsjax as rj
    >>> params = jnp.ones(3)
    >>> opt = optax.rmsprop(0.1, momentum=0.9)
    >>> opt_state = opt.update(jnp.ones(3), opt.init(params))[1]
    >>> tx = rj.rmsprop(0.1, momentum=0.9)
    >>> state = rj.from_optax_state(opt_state, like=tx.init(params))
    >>> type(state[0]).__name__, state[0].nu
    ('ScaleByRmsState', Array([0.1, 0.1, 0.1], dtype=float32))
    """
    _refuse_nnx_state("from_optax_state", optax_state=optax_state, like=like)
    _refuse_swapped("from_optax_state", like, optax_state, "to_optax_state")
    return _walk("from_optax_state", "state", like, optax_state, False, None)


def _refuse_nnx_state(function: str, **trees: Any) -> None:
    """A TypeError for an ``nnx.State`` (``nnx.state(optimizer)['opt_state']``, what an
    nnx checkpoint holds): its tuples and NamedTuples are dicts of positions, so no field
    can be matched; the optimizer's own ``opt_state`` keeps them."""
    for argument, tree in trees.items():
        kind = type(tree)
        if kind.__name__ == "State" and kind.__module__.startswith("flax.nnx"):
            raise TypeError(
                f"rmsjax.{function}: {argument} is an nnx.State "
                "(nnx.state(optimizer)['opt_state']), whose tuples are dicts; pass the "
                "nnx.Optimizer's own opt_state (restore a checkpoint into an nnx.Optimizer "
                "of the library that saved it first): new.opt_state = "
                f"rj.{function}(old.opt_state, like=new.opt_state)."
            )


def _libraries(tree: Any) -> set[str]:
    """The libraries whose state types ``tree`` holds (its outermost NamedTuples)."""
    nodes = jax.tree.leaves(tree, is_leaf=base.is_namedtuple)
    return {type(n).__module__.split(".")[0] for n in nodes if base.is_namedtuple(n)}


def _refuse_swapped(function: str, ours: Any, theirs: Any, inverse: str) -> None:
    """A TypeError where rmsjax's state stands where optax's is expected and the
    reverse (the arguments swapped, or the function of the other direction): the walk
    matched the fields by name and failed on the first one only rmsjax keeps."""
    # (a state of either library may hold parts of the other: chains take both)
    expected, given = _libraries(ours), _libraries(theirs)
    if "rmsjax" in given and "optax" in expected and "rmsjax" not in expected:
        raise TypeError(
            f"rmsjax.{function}: the rmsjax state and the optax state are the other way "
            f"round: {function} turns "
            + (
                "an optax state into the rmsjax state given as `like`"
                if function == "from_optax_state"
                else "an rmsjax state into the optax state given as `like`"
            )
            + f"; for the other direction use rj.{inverse}."
        )


def to_optax_state(state: base.OptState, like: base.OptState) -> base.OptState:
    """The optax state that continues an rmsjax optimizer's state: the inverse of
    :func:`from_optax_state`.

    Args:
      state: the state of an rmsjax optimizer.
      like: the state of the equivalent optax optimizer, ``opt.init(params)`` or
        ``jax.eval_shape(opt.init, params)`` (only its layout is read).

    Returns:
      ``state``'s values in ``like``'s layout. Fields optax does not keep (a step count
      it does not need) are dropped; int8 state is decoded.

    >>> import jax.numpy as jnp, optax, rmsjax as rj
    >>> params = jnp.ones(3)
    >>> tx = rj.adagrad(0.1)
    >>> state = tx.update(jnp.ones(3), tx.init(params))[1]
    >>> opt_state = rj.to_optax_state(state, like=optax.adagrad(0.1).init(params))
    >>> opt_state[0].sum_of_squares
    Array([1.1, 1.1, 1.1], dtype=float32)
    """
    _refuse_nnx_state("to_optax_state", state=state, like=like)
    _refuse_swapped("to_optax_state", state, like, "from_optax_state")
    return _walk("to_optax_state", "state", like, state, True, None)


def _a(noun: str) -> str:
    """``noun`` with its indefinite article (an AccumulateGradientsState, a TraceState)."""
    return f"{'an' if noun[:1] in 'AEIOU' else 'a'} {noun}"
