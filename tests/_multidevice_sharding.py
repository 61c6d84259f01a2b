"""Checks on 8 CPU devices, run by tests/test_sharding.py in a process of its own.

Usage: python tests/_multidevice_sharding.py CHECK, CHECK one of
layout-auto, layout-explicit, layout-explicit-int8, layout-wrappers, zero1,
docs.

``layout-*``: every rule and state format keeps its state laid out like the parameters
(after init, under jit, after jitted updates, on meshes with Auto and with Explicit axes,
inside shard_map) and gives the same numbers as on one device.
``zero1``: the ZeRO-1 layout holds 1/8 of the state per device and its jitted step gives
the single-device numbers.

Each check prints one line; the first failure raises, so the exit status is non-zero.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import textwrap

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rmsjax as rj  # noqa: E402
from rmsjax._src.specs import derived_spec  # noqa: E402

# Parameters chosen to reach every layout: a matrix whose last axis is a multiple of the
# int8 block (codes keep the parameter's axes), a 32-wide table (flat blocks of whole
# rows), a 3-D tensor, a long vector, a square matrix (its row and column statistics have
# the same shape), a small vector (float32 state even with int8) and a scalar. Mesh: 4 x 2,
# axes "data" and "model".
PARAM_SPECS = {
    "w": ((16, 512), P("data", "model")),
    "emb": ((128, 32), P("data", None)),
    "cube": ((4, 8, 256), P(None, "data", "model")),
    "v": ((8192,), P("data")),
    "sq": ((64, 64), P("data", "model")),
    "b": ((8,), P("model")),
    "s": ((), P()),
}

# Where the derived layouts must put the int8 codes and scales (written out by hand, so
# that this check does not only repeat derived_spec).
INT8_SPECS = {
    "w": (P("data", "model", None), P("data", "model")),
    "emb": (P("data", None), P("data")),
    "cube": (P(None, "data", None, "model"), P(None, "data", None)),
    "v": (P("data", None), P("data")),
}


def transformations() -> dict:
    """Every rule and every state format, in the chains people use (Adagrad's int8 state
    is in the ZeRO-1 check, SGD's momentum is RMSprop's)."""
    schedule = rj.schedules.cosine_decay_schedule(0.1, 100)
    return {
        "rmsprop centered nesterov bias_correction": rj.rmsprop(
            0.01, momentum=0.9, nesterov=True, centered=True, bias_correction=True
        ),
        "rmsprop int8 centered momentum": rj.rmsprop(
            0.01, momentum=0.9, centered=True, storage="int8"
        ),
        # storage="float32" takes the same path as "bfloat16" with another dtype.
        "rmsprop bfloat16": rj.rmsprop(0.01, momentum=0.9, storage="bfloat16"),
        "adagrad": rj.adagrad(0.01),
        "rowwise_adagrad": rj.rowwise_adagrad(0.01),
        "factored_rmsprop momentum": rj.factored_rmsprop(
            0.01, momentum=0.9, min_dim_size_to_factor=8
        ),
        "masked rms and weight decay": rj.chain(
            rj.masked(rj.scale_by_rms(), {n: n != "b" for n in PARAM_SPECS}),
            rj.masked(rj.add_decayed_weights(1e-4), {n: n == "w" for n in PARAM_SPECS}),
            rj.scale_by_learning_rate(0.01),
        ),
        "chain clip rms ema decay schedule": rj.chain(
            rj.clip_by_global_norm(1.0),
            rj.scale_by_rms(decay=0.99),
            rj.ema(0.9),
            rj.add_decayed_weights(1e-4),
            rj.scale_by_learning_rate(schedule),
        ),
    }


# On the mesh with Explicit axes (types carry the shardings) a subset keeps the run short:
# a plain rule, the derived layouts of row-wise and factored state, and the
# non-elementwise chain; int8 state there is a check of its own.
EXPLICIT_SUBSET = (
    "rmsprop centered nesterov bias_correction",
    "rowwise_adagrad",
    "factored_rmsprop momentum",
    "chain clip rms ema decay schedule",
)


def wrappers() -> dict:
    """Transformations that wrap another and keep state of their own, outside the per-leaf
    engine: their own state is not yet created in the parameters' layout (see
    test_sharding.py)."""
    return {
        "accumulate_gradients": rj.accumulate_gradients(rj.rmsprop(0.01, momentum=0.9), 2),
        "apply_if_finite": rj.apply_if_finite(rj.rmsprop(0.01, momentum=0.9), 3),
        "inject_hyperparams": rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.01),
    }


def make_mesh(axis_type) -> jax.sharding.Mesh:
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def make_params(mesh, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        name: jax.device_put(
            rng.standard_normal(shape).astype(np.float32), NamedSharding(mesh, spec)
        )
        for name, (shape, spec) in PARAM_SPECS.items()
    }


def on_one_device(tree):
    """A copy of ``tree`` on the first device alone, through NumPy (no mesh in its type)."""
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), tree)


def pairs(state, params) -> list:
    """(parameter name or None, state array) for every array in ``state``: arrays in a
    field with the parameters' structure are paired with their parameter."""
    treedef = jax.tree.structure(params)
    names = list(params)  # dict leaves flatten in sorted-key order
    names.sort()
    found: list = []

    def walk(node):
        if node is None:
            return
        if isinstance(node, jax.Array):
            found.append((None, node))
            return
        if isinstance(node, dict) and node and set(node) < set(names):
            # A part of the parameters' dict (the state of a masked rule).
            for name, subtree in node.items():
                found.extend((name, leaf) for leaf in jax.tree.leaves(subtree))
            return
        try:
            subtrees = treedef.flatten_up_to(node)
        except (ValueError, TypeError):
            subtrees = None
        if subtrees is not None:
            for name, subtree in zip(names, subtrees, strict=True):
                found.extend((name, leaf) for leaf in jax.tree.leaves(subtree))
            return
        for child in jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node):
            walk(child)

    walk(state)
    return found


