"""One step of a second moment held in numerics' encoding, from a state slot: what
``scale_by_rms`` and ``scale_by_rss`` share (see numerics.py for the encoding)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._src import numerics, validate
from rmsjax._src import storage as storage_lib


class MomentStep(NamedTuple):
    """A new moment and the operands of the step on it.

    Attributes:
      stored: the new moment in the slot's format.
      scale: a power of two per element (1 for a moment held as itself).
      value: the true moment times ``scale**2``, in range.
      eps_squared: ``eps * scale**2``, to add to ``value`` under the root.
      eps_linear: ``eps * scale``, to add to the root of ``value``.
      inline: whether the step computes its roots and divisions with
        :func:`numerics.rsqrt_inline` and its kin (an int8 slot, float32 compute), so
        that XLA recomputes them in each kernel that encodes the state.

    The step on the true moment is ``(g * scale) / sqrt(value + eps_squared)`` or
    ``(g * scale) / (sqrt(value) + eps_linear)``.
    """

    stored: Any
    scale: jax.Array
    value: jax.Array
    eps_squared: Any
    eps_linear: Any
    inline: bool = False

    def scaled(self, g: jax.Array) -> jax.Array:
        """``g * scale``: ``g`` itself where the scale is 1. A select of ``g``, not a
        product by a select of two constants, into which LLVM folded the negation of a
        learning rate of exactly 1: before ``trace`` the kernel then contracted a
        different product into its multiply-add than optax's kernel does."""
        return jnp.where(self.scale == 1, g, g * self.scale)


def accumulate(
    slot: Any,
    g: jax.Array,
    combine: Any,
    eps: Any,
    eps_in_sqrt: bool,
    dtype: Any,
    square: Any = None,
    read_back: bool = False,
    salt: Any = None,
) -> MomentStep:
    """``combine(square(g), old)`` from the moment held in ``slot``, in compute ``dtype``.

    ``combine`` is the rule's own formula and ``square`` its statistic of the squares,
    ``|g|^2`` by default (see :func:`numerics.accumulate_moment`). With ``read_back`` the
    step's operands come from the moment as the new slot holds it (see
    :func:`storage.keep`). ``salt``, the rule's step count when it keeps one, varies the
    rounding of int8 and bfloat16 slots from step to step (see :func:`rounding.dither`).
    Complex leaves keep their moment as optax does (complex, real-valued), clamped
    below overflow instead of encoded.
    """
    if jnp.iscomplexobj(g):
        new = combine(numerics.abs_sq(g), storage_lib.load(slot, dtype))
        new = numerics.finite_ceiling(new, slot)
        return MomentStep(storage_lib.store(new, slot), jnp.ones((), dtype), new, eps, eps)
    slot_dtype = storage_lib.slot_dtype(slot)
    concrete_eps = validate.concrete_value(eps)
    tiny = numerics.needs_tiny_mode(slot_dtype, concrete_eps, eps_in_sqrt)
    old = storage_lib.load_moment(slot, dtype, tiny)
    inline = isinstance(slot, storage_lib.QuantizedArray) and dtype == jnp.float32
    new = numerics.accumulate_moment(old, g, combine, slot_dtype, tiny, square, inline)
    stored, new = storage_lib.keep_moment(new, slot, read_back, tiny, salt)
    scale, value, eps_squared, eps_linear = numerics.moment_operands(
        new, slot_dtype, tiny, concrete_eps if tiny else eps
    )
    return MomentStep(stored, scale, value, eps_squared, eps_linear, inline)


def decaying_average(new: jax.Array, old: jax.Array, decay: Any) -> jax.Array:
    """``(1 - decay) * new + decay * old``, optax's formula for a first moment (a
    centered mean, an EMA), bit for bit, and finite wherever ``new`` and ``old`` are.

    With the two weights equal (a decay of 0.5) XLA factors the sum into
    ``0.5 * (new + old)``, whose sum overflows for operands beyond half of the dtype's
    largest number, although their average lies below it. There the halves are added
    instead, halved on the exponent bits, which XLA cannot factor: the same number
    wherever the sum is finite (halving rounds nothing), and finite where it is not."""
    average = (1 - decay) * new + decay * old
    d = validate.concrete_value(decay)
    if d is None:  # weights XLA cannot see: nothing to factor
        return average
    real = jnp.finfo(average.dtype).dtype  # (complex leaves: each part on its own)
    if np.asarray(1 - d, real) != np.asarray(d, real):
        return average

    def halves(x, y):
        return numerics.scale_exponent(x, -1) + numerics.scale_exponent(y, -1)

    if jnp.iscomplexobj(average):
        both = jax.lax.complex(
            halves(jnp.real(new), jnp.real(old)), halves(jnp.imag(new), jnp.imag(old))
        )
        overflow = jnp.isinf(average.real) | jnp.isinf(average.imag)
        return jnp.where(overflow, both.astype(average.dtype), average)
    return jnp.where(jnp.isinf(average), halves(new, old), average)


def debiased(average: jax.Array, correction: jax.Array) -> jax.Array:
    """``average / correction``, a decaying average over its bias correction
    ``1 - decay**t``, held at the dtype's largest number where a finite ``average``
    gives an infinite quotient: the debiased average of finite numbers is at most the
    largest of them, but the rounded average over the rounded factor can round past
    float32's maximum (a constant gradient of 3.4e38, the third step at a decay of 0.5)."""
    quotient = average / correction
    if jnp.iscomplexobj(quotient):
        return quotient
    top = jnp.asarray(jnp.finfo(quotient.dtype).max, quotient.dtype)
    over = jnp.isinf(quotient) & jnp.isfinite(average)
    return jnp.where(over, jnp.where(quotient > 0, top, -top), quotient)


_MEASURING: contextvars.ContextVar[bool] = contextvars.ContextVar("measuring", default=False)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """While tracing under it (the step-size diagnostics' derivative at a zero gradient),
    :func:`ever_nonzero` counts every element as seen where a concrete ``eps > 0`` keeps
    the step finite: the step of a sum still at zero is 0 at a zero gradient and
    ``lr g / sqrt(eps)`` at any other, so its derivative is the latter's."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


def ever_nonzero(step: MomentStep, nonzero_gradient: jax.Array, eps: Any) -> jax.Array:
    """Where a sum of squares has held a non-zero gradient: Adagrad's step is zero
    elsewhere (optax's rule). A gradient whose square underflows counts too, where a
    concrete ``eps > 0`` keeps its step finite."""
    concrete = validate.concrete_value(eps)
    if concrete is not None and concrete > 0:
        if _MEASURING.get():
            return jnp.ones(jnp.shape(step.value), bool)
        return (step.value > 0) | nonzero_gradient
    return step.value > 0
