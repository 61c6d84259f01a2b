"""``accumulate_gradients``: one optimizer step per ``every_k`` micro-batches."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsjax._src import (
    base,
    elementwise,
    fusion,
    numerics,
    sharding,
    step_checks,
    tree_checks,
    tree_paths,
    validate,
)


class AccumulateGradientsState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      mini_step: micro-batches accumulated since the last optimizer step, in
        ``[0, every_k)`` (int32); 0 right after a step, so ``(mini_step == 0) &
        (gradient_step > 0)`` tells that the last call updated the parameters (optax's
        ``MultiSteps.has_updated``).
      gradient_step: optimizer steps taken so far (int32, saturating).
      accumulated: the sum of the gradients of the current micro-batches divided by
        ``2**m``, the power of two at or above ``every_k`` (so that it cannot overflow
        where the gradients do not), one array per parameter.
      inner_state: the wrapped transformation's state.
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    accumulated: base.Updates
    inner_state: base.OptState


def accumulate_gradients(
    inner: base.GradientTransformation, every_k: int, *, accumulator_dtype: Any = None
) -> base.GradientTransformation:
    r"""Averages the gradients of ``every_k`` micro-batches and steps ``inner`` once.

    Calls 1 to k-1 of each cycle add the gradient to a running sum (kept in units of a
    power of two at or above k, so that gradients near float32's maximum do not make it
    overflow) and return zero updates (so ``apply_updates`` leaves the parameters as
    they are); call k hands the mean :math:`\bar g = \frac{1}{k}\sum_{j=1}^{k} g_j` to
    ``inner`` and returns its updates. When each micro-batch loss is a mean over the
    same number of examples, :math:`\bar g` is the gradient of the big batch, so
    training with micro-batches of size ``b`` matches training with batches of size
    ``k * b`` (up to rounding) while holding only one micro-batch of activations in memory.
    ``inner`` (RMSprop's average, Adagrad's sum, momentum, schedules) sees one step per
    cycle. The semantics are those of ``optax.MultiSteps`` (but for a non-finite
    micro-batch gradient, which stays in ``MultiSteps``' running mean for good and
    here only in its own cycle's sum: docs/porting.md); the inner step runs under
    ``lax.cond``, so its cost is paid once per cycle.

    Args:
      inner: the optimizer to step once per ``every_k`` calls.
      every_k: the number of micro-batches per step, an integer >= 1.
      accumulator_dtype: dtype of the running sum; None gives each parameter's dtype,
        at least float32 (``MultiSteps``' float32 default, without narrowing float64
        sums), so that bfloat16 gradients are summed without rounding; a narrower one
        (``jnp.bfloat16``) halves the buffer. A sum beyond its largest finite number
        (65504 for float16) is held at that number.

    Returns:
      A :class:`GradientTransformation` with state :class:`AccumulateGradientsState`.
      A state saved at a cycle's end (``mini_step == 0``) goes on with any ``every_k``.
      One saved mid-cycle holds a sum in units of its own ``every_k``'s power of two:
      resume it with the same ``every_k``. (With another, the cycle in progress steps
      when its count reaches the new ``every_k - 1``, or at once where it is past it,
      and its mean is off by the ratio of the two powers of two where they differ;
      ``MultiSteps`` keeps a running mean, which any ``every_k`` reads. The state's
      values are not read at run time to refuse it: that would cost a transfer to the
      host each step.)

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> tx = rj.accumulate_gradients(rj.sgd(1.0), every_k=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> first, state = tx.update(jnp.array([1.0]), state)
    >>> second, state = tx.update(jnp.array([3.0]), state)
    >>> first, second
    (Array([-0.], dtype=float32), Array([-2.], dtype=float32))
    """
    validate.check_transformation("accumulate_gradients", "inner", inner)
    name = "accumulate_gradients"
    validate.check_count(name, "every_k", every_k)
    validate.check_float_dtype(name, "accumulator_dtype", accumulator_dtype)
    inner = base.with_extra_args_support(inner)
    # The sum is kept in units of 2^m >= every_k, so that it stays under the largest
    # gradient: a plain float32 sum of four gradients of 1e38 is inf. Scaling by a power
    # of two rounds nothing, and the mean below, the scaled sum over every_k / 2^m, is
    # the plain sum over every_k wherever that sum is finite: bit for bit where every_k is
    # a power of two, and otherwise to XLA's division, a product by the divisor's rounded
    # reciprocal on a CPU (an ulp or two from the rounded quotient: seven gradients of 3.0
    # average to 3.0000002; optax's MultiSteps divides so too). (The price is
    # at float32's other end: a gradient under 2^m times its smallest normal number,
    # 1.2e-38, counts as 0 where the processor flushes subnormal numbers.)
    unit = 2 ** (int(every_k) - 1).bit_length()

    def zeros_like(leaf):
        # zeros_like keeps a sharded parameter's layout for its accumulator
        if accumulator_dtype is None:  # at least float32, as optax.MultiSteps' default
            return jnp.zeros_like(leaf, numerics.compute_dtype(jnp.result_type(leaf)))
        dtype = step_checks.accumulator_dtype_for(name, leaf, accumulator_dtype)
        return jnp.zeros_like(leaf, dtype)

    def init_fn(params):
        mini_step, gradient_step = sharding.init_shared_like(
            lambda: (jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)), jax.tree.leaves(params)
        )
        with elementwise.naming_wrapper(name, "init"):
            inner_state = inner.init(params)
        return AccumulateGradientsState(
            mini_step=mini_step,
            gradient_step=gradient_step,
            accumulated=jax.tree.map(zeros_like, params),
            inner_state=inner_state,
        )

    def update_fn(updates, state, params=None, **extra):
        elementwise.expect_state(
            name,
            state,
            AccumulateGradientsState,
            (
                "MultiStepsState",
                "A MultiStepsState does not convert (see docs/porting.md): keep "
                "optax.MultiSteps around the rmsjax optimizer, whose inner state converts.",
            ),
        )
        updates = _like_accumulated(name, updates, state.accumulated)

        def add(acc, g):
            dtype = numerics.compute_dtype(jnp.result_type(acc, g))
            g = g.astype(dtype) * (1 / unit)
            total = acc.astype(dtype) + g
            # A sum of finite gradients saturates at the accumulator's largest number
            # rather than turn into inf (which stepped by -inf): a narrower accumulator's
            # (bfloat16's is under float32's, float16's is 65504), and float32's where
            # rounding took the sum past it (bfloat16 holds float32's largest / 2 as
            # 2^127, and two of them overflowed float32).
            top = float(jnp.finfo(acc.dtype).max)  # (a complex one's parts')
            finite = jnp.isfinite(acc) & jnp.isfinite(g)

            def saturated(part):
                return jnp.where(finite, jnp.clip(part, -top, top), part)

            if jnp.iscomplexobj(total):
                total = jax.lax.complex(saturated(total.real), saturated(total.imag))
            else:
                total = saturated(total)
            return total.astype(acc.dtype)

        accumulated = jax.tree.map(add, state.accumulated, updates)
        # (>=: a state of a larger every_k, traced, steps at once rather than never)
        last = state.mini_step >= every_k - 1

        def step(_):
            def mean(acc, g):
                dtype = numerics.compute_dtype(acc.dtype)
                mean = (acc.astype(dtype) / (every_k / unit)).astype(g.dtype)
                # A mean of finite gradients is finite: at float32's maximum the quotient
                # can round past it (seven gradients of 3.4e38 gave inf).
                largest = jnp.finfo(mean.dtype).max
                rounded_over = jnp.isinf(mean) & jnp.isfinite(acc)
                return jnp.where(rounded_over, jnp.sign(mean) * largest, mean)

            averaged = jax.tree.map(mean, accumulated, updates)
            with elementwise.naming_wrapper(name, "update"):
                new_updates, inner_state = inner.update(
                    averaged, state.inner_state, params, **extra
                )
            return (
                new_updates,
                inner_state,
                jax.tree.map(jnp.zeros_like, accumulated),
            )

        def wait(_):
            # Zero updates shaped and typed as the inner step's output; -0.0 because
            # params + (-0.0) is params bit for bit, -0.0 included.
            # Built from the incoming updates (same tree and shapes), so that under
            # shard_map they carry the same varying axes as the inner step's output.
            out = jax.eval_shape(step, None)[0]
            zeros = jax.tree.map(lambda g, u: jnp.full_like(g, -0.0, u.dtype), updates, out)
            return zeros, state.inner_state, accumulated

        if every_k == 1:
            # every call steps: no cond, whose branch XLA compiles apart (its kernels
            # contracted other products into multiply-adds than the inner step alone)
            new_updates, inner_state, accumulated = step(None)
        else:
            new_updates, inner_state, accumulated = jax.lax.cond(last, step, wait, None)
        return new_updates, AccumulateGradientsState(
            mini_step=jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32),
            gradient_step=jnp.where(
                last, numerics.safe_increment(state.gradient_step), state.gradient_step
            ),
            accumulated=accumulated,
            inner_state=inner_state,
        )

    # No fused step: inside lax.cond XLA would contract the parameter update into the
    # inner step's last multiply (one rounding instead of two), so fused and unfused
    # steps would differ in the last bit, and differ from optax.MultiSteps. The inner
    # chain still runs fused; the parameters are updated after the cond.
    return fusion.wrapper_transformation(name, init_fn, update_fn, None)


def _like_accumulated(name: str, updates: Any, accumulated: Any) -> Any:
    """``updates`` as arrays, once their tree and shapes are the accumulator's: else a
    ValueError naming the leaf (a shape) or showing both structures."""
    held = tree_checks.flatten_like(name, "state", jax.tree.structure(updates), accumulated)
    paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    # floating-point or complex gradients
    tree_checks.check_inexact(name, "update", updates, [g for _, g in paths])
    for (path, g), acc in zip(paths, held):
        if jnp.shape(g) != jnp.shape(acc):
            raise ValueError(
                f"rmsjax.{name}.update: the update at {tree_paths.key_path(path)} "
                f"has shape {jnp.shape(g)} but the state holds {jnp.shape(acc)}. Initialise the "
                "optimizer with parameters of the gradients' shapes."
            )
    return jax.tree.map(jnp.asarray, updates)
