"""Sharding: layouts like the parameters, ZeRO-1, and no data-dependent control flow.

The checks that need 8 devices run tests/_multidevice_sharding.py in a process of its
own (tests/test_multihost.py runs examples/data_parallel.py on 8 devices and on 2
processes), with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before
jax is imported; this process keeps its single device.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import rmsjax as rj
from rmsjax._src.specs import derived_spec

# Runs 8-device and multi-process subprocesses: minutes, so outside the quick loop.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_8_devices(*args: str, timeout: int = 420) -> str:
    """Runs a script with 8 CPU devices; fails with its whole output if it fails."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = f"$ {' '.join(args)}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, f"exit status {result.returncode}\n{output}"
    return result.stdout


# ------------------------------------------------------------------- 8 devices, own process


def test_state_laid_out_like_params_on_auto_mesh():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "layout-auto")
    assert "all checks passed" in out
    assert out.count("ok layout: Auto mesh") == 8, out
    assert out.count("ok shard_map:") == 4, out


def test_a_step_compiles_once_whatever_the_parameters_spelling():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "compile-once")
    assert "ok compile once" in out


def test_state_laid_out_like_params_on_explicit_mesh():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "layout-explicit")
    assert out.count("ok layout: Explicit mesh") == 4, out


def test_int8_state_on_explicit_mesh():
    # failed in JAX's sharding-in-types checks ("select cases must have the same
    # shardings"; a reshape of a leaf split along its columns into blocks of whole rows)
    out = run_on_8_devices("tests/_multidevice_sharding.py", "layout-explicit-int8")
    assert out.count("ok layout: Explicit mesh") == 1, out


def test_int8_state_on_explicit_axes_where_a_device_holds_part_of_a_block():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "int8-explicit-blocks")
    assert out.count("ok int8 blocks") == 3, out


def test_factored_zero1_on_auto_and_explicit_meshes():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "zero1-factored")
    assert out.count("ok zero1 factored") == 2, out


def test_wrapper_state_laid_out_like_params():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "layout-wrappers")
    assert out.count("ok layout: Auto mesh") == 3, out
    assert "ok shard_map: accumulate_gradients" in out, out


def test_jit_init_keeps_the_parameters_shardings_on_auto_mesh():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "jit-init-auto")
    assert out.count("ok jit(init):") == 13, out


def test_zero1_step_matches_one_device_with_an_eighth_of_the_state():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "zero1")
    assert out.count("ok zero1 step") == 4 and out.count("ok zero1 bytes") == 4, out


def test_grouped_steps_inside_shard_map_like_the_jitted_step():
    # it refused every gradient with a shard's shape
    out = run_on_8_devices("tests/_multidevice_sharding.py", "grouped-shard-map")
    assert out.count("ok grouped shard_map") == 2, out


def test_scale_out_docs_snippets_run():
    out = run_on_8_devices("tests/_multidevice_sharding.py", "docs")
    assert "ok docs: 5 snippets" in out, out


# ----------------------------------------------------------------------- one device, here


MESH = AbstractMesh((4, 2), ("data", "model"))


@pytest.mark.parametrize(
    "spec, param_shape, slot_shape, expected",
    [
        (P("data", "model"), (16, 512), (16, 512), P("data", "model")),
        (P("data", "model"), (16, 512), (), P()),
        # int8, last axis a multiple of 256: codes split the last axis, scales per block.
        (P("data", "model"), (16, 512), (16, 2, 256), P("data", "model", None)),
        (P("data", "model"), (16, 512), (16, 2), P("data", "model")),
        # blocks too few for the shards: the axis goes within each block, as reshape does.
        (P(None, "data", "model"), (4, 8, 256), (4, 8, 1, 256), P(None, "data", None, "model")),
        # int8, flat blocks of whole rows, and their scales.
        (P("data", None), (128, 32), (16, 256), P("data", None)),
        (P("data", None), (128, 32), (16,), P("data")),
        (P("data"), (8192,), (32, 256), P("data", None)),
        (P("data", "model"), (16, 512), (0,), P()),
        # same-shaped leaves stacked along a new leading axis.
        (P("data", "model"), (16, 512), (3, 16, 512), P(None, "data", "model")),
        # blocks the shards do not divide: not sharded.
        (P("data", None), (6, 32), (3, 256), P(None, None)),
        (P("data", "model"), (16, 512), (16, 1), P("data", None)),
    ],
)
def test_derived_spec(spec, param_shape, slot_shape, expected):
    got = derived_spec(MESH, spec, param_shape, slot_shape)
    assert tuple(got) == tuple(expected)


def test_zero1_shardings_split_the_first_divisible_axis():
    mesh = jax.make_mesh((1,), ("data",))
    tree = {
        "a": jax.ShapeDtypeStruct((3, 8, 16), jnp.float32),
        "b": jax.ShapeDtypeStruct((5,), jnp.float32),
        "count": jax.ShapeDtypeStruct((), jnp.int32),
    }
    specs = jax.tree.map(lambda s: tuple(s.spec), rj.zero1_shardings(tree, mesh, "data"))
    # With one device everything divides; the first axis is split.
    assert specs == {"a": ("data", None, None), "b": ("data",), "count": ()}
    with pytest.raises(ValueError, match="axis must be one of the mesh's axes"):
        rj.zero1_shardings(tree, mesh, "batch")


