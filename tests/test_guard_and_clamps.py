"""apply_if_finite catches what the inner transformation makes non-finite; row-wise and
factored state stay finite under huge gradients, as the other rules' state does."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from tests.test_factored import factored_reference
from tests.test_rowwise import rowwise_reference


def _nan_at_step_two(count):
    return jnp.where(count == 2, jnp.nan, 0.1)


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_that_the_inner_rule_makes_non_finite_is_skipped(fused):
    params = jnp.array([1.0, -2.0, 3.0])
    grads = jnp.array([0.5, 0.25, -1.0])  # finite at every step
    tx = rj.apply_if_finite(rj.rmsprop(_nan_at_step_two, momentum=0.9), 5)
    state = tx.init(params)

    def step(p, s):
        if fused:
            return rj.update_and_apply(tx, grads, s, p)
        updates, s = tx.update(grads, s, p)
        return rj.apply_updates(p, updates), s

    step = jax.jit(step)
    for _ in range(2):
        params, state = step(params, state)
    before_params, before_inner = params, state.inner_state
    params, state = step(params, state)  # the schedule yields NaN here
    chex.assert_trees_all_equal(params, before_params)
    # the inner state is returned unchanged, bit for bit (its count included)
    chex.assert_trees_all_equal(state.inner_state, before_inner)
    assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
    assert int(state.total_notfinite) == 1
    chex.assert_tree_all_finite(state)


def test_an_overflowing_inner_rule_is_caught():
    # a float16 parameter with a momentum buffer in float16: 1e4 * 10 overflows it
    tx = rj.apply_if_finite(rj.sgd(1.0, momentum=0.9, accumulator_dtype=jnp.float16), 2)
    params = jnp.zeros(2, jnp.float16)
    state = tx.init(params)
    updates, state = tx.update(jnp.full(2, 60000.0, jnp.float16) * 1.0, state)
    updates, new_state = tx.update(jnp.full(2, 60000.0, jnp.float16), state)
    assert not bool(new_state.last_finite)
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    np.testing.assert_array_equal(np.asarray(updates, np.float32), [-0.0, -0.0])


def test_a_skipped_step_leaves_a_negative_zero_parameter_as_it_was():
    # porting.md: optax's skipped updates are +0.0, which turn a -0.0 parameter into +0.0
    params = jnp.array([-0.0, 1.0, -2.5])
    tx = rj.apply_if_finite(rj.rmsprop(0.1), 3)
    updates, _ = tx.update(jnp.array([1.0, jnp.nan, 2.0]), tx.init(params), params)
    after = np.asarray(rj.apply_updates(params, updates))
    np.testing.assert_array_equal(after.view(np.uint32), np.asarray(params).view(np.uint32))


def _rowwise(grads):
    return rowwise_reference(grads, 0.0, 1e-10)[0]


def _factored(grads):
    return factored_reference(grads, 0.9, 1e-30, min_dim=2)[0]


@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda: rj.rowwise_adagrad(1.0), _rowwise),
        (lambda: rj.factored_rmsprop(1.0, min_dim_size_to_factor=2), _factored),
    ],
)
@pytest.mark.parametrize("scale", [1e-30, 1e30, 3e38])
def test_rowwise_and_factored_steps_follow_the_equations_after_extreme_gradients(
    make, reference, scale
):
    # A step of gradients `scale`, then steps of ordinary ones: the state stays finite
    # and every step is the float64 equation's (a step that falls under float32's
    # normal range, 1 / 3e38, reads as 0, and so may one a little above it).
    rng = np.random.default_rng(0)
    params = {"table": jnp.ones((4, 8)), "v": jnp.ones(3)}
    tx = make()
    state = tx.init(params)
    steps = [jax.tree.map(lambda p: np.full(p.shape, scale, np.float32), params)]
    steps += [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)] * 3
    update = jax.jit(tx.update)
    got = []
    for g in steps:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        chex.assert_tree_all_finite((u, state))
        got.append(u)
    for key in params:
        want = -np.stack(reference([np.asarray(g[key], np.float64) for g in steps]))
        have = np.stack([np.asarray(u[key], np.float64) for u in got])
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-36)
