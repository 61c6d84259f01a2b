"""ZeRO-1: optimizer state split over the data-parallel axis, and a measure of what each
device holds.

The parameters stay replicated for data parallelism and each state array is split over
the data-parallel axis, so each device holds ``1/N`` of the optimizer state.
:func:`zero1_shardings` computes that layout, :func:`shard_state` applies it, and a
jitted step keeps it with ``in_shardings``/``out_shardings``, updating through
:func:`zero1_update_and_apply`. This module sits above the rules and ``chain``: it runs
a whole transformation (``update_and_apply``), where the layout module below the
engine only places state like the parameters. See docs/scale_out.md.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rmsjax._src import combine, factored, grouped, storage, tree_paths, validate
from rmsjax._src import specs as spec_lib
from rmsjax._src.sharding import known_sharding

# ---------------------------------------------------------------------------- ZeRO-1


def _zero1_spec(
    mesh: Mesh, leaf: Any, axis: str, split: bool = True, in_block: bool = False
) -> PartitionSpec:
    """``leaf``'s layout under ZeRO-1: split over ``axis`` along its first dimension that
    the axis divides (int8 codes, ``in_block``, on Explicit axes: never the last, the
    256 codes of one block, whose scale needs all of them; on Auto axes the compiler
    gathers a block's maximum, and splitting there keeps 1/N of the codes)."""
    shape = tuple(getattr(leaf, "shape", ()))
    current = known_sharding(leaf)
    if isinstance(current, NamedSharding) and tuple(current.mesh.axis_names) == tuple(
        mesh.axis_names
    ):
        entries = spec_lib.padded(current.spec, len(shape))
    else:
        entries = [None] * len(shape)
    used = {name for entry in entries for name in spec_lib.axis_names(entry)}
    if axis in used or not split:
        return PartitionSpec(*entries)
    size = mesh.shape[axis]
    explicit = mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit
    for dim, length in enumerate(shape[:-1] if in_block and explicit else shape):
        if entries[dim] is None and length % size == 0 and length >= size:
            entries[dim] = axis
            break
    return PartitionSpec(*entries)


def _check_mesh_axis(function: str, mesh: Any, axis: Any) -> None:
    meshes = (Mesh, jax.sharding.AbstractMesh)
    validate.check_instance(function, "mesh", mesh, meshes, "a jax.sharding.Mesh")
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise ValueError(
            f"rmsjax.{function}: axis must be one of the mesh's axes "
            f"{tuple(mesh.axis_names)}, got {axis!r}."
        )


def _check_same_mesh(function: str, mesh: Any, **trees: Any) -> None:
    """Each array whose layout is known lies on a mesh of ``mesh``'s axes and sizes: on
    Explicit axes another one failed deep inside the rule with JAX's own error, naming
    neither the function nor the argument."""
    want = dict(mesh.shape)
    for argument, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            sharding = known_sharding(leaf)
            if sharding is None or dict(sharding.mesh.shape) == want:
                continue
            raise ValueError(
                f"rmsjax.{function}: mesh has axes {want}, but {argument} leaf "
                f"{tree_paths.key_path(path)} lies on a mesh with axes "
                f"{dict(sharding.mesh.shape)}; pass the mesh the {argument} was placed on "
                "(for the state, the one given to rj.shard_state)."
            )


def _layout(state: Any, mesh: Mesh, axis: str) -> Any:
    def place(leaf: Any, split: bool = True) -> NamedSharding:
        return NamedSharding(mesh, _zero1_spec(mesh, leaf, axis, split))

    def node(x: Any) -> Any:
        if isinstance(x, storage.QuantizedArray):
            codes = NamedSharding(mesh, _zero1_spec(mesh, x.codes, axis, in_block=True))
            return storage.QuantizedArray(codes, place(x.scale), x.shape, x.signed)
        if not isinstance(x, factored.ScaleByFactoredRmsState):
            return place(x)
        # A factored moment is the outer product of its row and column statistics: split
        # over the same axis both, it would be split twice over it (a sharding error on
        # Explicit axes). The rows are split; the columns, m numbers per matrix, are not.
        return x._replace(
            nu_row=jax.tree.map(place, x.nu_row),
            nu_col=jax.tree.map(lambda leaf: place(leaf, split=False), x.nu_col),
            nu=jax.tree.map(place, x.nu),
        )

    return jax.tree.map(
        node,
        state,
        is_leaf=lambda x: isinstance(x, (factored.ScaleByFactoredRmsState, storage.QuantizedArray)),
    )


def zero1_shardings(state: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Shardings that split optimizer state over the data-parallel axis (ZeRO stage 1).

    Each array leaf is split along its first dimension whose length the size of ``axis``
    divides (and that is not already sharded; for int8 codes on Explicit axes, not the
    last, the 256 codes of one block, whose scale needs all of them); other mesh axes a leaf is
    already sharded over (tensor parallelism) are kept. Leaves with no such dimension,
    and scalars such as step counts, are replicated. Any divisible dimension gives each
    device exactly ``1/N``; the first one keeps state that is a reshape of its parameter
    (int8 blocks, row statistics) split like the parameter, so the step needs no
    reshuffling. With
    parameters replicated over ``axis`` and the state laid out this way, each device keeps
    about ``1/N`` of the optimizer state and updates only its part; ``jit`` inserts the
    gather of the updated parameters (see :func:`zero1_update_and_apply`). One
    exception: the column statistics of :func:`factored_rmsprop` (``nu_col``) are not
    split, as the moment is their outer product with the row statistics, which are.

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
    _check_mesh_axis("zero1_shardings", mesh, axis)
    _check_not_grouped("zero1_shardings", state, mesh, axis)
    return _layout(state, mesh, axis)


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
    _check_mesh_axis("shard_state", mesh, axis)
    _check_not_grouped("shard_state", state, mesh, axis)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if callable(leaf) or isinstance(leaf, (str, bytes)):  # JAX's error named no one
            where = tree_paths.key_path(path)
            hint = " (a GradientTransformation? pass tx.init(params))" if callable(leaf) else ""
            raise TypeError(
                "rmsjax.shard_state: state must be a tree of arrays, got "
                f"{type(leaf).__name__} {leaf!r} at {where}{hint}"
            )
    return jax.device_put(state, _layout(state, mesh, axis))


def _check_not_grouped(function: str, state: Any, mesh: Mesh, axis: str) -> None:
    """Refuses a state that holds ``rj.grouped``'s blocks where ``axis`` is Explicit:
    split over it, their stacked leaves failed inside JAX's vmap (on Auto axes the
    compiler lays them out, and the step gives the single-device numbers)."""
    types = dict(zip(mesh.axis_names, tuple(mesh.axis_types)))
    if types.get(axis) != AxisType.Explicit:
        return
    is_grouped = lambda x: isinstance(x, grouped.GroupedState)  # noqa: E731
    for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_grouped)[0]:
        if is_grouped(node):
            raise ValueError(
                f"rmsjax.{function}: the state holds a GroupedState (rj.grouped) at "
                f"{tree_paths.key_path(path)}, whose blocks stack leaves and "
                f"cannot be split over the Explicit axis {axis!r}. Shard the per-leaf "
                "optimizer's state (rj.ungroup_state converts a grouped one), or use a "
                "mesh with Auto axes."
            )


def _constrain(tree: Any, shardings: Any) -> Any:
    """Lays ``tree`` out by ``shardings``: ``reshard`` on Explicit axes, else a constraint."""

    def one(x, sharding):
        mesh = sharding.mesh
        if AxisType.Explicit in tuple(mesh.axis_types):
            return jax.sharding.reshard(
                x, NamedSharding(mesh, spec_lib.explicit_only(mesh, sharding.spec))
            )
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
      parameters in their input layout where it can be read (Explicit axes, or
      concrete arrays); on Auto axes under ``jit`` pass ``out_shardings`` for them
      (docs/scale_out.md, "Known limits").

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
    validate.check_transformation("zero1_update_and_apply", "tx", tx)
    _check_mesh_axis("zero1_update_and_apply", mesh, axis)
    _check_not_grouped("zero1_update_and_apply", state, mesh, axis)
    _check_same_mesh("zero1_update_and_apply", mesh, state=state, params=params)
    if jax.tree.structure(grads) != jax.tree.structure(params):
        # (split like the parameters below, they failed with a bare tree_map error)
        raise ValueError(
            "rmsjax.zero1_update_and_apply: grads must have the tree structure of params; "
            f"{tree_paths.tree_difference(params, grads, ('params', 'grads'))}."
            f"\n  grads: {jax.tree.structure(grads)}\n  params: {jax.tree.structure(params)}"
        )

    split = _layout(params, mesh, axis)
    new_params, new_state = combine.update_and_apply(
        tx, _constrain(grads, split), state, _constrain(params, split), **extra
    )
    # Back to the parameters' layout where it is known (Explicit axes, or outside jit);
    # on Auto axes under jit the step's out_shardings say it.
    known = [known_sharding(p) for p in jax.tree.leaves(params)]
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
      Leaves that are not JAX arrays (NumPy arrays, Python numbers, None) are in host
      memory, on no device, and are not counted.

    >>> import jax.numpy as jnp, rmsjax as rj
    >>> list(rj.bytes_per_device({"a": jnp.zeros(4), "b": jnp.zeros(2)}).values())
    [24]
    """
    held: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)