def check_layout(label: str, state, params, mesh) -> None:
    """Every state array laid out like its parameter; scalars replicated on ``mesh``."""
    found = pairs(state, params)
    assert found, f"{label}: the state holds no arrays"
    for name, leaf in found:
        sharding = leaf.sharding
        assert isinstance(sharding, NamedSharding), f"{label}: {name} {sharding}"
        assert sharding.mesh.devices.size == 8, f"{label}: {name} on {sharding.mesh}"
        if name is None:
            assert leaf.ndim == 0 and sharding.is_fully_replicated, (
                f"{label}: unpaired state array {leaf.shape} {sharding.spec} should be a "
                "replicated scalar"
            )
            continue
        param = params[name]
        if leaf.ndim == param.ndim - 1 and leaf.ndim:
            # A statistic of each row (last axis reduced) or column (second-to-last): it
            # keeps the mesh axes of the dimensions it runs along. For a square matrix
            # the shape cannot tell which it is; the rule's declaration does.
            entries = list(param.sharding.spec) + [None] * (param.ndim - len(param.sharding.spec))
            readings = {
                param.shape[:-1]: [tuple(entries[:-1])],
                param.shape[:-2] + param.shape[-1:]: [tuple(entries[:-2] + entries[-1:])],
            }
            if param.shape[:-1] == param.shape[:-2] + param.shape[-1:]:
                readings[param.shape[:-1]] = [
                    tuple(entries[:-1]),
                    tuple(entries[:-2] + entries[-1:]),
                ]
            allowed = readings.get(leaf.shape, [])
        else:
            allowed = []
        if allowed:
            assert any(
                sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), leaf.ndim)
                for spec in allowed
            ), f"{label}: statistic {leaf.shape} of {name}: {sharding.spec}, allowed {allowed}"
            continue
        expected = NamedSharding(
            mesh, derived_spec(mesh, param.sharding.spec, param.shape, leaf.shape)
        )
        assert sharding.is_equivalent_to(expected, leaf.ndim), (
            f"{label}: state of {name} {leaf.shape} has {sharding.spec}, expected "
            f"{expected.spec} (parameter {param.shape} {param.sharding.spec})"
        )
        if leaf.shape == param.shape:
            assert sharding.is_equivalent_to(param.sharding, leaf.ndim), (label, name)


def check_square_statistics(label: str, factored_state, mesh) -> None:
    """The square matrix's row and column statistics, which its shape cannot tell apart,
    laid out from the rule's declaration: each keeps the axis of the dimension it runs
    along (rows "data", columns "model")."""
    for field, want in (("nu_row", P("data")), ("nu_col", P("model"))):
        sharding = getattr(factored_state, field)["sq"].sharding
        assert sharding.is_equivalent_to(NamedSharding(mesh, want), 1), (
            f"{label}: {field} of sq has {sharding.spec}, expected {want}"
        )


def check_int8_layout(label: str, state, params) -> None:
    """The int8 codes and scales of the large parameters sit where INT8_SPECS says."""
    seen = set()
    for name, leaf in pairs(state, params):
        if name in INT8_SPECS and leaf.dtype in (jnp.int8, jnp.float32) and leaf.ndim >= 1:
            codes_spec, scale_spec = INT8_SPECS[name]
            spec = codes_spec if leaf.dtype == jnp.int8 else scale_spec
            if leaf.shape == params[name].shape:
                continue
            got = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
            want = tuple(spec) + (None,) * (leaf.ndim - len(spec))
            assert got == want, f"{label}: int8 state of {name} {leaf.shape}: {got} != {want}"
            seen.add((name, str(leaf.dtype)))
    assert len(seen) == 2 * len(INT8_SPECS), f"{label}: int8 layouts seen {sorted(seen)}"


