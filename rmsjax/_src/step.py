"""``make_train_step``: a jitted training step with donated parameters and state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import base, combine, validate


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    if hasattr(value, "shape"):
        kind = "" if _numeric_dtype(value) else f" and dtype {value.dtype}"
        return f"an array of shape {value.shape}{kind}"
    return f"{type(value).__name__} {value!r}"


def _numeric_dtype(value: Any) -> bool:
    """Whether an array's dtype is a number or a bool: NumPy holds strings, bytes,
    dates and objects too (ml_dtypes' bfloat16, of NumPy kind V, is a number)."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and (
        jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
    )


def _check_aux(name: str, aux: Any) -> None:
    # the step is jitted, so aux leaves are returned as arrays; JAX's own error names
    # the output component of an internal function, not loss_fn's aux
    for path, leaf in jax.tree_util.tree_leaves_with_path(aux):
        numeric = isinstance(leaf, (jax.Array, bool, int, float, complex)) or (
            isinstance(leaf, (np.ndarray, np.generic)) and _numeric_dtype(leaf)
        )
        if not numeric:
            raise TypeError(
                f"rmsjax.{name}: with has_aux=True, loss_fn's aux is returned from a "
                "jitted step, so its leaves must be arrays or numbers; got "
                f"{_describe(leaf)} at aux{jax.tree_util.keystr(path)}. Return it as an "
                "array, or compute it outside the step"
            )


_NOT_DIFFERENTIABLE = (
    "the step differentiates loss_fn with respect to every leaf of params, which needs "
    "floats. Pass integer values in the batch (or close over them) instead."
)


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: base.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable[..., tuple]:
    """Returns ``step(params, state, *batch) -> (params, state, loss)``, jitted.

    The step computes ``loss_fn(params, *batch)`` and its gradient, then updates the
    state and the parameters with :func:`update_and_apply`, so that for an elementwise
    chain each parameter's optimizer step and update is one loop over its elements.
    Parameters and optimizer state are *donated*: XLA writes the new values into the
    old buffers instead of allocating fresh ones (on CPU an undonated optimizer step is
    several times slower; see ``benchmarks/RESULTS.md``).

    .. warning:: donated arrays are deleted by the call. Always continue with the
       returned ``params`` and ``state``: ``params, state, loss = step(params, state,
       x, y)``. Reading the arrays passed in afterwards raises "Array has been deleted".
       Keep a copy (``jax.tree.map(jnp.copy, params)``) if you need the old values, or
       pass ``donate=False``. Tied weights (one array at two places of ``params``)
       cannot be donated: XLA refuses to donate a buffer twice ("Attempt to donate the
       same buffer twice"); keep the weight once in ``params``, or pass
       ``donate=False``. Nor can an array passed both in ``params`` and in the batch
       ("Attempt to use a buffer that was previously donated"): pass a copy as the
       batch. Called under a transformation (``jax.grad`` through a few steps to
       learn a learning rate, ``vmap``, an outer ``jit``) the step donates nothing:
       the transformation still holds the buffers.

    ``tx.update`` is called with the gradients, the state and the parameters only. For
    a part that reads an extra argument (``optax.contrib.reduce_on_plateau``'s
    ``value``), write the step with :func:`update_and_apply`:
    ``update_and_apply(tx, grads, state, params, value=loss)``.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> loss`` (a scalar), or ``-> (loss, aux)``
        with ``has_aux=True``.
      tx: the optimizer, e.g. ``rmsprop(1e-3, momentum=0.9)`` or, for models with many
        small leaves, ``grouped(rmsprop(1e-3, momentum=0.9))``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the step then returns
        ``(params, state, (loss, aux))``.
      donate: donate ``params`` and ``state`` (the default; see the warning).

    Returns:
      The jitted step function (with ``lower``, ``trace`` and ``eval_shape``). It
      compiles once per set of argument shapes and dtypes.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> def loss_fn(params, x, y):
    ...     return jnp.mean((x @ params["w"] - y) ** 2)
    >>> tx = rj.rmsprop(0.1)
    >>> step = rj.make_train_step(loss_fn, tx)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> x, y = jnp.eye(2), jnp.array([1.0, -1.0])
    >>> params, state, loss = step(params, state, x, y)
    >>> params["w"], loss
    (Array([ 0.31622776, -0.31622776], dtype=float32), Array(1., dtype=float32))
    """
    name = "make_train_step"
    validate.check_callable(name, "loss_fn", loss_fn)
    validate.check_transformation(name, "tx", tx)
    validate.check_bool(name, "has_aux", has_aux)
    validate.check_bool(name, "donate", donate)

    def checked_loss(params, *batch):
        # checked while value_and_grad traces it: JAX's own error would not say which
        # argument of make_train_step to change
        out = loss_fn(params, *batch)
        is_pair = isinstance(out, (tuple, list)) and len(out) == 2
        if has_aux and not is_pair:
            raise TypeError(
                f"rmsjax.{name}: with has_aux=True, loss_fn must return (loss, aux), "
                f"got {_describe(out)}"
            )
        if not has_aux and isinstance(out, (tuple, list)):
            raise TypeError(
                f"rmsjax.{name}: loss_fn must return a scalar loss, got {_describe(out)}; "
                "if it returns (loss, aux), pass has_aux=True"
            )
        if has_aux:
            _check_aux(name, out[1])
        loss = out[0] if has_aux else out
        if jnp.shape(loss) != ():
            raise TypeError(
                f"rmsjax.{name}: loss_fn must return a scalar loss, got an array of "
                f"shape {jnp.shape(loss)}; reduce it (e.g. with jnp.mean)"
            )
        return out

    grad_fn = jax.value_and_grad(checked_loss, has_aux=has_aux)

    def step(params, state, *batch):
        # JAX's own error for an integer leaf names no leaf
        base.check_float_leaves(name, params, _NOT_DIFFERENTIABLE)
        loss, grads = grad_fn(params, *batch)
        params, state = combine.update_and_apply(tx, grads, state, params)
        return params, state, loss

    if not donate:
        return jax.jit(step)
    return _donating(name, step)


