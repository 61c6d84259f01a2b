"""int8 slots encoded one after another, so that a step on a CPU needs no copy of its
old codes (used by ``engine.leaf_stepper`` and, for ``rj.grouped``'s stacked blocks,
by the engine's block step).

XLA CPU writes each output of a step with its own kernel, and writes a new int8 slot
over its donated old codes only if every kernel that reads those codes has run before,
and only if the kernel that writes it reads them at the same index. Left to itself, it
orders a step's kernels by their data alone: the parameter's kernel and the other
slots' kernels are unordered with the one that writes a slot, so it first copies the
old codes, one byte per element and slot (and the temporary the block scales need
takes the space the copies free).

Here the leaf's update is computed first, without its int8 slots
(:func:`storage.slots_kept`), and then each slot on its own, by the rule again from the
old state, after every slot whose computation reads it (:func:`_order`), from codes that
depend through an exact zero on what was written before (a reduction over it: XLA
recomputes a slice of an output where it is read instead of waiting for it), in the
codes' block layout (:func:`block_layout.block_view`). The values are the same, bit
for bit: XLA computes each slot again in each kernel that encodes it anyway. On one
4M-element leaf the peak of an RMSprop step with int8 momentum falls from 12.07 to
10.55 bytes per parameter.

Each such dependency costs the compiler, per leaf whatever its size, and the compiled
step holds more memory for as long as it exists: with int8 momentum, 64 leaves of 16k
compiled in 8.4 s instead of 6.4 s and held 0.74 GB instead of 0.55 GB, to save 1.6 MB
of the step's temporaries (300 leaves: 86 s and 6.2 GB instead of 66 s and 4.1 GB; the
cost grows faster than the leaves). On a CPU both are the same memory, so a step does
this only for leaves of at least :data:`MIN_SIZE` elements, about where the copies it
saves catch up with what the compiled step holds for it, and for at most
:data:`MAX_LEAVES` such leaves; on a CPU only (on other backends XLA fuses and orders a
step in its own way).

A block of stacked leaves (:func:`encode_block`) is encoded in turn whatever its size:
left to XLA, the copies of every block's old codes were alive at once, so the step's
temporaries grew with the tree (1.78 bytes per parameter for RMSprop with int8
momentum on 1000 leaves of 16k; 0.53 in turn). There the compiled step holds more
memory too (60-95 MB more on those 1000 leaves, to save 20 MB of temporaries: see
docs/memory.md); the step's peak, which decides whether a model fits beside its
gradients, is what this bounds, as it is on a leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rmsjax._src import base, block_layout, quantization, storage
from rmsjax._src.elementwise import LeafRule

MAX_LEAVES = 64
"""A step encodes the int8 slots of its leaves in turn when it has at most this many
int8 leaves of :data:`MIN_SIZE` elements or more (see the module's notes)."""
MIN_SIZE = 1 << 21
"""Leaves with fewer elements keep XLA's copies of their old codes: what encoding them in
turn would save (with int8 momentum about 1.5 bytes per element, 3 MB at 2M elements)
is less than what it adds per leaf to the memory the compiled step holds (1.3 MB per
leaf measured on 16 leaves, 3 MB on 64; see the module's notes): at 2M they are about
even."""


def _all_int8(slots: Sequence[Any]) -> bool:
    return bool(slots) and all(isinstance(s, quantization.QuantizedArray) for s in slots)


def _large_int8(slots: Sequence[Any]) -> bool:
    return _all_int8(slots) and slots[0].size >= MIN_SIZE


def worth_it(per_block: Sequence[Sequence[Any]]) -> bool:
    """Whether a step over blocks with these slots encodes int8 slots in turn: on a CPU,
    with at most :data:`MAX_LEAVES` leaves of :data:`MIN_SIZE` elements or more whose
    slots are all int8."""
    count = sum(1 for slots in per_block if _large_int8(slots))
    return 0 < count <= MAX_LEAVES and jax.default_backend() == "cpu"


def applies(rule: LeafRule, g: Any, slots: Sequence[Any]) -> bool:
    """Whether this leaf's slots are encoded in turn: all int8, at least
    :data:`MIN_SIZE` elements, the rule does not read the parameter (which the update
    has overwritten by then), and no mesh with Explicit axes splits the leaf (the order
    hangs on one element of the update, which such a mesh does not hand out as it is)."""
    return _large_int8(slots) and not rule.needs_params and block_layout.splitting(g) is None


def applies_to_block(rule: LeafRule, slots: Sequence[Any]) -> bool:
    """Whether a block of stacked leaves has its slots encoded in turn
    (:func:`encode_block`): all int8, on a CPU, and the rule does not read the parameter.
    Whatever the block's size: its copies would be alive with every other block's."""
    return _all_int8(slots) and not rule.needs_params and jax.default_backend() == "cpu"


def padded(rule: LeafRule, g: Any, slots: Sequence[Any]) -> bool:
    """Whether this leaf's int8 slots are computed in their padded block layout, with
    :func:`step` ``(ordered=False)`` where they are not encoded in turn: a leaf that
    does not fill whole blocks. Computed in the leaf's layout, each new slot was padded
    in the middle of the step, which XLA kept in a float32 temporary (4 bytes per
    element and slot) and which cost a third to a half of the step's time. The rule
    computes the padding too: its gradient is 0, so its moments stay 0, as before."""
    return _all_int8(slots) and not rule.needs_params and g.size % block_layout.BLOCK_SIZE != 0


def step(
    rule: LeafRule,
    context: Any,
    apply: bool,
    g: Any,
    slots: Sequence[Any],
    param: Any,
    ordered: bool = True,
) -> tuple[Any, tuple]:
    """``(update or new param, new slots)`` of one leaf, its int8 slots encoded in turn
    (unless not ``ordered``: computed in the block layout, in the order XLA picks)."""
    slots = tuple(slots)
    with storage.slots_kept():
        update, _ = rule.update_leaf(g, slots, context, param)
    out = base.apply_leaf(param, update) if apply else update
    zero = zero_after(jnp.ravel(out)[0]) if ordered else jnp.zeros((), jnp.int8)
    blocks = block_layout.to_blocks(g)

    def encode(i, zero):  # slot i, computed again from codes that come after ``zero``
        view = tuple(
            quantization.QuantizedArray(s.codes + zero, s.scale, s.codes.shape, s.signed)
            for s in slots
        )
        with block_layout.block_view(), storage.slots_kept(but=view[i]):
            return rule.update_leaf(blocks, view, context, None)[1][i]

    return out, _encode(encode, slots, zero, ordered)


def encode_block(
    rule: LeafRule, context: Any, stacked: Any, slots: Sequence[Any], rows: list
) -> tuple:
    """The new int8 ``slots`` of a block of stacked leaves (``rj.grouped``'s), encoded in
    turn after every row of the block's output is written: :func:`step`'s second half,
    the rows having been computed under :func:`storage.slots_kept` from the stacked
    gradients ``stacked``. Left to XLA, each block's old codes were copied, and the
    copies of all blocks were alive at once: 1.78 bytes per parameter of temporaries
    for RMSprop with int8 momentum on 1000 leaves of 16k, 0.53 in turn
    (docs/memory.md)."""
    slots = tuple(slots)
    zero = zero_after(jnp.max(jnp.stack([jnp.ravel(row)[0] for row in rows])))
    blocks = jax.vmap(block_layout.to_blocks)(stacked)

    def encode(i, zero):
        view = tuple(  # each row's slots in their codes' own layout
            quantization.QuantizedArray(s.codes + zero, s.scale, s.codes.shape[1:], s.signed)
            for s in slots
        )

        def row(g, view):
            with block_layout.block_view(), storage.slots_kept(but=view[i]):
                return rule.update_leaf(g, view, context, None)[1][i]

        return jax.vmap(row)(blocks, view)

    return _encode(encode, slots, zero, ordered=True)


def _encode(encode, slots: tuple, zero: jax.Array, ordered: bool) -> tuple:
    """The new ``slots``, each ``encode(i, zero)`` after the one before it when
    ``ordered`` (see :func:`_order`)."""
    new_slots = list(slots)
    for i in _order(encode, slots) if ordered else range(len(slots)):
        new = encode(i, zero)
        new_slots[i] = quantization.QuantizedArray(
            new.codes, new.scale, slots[i].shape, slots[i].signed
        )
        zero = zero_after(jnp.max(new.codes)) if ordered else zero
    return tuple(new_slots)


def _order(encode, slots: Sequence[Any]) -> list[int]:
    """The order to encode the slots in: each after every slot whose computation reads
    its old codes (RMSprop's second moment after the momentum that divides by it,
    centered RMSprop's mean after the variance that subtracts it), as the traced
    computations show; where the reads go both ways, the rest last slot first."""
    count = len(slots)
    reads = [_slots_read(lambda zero, i=i: encode(i, zero), slots) for i in range(count)]
    order: list[int] = []
    waiting = list(range(count))
    while waiting:
        # slot i can go when no other slot still waiting reads it
        ready = [i for i in waiting if not any(i in reads[k] for k in waiting if k != i)]
        if not ready:
            return order + waiting[::-1]
        order.append(ready[-1])
        waiting.remove(ready[-1])
    return order


def _slots_read(fn, slots: Sequence[Any]) -> set[int]:
    """The indices of the ``slots`` whose codes ``fn(zero)`` reads: what its outputs
    depend on in its jaxpr, equation by equation, back to the codes it closes over."""
    closed = jax.make_jaxpr(fn)(jnp.zeros((), jnp.int8))
    jaxpr = closed.jaxpr
    needed = {id(v) for v in jaxpr.outvars}
    for eqn in reversed(jaxpr.eqns):
        if any(id(v) in needed for v in eqn.outvars):
            needed.update(id(v) for v in eqn.invars)
    read = {id(c) for c, v in zip(closed.consts, jaxpr.constvars) if id(v) in needed}
    return {i for i, s in enumerate(slots) if id(s.codes) in read}


def zero_after(x: jax.Array) -> jax.Array:
    """An int8 zero computed from the scalar ``x`` (any value, NaN and inf included),
    which XLA can neither compute before ``x`` nor fold into a constant."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    else:
        bits = x.astype(jnp.uint32)
    sign = bits >> 31  # 0 or 1, so sign * (1 - sign) is 0
    return ((sign ^ 1) * sign).astype(jnp.int8)