def per_device_bytes_like_params(state, params) -> int:
    """What each device should hold when every state array is laid out like its
    parameter and scalars are replicated (shapes here divide evenly)."""
    total = 0
    for name, leaf in pairs(state, params):
        if name is None:
            total += leaf.nbytes
            continue
        spec = leaf.sharding.spec
        pieces = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                pieces *= leaf.sharding.mesh.shape[axis]
        total += leaf.nbytes // pieces
    return total


def shard_mapped_step(step, mesh, param_specs, state_specs):
    """``step(g, s, p) -> (p, s)`` jitted inside ``shard_map``: each device steps its own
    shards of the gradients, the state and the parameters."""
    return jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(param_specs, state_specs, param_specs),
            out_specs=(param_specs, state_specs),
        )
    )


def assert_same(label: str, got, want, rtol: float = 2e-6, atol: float = 1e-7) -> None:
    """Equal up to float32 rounding (and at most one code step for a few int8 codes)."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"{label}: structures differ\n{got_def}\n{want_def}"
    for a, b in zip(got_leaves, want_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (label, a.dtype, b.dtype)
        if a.dtype == np.int8:
            # Codes: a float32 rounding difference may move a value to the next code. The
            # dither of a second moment hashes the new value's bits, so a last-bit
            # difference (XLA fusing a multiply-add in one compiled step and not in the
            # other; seen with centered int8 state on the Auto mesh) draws another random
            # number, and unbiased rounding may then pick the other of the two codes
            # around the value: measured 7% of codes after 2 steps, each one code apart.
            assert np.max(np.abs(a.astype(np.int32) - b.astype(np.int32)), initial=0) <= 1
            assert np.mean(a != b) < 0.1, f"{label}: int8 codes differ at {np.mean(a != b)}"
        else:
            np.testing.assert_allclose(
                a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol, err_msg=label
            )


def run_layout(axis_type, names, candidates=transformations) -> None:
    mesh = make_mesh(axis_type)
    explicit = axis_type == AxisType.Explicit
    params = make_params(mesh)
    grads = [make_params(mesh, seed) for seed in (1, 2)]
    for name, tx in candidates().items():
        if name not in names:
            continue
        label = f"{axis_type.name} mesh, {name}"
        # init outside jit.
        state = tx.init(params)
        check_layout(f"{label}, init", state, params, mesh)
        if name.startswith("factored"):
            check_square_statistics(f"{label}, init", state[0], mesh)
        if "int8" in name:
            check_int8_layout(f"{label}, init", state, params)
        if name.startswith("rmsprop centered"):
            want = per_device_bytes_like_params(state, params)
            held = rj.bytes_per_device(state)
            assert len(held) == 8 and set(held.values()) == {want}, (label, held, want)
        # init under jit: Explicit axes carry the layout in the types; Auto axes take
        # it from state_shardings.
        shardings = rj.state_shardings(tx, params)
        if explicit:
            with jax.set_mesh(mesh):
                jitted_state = jax.jit(tx.init)(params)
        else:
            jitted_state = jax.jit(tx.init, out_shardings=shardings)(params)
        check_layout(f"{label}, jit(init)", jitted_state, params, mesh)

        # state_shardings spells each layout as init does (and a jitted step returns
        # it): spelled in full on Auto axes, a jitted init pinned with them made the
        # step compile a second time (the accumulator of accumulate_gradients follows
        # the caller's spelling of the parameter, see below)
        def spelled_alike(a, b, ndim, name=name):
            if name == "accumulate_gradients":
                return a.is_equivalent_to(b, ndim)
            return a.spec == b.spec

        for got, want in zip(jax.tree.leaves(jitted_state), jax.tree.leaves(state), strict=True):
            assert spelled_alike(got.sharding, want.sharding, got.ndim), (label, got.sharding)
        for sharding, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(state), strict=True):
            assert spelled_alike(sharding, leaf.sharding, leaf.ndim), (label, sharding.spec)
        # The same from abstract parameters, as for restoring a checkpoint.
        abstract = jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params
        )
        for sharding, leaf in zip(
            jax.tree.leaves(rj.state_shardings(tx, abstract)), jax.tree.leaves(state), strict=True
        ):
            assert spelled_alike(sharding, leaf.sharding, leaf.ndim), f"{label}, abstract"
        assert_same(f"{label}, jit(init) values", jitted_state, state)

        # Jitted steps, with the fused update and with update + apply_updates.
        def fused(g, s, p, tx=tx):
            return rj.update_and_apply(tx, g, s, p)

        def unfused(g, s, p, tx=tx):
            updates, s = tx.update(g, s, p)
            return rj.apply_updates(p, updates), s

        steps = [("update_and_apply", fused)]
        if name.startswith("rmsprop centered"):
            steps.append(("update", unfused))
        # A global norm sums in another order on 8 devices: rounding, amplified where
        # RMSprop divides small gradients by their small root mean square.
        tolerance = {"rtol": 1e-4, "atol": 1e-6} if "clip" in name else {}
        for step_name, step in steps:
            sharded_step = jax.jit(step)
            p, s = params, state
            p_ref, s_ref = on_one_device(params), on_one_device(state)
            for g in grads:
                if explicit:
                    with jax.set_mesh(mesh):
                        p, s = sharded_step(g, s, p)
                else:
                    p, s = sharded_step(g, s, p)
                # One sharded step in flight: CPU collectives on 8 simulated devices can
                # run out of threads when steps queue up on a busy machine.
                jax.block_until_ready((p, s))
                p_ref, s_ref = jax.jit(step)(on_one_device(g), s_ref, p_ref)
            check_layout(f"{label}, jit({step_name}) x{len(grads)}", s, params, mesh)
            if name.startswith("factored"):
                check_square_statistics(f"{label}, jit({step_name})", s[0], mesh)
            # And exactly the layout init chose, spelled as init spelled it: the next
            # step compiles nothing new for the state (an equivalent layout spelled
            # otherwise, with a trailing None, compiles the step again). The
            # accumulator of accumulate_gradients is spelled as the caller spelled the
            # parameter, and changes spelling with it (the parameters themselves do:
            # a second compilation that optax's steps share).
            for new, old in zip(jax.tree.leaves(s), jax.tree.leaves(state), strict=True):
                same = (
                    new.sharding.is_equivalent_to(old.sharding, new.ndim)
                    if name == "accumulate_gradients"
                    else new.sharding.spec == old.sharding.spec
                )
                assert same, f"{label}: {new.shape} {old.sharding.spec} -> {new.sharding.spec}"
            for new, old in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True):
                assert new.sharding.is_equivalent_to(old.sharding, new.ndim), label
            assert_same(f"{label}, {step_name} params", p, p_ref, **tolerance)
            assert_same(f"{label}, {step_name} state", s, s_ref, **tolerance)
        print(f"ok layout: {label}")

    if explicit:
        return
    # shard_map: each device runs the step on its own shards (elementwise rules need no
    # communication); the result equals the jitted global step.
    for name, tx in candidates().items():
        if name not in names:
            continue
        if name.startswith("chain clip") or name == "apply_if_finite":
            # A global norm, or "are all gradients finite", needs a reduction over every
            # shard: not elementwise, so not for a plain shard_map step.
            continue
        if "int8" in name:
            # A QuantizedArray records its array's global shape, which the shards
            # inside shard_map do not have: int8 state is for jit (docs/scale_out.md).
            print(f"not run in shard_map: {name} (int8 state is for jit)")
            continue
        if "rowwise" in name or "factored" in name:
            # Means over a sharded axis would need a psum: row-wise and factored state are
            # for jit, or for shard_map with those axes unsharded (docs/scale_out.md).
            print(f"not run in shard_map: {name} (reduces over sharded axes)")
            continue
        state = tx.init(params)
        param_specs = jax.tree.map(lambda x: x.sharding.spec, params)
        state_specs = jax.tree.map(lambda x: x.sharding.spec, state)

        def local_step(g, s, p, tx=tx):
            return rj.update_and_apply(tx, g, s, p)

        mapped = shard_mapped_step(local_step, mesh, param_specs, state_specs)
        p_map, s_map = params, state
        p_jit, s_jit = params, state
        for g in grads:
            p_map, s_map = jax.block_until_ready(mapped(g, s_map, p_map))
            p_jit, s_jit = jax.jit(local_step)(g, s_jit, p_jit)
        # bfloat16 second moments are rounded without bias with a random number that
        # hashes each element's position, which inside shard_map is its position in
        # the shard: at each step a moment may land on the other neighbouring bfloat16
        # number (up to 0.8% away), which moves a step by half that and the momentum
        # with it (the steps here are about 0.03: a few percent of one).
        tolerance = {"rtol": 3e-2, "atol": 2e-3} if "bfloat16" in name else {}
        assert_same(f"shard_map {name} params", p_map, p_jit, **tolerance)
        assert_same(f"shard_map {name} state", s_map, s_jit, **tolerance)
        check_layout(f"shard_map {name}", s_map, params, mesh)
        print(f"ok shard_map: {name}")


# ---------------------------------------------------------------------------- ZeRO-1


def run_zero1() -> None:
    rng = np.random.default_rng(0)
    # Every array has an axis that 8 divides, except "odd" (replicated by ZeRO-1); "emb"
    # is large enough for int8 state.
    host_params = {
        "w1": rng.standard_normal((16, 64)).astype(np.float32) * 0.3,
        "b1": np.zeros(64, np.float32),
        "w2": rng.standard_normal((64, 8)).astype(np.float32) * 0.3,
        "emb": rng.standard_normal((128, 64)).astype(np.float32) * 0.1,
        "odd": np.ones(3, np.float32),
    }
    xs = rng.standard_normal((4, 32, 16)).astype(np.float32)
    ys = rng.standard_normal((4, 32, 8)).astype(np.float32)
    ids = rng.integers(0, 128, (4, 32))

    def loss(params, x, y, i):
        hidden = jnp.tanh(x @ params["w1"] + params["b1"] + params["emb"][i])
        return jnp.mean((hidden @ params["w2"] * params["odd"].sum() / 3 - y) ** 2)

    cases = [
        (AxisType.Auto, "rmsprop momentum centered", rj.rmsprop(0.01, momentum=0.9, centered=True)),
        (AxisType.Auto, "adagrad int8", rj.adagrad(0.05, storage="int8")),
        (AxisType.Explicit, "rmsprop momentum", rj.rmsprop(0.01, momentum=0.9)),
        # (the codes of a flat layout on Explicit axes: a ShardingTypeError once)
        (
            AxisType.Explicit,
            "rmsprop momentum int8",
            rj.rmsprop(0.01, momentum=0.9, storage="int8"),
        ),
    ]
    for axis_type, name, tx in cases:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        replicated = NamedSharding(mesh, P())
        label = f"{axis_type.name} mesh, {name}"

        def single_step(params, state, x, y, i, tx=tx):
            grads = jax.grad(loss)(params, x, y, i)
            return rj.update_and_apply(tx, grads, state, params)

        def zero1_step(params, state, x, y, i, tx=tx, mesh=mesh):
            grads = jax.grad(loss)(params, x, y, i)
            return rj.zero1_update_and_apply(tx, grads, state, params, mesh, "data")

        # One device.
        params = on_one_device(host_params)
        state = tx.init(params)
        for x, y, i in zip(xs, ys, ids, strict=True):
            params, state = jax.jit(single_step)(params, state, x, y, i)
        want_params, want_state = params, state

        # 8 devices: parameters replicated, state split over "data", batch split.
        params = jax.device_put(host_params, replicated)
        state = tx.init(params)
        replicated_bytes = rj.bytes_per_device(state)
        state = rj.shard_state(state, mesh, "data")
        state_shardings = rj.zero1_shardings(state, mesh, "data")
        param_shardings = jax.tree.map(lambda _, r=replicated: r, host_params)
        batch = NamedSharding(mesh, P("data"))
        step = jax.jit(
            zero1_step,
            in_shardings=(param_shardings, state_shardings, batch, batch, batch),
            out_shardings=(param_shardings, state_shardings),
            donate_argnums=(0, 1),
        )
        with jax.set_mesh(mesh):
            for x, y, i in zip(xs, ys, ids, strict=True):
                params, state = step(params, state, x, y, i)
                jax.block_until_ready(state)  # one step in flight, as above

        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            where = f"{label} {jax.tree_util.keystr(path)}"
            if any(length % 8 == 0 for length in leaf.shape):
                assert "data" in tuple(leaf.sharding.spec), f"{where}: {leaf.sharding.spec}"
            else:
                assert leaf.sharding.is_fully_replicated, f"{where}: {leaf.sharding.spec}"
        for leaf in jax.tree.leaves(params):
            assert leaf.sharding.is_fully_replicated, label

        # Per-device bytes: 1/8 of each split array, all of the replicated ones.
        held = rj.bytes_per_device(state)
        leaves = jax.tree.leaves(state)
        split = sum(x.nbytes for x in leaves if "data" in tuple(x.sharding.spec))
        kept = sum(x.nbytes for x in leaves if "data" not in tuple(x.sharding.spec))
        assert split % 8 == 0 and kept < split // 8, (label, split, kept)
        assert len(held) == 8 and set(held.values()) == {split // 8 + kept}, (label, held)
        assert set(replicated_bytes.values()) == {split + kept}, (label, replicated_bytes)
        print(
            f"ok zero1 bytes: {label}: {split // 8 + kept} B per device, replicated "
            f"{split + kept} B ({split} B split 8 ways, {kept} B replicated)"
        )

        # The batch mean is summed in another order over 8 devices: rounding, which
        # RMSprop's division (centered: nu - mu^2) can amplify a little over the steps.
        assert_same(f"zero1 {label} params", params, want_params, rtol=1e-4, atol=1e-5)
        assert_same(f"zero1 {label} state", state, want_state, rtol=1e-4, atol=1e-5)
        print(f"ok zero1 step: {label} matches one device after {len(xs)} steps")

    # A mesh other than the state's, on Explicit axes: an error naming the function and
    # the mesh (JAX's own error came from deep inside the rule).
    one = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    other = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    tx = rj.rmsprop(0.1)
    params = jax.device_put({"w": jnp.ones((16, 4))}, NamedSharding(one, P()))
    state = rj.shard_state(tx.init(params), one, "data")
    try:
        with jax.set_mesh(other):
            jax.jit(lambda g, s, p: rj.zero1_update_and_apply(tx, g, s, p, other, "data"))(
                params, state, params
            )
    except ValueError as error:
        assert str(error).startswith("rmsjax.zero1_update_and_apply: mesh has axes"), error
    else:
        raise AssertionError("a state on another mesh was accepted")

    # zero1_shardings keeps tensor-parallel axes and adds the data axis elsewhere.
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    leaf = jax.device_put(jnp.zeros((6, 16, 4)), NamedSharding(mesh2, P(None, "model")))
    spec = rj.zero1_shardings({"a": leaf}, mesh2, "data")["a"].spec
    assert tuple(spec) == (None, "model", "data"), spec
    print("ok zero1 keeps other axes")


# ------------------------------------------------------------------- docs/scale_out.md


def run_docs() -> None:
    """Runs the Python snippets of docs/scale_out.md in order, as a reader would, and checks
    what each promises. The multi-process snippet needs a cluster: test_multihost.py runs
    the example that does the same."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "scale_out.md").read_text()
    blocks = [
        textwrap.dedent(block)
        for block in re.findall(r"^ *```python\n(.*?)^ *```", text, re.M | re.S)
    ]
    assert len(blocks) == 6, f"expected 6 Python snippets, found {len(blocks)}"
    blocks = [b for b in blocks if "jax.distributed.initialize" not in b]
    # What the snippets leave to the reader: a loss, and (from section 2 on) the model's
    # parameters and a batch.
    namespace: dict = {"np": np}
    exec("def loss_fn(params, x, y):\n    return jnp.mean((x @ params['w'] - y) ** 2)", namespace)
    reader = {
        "params": {"w": np.full((16, 4), 0.1, np.float32)},
        "x": np.linspace(-1, 1, 64 * 16, dtype=np.float32).reshape(64, 16),
        "y": np.ones((64, 4), np.float32),
    }

    def run(index):
        exec(compile(blocks[index], f"docs/scale_out.md snippet {index + 1}", "exec"), namespace)
        return namespace

    ns = run(0)  # section 1: state laid out like the parameters
    assert tuple(ns["state"][0].nu["w"].sharding.spec) == ("data", "model")
    assert ns["state"][0].count.sharding.is_fully_replicated
    ns = run(1)  # a jitted init with state_shardings
    assert tuple(ns["state"][0].nu["w"].sharding.spec) == ("data", "model")
    namespace.update(reader)
    ns = run(2)  # section 2: data parallel
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(ns["state"]))
    after_data_parallel = np.asarray(ns["params"]["w"])
    ns = run(3)  # section 3: ZeRO-1, one more step
    state = ns["state"]
    assert tuple(state[0].nu["w"].sharding.spec) == ("data", None)
    held = set(rj.bytes_per_device(state).values())
    assert held == {2 * 16 * 4 * 4 // 8 + 2 * 4}, held  # nu and trace split, 2 counts
    assert not np.allclose(np.asarray(ns["params"]["w"]), after_data_parallel)
    ns = run(4)  # section 4: shard_map
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(ns["params"]))
    assert np.isfinite(float(ns["loss"]))
    print(f"ok docs: {len(blocks)} snippets of docs/scale_out.md ran")