def _under_transformation(*args: Any) -> bool:
    """Whether the call is traced by a transformation (``grad``, ``vmap``, an outer
    ``jit``), even where none of ``args`` is a tracer (``grad`` with respect to the batch,
    a tracer ``loss_fn`` closes over): JAX's own test, one call. A JAX without it is
    asked of the arguments instead."""
    if _is_top_level is not None:
        return not _is_top_level()
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


try:  # (private: tests/test_step.py checks that it still answers as used here)
    from jax._src.core import trace_ctx as _trace_ctx

    _is_top_level: Callable[[], bool] | None = _trace_ctx.is_top_level
except (ImportError, AttributeError):  # pragma: no cover
    _is_top_level = None


def _donating(name: str, step: Callable[..., tuple]) -> Callable[..., tuple]:
    """``step`` jitted with its parameters and state donated, except under a
    transformation (an eager ``jax.grad`` through a few steps, ``vmap``, an outer
    ``jit``), whose tracers hold buffers a donation would delete; a deleted array
    passed in is named. It keeps the jitted function's ``lower``, ``trace`` and
    ``eval_shape``."""
    donated, kept = jax.jit(step, donate_argnums=(0, 1)), jax.jit(step)

    def donating_step(params, state, *batch):
        if _under_transformation(params, state, batch):
            return kept(params, state, *batch)
        try:
            return donated(params, state, *batch)
        except (ValueError, RuntimeError) as error:  # XLA's names an argument's index
            for what, tree in (("params", params), ("state", state)):
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                    if isinstance(leaf, jax.Array) and leaf.is_deleted():
                        raise ValueError(
                            f"rmsjax.{name}: {what}{jax.tree_util.keystr(path)} was "
                            "deleted: an earlier call donated it. Continue with what the "
                            "last step returned (params, state, loss = step(params, "
                            "state, ...)), or pass donate=False."
                        ) from error
            raise

    for attribute in ("lower", "trace", "eval_shape"):
        setattr(donating_step, attribute, getattr(donated, attribute))
    return donating_step
