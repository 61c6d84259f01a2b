"""PartitionSpecs of optimizer state: how a state array of one shape is laid out next
to a parameter of another. Pure functions of shapes and specs, used by the layout of
state like the parameters (sharding.py) and by ZeRO-1 (zero1.py)."""

from __future__ import annotations

import math
from typing import Any

from jax.sharding import AxisType, PartitionSpec


def axis_names(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry (None, a name or a tuple)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def shards(mesh: Any, entry: Any) -> int:
    """Into how many pieces a spec entry splits its dimension on ``mesh``."""
    return math.prod(mesh.shape[name] for name in axis_names(entry))


def padded(spec: PartitionSpec, ndim: int) -> list:
    entries = list(spec)
    return entries + [None] * (ndim - len(entries))


def derived_spec(
    mesh: Any, spec: PartitionSpec, param_shape: tuple, slot_shape: tuple
) -> PartitionSpec:
    """The spec of an array of ``slot_shape`` stored for an array of ``param_shape`` laid
    out by ``spec`` on ``mesh``: int8 codes and block scales stored for a slot (whose own
    spec comes from the rule's declaration, see ``sharding.py``), or leaves stacked into
    a block.

    Any sharding gives the same numbers; this one keeps each device's state next to its
    part of the array where the shapes make that plain:

    * same shape: the parameter's spec;
    * same rank: a dimension keeps the array dimension's axes if it has the same
      length, or a length that divides it and that the shards divide (one scale per block
      of a sharded dimension); other dimensions are not sharded;
    * the last dimension split into ``(blocks, block)``: the leading dimensions' spec, and
      the last dimension's axes on the blocks if the shards divide them, else within the
      blocks if they divide the block (as ``reshape`` splits a sharded axis);
    * several such parameters stacked, ``(k, *param_shape)``: the parameter's spec after
      an unsharded leading axis;
    * a flat buffer of blocks ``(blocks, block)``, or its per-block scales ``(blocks,)``:
      the first dimension's axes on the blocks when the shards divide the blocks (blocks
      then follow the rows, as a ``reshape`` of the parameter puts them);
    * anything else, scalars and empty placeholders: replicated.

    Args:
      mesh: the mesh (concrete or abstract) the parameter lives on.
      spec: the parameter's PartitionSpec.
      param_shape: the parameter's shape.
      slot_shape: the state array's shape.

    Returns:
      A PartitionSpec for the state array.

    >>> import jax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.sharding.AbstractMesh((2, 2), ("data", "model"))
    >>> derived_spec(mesh, P("data", "model"), (8, 512), (8, 2, 256))
    P('data', 'model', None)
    >>> derived_spec(mesh, P("data", "model"), (8, 512), (8, 2))
    P('data', 'model')
    """
    param_shape, slot_shape = tuple(param_shape), tuple(slot_shape)
    entries = padded(spec, len(param_shape))
    if slot_shape == param_shape:
        return PartitionSpec(*entries)
    if not slot_shape or not param_shape or 0 in slot_shape:
        return PartitionSpec()

    def keep(entry: Any, length: int, param_length: int) -> Any:
        if length == param_length:
            return entry
        divides = length > 1 and param_length % length == 0
        return entry if divides and length % shards(mesh, entry) == 0 else None

    rank = len(slot_shape)
    if rank == len(param_shape):
        return PartitionSpec(*map(keep, entries, slot_shape, param_shape))
    if rank == len(param_shape) + 1 and slot_shape[:-2] == param_shape[:-1]:
        blocks, block = slot_shape[-2:]
        if blocks * block == param_shape[-1]:
            # As a reshape splits a sharded axis: over the blocks if the shards divide
            # them, else within each block.
            pieces = shards(mesh, entries[-1])
            if blocks % pieces == 0:
                return PartitionSpec(*entries[:-1], entries[-1], None)
            if block % pieces == 0:
                return PartitionSpec(*entries[:-1], None, entries[-1])
            return PartitionSpec(*entries[:-1], None, None)
    if rank == len(param_shape) + 1 and slot_shape[1:] == param_shape:
        return PartitionSpec(None, *entries)  # leaves stacked along a new leading axis
    if rank <= 2:
        first = entries[0] if slot_shape[0] % shards(mesh, entries[0]) == 0 else None
        return PartitionSpec(first, *[None] * (rank - 1))
    return PartitionSpec()


def explicit_only(mesh: Any, spec: PartitionSpec) -> PartitionSpec:
    """``spec`` without the axes a traced value cannot be resharded over (Auto, Manual)."""
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    }
    kept = []
    for entry in spec:
        names = tuple(n for n in axis_names(entry) if n in explicit)
        kept.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*kept)
