"""Optimizer state on a mesh of devices: placement like the parameters, and ZeRO-1.

Two layouts are supported.

* **Like the parameters** (the default, nothing to do): ``init`` gives every per-parameter
  state array the sharding of its parameter, and scalar state (step counts) is replicated
  over the parameters' mesh. State arrays whose shape differs from the parameter's
  (row-wise, factored or block-quantized formats) get a sharding derived from it: a state
  dimension keeps the parameter dimension's mesh axes when it has the same length, or a
  length still divisible by the number of shards (blocks of a sharded dimension). The
  engine calls :func:`init_leaf_like` and :func:`init_shared_like` for this; updates under
  ``jit`` keep the layout (in the types on meshes with Explicit axes, by the compiler's
  sharding propagation on Auto axes). :func:`state_shardings` gives the layout without
  creating the state, for a jitted ``init`` on Auto axes or a checkpoint restore.
* **ZeRO-1**: the parameters stay replicated for data parallelism, and each state array is
  split over the data-parallel axis, so each device holds ``1/N`` of the optimizer state.
  :func:`zero1_shardings` computes that layout, :func:`shard_state` applies it, and a
  jitted step keeps it with ``in_shardings``/``out_shardings``, updating through
  :func:`zero1_update_and_apply`.

See docs/scale_out.md for the whole path from one device to several processes.

:func:`bytes_per_device` measures what each device holds, to check either layout.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# ----------------------------------------------------------------------------- helpers


def _axis_names(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry (None, a name or a tuple)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _shards(mesh: Any, entry: Any) -> int:
    """Into how many pieces a spec entry splits its dimension on ``mesh``."""
    return math.prod(mesh.shape[name] for name in _axis_names(entry))


def _padded(spec: PartitionSpec, ndim: int) -> list:
    entries = list(spec)
    return entries + [None] * (ndim - len(entries))


def derived_spec(
    mesh: Any, spec: PartitionSpec, param_shape: tuple, slot_shape: tuple
) -> PartitionSpec:
    """The spec of a state array of ``slot_shape`` kept for a parameter of ``param_shape``
    laid out by ``spec`` on ``mesh``.

    Any sharding gives the same numbers; this one keeps each device's state next to its
    part of the parameter where the shapes make that plain:

    * same shape: the parameter's spec;
    * same rank: a dimension keeps the parameter dimension's axes if it has the same
      length, or a length that divides it and that the shards divide (one scale per block
      of a sharded dimension); other dimensions are not sharded (row or column statistics
      kept with ``keepdims``);
    * one rank less (a statistic of each row or column, as row-wise and factored state
      keep): the spec of the dimensions left, the last, the second-to-last or the first
      dimension reduced, whichever the shape fits; when it fits several (a square matrix)
      only the axes they agree on are kept;
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
    >>> derived_spec(mesh, P("data", "model"), (8, 512), (512,))
    P('model',)
    """
    param_shape, slot_shape = tuple(param_shape), tuple(slot_shape)
    entries = _padded(spec, len(param_shape))
    if slot_shape == param_shape:
        return PartitionSpec(*entries)
    if not slot_shape or not param_shape or 0 in slot_shape:
        return PartitionSpec()

    def keep(entry: Any, length: int, param_length: int) -> Any:
        if length == param_length:
            return entry
        divides = length > 1 and param_length % length == 0
        return entry if divides and length % _shards(mesh, entry) == 0 else None

    rank = len(slot_shape)
    if rank == len(param_shape):
        return PartitionSpec(*map(keep, entries, slot_shape, param_shape))
    if rank == len(param_shape) - 1:
        # A statistic of each row (last axis reduced), of each column (second-to-last), or
        # over the first axis. When the shape fits several readings (a square matrix),
        # keep only the axes they agree on: the shape cannot tell which one it is.
        readings = [
            (param_shape[:-1], entries[:-1]),
            (param_shape[:-2] + param_shape[-1:], entries[:-2] + entries[-1:]),
            (param_shape[1:], entries[1:]),
        ]
        specs = [spec for shape, spec in readings if shape == slot_shape]
        if specs:
            return PartitionSpec(
                *(kept[0] if len(set(kept)) == 1 else None for kept in zip(*specs, strict=True))
            )
    if rank == len(param_shape) + 1 and slot_shape[:-2] == param_shape[:-1]:
        blocks, block = slot_shape[-2:]
        if blocks * block == param_shape[-1]:
            # As a reshape splits a sharded axis: over the blocks if the shards divide
            # them, else within each block.
            shards = _shards(mesh, entries[-1])
            if blocks % shards == 0:
                return PartitionSpec(*entries[:-1], entries[-1], None)
            if block % shards == 0:
                return PartitionSpec(*entries[:-1], None, entries[-1])
            return PartitionSpec(*entries[:-1], None, None)
    if rank == len(param_shape) + 1 and slot_shape[1:] == param_shape:
        return PartitionSpec(None, *entries)  # leaves stacked along a new leading axis
    if rank <= 2:
        first = entries[0] if slot_shape[0] % _shards(mesh, entries[0]) == 0 else None
        return PartitionSpec(first, *[None] * (rank - 1))
    return PartitionSpec()


def _explicit_only(mesh: Any, spec: PartitionSpec) -> PartitionSpec:
    """``spec`` without the axes a traced value cannot be resharded over (Auto, Manual)."""
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    }
    kept = []
    for entry in spec:
        names = tuple(n for n in _axis_names(entry) if n in explicit)
        kept.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*kept)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _mesh_sharding(x: Any) -> NamedSharding | None:
    """The NamedSharding of a concrete array spread over more than one device, else None."""
    if _is_tracer(x) or not isinstance(x, jax.Array):
        return None
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding
    return None


def _explicit_sharding(x: Any) -> NamedSharding | None:
    """The sharding in the type of a traced value on a mesh with Explicit axes, else None."""
    if not _is_tracer(x):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.mesh.axis_names:
        return None
    if AxisType.Explicit not in tuple(sharding.mesh.axis_types):
        return None
    return sharding


def _known_sharding(x: Any) -> NamedSharding | None:
    """The NamedSharding of an array, a ShapeDtypeStruct or an explicitly typed tracer."""
    if _is_tracer(x):
        return _explicit_sharding(x)
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


# ---------------------------------------------------------------------- engine helpers

# State is computed from constants (a fill value, its int8 encoding): XLA would fold it
# at compile time, which for int8 state of a large parameter takes far longer than
# computing it on the devices.
_NO_FOLDING = {"xla_disable_hlo_passes": "constant_folding"}


def init_leaf_like(rule: Any, param: Any) -> Any:
    """Runs ``rule.init_leaf(param)`` so that its arrays are laid out like ``param``.

    A concrete parameter sharded over a mesh: the state is created directly in its derived
    sharding (no full copy on one device first). A traced parameter whose type carries a
    sharding (a mesh with Explicit axes): the state is resharded to match. Otherwise
    (one device, or an Auto mesh under ``jit``, where the compiler chooses):
    ``rule.init_leaf(param)`` unchanged.

    Args:
      rule: the :class:`~rmsjax._src.elementwise.LeafRule`; its ``update_leaf`` settles
        the layout of state whose shape alone does not tell it (see :func:`derived_spec`).
      param: one parameter leaf.

    Returns:
      The slots, a tuple of arrays (or small pytrees of arrays).
    """
    sharding = _mesh_sharding(param)
    if sharding is not None:
        mesh, spec = sharding.mesh, sharding.spec
        abstract = jax.eval_shape(rule.init_leaf, param)
        specs = _slot_specs(rule, mesh, spec, param, abstract)
        out = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        return jax.jit(rule.init_leaf, out_shardings=out, compiler_options=_NO_FOLDING)(param)
    slots = rule.init_leaf(param)
    sharding = _explicit_sharding(param)
    if sharding is None:
        if _is_tracer(param):
            # A jitted init on Auto axes (how flax and most scripts create state): the
            # layout is the compiler's to choose, and a state made from constants would
            # land on one device. Tie each slot shaped like its parameter to the
            # parameter's sharding; the others follow by propagation.
            return jax.tree.map(lambda slot: _shard_like(slot, param), slots)
        return slots
    mesh = sharding.mesh
    specs = _slot_specs(rule, mesh, sharding.spec, param, slots)

    def place(slot, target):
        target = NamedSharding(mesh, _explicit_only(mesh, target))
        return jax.sharding.reshard(slot, target)

    return jax.tree.map(place, slots, specs)


def _shard_like(slot: Any, param: Any) -> Any:
    if not _is_tracer(param) or tuple(jnp.shape(slot)) != tuple(jnp.shape(param)) or not param.ndim:
        return slot
    return shard_alike(param, slot)[1]


def _readings(param_shape: tuple, slot_shape: tuple) -> int:
    """How many ways a state one rank below its parameter fits it (see derived_spec)."""
    param_shape, slot_shape = tuple(param_shape), tuple(slot_shape)
    if len(slot_shape) != len(param_shape) - 1 or not slot_shape:
        return 0
    shapes = (param_shape[:-1], param_shape[:-2] + param_shape[-1:], param_shape[1:])
    return sum(shape == slot_shape for shape in shapes)


def _slot_specs(rule: Any, mesh: Any, spec: PartitionSpec, param: Any, slots: Any) -> Any:
    """The specs of one leaf's slots: :func:`derived_spec`, except where the shape fits
    several readings (a statistic of a square matrix): there, the spec the rule's own
    update gives that slot, traced on Explicit axes."""
    shape = tuple(param.shape)
    explicit = AxisType.Explicit in tuple(mesh.axis_types)

    def spelled(target: PartitionSpec, ndim: int) -> PartitionSpec:
        # As the step will return it, so that a jitted step does not compile again for
        # the same layout spelled another way: in full on Explicit axes (the types), and
        # P() for nothing sharded on Auto axes (the compiler's output).
        if explicit:
            return PartitionSpec(*_padded(target, ndim))
        return target if any(entry is not None for entry in target) else PartitionSpec()

    specs = jax.tree.map(
        lambda a: spelled(derived_spec(mesh, spec, shape, a.shape), len(a.shape)), slots
    )
    if not any(_readings(shape, a.shape) > 1 for a in jax.tree.leaves(slots)):
        return specs
    probed = _probe(rule, mesh, spec, param, slots, specs)
    if probed is None:
        return specs
    return jax.tree.map(
        lambda a, derived, settled: (
            spelled(settled, len(a.shape)) if _readings(shape, a.shape) > 1 else derived
        ),
        slots,
        specs,
        probed,
    )


def _probe(rule: Any, mesh: Any, spec: PartitionSpec, param: Any, slots: Any, specs: Any):
    """The specs ``rule.update_leaf`` gives the slots, traced abstractly on a copy of
    ``mesh`` whose axes are Explicit (so the layouts travel in the types); None if the
    rule cannot be traced that way."""
    if isinstance(mesh, Mesh):
        axis_types = (AxisType.Explicit,) * len(mesh.axis_names)
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=axis_types)
        context = jax.set_mesh(mesh)
    else:  # an abstract mesh: already inside a trace on Explicit axes
        context = contextlib.nullcontext()

    def typed(shape, dtype, target):
        target = NamedSharding(mesh, _explicit_only(mesh, target))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=target)

    def step(g, slots, p):
        _, context_ = rule.step_shared(rule.init_shared())
        return rule.update_leaf(g, slots, context_, p)[1]

    p = typed(tuple(param.shape), jnp.result_type(param), spec)
    slots = jax.tree.map(lambda a, target: typed(a.shape, a.dtype, target), slots, specs)
    try:
        with context:
            out = jax.eval_shape(step, p, slots, p)
    except Exception:  # best effort: a rule that cannot be traced so keeps the derived layout
        return None
    return jax.tree.map(lambda o: PartitionSpec(*o.sharding.spec), out)


def init_shared_like(init_shared: Callable[[], Any], param_leaves: list) -> Any:
    """Runs a rule's ``init_shared()`` with its scalars (step counts) replicated over the
    parameters' mesh.

    Args:
      init_shared: ``() -> shared``, the rule's initialiser of its shared scalars.
      param_leaves: the parameter leaves; the first one sharded over a mesh names it.

    Returns:
      ``init_shared()``, replicated over that mesh; as it comes when no parameter is
      sharded (under ``jit`` the compiler replicates scalars).
    """
    meshes = [s.mesh for s in map(_mesh_sharding, param_leaves) if s is not None]
    if not meshes:
        return init_shared()
    replicated = NamedSharding(meshes[0], PartitionSpec())
    out = jax.tree.map(lambda _: replicated, jax.eval_shape(init_shared))
    return jax.jit(init_shared, out_shardings=out)()


def state_shardings(tx: Any, params: Any) -> Any:
    """The shardings ``tx.init(params)`` gives its state, computed without creating it.

    ``tx.init(params)`` called outside ``jit`` lays the state out like the parameters; so
    does a jitted ``init`` on a mesh with Explicit axes. On a mesh with Auto axes a jitted
    ``init`` leaves the layout to the compiler, which puts state that does not depend on
    the parameters' values on one device: pass these shardings as its ``out_shardings``.
    They also describe the state for restoring a checkpoint.

    Args:
      tx: a :class:`GradientTransformation`.
      params: the parameters, as arrays or :class:`jax.ShapeDtypeStruct` whose
        ``sharding`` is a :class:`jax.sharding.NamedSharding`, all on one mesh (leaves
        without a NamedSharding count as replicated).

    Returns:
      A pytree of NamedShardings with the structure of ``tx.init(params)``.

    Raises:
      ValueError: if no parameter carries a NamedSharding.

    >>> import jax, jax.numpy as jnp, rmsjax as rj
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = jax.device_put(jnp.zeros(4), NamedSharding(mesh, P("data")))
    >>> tx = rj.rmsprop(0.1)
    >>> shardings = rj.state_shardings(tx, params)
    >>> shardings[0].nu.spec, shardings[0].count.spec
    (P('data',), P())
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    """
    mesh = None
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            mesh = sharding.mesh
            break
    if mesh is None:
        raise ValueError(
            "rmsjax.state_shardings: no parameter carries a NamedSharding; place the "
            "parameters with jax.device_put(params, NamedSharding(mesh, spec)) or describe "
            "them as jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))."
        )
    # Trace init on a copy of the mesh whose axes are Explicit: the shardings then travel
    # in the types, through rmsjax's rules and through rules written with *_like ops.
    axis_types = (AxisType.Explicit,) * len(mesh.axis_names)
    explicit = Mesh(mesh.devices, mesh.axis_names, axis_types=axis_types)

    def abstract(leaf):
        sharding = getattr(leaf, "sharding", None)
        same_mesh = isinstance(sharding, NamedSharding) and sharding.mesh == mesh
        spec = sharding.spec if same_mesh else PartitionSpec()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(explicit, spec))

    with jax.set_mesh(explicit):
        shapes = jax.eval_shape(tx.init, jax.tree.map(abstract, params))

    def concrete(leaf):
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(concrete, shapes)


# ---------------------------------------------------------------------------- ZeRO-1


def _zero1_spec(mesh: Mesh, leaf: Any, axis: str) -> PartitionSpec:
    shape = tuple(getattr(leaf, "shape", ()))
    current = _known_sharding(leaf)
    if isinstance(current, NamedSharding) and tuple(current.mesh.axis_names) == tuple(
        mesh.axis_names
    ):
        entries = _padded(current.spec, len(shape))
    else:
        entries = [None] * len(shape)
    used = {name for entry in entries for name in _axis_names(entry)}
    if axis in used:
        return PartitionSpec(*entries)
    size = mesh.shape[axis]
    for dim, length in enumerate(shape):
        if entries[dim] is None and length % size == 0 and length >= size:
            entries[dim] = axis
            break
    return PartitionSpec(*entries)


def zero1_shardings(state: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Shardings that split optimizer state over the data-parallel axis (ZeRO stage 1).

    Each array leaf is split along its first dimension whose length the size of ``axis``
    divides (and that is not already sharded); other mesh axes a leaf is already sharded
    over (tensor parallelism) are kept. Leaves with no such dimension, and scalars such as
    step counts, are replicated. Any divisible dimension gives each device exactly ``1/N``;
    the first one keeps state that is a reshape of its parameter (int8 blocks, row
    statistics) split like the parameter, so the step needs no reshuffling. With
    parameters replicated over ``axis`` and the state laid out this way, each device keeps
    about ``1/N`` of the optimizer state and updates only its part; ``jit`` inserts the
    gather of the updated parameters (see :func:`zero1_update_and_apply`).

    Args:
      state: an optimizer state, or its abstract form (``jax.eval_shape(tx.init, params)``);
        leaves need a ``shape`` (None leaves stay None).
      mesh: the device mesh.
      axis: the name of the data-parallel mesh axis.

    Returns:
      A pytree of :class:`jax.sharding.NamedSharding` with the structure of ``state``, for
      :func:`shard_state` or ``jax.jit(..., in_shardings=..., out_shardings=...)``.

    Raises:
      ValueError: if ``axis`` is not an axis of ``mesh``.

    >>> import jax, jax.numpy as jnp, rmsjax as rj
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> state = rj.rmsprop(0.1).init({"w": jnp.zeros((4, 2))})
    >>> shardings = rj.zero1_shardings(state, mesh, "data")
    >>> shardings[0].nu["w"].spec, shardings[0].count.spec
    (P('data', None), P())
    """
    if axis not in mesh.axis_names:
        raise ValueError(
            f"rmsjax.zero1_shardings: axis must be one of the mesh's axes "
            f"{tuple(mesh.axis_names)}, got {axis!r}."
        )
    return jax.tree.map(lambda leaf: NamedSharding(mesh, _zero1_spec(mesh, leaf, axis)), state)


