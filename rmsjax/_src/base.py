"""The transformation protocol: a pair of pure functions over pytrees."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, overload

import jax
import jax.numpy as jnp

from rmsjax._src import validate
from rmsjax._src.tree_paths import held_values, key_path, tree_difference

Params = Any
"""A pytree of parameters (arrays, or None for leaves that are not trained)."""
Updates = Any
"""A pytree of gradients or updates with the structure of the parameters."""
OptState = Any
"""A pytree holding an optimizer's state."""
Schedule = Callable[[Any], Any]
"""A function from the step count (an int32 scalar) to a scalar value (a JAX scalar or
a Python number: ``constant_schedule`` returns its value as given, as optax's)."""
ScalarOrSchedule = float | jax.Array | Schedule
"""A constant (python float or scalar array) or a schedule."""
Storage = Literal["float32", "bfloat16", "int8"]
"""How a rule keeps its state arrays (the ``storage`` option; None keeps each in its
parameter's dtype): see docs/memory.md."""


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``.

    Both functions are pure, so a transformation can be used inside ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``. Keyword arguments passed to ``update`` that a rule
    does not use are ignored, so extras can be threaded through any chain.
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


# rmsjax state types and the optax state types that hold the same information (used by
# from_optax_state/to_optax_state, and by a rule's update to say whether an optax state it
# is handed converts). Fields are matched by name; a field optax does not keep (the step
# count of a rule that only needs it for a schedule or a bias correction optax was not
# asked for) starts at zero.
_OPTAX_COUNTERPARTS = {
    "ScaleByRmsState": (
        "ScaleByRmsState",
        "ScaleByRmsWithCountState",
        "ScaleByRStdDevState",
        "ScaleByRStdDevWithCountState",
    ),
    "ScaleByLearningRateState": ("ScaleByScheduleState", "EmptyState"),
    "InjectHyperparamsState": ("InjectStatefulHyperparamsState", "InjectHyperparamsState"),
}


def optax_counterpart(rmsjax_name: str, optax_name: str) -> bool:
    """Whether optax's state type ``optax_name`` holds what rmsjax's ``rmsjax_name`` does."""
    return optax_name in _OPTAX_COUNTERPARTS.get(rmsjax_name, (rmsjax_name,))


def init_empty_state(params: Params) -> EmptyState:
    del params
    return EmptyState()


def is_none(x: Any) -> bool:
    """``is_leaf`` for tree maps in which None marks a leaf that is left out."""
    return x is None


