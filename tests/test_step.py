"""make_train_step: the same numbers as a hand-written step, donated buffers, one trace."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from tests import registry


def model_params() -> dict:
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (3, 8)) * 0.5, "b": jnp.zeros(8)},
        "out": {"w": jax.random.normal(k2, (8, 1)) * 0.5, "b": jnp.zeros(1)},
    }


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    prediction = h @ params["out"]["w"] + params["out"]["b"]
    return jnp.mean((prediction[:, 0] - y) ** 2)


def batches(count: int = 30):
    rng = np.random.default_rng(0)
    for _ in range(count):
        x = rng.standard_normal((16, 3)).astype(np.float32)
        yield jnp.asarray(x), jnp.asarray(np.sin(x.sum(axis=1)).astype(np.float32))


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


OPTIMIZERS = registry.cases("step")


def _donating_step():
    """A donating step of RMSprop with momentum, fresh parameters, state and a batch."""
    tx = rj.rmsprop(0.01, momentum=0.9)
    params = model_params()
    return rj.make_train_step(loss_fn, tx), params, tx.init(params), next(batches(1))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_equals_the_hand_written_step(name):
    tx = OPTIMIZERS[name].make(rj)

    @jax.jit
    def reference(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state, loss

    step = rj.make_train_step(loss_fn, tx)
    params = model_params()
    p1, s1 = copy(params), tx.init(params)
    p2, s2 = copy(params), tx.init(params)
    losses = []
    for x, y in batches():
        p1, s1, loss1 = step(p1, s1, x, y)
        p2, s2, loss2 = reference(p2, s2, x, y)
        np.testing.assert_array_equal(loss1, loss2)
        losses.append(float(loss1))
    chex.assert_trees_all_equal(p1, p2)
    chex.assert_trees_all_equal(s1, s2)
    assert losses[-1] < losses[0]  # it trains


def test_params_and_state_are_donated():
    step, params, state, (x, y) = _donating_step()
    new_params, new_state, _ = step(params, state, x, y)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((new_params, new_state)))
    assert not x.is_deleted() and not y.is_deleted()  # the batch is not donated


def test_donate_false_keeps_the_inputs():
    tx = rj.adagrad(0.1)
    step = rj.make_train_step(loss_fn, tx, donate=False)
    params = model_params()
    state = tx.init(params)
    x, y = next(batches(1))
    new_params, _, _ = step(params, state, x, y)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))
    assert not np.array_equal(new_params["out"]["w"], params["out"]["w"])


def test_tied_weights_need_donate_false_as_the_docstring_says():
    x = jnp.ones(3)
    params = {"a": x, "b": x}  # the same array twice

    def loss_fn(p):
        return jnp.sum(p["a"] * p["b"])

    tx = rj.sgd(0.1)
    with pytest.raises(Exception, match="donate the same buffer twice"):
        rj.make_train_step(loss_fn, tx)(params, tx.init(params))
    x = jnp.ones(3)
    params = {"a": x, "b": x}
    new, _, loss = rj.make_train_step(loss_fn, tx, donate=False)(params, tx.init(params))
    assert float(loss) == 3.0 and float(new["a"][0]) == pytest.approx(0.9)


def test_has_aux():
    def loss_with_aux(params, x, y):
        loss = loss_fn(params, x, y)
        return loss, {"twice": 2 * loss}

    tx = rj.sgd(0.1)
    step = rj.make_train_step(loss_with_aux, tx, has_aux=True)
    params = model_params()
    x, y = next(batches(1))
    _, _, (loss, aux) = step(params, tx.init(params), x, y)
    np.testing.assert_array_equal(aux["twice"], 2 * loss)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_trace_for_many_steps(name):
    tx = OPTIMIZERS[name].make(rj)
    chex.clear_trace_counter()  # chex counts per function definition, across parameters

    @chex.assert_max_traces(n=1)
    def traced_loss(params, x, y):
        return loss_fn(params, x, y)

    step = rj.make_train_step(traced_loss, tx)
    params = model_params()
    state = tx.init(params)
    for x, y in batches(8):
        params, state, loss = step(params, state, x, y)
    chex.assert_tree_all_finite((params, loss))


SCALAR_STATE = {
    "inject_hyperparams": lambda: rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1),
    "inject_hyperparams, array values": lambda: rj.inject_hyperparams(rj.rmsprop)(
        learning_rate=jnp.float32(0.1), decay=jnp.float32(0.9), initial_scale=jnp.float32(0.0)
    ),
    "adagrad, array accumulator": lambda: rj.adagrad(0.1, initial_accumulator_value=ACCUMULATOR),
    "rmsprop, array initial_scale": lambda: rj.rmsprop(0.1, initial_scale=jnp.float32(0.0)),
    "torch_rmsprop": lambda: rj.inject_hyperparams(rj.compat.torch_rmsprop)(lr=0.1),
}
ACCUMULATOR = jnp.float32(0.1)


@pytest.mark.parametrize("make", SCALAR_STATE.values(), ids=SCALAR_STATE.keys())
def test_a_fresh_state_holds_no_buffer_twice_nor_the_caller_s(make):
    # jnp.full((), x) is x itself for a 0-d x of the dtype: a scalar parameter's moment
    # was the injected initial_scale, or the caller's accumulator value, and the first
    # donated step refused the buffer given twice, or deleted the caller's array.
    params = {"w": jnp.ones(3), "t": jnp.float32(1.0)}
    tx = make()
    state = tx.init(params)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
    assert len(set(pointers)) == len(pointers)
    assert ACCUMULATOR.unsafe_buffer_pointer() not in pointers

    def loss(p, x):
        return jnp.sum((x * p["w"]) ** 2) * p["t"]

    step = rj.make_train_step(loss, tx)
    params, state, value = step(params, state, jnp.ones(3))
    params, state, value = step(params, state, jnp.ones(3))
    assert np.isfinite(float(value))
    assert float(ACCUMULATOR) == np.float32(0.1)  # the caller's array is still there


def test_eager_grad_through_donated_steps_learns_a_learning_rate_as_optax_does():
    # jax.grad (not jitted) through three steps of RMSprop with momentum: the tracers
    # hold the buffers a donation deletes ("Array has been deleted" at the third step)
    import optax

    x = jnp.ones((4, 3))

    def quadratic(params, x):
        return jnp.mean((x @ params["w"]) ** 2)

    def meta(module, step_with):
        tx = module.inject_hyperparams(module.rmsprop)(learning_rate=0.01, momentum=0.9)
        step = step_with(tx)

        def loss_after_three_steps(rate):
            params = {"w": jnp.ones((3, 2))}
            state = tx.init(params)
            state.hyperparams["learning_rate"] = rate
            for _ in range(3):
                params, state = step(tx, params, state)
            return quadratic(params, x)

        return jax.grad(loss_after_three_steps)(0.01)

    def ours(tx):
        step = rj.make_train_step(quadratic, tx)
        return lambda tx, params, state: step(params, state, x)[:2]

    def theirs(tx):
        def step(tx, params, state):
            grads = jax.grad(quadratic)(params, x)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    np.testing.assert_allclose(meta(rj, ours), meta(optax, theirs), rtol=1e-6)


def test_a_donated_array_passed_again_is_named():
    step, params, state, (x, y) = _donating_step()
    new_params, new_state, _ = step(params, state, x, y)
    with pytest.raises(
        ValueError, match=r"^rmsjax\.make_train_step: params\['hidden'\]\['b'\] was deleted"
    ):
        step(params, new_state, x, y)
    with pytest.raises(
        ValueError, match=r"^rmsjax\.make_train_step: state\[0\]\.count was deleted"
    ):
        step(new_params, state, x, y)
    # the step keeps the jitted function's methods (memory analysis, shapes)
    compiled = step.lower(new_params, new_state, x, y).compile()
    assert compiled.memory_analysis() is not None
    shapes = step.eval_shape(new_params, new_state, x, y)
    assert jax.tree.map(jnp.shape, shapes[0]) == jax.tree.map(jnp.shape, new_params)


def test_under_a_transformation_of_the_batch_the_step_donates_nothing():
    # grad with respect to the batch, vmap over it: params and state are concrete, yet
    # the transformation holds them (the backward pass, the batched call)
    step, params, state, (x, y) = _donating_step()
    jax.grad(lambda x: step(params, state, x, y)[2])(x)
    xs, ys = jnp.stack([x, x + 1.0]), jnp.stack([y, y])
    losses = jax.vmap(step, in_axes=(None, None, 0, 0))(params, state, xs, ys)[2]
    assert losses.shape == (2,)
    leaves = jax.tree.leaves((params, state))
    assert not any(leaf.is_deleted() for leaf in leaves)
    step(params, state, x, y)  # at the top level it donates
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params))


def test_jax_s_top_level_test_answers_as_the_step_reads_it():
    # step.py asks a private JAX function whether a call is traced; pin its answers
    from rmsjax._src import step as step_module

    seen = []
    assert step_module._is_top_level is not None
    assert not step_module._under_transformation(1.0)
    jax.grad(lambda v: seen.append(step_module._under_transformation()) or v)(1.0)
    jax.vmap(lambda v: seen.append(step_module._under_transformation()) or v)(jnp.ones(2))
    jax.jit(lambda v: seen.append(step_module._under_transformation()) or v)(1.0)
    assert seen == [True, True, True]