def test_bytes_per_device_counts_each_shard():
    state = rj.rmsprop(0.1, momentum=0.9).init({"w": jnp.zeros((4, 8)), "b": jnp.zeros(3)})
    held = rj.bytes_per_device(state)
    # nu and trace for 35 float32 parameters, and two int32 counts.
    assert list(held.values()) == [2 * 35 * 4 + 2 * 4]


def test_state_shardings_refuses_parameters_on_two_meshes():
    # the leaf on the second mesh was laid out as replicated on the first, silently
    one = jax.make_mesh((1,), ("data",))
    two = jax.make_mesh((1, 1), ("data", "model"))
    params = {
        "a": jax.device_put(jnp.ones(8), jax.sharding.NamedSharding(one, P("data"))),
        "b": jax.device_put(jnp.ones(8), jax.sharding.NamedSharding(two, P("model"))),
    }
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.state_shardings: params must lie on one mesh; leaf \['a'\] lies on "
        r"a mesh with axes \{'data': 1\}, leaf \['b'\] on one with axes",
    ):
        rj.state_shardings(rj.rmsprop(0.1), params)


def test_state_shardings_needs_a_named_sharding():
    with pytest.raises(ValueError, match="no parameter carries a NamedSharding"):
        rj.state_shardings(rj.adagrad(0.1), {"w": jnp.zeros(3)})


def test_state_shardings_take_what_eval_shape_gives_on_explicit_axes():
    # jax.eval_shape of parameters on a mesh with Explicit axes gives shardings over an
    # AbstractMesh, which has no devices: JAX's "AbstractMesh does not implement devices"
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((1,), ("data",), axis_types=explicit)
    params = {"w": jax.device_put(jnp.zeros((4, 256)), jax.sharding.NamedSharding(mesh, P("data")))}
    tx = rj.rmsprop(0.1, momentum=0.9, storage="int8")
    with pytest.raises(ValueError, match=r"^rmsjax\.state_shardings: .*abstract mesh .*set_mesh"):
        rj.state_shardings(tx, jax.eval_shape(lambda: params))
    with jax.set_mesh(mesh):
        got = rj.state_shardings(tx, jax.eval_shape(lambda: params))
    assert got == rj.state_shardings(tx, params)
    assert all(isinstance(s.mesh, jax.sharding.Mesh) for s in jax.tree.leaves(got))
    # described and concrete leaves together: the concrete mesh is the one described
    mixed = {"w": jax.eval_shape(lambda: params)["w"], "v": params["w"]}
    got = rj.state_shardings(tx, mixed)
    assert got[0].nu["w"] == got[0].nu["v"] == rj.state_shardings(tx, params)[0].nu["w"]


def test_state_shardings_match_init_on_one_device_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    params = {"w": jax.device_put(jnp.zeros((4, 256)), sharding)}
    tx = rj.chain(rj.scale_by_rms(), rj.trace(0.9))
    state = tx.init(params)
    expected = rj.state_shardings(tx, params)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert tuple(expected[0].nu["w"].spec) == ("data", None)
    assert tuple(expected[0].count.spec) == ()


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_state_shardings_spell_layouts_as_init_does(axis_type):
    # spelled in full on Auto axes (P('data', None) where init writes P('data')), the
    # shardings pinned a jitted init and the step compiled a second time (checked on 8
    # devices in tests/_multidevice_sharding.py); a Python number among the
    # parameters, which init takes, failed with an AttributeError
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(kind,))
    w = jax.device_put(jnp.zeros((4, 256)), jax.sharding.NamedSharding(mesh, P("data")))
    params = {"w": w, "b": 1.0}
    for tx in (rj.rmsprop(0.1, momentum=0.9), rj.rowwise_adagrad(0.1)):
        state, shardings = tx.init(params), rj.state_shardings(tx, params)
        for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
            if isinstance(leaf.sharding, jax.sharding.NamedSharding):
                assert leaf.sharding.spec == want.spec, (leaf.sharding.spec, want.spec)
    assert tuple(rj.state_shardings(rj.rmsprop(0.1), params)[0].nu["w"].spec) == (
        ("data",) if axis_type == "Auto" else ("data", None)
    )


def _primitives(jaxpr) -> set:
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found |= _primitives(getattr(inner, "jaxpr", inner))
    return found


