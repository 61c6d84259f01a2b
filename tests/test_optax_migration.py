"""Moving a run between optax and rmsjax: from_optax_state and to_optax_state.

Each test trains with one library, saves parameters and optimizer state with orbax,
restores them into an abstract target, converts the state, continues with the other
library, and asserts that the trajectory is bit-identical to the first library
continuing on its own.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj
from tests import registry, trees

ocp = pytest.importorskip("orbax.checkpoint", reason="orbax is in the examples extra")


def _pair(case):
    return case.make(rj), case.make(optax)


OPTIMIZERS = registry.cases("migration")


def _params():
    params = trees.mixed_params()
    params["dense"]["b"] = jnp.zeros(4)  # orbax saves no None leaves of params
    return params


def _train(tx, apply, params, state, grads):
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        params = apply(params, updates)
    return params, state


def _save_and_restore(directory, params, state):
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params, "opt_state": state}
    )
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, {"params": params, "opt_state": state})
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory, abstract)
    return restored["params"], restored["opt_state"]


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optax_run_continues_in_rmsjax_bit_for_bit(name, tmp_path):
    ours, theirs = _pair(OPTIMIZERS[name])
    params = _params()
    grads = trees.gradient_sequence(params, 10, seed=5)
    p, s = _train(theirs, optax.apply_updates, params, theirs.init(params), grads[:5])
    p, s = _save_and_restore(tmp_path / "optax", p, s)
    expected = _train(theirs, optax.apply_updates, p, s, grads[5:])
    converted = rj.from_optax_state(s, like=jax.eval_shape(ours.init, params))
    got = _train(ours, rj.apply_updates, p, converted, grads[5:])
    chex.assert_trees_all_equal(got[0], expected[0])
    chex.assert_trees_all_equal_dtypes(got[0], expected[0])
    # and the rmsjax state maps back onto optax's, equal to optax's own
    back = rj.to_optax_state(got[1], like=theirs.init(params))
    chex.assert_trees_all_equal(back, expected[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rmsjax_run_continues_in_optax_bit_for_bit(name, tmp_path):
    ours, theirs = _pair(OPTIMIZERS[name])
    params = _params()
    grads = trees.gradient_sequence(params, 10, seed=6)
    p, s = _train(ours, rj.apply_updates, params, ours.init(params), grads[:5])
    p, s = _save_and_restore(tmp_path / "rmsjax", p, s)
    expected = _train(ours, rj.apply_updates, p, s, grads[5:])
    converted = rj.to_optax_state(s, like=jax.eval_shape(theirs.init, params))
    got = _train(theirs, optax.apply_updates, p, converted, grads[5:])
    chex.assert_trees_all_equal(got[0], expected[0])


def test_complex_state_converts_both_ways():
    params = {"z": jnp.array([1 + 1j, 2 - 1j], jnp.complex64)}
    ours, theirs = rj.rmsprop(0.1, momentum=0.9), optax.rmsprop(0.1, momentum=0.9)
    g = {"z": jnp.array([0.5 - 2j, 1j], jnp.complex64)}
    s = theirs.update(g, theirs.init(params))[1]
    converted = rj.from_optax_state(s, like=ours.init(params))
    np.testing.assert_array_equal(converted[0].nu["z"], s[0].nu["z"])
    chex.assert_trees_all_equal(rj.to_optax_state(converted, like=s), s)


def test_int8_state_is_encoded_and_decoded():
    params = {"w": jnp.linspace(0.1, 1.0, 8192).reshape(8, 1024)}
    theirs = optax.rmsprop(0.1, momentum=0.9)
    tx = rj.rmsprop(0.1, momentum=0.9, storage="int8")
    s = theirs.update(params, theirs.init(params))[1]
    converted = rj.from_optax_state(s, like=tx.init(params))
    assert isinstance(converted[0].nu["w"], rj.QuantizedArray)
    decoded = rj.dequantize(converted[0].nu["w"])
    np.testing.assert_allclose(decoded, s[0].nu["w"], rtol=0.05)
    back = rj.to_optax_state(converted, like=s)
    np.testing.assert_allclose(back[2].trace["w"], s[2].trace["w"], rtol=0.05)


def test_an_overflowed_optax_sum_converts_to_int8_without_nan():
    # optax's Adagrad sum is inf where a gradient above 1.8e19 overflowed it. In int8
    # state it is held as the largest moment, and its block's other elements stay
    # finite, as each element of float32 state does on its own.
    params = jnp.zeros(4096)
    theirs = optax.adagrad(0.01).init(params)
    overflowed = theirs[0].sum_of_squares.at[3].set(jnp.inf)
    theirs = (theirs[0]._replace(sum_of_squares=overflowed), *theirs[1:])
    for storage in (None, "int8"):
        tx = rj.adagrad(0.01, storage=storage)
        state = rj.from_optax_state(theirs, like=jax.eval_shape(tx.init, params))
        for _ in range(3):
            updates, state = jax.jit(tx.update)(jnp.ones(4096), state, params)
            assert bool(jnp.all(jnp.isfinite(updates))), storage
            assert abs(float(updates[3])) < 1e-20  # the overflowed element barely moves
        # the other blocks step as from a sum of 0.1 + 3 (within int8's rounding)
        np.testing.assert_allclose(updates[256:], -0.01 / np.sqrt(3.1), rtol=0.02)


@pytest.mark.parametrize("storage", ["int8", "bfloat16"])
def test_centered_low_precision_state_moves_its_variance_to_optax_and_back(storage):
    # A centered int8 or bfloat16 state holds nu - mu^2 (rounding nu and mu apart would
    # lose small variances); optax holds nu, so the conversion adds mu^2 and takes it
    # off again.
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((8, 1024))}
    theirs = optax.rmsprop(0.1, centered=True)
    ours = rj.rmsprop(0.1, centered=True, storage=storage)
    s, state = theirs.init(params), ours.init(params)
    for _ in range(5):
        g = {"w": jnp.asarray(rng.normal(size=(8, 1024)) + 2.0, jnp.float32)}
        s = theirs.update(g, s)[1]
        state = ours.update(g, state)[1]
    out = rj.to_optax_state(state, like=s)
    np.testing.assert_allclose(out[0].nu["w"], s[0].nu["w"], rtol=0.1)
    np.testing.assert_allclose(out[0].mu["w"], s[0].mu["w"], rtol=0.1, atol=1e-2)
    back = rj.from_optax_state(s, like=state)
    variance = s[0].nu["w"] - s[0].mu["w"] ** 2
    held = back[0].nu["w"]
    held = rj.dequantize(held) if storage == "int8" else held.astype(jnp.float32)
    np.testing.assert_allclose(held, variance, rtol=0.1, atol=1e-3)


def test_a_state_of_another_optimizer_is_refused_with_its_place():
    params = {"w": jnp.ones(3)}
    s = optax.adagrad(0.1).init(params)
    like = rj.chain(rj.scale_by_rms(), rj.scale(-0.1)).init(params)
    with pytest.raises(
        ValueError, match=r"at state\[0\]: a ScaleByRssState cannot become a ScaleByRmsState"
    ):
        rj.from_optax_state(s, like=like)
    with pytest.raises(ValueError, match=r"at state: expected a sequence of 3 states"):
        rj.from_optax_state(s, like=rj.rmsprop(0.1, momentum=0.5).init(params))
    centered_like = rj.rmsprop(0.1, centered=True).init(params)
    with pytest.raises(ValueError, match=r"at state\[0\]\.mu: ScaleByRmsState holds no 'mu'"):
        rj.from_optax_state(optax.rmsprop(0.1).init(params), like=centered_like)
    # the other way round nothing may be dropped either: optax's centered mean has no
    # place in an uncentered rmsjax state (it was left out without a word)
    centered = optax.rmsprop(0.1, centered=True)
    centered_state = centered.update(params, centered.init(params), params)[1]
    with pytest.raises(ValueError, match=r"at state\[0\]\.mu: `like` holds None, the state a"):
        rj.from_optax_state(centered_state, like=rj.rmsprop(0.1).init(params))
    # nor from rmsjax to optax: a centered rmsjax state has no uncentered optax twin
    tx = rj.rmsprop(0.1, centered=True)
    ours = tx.update(params, tx.init(params), params)[1]
    with pytest.raises(ValueError, match=r"at state\[0\]\.mu: `like`, a ScaleByRmsState, has no"):
        rj.to_optax_state(ours, like=optax.rmsprop(0.1).init(params))
    # a template that is not a state
    for bad in (None, 3, "abc"):
        with pytest.raises(ValueError, match=r"^rmsjax\.from_optax_state: at state: `like` holds"):
            rj.from_optax_state(s, like=bad)
    # None parameters stay None
    frozen = {"w": jnp.ones(3), "frozen": None}
    state = rj.from_optax_state(optax.adagrad(0.1).init(frozen), rj.adagrad(0.1).init(frozen))
    assert state[0].sum_of_squares["frozen"] is None


def test_nothing_of_the_state_is_dropped_or_changed_on_the_way_in_silence():
    # porting.md: nothing is dropped on the way (but a step count the other library
    # does not keep). Each of these converted without a word, losing or changing values
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = jax.tree.map(jnp.ones_like, params)
    # a leaf `like`'s parameters lack: its moment was left out
    more = dict(params, c=jnp.ones(4))
    opt = optax.rmsprop(0.1)
    s = opt.update(jax.tree.map(jnp.ones_like, more), opt.init(more))[1]
    with pytest.raises(ValueError, match=r"at state\[0\]\.nu\['c'\]: `like` has no place"):
        rj.from_optax_state(s, like=rj.rmsprop(0.1).init(params))
    # a hyperparameter set in optax's state that rmsjax's keeps static: the run went on
    # at the static value
    injected = optax.inject_hyperparams(optax.rmsprop)(learning_rate=0.1, decay=0.9)
    s = injected.init(params)
    s.hyperparams["decay"] = jnp.asarray(0.5)
    static = rj.inject_hyperparams(rj.rmsprop, static_args=("decay",))(0.1, decay=0.9)
    with pytest.raises(ValueError, match=r"at state\.hyperparams\['decay'\]: `like` has no"):
        rj.from_optax_state(s, like=static.init(params))
    ours = rj.inject_hyperparams(rj.rmsprop)(0.1, decay=0.9)
    converted = rj.from_optax_state(s, like=ours.init(params))
    assert float(converted.hyperparams["decay"]) == 0.5
    assert not converted.hyperparams["decay"].weak_type  # (a jitted step traced twice)
    # an int8 template of another shape: quantized without a check
    big, bigger = {"w": jnp.ones((64, 64))}, {"w": jnp.ones((64, 128))}
    s = opt.update(jax.tree.map(jnp.ones_like, bigger), opt.init(bigger))[1]
    with pytest.raises(ValueError, match=r"nu\['w'\]: expected shape \(64, 64\), got \(64, 128\)"):
        rj.from_optax_state(s, like=rj.rmsprop(0.1, storage="int8").init(big))
    # counts: 3.7 became 3, 3e9 the largest int32, -3 stepped on
    scheduled = optax.rmsprop(optax.linear_schedule(0.1, 0.0, 10))
    like = rj.rmsprop(rj.schedules.linear_schedule(0.1, 0.0, 10)).init(params)
    s = scheduled.update(grads, scheduled.init(params))[1]
    counted = [i for i, part in enumerate(s) if "count" in getattr(part, "_fields", ())][0]
    for count, says in (
        (3.7, "expected whole numbers"),
        (3e9, r"expected int32 values in \[0, 2147483647\]"),
        (-3, r"expected int32 values in \[0,"),
    ):
        bad = tuple(
            p._replace(count=jnp.asarray(count)) if i == counted else p for i, p in enumerate(s)
        )
        with pytest.raises(ValueError, match=rf"\.count: {says}"):
            rj.from_optax_state(bad, like=like)
    good = tuple(p._replace(count=jnp.asarray(4.0)) if i == counted else p for i, p in enumerate(s))
    assert int(jax.tree.leaves(rj.from_optax_state(good, like=like)[1])[0]) == 4
    # a complex state for real parameters: the imaginary part was dropped
    momentum = optax.sgd(0.1, momentum=0.9)
    complex_params = {"w": jnp.ones(3, jnp.complex64)}
    s = momentum.update({"w": jnp.full(3, 1 + 2j, jnp.complex64)}, momentum.init(complex_params))[1]
    with pytest.raises(ValueError, match=r"trace\['w'\]: a complex64 value cannot become float32"):
        rj.from_optax_state(s, like=rj.sgd(0.1, momentum=0.9).init({"w": jnp.ones(3)}))
    # a float64 moment beyond float32 (a run with x64) became inf
    s = opt.init({"w": jnp.ones(3)})
    s = (s[0]._replace(nu={"w": np.full(3, 1e49)}), *s[1:])
    with pytest.raises(ValueError, match=r"nu\['w'\]: .* beyond float32's largest"):
        rj.from_optax_state(s, like=rj.rmsprop(0.1).init({"w": jnp.ones(3)}))


def test_swapped_states_are_named_as_such():
    # an AttributeError ('ScaleByRmsState' object has no attribute 'mu') named nothing
    params = {"w": jnp.ones(3)}
    ours, theirs = rj.rmsprop(0.1).init(params), optax.rmsprop(0.1).init(params)
    with pytest.raises(
        TypeError,
        match=r"^rmsjax\.from_optax_state: the rmsjax state and the optax state are the "
        r"other way round.*rj\.to_optax_state",
    ):
        rj.from_optax_state(ours, like=theirs)
    with pytest.raises(
        TypeError, match=r"^rmsjax\.to_optax_state: .*other way round.*rj\.from_optax_state"
    ):
        rj.to_optax_state(theirs, like=ours)
    # a chain of either library may hold the other's parts: converted as before
    opt = optax.chain(rj.as_optax(rj.clip(1.0)), optax.rmsprop(0.1))
    tx = rj.chain(optax.clip(1.0), rj.rmsprop(0.1))
    converted = rj.from_optax_state(opt.init(params), like=tx.init(params))
    assert jax.tree.structure(converted) == jax.tree.structure(tx.init(params))
    back = rj.to_optax_state(converted, like=opt.init(params))
    assert jax.tree.structure(back) == jax.tree.structure(opt.init(params))


def test_flax_restoring_a_float_checkpoint_into_int8_state_says_so():
    serialization = pytest.importorskip("flax.serialization")
    params = {"w": jnp.ones((64, 128))}
    saved = serialization.to_bytes(rj.rmsprop(0.1).init(params))
    target = rj.rmsprop(0.1, storage="int8").init(params)
    with pytest.raises(
        ValueError, match=r"the target holds int8 state .* where the saved state holds a"
    ):
        serialization.from_bytes(target, saved)


def test_a_grouped_state_converts_through_its_per_leaf_state():
    params = {"a": jnp.ones(3), "b": jnp.linspace(0.0, 1.0, 3)}
    grouped = rj.grouped(rj.rmsprop(0.1, momentum=0.9))
    tx = rj.chain(rj.clip(1.0), grouped)
    opt = optax.chain(optax.clip(1.0), optax.rmsprop(0.1, momentum=0.9))
    state = tx.update(params, tx.init(params), params)[1]
    with pytest.raises(ValueError, match=r"at state\[1\]: a GroupedState .* rj\.ungroup_state"):
        rj.to_optax_state(state, like=jax.eval_shape(opt.init, params))
    with pytest.raises(ValueError, match=r"at state\[1\]: a GroupedState .* rj\.group_state"):
        rj.from_optax_state(opt.init(params), like=jax.eval_shape(tx.init, params))
    # what the messages say works, both ways, bit for bit (optax keeps no count here,
    # so the count restarts at 0)
    per_leaf = rj.ungroup_state(grouped, state[1], params)
    theirs = rj.to_optax_state(per_leaf, like=jax.eval_shape(opt.init, params)[1])
    back = rj.from_optax_state(theirs, like=rj.rmsprop(0.1, momentum=0.9).init(params))
    regrouped = rj.group_state(grouped, back, params)
    chex.assert_trees_all_equal(regrouped.inner[0].nu, state[1].inner[0].nu)
    chex.assert_trees_all_equal(regrouped.inner[2].trace, state[1].inner[2].trace)


def test_state_layouts_do_not_change_with_flags_or_a_schedule():
    # README: each rule's state is one NamedTuple whose fields do not change with the
    # flags (mu is None unless centered), and scale_by_learning_rate keeps a count for a
    # float as for a schedule, so switching one for the other keeps checkpoints valid
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    schedule = rj.schedules.linear_schedule(0.1, 0.01, 10)
    assert jax.tree.structure(rj.scale_by_learning_rate(0.1).init(params)) == (
        jax.tree.structure(rj.scale_by_learning_rate(schedule).init(params))
    )
    assert jax.tree.structure(rj.rmsprop(0.1).init(params)) == (
        jax.tree.structure(rj.rmsprop(schedule).init(params))
    )
    for flags in (
        {},
        {"eps_in_sqrt": False},
        {"bias_correction": True},
        {"initial_scale": 1.0, "decay": 0.5},
    ):
        state = rj.scale_by_rms(**flags).init(params)
        assert type(state) is rj.ScaleByRmsState and state._fields == ("count", "nu", "mu")
        assert state.mu is None and state.count.dtype == jnp.int32
        assert jax.tree.structure(state) == jax.tree.structure(rj.scale_by_rms().init(params))
    centered = rj.scale_by_rms(centered=True).init(params)
    assert jax.tree.structure(centered.mu) == jax.tree.structure(params)


def test_an_nnx_optimizer_migrates_through_its_own_opt_state_and_an_nnx_state_is_refused():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    theirs = nnx.Optimizer(model, optax.rmsprop(1e-2, momentum=0.9), wrt=nnx.Param)
    ours = nnx.Optimizer(model, rj.rmsprop(1e-2, momentum=0.9), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    theirs.update(model, grads)
    ours.opt_state = rj.from_optax_state(theirs.opt_state, like=ours.opt_state)
    chex.assert_trees_all_equal(ours.opt_state[0].nu, theirs.opt_state[0].nu)
    for function, state, like in [
        (rj.from_optax_state, nnx.state(theirs)["opt_state"], nnx.state(ours)["opt_state"]),
        (rj.to_optax_state, nnx.state(ours)["opt_state"], nnx.state(theirs)["opt_state"]),
    ]:
        with pytest.raises(TypeError, match=rf"^rmsjax\.{function.__name__}: .* is an nnx\.State"):
            function(state, like=like)
