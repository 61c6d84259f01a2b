"""Optimizer state on a mesh of devices, laid out like the parameters.

This is the default layout, with nothing to do: ``init`` gives every per-parameter
state array the sharding of its parameter, and scalar state (step counts) is replicated
over the parameters' mesh. State arrays whose shape differs from the parameter's
(row-wise, factored or block-quantized formats) get a sharding derived from the rule's
declaration of each slot (:class:`~rmsjax._src.elementwise.Slot`): a slot dimension
keeps the mesh axes of the parameter dimension it runs along, and int8 codes and scales
follow the array they stand for as a reshape into blocks would. The engine calls
:func:`init_leaf_like` and :func:`init_shared_like` for this; updates under ``jit`` keep
the layout (in the types on meshes with Explicit axes, by the compiler's sharding
propagation on Auto axes). :func:`state_shardings` gives the layout without creating
the state, for a jitted ``init`` on Auto axes or a checkpoint restore.

The other layout, ZeRO-1 (each state array split over the data-parallel axis), and
:func:`bytes_per_device` live in ``zero1.py``, above the rules they run. See
docs/scale_out.md for the whole path from one device to several processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from rmsjax._src import block_layout, tree_paths, validate
from rmsjax._src import specs as spec_lib

# ----------------------------------------------------------------------------- helpers


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
    return block_layout.explicit_sharding(x) if _is_tracer(x) else None


def _one_mesh(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one mesh, either of them perhaps as the abstract mesh
    that describes it."""
    if isinstance(a, AbstractMesh) or isinstance(b, AbstractMesh):
        return getattr(a, "abstract_mesh", a) == getattr(b, "abstract_mesh", b)
    return a == b


def _concrete_mesh(mesh: Any) -> Mesh:
    """``mesh``, or for the abstract mesh that ``jax.eval_shape`` puts in the shardings of
    its results on Explicit axes, the mesh set with ``jax.set_mesh`` that it describes:
    :func:`state_shardings` returns shardings a restore or ``out_shardings`` can use."""
    if not isinstance(mesh, AbstractMesh):
        return mesh
    current = jax.sharding.get_mesh()
    if not current.empty and current.abstract_mesh == mesh:
        return current
    raise ValueError(
        "rmsjax.state_shardings: params carry shardings over an abstract mesh (axes "
        f"{dict(mesh.shape)}), as jax.eval_shape gives them on a mesh with Explicit axes, "
        "and no mesh it describes is set; call state_shardings inside "
        "`with jax.set_mesh(mesh):`, or describe the parameters as "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))."
    )


def known_sharding(x: Any) -> NamedSharding | None:
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
    sharding (a mesh with Explicit axes): the state is resharded to match. A traced
    parameter on an Auto mesh (a jitted ``init``): each slot shaped like the parameter is
    tied to its sharding with ``shard_alike``; the compiler places the others. Otherwise
    (one device): ``rule.init_leaf(param)`` unchanged.

    Args:
      rule: the :class:`~rmsjax._src.elementwise.LeafRule`; its declared slots say
        which of the parameter's dimensions each slot runs along.
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
        target = NamedSharding(mesh, spec_lib.explicit_only(mesh, target))
        return jax.sharding.reshard(slot, target)

    return jax.tree.map(place, slots, specs)


def _shard_like(slot: Any, param: Any) -> Any:
    if not _is_tracer(param) or tuple(jnp.shape(slot)) != tuple(jnp.shape(param)) or not param.ndim:
        return slot
    return shard_alike(param, slot)[1]


def _spelled(mesh: Any, target: PartitionSpec, ndim: int) -> PartitionSpec:
    """``target`` as a jitted step will return it, so that the step does not compile
    again for the same layout spelled another way: in full on Explicit axes (the types),
    and on Auto axes as the compiler writes the layout of an array it computes, without
    unsharded trailing dimensions (P() for nothing sharded; int8 codes P('data',
    'model'), not P('data', 'model', None), which compiled the step a second time)."""
    if AxisType.Explicit in tuple(mesh.axis_types):
        return PartitionSpec(*spec_lib.padded(target, ndim))
    entries = list(target)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _slot_specs(rule: Any, mesh: Any, spec: PartitionSpec, param: Any, slots: Any) -> tuple:
    """The specs of one leaf's slots, from the rule's declarations (``rule.slots``): a
    slot runs along the parameter dimensions its axes name and keeps their mesh axes
    (a row statistic keeps the rows'); an array stored for it in another shape (int8
    codes and their block scales) follows it as a reshape into blocks would
    (:func:`~rmsjax._src.specs.derived_spec`)."""
    shape = tuple(param.shape)
    entries = spec_lib.padded(spec, len(shape))

    specs = []
    for declared, slot in zip(rule.slots, slots, strict=True):
        logical_shape = declared.shape_for(shape)
        logical = PartitionSpec(*(entries[axis] for axis in declared.axes_for(shape)))

        def of(array, logical=logical, logical_shape=logical_shape):
            if tuple(array.shape) == logical_shape:
                return _spelled(mesh, logical, len(array.shape))
            derived = spec_lib.derived_spec(mesh, logical, logical_shape, array.shape)
            return _spelled(mesh, derived, len(array.shape))

        specs.append(jax.tree.map(of, slot))
    return tuple(specs)


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
    ``init`` lays out the state shaped like each parameter, and leaves the rest (int8
    codes, row-wise and factored statistics) to the compiler: pass these shardings as its
    ``out_shardings`` to pin all of it.
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
    validate.check_transformation("state_shardings", "tx", tx)
    mesh, first = None, ()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            continue
        if mesh is None:
            mesh, first = sharding.mesh, path
        elif _one_mesh(mesh, sharding.mesh):
            # a concrete mesh stands for the abstract one (jax.eval_shape's) it has
            mesh = mesh if isinstance(sharding.mesh, AbstractMesh) else sharding.mesh
        else:
            # (the leaves on the second mesh were laid out as replicated on the first)
            raise ValueError(
                "rmsjax.state_shardings: params must lie on one mesh; leaf "
                f"{tree_paths.key_path(first)} lies on a mesh with axes {dict(mesh.shape)}, "
                f"leaf {tree_paths.key_path(path)} on one with axes "
                f"{dict(sharding.mesh.shape)}"
            )
    if mesh is None:
        raise ValueError(
            "rmsjax.state_shardings: no parameter carries a NamedSharding; place the "
            "parameters with jax.device_put(params, NamedSharding(mesh, spec)) or describe "
            "them as jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))."
        )
    mesh = _concrete_mesh(mesh)
    # Trace init on a copy of the mesh whose axes are Explicit: the shardings then travel
    # in the types, through rmsjax's rules and through rules written with *_like ops.
    axis_types = (AxisType.Explicit,) * len(mesh.axis_names)
    explicit = Mesh(mesh.devices, mesh.axis_names, axis_types=axis_types)

    def abstract(leaf):
        sharding = getattr(leaf, "sharding", None)  # on `mesh`, if a NamedSharding (above)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        # (a Python number, which init takes, has no shape or dtype of its own)
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(explicit, spec))

    with jax.set_mesh(explicit):
        shapes = jax.eval_shape(tx.init, jax.tree.map(abstract, params))

    def concrete(leaf):
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        # spelled as init and a jitted step write it, or the step compiles twice
        return NamedSharding(mesh, _spelled(mesh, spec, len(leaf.shape)))

    return jax.tree.map(concrete, shapes)