def run_jit_init_auto() -> None:
    """``jax.jit(tx.init)(params)`` with no out_shardings on Auto axes, as flax and most
    scripts create state: every state array shaped like its parameter carries the
    parameter's sharding, and keeps it through jitted steps, for every rule, storage
    option and wrapper."""
    mesh = make_mesh(AxisType.Auto)
    params = make_params(mesh)
    candidates = {**transformations(), **wrappers()}
    candidates["sgd momentum"] = rj.sgd(0.1, momentum=0.9)
    candidates["grouped rmsprop"] = rj.grouped(rj.rmsprop(0.01, momentum=0.9))

    def check(label, state, tx):
        if isinstance(state, rj.GroupedState):  # blocks of one leaf here: all shapes differ
            state = rj.ungroup_state(tx, state, params)
        checked = 0
        for name, leaf in pairs(state, params):
            if name is None or leaf.shape != params[name].shape or not leaf.ndim:
                continue
            want = params[name].sharding
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
                f"{label}: state of {name!r} is {leaf.sharding}, parameter {want}"
            )
            checked += 1
        return checked

    for name, tx in candidates.items():
        state = jax.jit(tx.init)(params)
        checked = check(f"{name}, jit(init)", state, tx)
        check(f"{name}, init", tx.init(params), tx)
        step = jax.jit(lambda g, s, p, tx=tx: rj.update_and_apply(tx, g, s, p))
        new_params, state = step(make_params(mesh, 1), state, params)
        check(f"{name}, after a step", state, tx)
        if "int8" not in name and "factored" not in name and "rowwise" not in name:
            assert checked, f"{name}: no state array shaped like a parameter was found"
        print(f"ok jit(init): {name}, {checked} arrays")


