"""The arithmetic the rules share: their compute dtype, squared moduli, bias-correction
factors as optax computes them, a ceiling below overflow, and saturating counts."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def compute_dtype(dtype: Any) -> Any:
    """The dtype rules compute in: float32 for half-precision leaves, else the leaf's
    (complex64 and complex128 leaves compute in their own dtype)."""
    return jnp.promote_types(dtype, jnp.float32)


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2`, real: ``x * x`` for real ``x``, ``(conj(x) * x).real`` for complex
    ``x`` (the same values, bit for bit, as optax computes a complex second moment)."""
    if jnp.iscomplexobj(x):
        return (jnp.conj(x) * x).real
    return x * x


@functools.partial(jax.jit, inline=True)
def bias_correction_factor(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count``, jitted and inlined as optax computes it, so that eager and
    jitted steps get optax's factor bit for bit (eager ``pow`` can differ by an ulp)."""
    return 1 - decay**count


def finite_ceiling(x: jax.Array, *stored: Any) -> jax.Array:
    """``x`` clipped at the largest value that is finite in its dtype and in the dtype
    of each ``stored`` slot, so that an overflowing square (a gradient above 1.8e19 in
    float32, above 256 in a float16 state) never leaves an infinite moment in the state.
    A no-op, bit for bit, on every finite value below that ceiling; NaN stays NaN."""
    top = float(jnp.finfo(x.dtype).max)
    if jnp.iscomplexobj(x):  # a complex second moment: its real part holds the value
        return jnp.where(x.real > top, jnp.asarray(top, x.dtype), x)
    for slot in stored:
        dtype = getattr(slot, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            top = min(top, float(jnp.finfo(dtype).max))
    # The same values as jnp.minimum(x, top), NaN included, but XLA CPU fuses a select
    # differently: with minimum it recomputed the moment inside the consumer from the
    # old state and copied the state buffer first (16M float32 steps ran 2x slower).
    return jnp.where(x > top, jnp.asarray(top, x.dtype), x)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the largest int32 instead of wrapping."""
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(count < top, count + 1, top).astype(jnp.int32)


def zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)
