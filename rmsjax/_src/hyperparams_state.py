"""The state of :func:`~rmsjax._src.hyperparams.inject_hyperparams`: its NamedTuple and
the ``hyperparams`` dict that checks every entry set in it."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import base, validate


class InjectHyperparamsState(NamedTuple):
    """State of a transformation made by :func:`inject_hyperparams`; the fields of
    ``optax.InjectStatefulHyperparamsState``, in its order.

    Attributes:
      count: number of updates so far (int32, saturating); schedules are read at it.
      hyperparams: a :class:`Hyperparams` dict from argument name to its current value,
        a scalar array (float32 for real numbers by default, int32 for python ints).
        Set an entry (``state.hyperparams["learning_rate"] = 1e-4``, as in optax) to
        change it from the next step on; the value is cast to the entry's dtype, so a
        jitted step is not traced again (an int32 entry set to a fractional number
        becomes float32, as in optax, rather than truncating it).
      hyperparams_states: the state of each stateful schedule (an object with ``init``,
        ``update`` and ``__call__``, as optax's ``StatefulSchedule``), by argument name;
        empty when there is none.
      inner_state: the state of the transformation the factory builds.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's
    hyperparams: dict[str, jax.Array]
    hyperparams_states: dict[str, Any]
    inner_state: base.OptState


class Hyperparams(dict):
    """The ``hyperparams`` dict of an :class:`InjectHyperparamsState`: a dict (and a
    pytree with the same keys and paths) that keeps each entry's dtype and refuses names
    it does not hold, however an entry is set (``[key] =``, ``update``, ``|=``,
    ``setdefault``), so a misspelled name fails where it is set; entries cannot be
    removed."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            raise KeyError(
                f"rmsjax.inject_hyperparams: state.hyperparams has no entry {key!r}; "
                f"its entries are {sorted(self)}"
            )
        old = super().__getitem__(key)
        if isinstance(value, jax.core.Tracer):
            # its value is unknown until the step runs; its shape and dtype are known now
            _check_array(key, value, old)
            super().__setitem__(key, value)
            return
        _check_array(key, value, old)
        if np.shape(old) == ():
            # a real number, finite in float32 (a bool would be stored as 1.0, a decay
            # of True stepping by -1000 g); its range is checked where the step builds
            # the optimizer from it
            validate.check_finite("inject_hyperparams", f"state.hyperparams[{key!r}]", value)
        dtype = jnp.result_type(old)
        if jnp.issubdtype(dtype, jnp.integer) and not fits_int32(value):
            # an entry first given as a Python int (learning_rate=1) set to 0.01: a float
            # from now on, as in optax, not truncated to 0 (one more trace of the step)
            dtype = value.dtype if _is_floating_array(value) else jnp.float32
        refuse_lost("inject_hyperparams", f"state.hyperparams[{key!r}]", value, dtype)
        super().__setitem__(key, jnp.array(value, dtype, copy=True))

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """As ``dict.update``, each entry set as ``hyperparams[key] = value`` is; nothing
        is set if one entry is refused."""
        entries = dict(*args, **kwargs)
        trial = dict.__new__(Hyperparams)
        dict.update(trial, self)
        for key, value in entries.items():
            trial[key] = value
        dict.update(self, trial)

    def __ior__(self, other: Any) -> Hyperparams:  # type: ignore[override,misc]
        self.update(other)
        return self

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default  # refused: setdefault only ever adds an entry
        return self[key]

    def _refuse_removal(self, *key: Any) -> Any:
        name = f"state.hyperparams[{key[0]!r}]" if key else "entries of state.hyperparams"
        if key and key[0] not in self:
            self[key[0]] = None  # refused as a misspelled name is
        raise TypeError(
            f"rmsjax.inject_hyperparams: {name} cannot be removed; the step builds the "
            f"optimizer from every one of {sorted(self)}"
        )

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        # as dict.pop, an absent key with a default removes nothing and returns it
        return default[0] if key not in self and default else self._refuse_removal(key)

    __delitem__ = _refuse_removal  # type: ignore[assignment]
    popitem = clear = _refuse_removal  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        # pickle and copy.deepcopy rebuild from the entries, not item by item into an
        # empty Hyperparams (which holds no entry to set)
        return (Hyperparams, (dict(self),))


jax.tree_util.register_pytree_with_keys(
    Hyperparams,
    lambda d: (
        tuple((jax.tree_util.DictKey(k), d[k]) for k in sorted(d)),
        tuple(sorted(d)),
    ),
    lambda keys, values: Hyperparams(zip(keys, values)),
    flatten_func=lambda d: (tuple(d[k] for k in sorted(d)), tuple(sorted(d))),
)


# The state flattens its hyperparams as a plain dict and is rebuilt with a Hyperparams:
# optax's tree_set sets the entries in a plain dict, and a state so set has the same tree
# structure as one from init, so either can be a lax.scan carry or a cond branch's output,
# wherever tree_set is called. Key paths are a NamedTuple's (.count, .hyperparams['lr']).
_STATE_FIELDS = InjectHyperparamsState._fields


def _state_children(state: InjectHyperparamsState) -> tuple:
    return (*state[:1], dict(state.hyperparams), *state[2:])


def _flatten_state(state: InjectHyperparamsState) -> tuple:
    keys = map(jax.tree_util.GetAttrKey, _STATE_FIELDS)
    return tuple(zip(keys, _state_children(state))), None


def _unflatten_state(aux: None, children: Any) -> InjectHyperparamsState:
    del aux
    count, entries, schedule_states, inner_state = children
    return InjectHyperparamsState(count, Hyperparams(entries), schedule_states, inner_state)


jax.tree_util.register_pytree_with_keys(
    InjectHyperparamsState,
    _flatten_state,
    _unflatten_state,
    flatten_func=lambda state: (_state_children(state), None),
)


def _check_array(key: str, value: Any, old: Any) -> None:
    """The checks of an entry that need no value: its shape, and for an array its dtype
    (real: a bool stepped as 1, a complex number as its real part)."""
    if np.shape(value) != np.shape(old):
        raise ValueError(
            f"rmsjax.inject_hyperparams: state.hyperparams[{key!r}] holds a value of "
            f"shape {np.shape(old)}, got one of shape {np.shape(value)}"
        )
    if isinstance(value, jax.Array) and not validate.is_real_dtype(value.dtype):
        raise TypeError(
            f"rmsjax.inject_hyperparams: state.hyperparams[{key!r}] must be a real "
            f"number (an integer or a float), got an array of dtype {value.dtype}"
        )


def check_entries(entries: Any, templates: dict[str, Any]) -> None:
    """The checks of ``state.hyperparams[key] = value`` on the entries a step reads, which
    ``optax.tree_utils.tree_set`` (it rebuilds the dict) or a plain dict put there without
    them. An array (a tracer under ``jit``) is checked by its shape and dtype alone, with
    no read of its value; a host value (a Python or NumPy number, a string, None) in
    full, against ``templates``, the entries' shapes and dtypes (``np.zeros((), dtype)``).
    An array's value is checked where the step builds the optimizer from it (its range;
    eagerly) or not at all (traced)."""
    trial = Hyperparams(templates)  # (the dict constructor sets no entry through the checks)
    for key in templates:
        value = entries[key]
        if isinstance(value, jax.Array):
            _check_array(key, value, templates[key])
        else:
            trial[key] = value


def refuse_lost(function: str, label: str, value: Any, dtype: Any) -> None:
    """A ValueError where ``value``, a finite number that is not 0, is 0 or infinite in
    ``dtype`` (1e-8 or 1e5 in float16): kept in a state of that dtype, a hyperparameter
    would be another in silence (``eps=0``, an infinite learning rate). Decided on the
    host from the number given, so under ``jit`` too, where it is not traced."""
    given = validate.concrete_value(value)
    if given in (None, 0.0) or not math.isfinite(given):
        return
    if not jnp.issubdtype(dtype, jnp.floating):
        return
    with np.errstate(over="ignore"):  # (refused below, with the dtype named)
        held = float(np.asarray(given).astype(jnp.dtype(dtype)))
    if held == 0 or math.isinf(held):
        raise ValueError(
            f"rmsjax.{function}: {label} is {given!r}, which is {held:g} in "
            f"{jnp.dtype(dtype).name} (the state's hyperparam_dtype); pass "
            f"{_held_by(dtype)}"
        )


def _held_by(dtype: Any) -> str:
    """What to pass instead of a value ``dtype`` loses (see :func:`refuse_lost`)."""
    if jnp.finfo(dtype).bits < 32:
        return "a wider hyperparam_dtype (float32, the default), or a value the dtype holds"
    return "a value the dtype holds (or, with jax_enable_x64, hyperparam_dtype=jnp.float64)"


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) or (
        hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)
    )


def fits_int32(value: Any) -> bool:
    """An integer int32 holds (a traced one is taken to): a larger one, np.int64(2**40)
    say, wrapped around in silence (a learning rate of -2**31); it is kept as a float."""
    if not is_integer(value):
        return False
    if isinstance(value, jax.core.Tracer):
        return True
    info = np.iinfo(np.int32)
    return bool(info.min <= int(value) <= info.max)


def _is_floating_array(value: Any) -> bool:
    return hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.floating)