def run_zero1_factored() -> None:
    """ZeRO-1 of factored_rmsprop on Auto and Explicit axes: the row statistics are
    split, the column statistics not (split over the same axis both, their outer
    product was split twice over it: a ShardingTypeError on Explicit axes)."""
    rng = np.random.default_rng(0)
    values = {"w": rng.normal(size=(32, 64)).astype(np.float32), "b": np.ones(64, np.float32)}
    grads = [jax.tree.map(lambda v: (rng.normal(size=v.shape)).astype(np.float32), values)]
    tx = rj.factored_rmsprop(1e-2, momentum=0.9)
    p_ref, s_ref = values, tx.init(values)
    for g in grads * 3:
        p_ref, s_ref = jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))(g, s_ref, p_ref)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        replicated = NamedSharding(mesh, P())
        params = jax.device_put(values, replicated)
        state = rj.shard_state(tx.init(params), mesh, "data")
        assert state[0].nu_row["w"].sharding.spec == P("data")
        assert state[0].nu_col["w"].sharding.spec == P(None)
        step = jax.jit(
            lambda g, s, p, mesh=mesh: rj.zero1_update_and_apply(tx, g, s, p, mesh, "data")
        )
        p, s = params, state
        for g in grads * 3:
            g = jax.device_put(g, replicated)
            if axis_type == AxisType.Explicit:
                with jax.set_mesh(mesh):
                    p, s = step(g, s, p)
            else:
                p, s = step(g, s, p)
            jax.block_until_ready((p, s))
        assert_same(f"factored ZeRO-1, {axis_type.name}", p, p_ref)
        print(f"ok zero1 factored: {axis_type.name}")


