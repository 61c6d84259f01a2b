"""Rounding without bias: a reproducible per-element random number, and the stochastic
rounding of second moments to bfloat16.

A second moment that changes by less than half a step of its format each step never
changes at all when rounded to nearest: an Adagrad sum stops growing, an RMSprop average
with a decay of 0.999 stops following its gradients. Rounded up with the probability
that makes the stored value right on average, it keeps every increment in expectation.
The random number is a hash of the value's bits, its position and the rule's step
count, so a step stays a deterministic function of its inputs and needs no random state,
and a value that repeats from step to step is not rounded the same way each time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _hash(x: jax.Array, salt: Any = None) -> jax.Array:
    """32 bits per element from the element's float32 bits, its position in the array and
    ``salt``, mixed well in the upper 24 bits, the ones the roundings read.

    The three are combined by exclusive or (position and salt each spread over the word
    by an odd multiplier); a shift folds the upper bits into the lower, and a product
    with an odd constant carries every bit into all the bits above it (multiplicative
    hashing; Knuth, TAOCP vol. 3, 6.4). Without the shift, equal values at consecutive
    positions would give dithers on a line, correlated from element to element. That is
    what the roundings need: a dither uniform, independent of the bits they round away
    and of its neighbours', and new at each step (tests/test_rounding.py measures all
    three). It costs one product and one shift per element; murmur3's finalizer, used
    before, took two and three, and a bfloat16 step is little more than its memory
    traffic and this arithmetic (docs/memory.md, "Step time")."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    position = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
    h = bits ^ (position * jnp.uint32(0x9E3779B9))
    if salt is not None:
        h = h ^ (jnp.asarray(salt).astype(jnp.uint32) * jnp.uint32(0x632BE5AB))
    return (h ^ (h >> 15)) * jnp.uint32(0x85EBCA6B)


def dither(x: jax.Array, salt: Any = None) -> jax.Array:
    """A number in [0, 1) per element, a hash of the element's float32 bits, of its
    position in the array and of ``salt`` (an integer scalar, the step count of the rule
    that rounds): as good as random for rounding, yet reproducible and free of any
    random state. The value changes whenever the element or the salt does, so its
    rounding does too. Without a salt, a value that repeats exactly from step to step
    (a constant gradient) is rounded the same way each time, so a moment can stop
    changing where it rounds down: salted by the step, it cannot."""
    return (_hash(x, salt) >> 8).astype(jnp.float32) * np.float32(2.0**-24)


_LARGEST = 0x7F7F0000  # float32 bits of bfloat16's largest finite number


@jax.custom_jvp
def round_bfloat16(x: jax.Array, salt: Any = None) -> jax.Array:
    """Float32 ``x`` rounded to bfloat16 without bias: to one of the two bfloat16 numbers
    around it, the one of larger magnitude with probability (the distance from the
    other) / (the gap between them), so the stored value is ``x`` on average.

    bfloat16 keeps the upper 16 bits of a float32. Adding 16 bits of :func:`dither`'s
    hash (with ``salt``) to the lower 16 and clearing them rounds up exactly that
    often, a carry into the exponent included; the conversion that follows is exact.
    Values bfloat16 holds exactly stay themselves. Infinities, NaN and magnitudes from
    bfloat16's largest number up are rounded to nearest.

    (The conversion also keeps XLA from computing the rounding again in the kernels
    that read the new state: with the upper half taken by integer operations alone, a
    step kept a copy of its old state to recompute it, 2 bytes per element more.)

    Differentiated, it is the identity, as a conversion to bfloat16 is: the rounding's
    integer operations alone would have no derivative and cut every gradient that
    passes through a bfloat16 state (a loss after unrolled steps, with respect to the
    learning rate)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    fits = (bits & jnp.uint32(0x7FFFFFFF)) < jnp.uint32(_LARGEST)
    rounded = (bits + (_hash(x, salt) >> 16)) & jnp.uint32(0xFFFF0000)
    bits = jnp.where(fits, rounded, bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.bfloat16)


@round_bfloat16.defjvp
def _round_bfloat16_jvp(primals, tangents):
    x, salt = primals
    return round_bfloat16(x, salt), jnp.asarray(tangents[0], jnp.float32).astype(jnp.bfloat16)


__all__ = ["dither", "round_bfloat16"]