def shard_state(state: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Places ``state`` with :func:`zero1_shardings`: split over ``axis``, ZeRO-1 style.

    Args:
      state: an optimizer state (for instance ``tx.init(params)``).
      mesh: the device mesh.
      axis: the name of the data-parallel mesh axis.

    Returns:
      The same state, each array laid out by :func:`zero1_shardings`.

    >>> import jax, jax.numpy as jnp, rmsjax as rj
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> state = rj.shard_state(rj.adagrad(0.1).init(jnp.zeros(8)), mesh, "data")
    >>> state[0].sum_of_squares.sharding.spec
    P('data',)
    """
    return jax.device_put(state, zero1_shardings(state, mesh, axis))


def _constrain(tree: Any, shardings: Any) -> Any:
    """Lays ``tree`` out by ``shardings``: ``reshard`` on Explicit axes, else a constraint."""

    def one(x, sharding):
        mesh = sharding.mesh
        if AxisType.Explicit in tuple(mesh.axis_types):
            return jax.sharding.reshard(x, NamedSharding(mesh, _explicit_only(mesh, sharding.spec)))
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(one, tree, shardings)


def zero1_update_and_apply(
    tx: Any, grads: Any, state: Any, params: Any, mesh: Mesh, axis: str = "data", **extra: Any
) -> tuple[Any, Any]:
    """:func:`update_and_apply` for ZeRO-1: each device updates only its part of the state.

    Call it inside the jitted training step, with the state laid out by
    :func:`zero1_shardings` and the parameters replicated over ``axis``. The gradients
    and parameters are split like the state before the update (the compiler turns the
    gradients' all-reduce into a reduce-scatter), the update runs on each device's part,
    and the new parameters are gathered back to the parameters' layout. On a mesh with
    Explicit axes this is needed (elementwise ops refuse operands laid out differently);
    on Auto axes it makes the compiler's choice explicit.

    Args:
      tx: the :class:`GradientTransformation`.
      grads: the gradients, with the parameters' structure.
      state: the optimizer state, laid out by :func:`zero1_shardings`.
      params: the parameters (replicated over ``axis``).
      mesh: the device mesh.
      axis: the name of the data-parallel mesh axis.
      **extra: keyword extras for ``tx.update``.

    Returns:
      ``(new_params, new_state)``, as :func:`update_and_apply` returns them, the
      parameters in their input layout.

    >>> import jax, jax.numpy as jnp, rmsjax as rj
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> tx, params = rj.sgd(0.1), jnp.ones(4)
    >>> state = rj.shard_state(tx.init(params), mesh, "data")
    >>> step = jax.jit(lambda g, s, p: rj.zero1_update_and_apply(tx, g, s, p, mesh))
    >>> with jax.set_mesh(mesh):  # make_mesh's axes are Explicit: jit needs the mesh
    ...     params, state = step(jnp.ones(4), state, params)
    >>> params
    Array([0.9, 0.9, 0.9, 0.9], dtype=float32)
    """
    from rmsjax._src import combine  # combine imports the engine, which imports this file

    split = zero1_shardings(params, mesh, axis)
    new_params, new_state = combine.update_and_apply(
        tx, _constrain(grads, split), state, _constrain(params, split), **extra
    )
    # Back to the parameters' layout where it is known (Explicit axes, or outside jit);
    # on Auto axes under jit the step's out_shardings say it.
    known = [_known_sharding(p) for p in jax.tree.leaves(params)]
    new_leaves, treedef = jax.tree.flatten(new_params)
    new_leaves = [
        x if sharding is None else _constrain(x, NamedSharding(mesh, sharding.spec))
        for x, sharding in zip(new_leaves, known, strict=True)
    ]
    return treedef.unflatten(new_leaves), new_state


def bytes_per_device(tree: Any) -> dict:
    """How many bytes of ``tree``'s arrays each device holds (this process's devices).

    Args:
      tree: a pytree of arrays, for instance an optimizer state.

    Returns:
      A dict from device to the bytes of the shards it holds, replicated copies included.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> list(rj.bytes_per_device({"a": jnp.zeros(4), "b": jnp.zeros(2)}).values())
    [24]
    """
    held: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)