def run_grouped_shard_map() -> None:
    """``grouped`` inside ``shard_map``: each device steps the blocks of its shards, the
    same numbers as the jitted global step; same-shaped leaves sharded apart cannot share
    a block, and the error says so."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    shapes = {"a": (16, 8), "b": (16, 8), "c": (16, 8), "v": (64,)}
    values = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)
    ]
    tx = rj.grouped(rj.rmsprop(0.01, momentum=0.9))
    state = tx.init(values)
    assert [jnp.shape(nu) for nu in state.inner[0].nu] == [(3, 16, 8), (64,)]
    param_specs = {k: P("data") for k in shapes}
    # a block's leading axis stacks leaves, the parameters' axes come after it; a block
    # of one leaf is the leaf's own shape
    specs_by_rank = {0: P(), 1: P("data"), 3: P(None, "data")}
    state_specs = jax.tree.map(lambda x: specs_by_rank[x.ndim], state)

    def local_step(g, s, p):
        return rj.update_and_apply(tx, g, s, p)

    mapped = shard_mapped_step(local_step, mesh, param_specs, state_specs)
    p_map, s_map, p_jit, s_jit = values, state, values, state
    for g in grads:
        p_map, s_map = mapped(g, s_map, p_map)
        p_jit, s_jit = jax.jit(local_step)(g, s_jit, p_jit)
    for got, want in zip(jax.tree.leaves((p_map, s_map)), jax.tree.leaves((p_jit, s_jit))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    print("ok grouped shard_map: the jitted step's numbers")

    apart = {**param_specs, "b": P()}  # b whole on each device, a and c in shards
    mapped = shard_mapped_step(local_step, mesh, apart, state_specs)
    try:
        mapped(grads[0], state, values)
    except ValueError as error:
        assert "must share a shape" in str(error) and "['b']" in str(error), error
        print("ok grouped shard_map: leaves sharded apart refused")
    else:
        raise AssertionError("leaves sharded apart were stacked in one block")


def run_compile_once() -> None:
    """On Auto axes a jitted step compiles once for parameters spelled without trailing
    Nones, with init called as it is or jitted under state_shardings, for every state
    format. (A jitted step spells an output as its first argument's first leaf where the
    two have the same rank and layout, and without trailing Nones elsewhere: parameters
    spelled P('data', None) make a second compilation, optax's steps too; see
    docs/scale_out.md.)"""
    mesh = make_mesh(AxisType.Auto)
    makers = {
        "rmsprop momentum": lambda: rj.rmsprop(1e-2, momentum=0.9),
        "rmsprop int8": lambda: rj.rmsprop(1e-2, storage="int8"),
        "adagrad bfloat16": lambda: rj.adagrad(1e-2, storage="bfloat16"),
        "factored": lambda: rj.factored_rmsprop(1e-2),
        "rowwise": lambda: rj.rowwise_adagrad(1e-2),
        "apply_if_finite": lambda: rj.apply_if_finite(rj.rmsprop(1e-2), 3),
    }
    for spec in (P("model"), P("data"), P(None, "model"), P("data", "model"), P()):
        sharding = NamedSharding(mesh, spec)
        grads = jax.device_put(np.full((64, 512), 0.5, np.float32), sharding)
        for name, make in makers.items():
            for jit_init in (False, True):
                tx = make()
                params = jax.device_put(np.ones((64, 512), np.float32), sharding)
                if jit_init:
                    shardings = rj.state_shardings(tx, params)
                    state = jax.jit(tx.init, out_shardings=shardings)(params)
                else:
                    state = tx.init(params)

                def step(g, s, p, tx=tx):
                    return rj.update_and_apply(tx, g, s, p)

                jitted = jax.jit(step)
                for _ in range(3):
                    params, state = jitted(grads, state, params)
                    jax.block_until_ready(params)
                compiled = jitted._cache_size()
                label = f"{spec}, {name}, {'jit(init)' if jit_init else 'init'}"
                assert compiled == 1, f"{label}: compiled {compiled} times"
    print("ok compile once")


def run_int8_explicit_blocks() -> None:
    """int8 state on an 8-way mesh with Explicit axes where a device's part of a leaf is
    not whole blocks: a padded flat layout whose blocks the shards do not divide, a last
    axis of 2 blocks split 8 ways, and ZeRO-1 of a leaf of 20 blocks (each failed in
    JAX's sharding-in-types checks). Three steps equal one device's, and the state keeps
    init's layout."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(5)
    leaves = {
        "padded": ((4104,), P("data")),  # 17 blocks
        "rows": ((96, 50), P("data")),  # 19 blocks
        "blocks_split": ((64, 512), P(None, "data")),  # 2 blocks a row, 8 parts
        "replicated": ((100, 50), P()),  # 20 blocks: ZeRO-1 keeps them whole
        "whole_padded": ((8, 1000), P("data")),  # 32 blocks, 4 a device (eager: a gather)
        "large": ((4096, 512), P("data")),  # 2M: its slots are encoded in turn on one device
    }
    host = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in leaves.items()}
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
        for _ in range(3)
    ]
    tx = rj.rmsprop(0.01, momentum=0.9, storage="int8")

    def step(g, s, p):
        return rj.update_and_apply(tx, g, s, p)

    def zero1_step(g, s, p):
        return rj.zero1_update_and_apply(tx, g, s, p, mesh, "data")

    want_p, want_s = on_one_device(host), tx.init(on_one_device(host))
    for g in grads:
        want_p, want_s = jax.jit(step)(on_one_device(g), want_s, want_p)
    for label, fn, zero1 in (("per-leaf", step, False), ("ZeRO-1", zero1_step, True)):

        def placed(tree, zero1=zero1):
            return {
                k: jax.device_put(v, NamedSharding(mesh, P() if zero1 else leaves[k][1]))
                for k, v in tree.items()
            }

        with jax.set_mesh(mesh):
            params = placed(host)
            state = tx.init(params)
            if zero1:
                state = rj.shard_state(state, mesh, "data")
            layout = [x.sharding.spec for x in jax.tree.leaves(state)]
            jitted = jax.jit(fn)
            for g in grads:
                params, state = jitted(placed(g), state, params)
                jax.block_until_ready(params)
        assert [x.sharding.spec for x in jax.tree.leaves(state)] == layout, label
        assert_same(f"int8 blocks {label} params", params, want_p)
        assert_same(f"int8 blocks {label} state", state, want_s)
        print(f"ok int8 blocks: {label}")
    # op by op (outside jit) too: the layout kept, the values finite
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, NamedSharding(mesh, leaves[k][1])) for k, v in host.items()}
        state = tx.init(params)
        layout = [x.sharding.spec for x in jax.tree.leaves(state)]
        g = {k: jax.device_put(v, NamedSharding(mesh, leaves[k][1])) for k, v in grads[0].items()}
        params, state = step(g, state, params)
    assert [x.sharding.spec for x in jax.tree.leaves(state)] == layout
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    print("ok int8 blocks: op by op")


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    checks = {
        "layout-auto": lambda: run_layout(AxisType.Auto, tuple(transformations())),
        "layout-explicit": lambda: run_layout(AxisType.Explicit, EXPLICIT_SUBSET),
        "layout-explicit-int8": lambda: run_layout(
            AxisType.Explicit, ("rmsprop int8 centered momentum",)
        ),
        "layout-wrappers": lambda: run_layout(AxisType.Auto, tuple(wrappers()), wrappers),
        "jit-init-auto": run_jit_init_auto,
        "zero1": run_zero1,
        "zero1-factored": run_zero1_factored,
        "docs": run_docs,
        "grouped-shard-map": run_grouped_shard_map,
        "compile-once": run_compile_once,
        "int8-explicit-blocks": run_int8_explicit_blocks,
    }
    checks[sys.argv[1]]()
    print("all checks passed")