def is_namedtuple(x: Any) -> bool:
    """Whether ``x`` is a NamedTuple: every state rmsjax and optax build is one."""
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def accepts_extra(function: Callable) -> bool:
    """Whether ``function`` takes keyword extras (a ``**kwargs`` parameter)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _is_optax_extra_args(tx: Any) -> bool:
    """An optax ``GradientTransformationExtraArgs``: optax hands it every extra, whatever
    its ``update`` declares (a keyword-only ``loss``, say), and so does rmsjax."""
    kind = type(tx)
    return kind.__name__ == "GradientTransformationExtraArgs" and kind.__module__.startswith(
        "optax"
    )


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` with an ``update`` that takes keyword extras, ignoring them, if it did not.

    Every rmsjax transformation already takes them and is returned as it is, so are
    optax's ``GradientTransformationExtraArgs``; a plain optax transformation gets an
    ``update`` that drops them. ``chain`` and the wrappers apply this once, when they
    are built, so that a step passes extras on without inspecting what it calls.

    Args:
      tx: any object with ``init`` and ``update``.

    Returns:
      ``tx``, or a :class:`GradientTransformation` around it.

    >>> import optax, rmsjax as rj
    >>> tx = rj.with_extra_args_support(optax.scale(2.0))
    >>> float(tx.update(1.0, tx.init(1.0), None, step=3)[0])
    2.0
    """
    validate.check_transformation("with_extra_args_support", "tx", tx)
    if accepts_extra(tx.update) or _is_optax_extra_args(tx):
        return tx
    inner = tx.update

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra: Any):
        del extra
        return inner(updates, state, params)

    return GradientTransformation(tx.init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Adds ``updates`` to ``params`` leaf by leaf, keeping each parameter's dtype.

    Leaves that are None in ``params`` (for instance parameters filtered out with
    equinox's ``eqx.filter``) stay None. ``updates`` must have the parameters' tree
    structure, and an update the shape of its parameter (or one that broadcasts to it):
    anything else raises a ValueError naming the leaf, where adding it would fail or
    change the parameter's shape.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> rj.apply_updates({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.full(2, 0.5)})["w"]
    Array([1.5, 1.5], dtype=bfloat16)
    """
    treedef = jax.tree.structure(params, is_leaf=is_none)
    try:
        flat_updates = treedef.flatten_up_to(updates)
        # flatten_up_to takes updates whose tree goes on below a parameter leaf (a dict
        # where a parameter is an array); the sum would then fail on the container
        if not all(jax.tree_util.treedef_is_leaf(_leaf_structure(u)) for u in flat_updates):
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError(
            "rmsjax.apply_updates: the tree structure of the updates differs from that of "
            f"the parameters; {tree_difference(params, updates)}."
            f"\n  updates: {jax.tree.structure(updates)}\n  params: {treedef}"
        ) from None
    paths_and_params = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)[0]
    out = []
    for (path, p), u in zip(paths_and_params, flat_updates, strict=True):
        if p is not None:
            locate = functools.partial(key_path, path)
            check_float_parameter("apply_updates", locate, p, u)
        if p is not None and u is None:  # None is an empty subtree: the trees differ
            raise ValueError(
                f"rmsjax.apply_updates: the update at {key_path(path)} is None and "
                f"its parameter an array of shape {jnp.shape(p)}; a leaf left out of the "
                "updates must be None in the parameters too."
            )
        if p is not None and not _broadcasts_to(jnp.shape(u), jnp.shape(p)):
            raise ValueError(
                f"rmsjax.apply_updates: the update at {key_path(path)} has shape "
                f"{jnp.shape(u)}, which does not fit its parameter's shape {jnp.shape(p)}"
            )
        out.append(None if p is None else apply_leaf(p, u))
    return jax.tree.unflatten(treedef, out)


def check_float_parameter(
    where: str, locate: Callable[[], str], param: Any, update: Any = None
) -> None:
    """Raises a TypeError naming ``rmsjax.{where}`` and the leaf at ``locate()`` (its
    key path, looked up only for the error: a step checks every leaf) unless ``param``
    is floating point (or complex), and, given its ``update``, unless a complex update
    goes to a complex parameter: an update added to an integer or bool parameter would
    be truncated without a word, and a complex one to a real parameter lose its
    imaginary part."""
    dtype = _array_dtype(where, locate, param)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"rmsjax.{where}: the parameter at {locate()} has dtype {dtype}; an update added "
            "to it would be truncated. Leave it out of the trained tree (None in the "
            "parameters and the updates) or cast it to a float dtype."
        )
    update_dtype = None if update is None else jnp.result_type(update)
    for what, kind in (("parameter", dtype), ("update", update_dtype)):
        if kind is not None and is_eight_bit_float(kind):
            # (JAX's own TypePromotionError named neither the leaf nor this function)
            raise eight_bit_float_error(where, f"the {what} at {locate()}", kind)
    if update_dtype is None or jnp.issubdtype(dtype, jnp.complexfloating):
        return
    if jnp.issubdtype(update_dtype, jnp.complexfloating):
        raise TypeError(
            f"rmsjax.{where}: the update at {locate()} has dtype {update_dtype} and its "
            f"parameter {dtype}; adding it would drop its imaginary part. Take the real "
            "part of the gradients (jnp.real) if that is meant, or make the parameter complex."
        )


def is_eight_bit_float(dtype: Any) -> bool:
    """Whether ``dtype`` is one of JAX's 8-bit floats, which rmsjax refuses."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 2


def eight_bit_float_error(function: str, subject: str, dtype: Any) -> TypeError:
    """The refusal of an 8-bit float leaf: ``subject`` names it (``leaf ['w']``)."""
    return TypeError(
        f"rmsjax.{function}: {subject} has dtype {dtype}; rmsjax does not take 8-bit float "
        "leaves (JAX does not promote them to the float32 most rules compute in). Keep the "
        f"trained parameters and their gradients in bfloat16 or float32, and cast them to "
        f"{dtype} for the forward pass."
    )


def _array_dtype(where: str, locate: Callable[[], str], param: Any) -> Any:
    """``param``'s dtype, or a TypeError naming it where it is no array (a function or
    another object in the tree: an unfiltered model)."""
    try:
        return jnp.result_type(param)
    except TypeError:
        raise TypeError(
            f"rmsjax.{where}: the parameter at {locate()} is {param!r} "
            f"({type(param).__name__}), not an array. Leave it out of the trained tree "
            "(None in the parameters and the updates: eqx.filter(model, eqx.is_array))."
        ) from None


def check_float_leaves(function: str, params: Any, why: str) -> None:
    """Raises ``TypeError: rmsjax.{function}: params leaf {path} has dtype {dtype};
    {why}`` for the first leaf of ``params`` that is not floating point (or complex),
    and names a leaf that is no array as :func:`check_float_parameter` does."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = _array_dtype(function, functools.partial(key_path, path), leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"rmsjax.{function}: params leaf {key_path(path)} has dtype {dtype}; {why}"
            )


def _leaf_structure(x: Any) -> Any:
    return jax.tree.structure(x, is_leaf=is_none)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    try:
        return tuple(jnp.broadcast_shapes(shape, target)) == tuple(target)
    except ValueError:
        return False


@overload
def apply_leaf(param: None, update: jax.Array) -> None: ...
@overload
def apply_leaf(param: jax.Array, update: jax.Array) -> jax.Array: ...
def apply_leaf(param: jax.Array | None, update: jax.Array) -> jax.Array | None:
    """One leaf of :func:`apply_updates`: ``param + update`` in the parameter's dtype (a
    None parameter stays None)."""
    if param is None:
        return None
    param = jnp.asarray(param)
    return jnp.asarray(param + update).astype(param.dtype)


class TreeStructure:
    """The parameters a ``GroupedState`` was made for, held in the state as static data
    (a pytree node without leaves): it is no array, saves nothing to a checkpoint, and is
    part of what ``jit`` compares, as a shape is.

    Attributes:
      treedef: the parameters' tree structure.
      leaves: each parameter leaf's ``(shape, dtype)``, in tree order, from which the
        state's blocks were made; None in a state saved before it was kept.
    """

    leaves: tuple[tuple[tuple[int, ...], Any], ...] | None = None  # pickles without it

    def __init__(self, treedef: Any, leaves: tuple | None = None):
        self.treedef = treedef
        self.leaves = leaves

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeStructure) and (other.treedef, other.leaves) == (
            self.treedef,
            self.leaves,
        )

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __repr__(self) -> str:
        return f"TreeStructure({self.treedef})"


jax.tree_util.register_pytree_node(
    TreeStructure,
    lambda t: ((), (t.treedef, t.leaves)),
    lambda aux, _: TreeStructure(*aux),
)


def structure_of(tree: Any) -> Any:
    """A tree's structure as :class:`GroupedState` keeps it: updates with None for a
    parameter that has an array differ from it, as they do from a per-leaf state; a
    framework's variable counts as what it holds (:func:`is_variable`): an array, or
    the ``MaskedNode`` a ``masked`` wrapper put in its place (``nnx.Optimizer`` builds
    the state from variables and steps it with plain arrays)."""
    return jax.tree.structure(held_values(tree))