STEPS = {
    "rmsprop": lambda: rj.rmsprop(0.1, momentum=0.9, centered=True, bias_correction=True),
    "rmsprop int8": lambda: rj.rmsprop(0.1, momentum=0.9, storage="int8"),
    "adagrad int8": lambda: rj.adagrad(0.1, storage="int8"),
    "rowwise_adagrad": lambda: rj.rowwise_adagrad(0.1),
    "factored_rmsprop": lambda: rj.factored_rmsprop(0.1, momentum=0.9),
    "sgd": lambda: rj.sgd(0.1, momentum=0.9, nesterov=True),
    "chain": lambda: rj.chain(
        rj.clip_by_global_norm(1.0),
        rj.scale_by_rms(),
        rj.add_decayed_weights(1e-4),
        rj.scale_by_learning_rate(rj.schedules.cosine_decay_schedule(0.1, 10)),
        rj.ema(0.9),
    ),
    # README: no step contains a cond, wrappers and presets included
    "apply_if_finite": lambda: rj.apply_if_finite(rj.rmsprop(0.1, momentum=0.9), 3),
    "masked": lambda: rj.masked(rj.adagrad(0.1), {"w": True, "b": False, "s": True}),
    "inject_hyperparams": lambda: rj.inject_hyperparams(rj.rmsprop)(0.1, momentum=0.9),
    "grouped": lambda: rj.grouped(rj.rmsprop(0.1, momentum=0.9, storage="int8")),
    "torch_rmsprop": lambda: rj.compat.torch_rmsprop(0.1, momentum=0.9, weight_decay=0.1),
    "torch_adagrad": lambda: rj.compat.torch_adagrad(0.1, lr_decay=0.1),
    "keras_rmsprop": lambda: rj.compat.keras_rmsprop(0.1, centered=True, weight_decay=0.1),
    "keras_adagrad": lambda: rj.compat.keras_adagrad(0.1),
    "tf1_rmsprop": lambda: rj.compat.tf1_rmsprop(0.1, momentum=0.9, centered=True),
    "tf1_adagrad": lambda: rj.compat.tf1_adagrad(0.1),
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_step_has_no_data_dependent_control_flow(name):
    """No cond or while in a step: each device runs the same straight-line code, so the
    step works inside shard_map and costs no host round trip."""
    tx = STEPS[name]()
    params = {"w": jnp.ones((64, 256)), "b": jnp.ones(256), "s": jnp.ones(())}
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s, p: rj.update_and_apply(tx, g, s, p))(params, state, params)
    used = _primitives(jaxpr.jaxpr)
    assert not used & {"cond", "while", "switch"}, sorted(used)
    assert "add" in used or "mul" in used  # the walk saw the step's arithmetic


def test_counts_stay_replicated_scalars():
    state = rj.rmsprop(0.1, momentum=0.9).init({"w": jnp.zeros(4)})
    assert state[0].count.shape == () and state[0].count.sharding.is_fully_replicated
    np.testing.assert_array_equal(state[0].count, 0)


def test_shard_state_names_a_transformation_given_as_the_state():
    mesh = jax.make_mesh((1,), ("data",))
    tx = rj.rmsprop(0.1)
    with pytest.raises(TypeError, match=r"^rmsjax\.shard_state: state must be a tree of arrays"):
        rj.shard_state(tx, mesh, "data")
    assert jax.tree.structure(rj.shard_state(tx.init({"w": jnp.ones(3)}), mesh, "data")) == (
        jax.tree.structure(tx.init({"w": jnp.ones(3)}))
    )


@pytest.mark.parametrize(
    "make,where",
    [
        (lambda: rj.grouped(rj.rmsprop(0.01)), r"<root>"),
        (lambda: rj.chain(rj.clip_by_global_norm(1.0), rj.grouped(rj.rmsprop(0.01))), r"\[1\]"),
    ],
)
def test_zero1_refuses_grouped_state_on_explicit_axes_and_takes_it_on_auto(make, where):
    # on Explicit axes the blocks' leaf axis was split in silence and the step failed
    # inside JAX's vmap ("inconsistent axis specs"), even on a 1-device mesh; on Auto
    # axes the compiler lays the blocks out and the step gives one device's numbers
    params = {"a": jnp.ones(4), "b": jnp.ones(4)}
    tx = make()
    state = tx.init(params)
    explicit = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    for function, call in (
        ("shard_state", lambda: rj.shard_state(state, explicit, "data")),
        ("zero1_shardings", lambda: rj.zero1_shardings(state, explicit, "data")),
        (
            "zero1_update_and_apply",
            lambda: rj.zero1_update_and_apply(tx, params, state, params, explicit),
        ),
    ):
        with pytest.raises(
            ValueError, match=rf"^rmsjax\.{function}: the state holds a GroupedState .* at {where}"
        ):
            call()
    auto = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = rj.shard_state(state, auto, "data")
    step = jax.jit(lambda g, s, p: rj.zero1_update_and_apply(tx, g, s, p, auto))
    got = step(params, sharded, params)[0]
    want = rj.update_and_apply(tx, params, state, params)[0]
    np.testing.assert_array_equal(got["a"], want["a"])


def test_zero1_names_gradients_shaped_unlike_the_parameters():
    # split like the parameters, they failed inside a tree_map with JAX's own message
    mesh = jax.make_mesh((1,), ("data",))
    params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    tx = rj.rmsprop(0.1)
    state = rj.shard_state(tx.init(params), mesh, "data")
    grads = {"w": jnp.ones((4, 2)), "bias": jnp.zeros(2)}
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.zero1_update_and_apply: grads must have the tree structure of params",
    ):
        rj.zero1_update_and_apply(tx, grads, state, params, mesh, "data")
