"""Row-wise Adagrad against a float64 NumPy transcription of FBGEMM's rule."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from tests import trees


def rowwise_reference(grads, initial_accumulator_value=0.0, eps=1e-10):
    """a_r += mean_j g_rj^2 over the last axis (per element for scalars and vectors);
    u = g / (sqrt(a_r) + eps), zero where a_r == 0."""
    g0 = np.asarray(grads[0], np.float64)
    rowwise = g0.ndim >= 2
    total = np.full(g0.shape[:-1] if rowwise else g0.shape, initial_accumulator_value)
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        total = total + ((g * g).mean(axis=-1) if rowwise else g * g)
        a = total[..., None] if rowwise else total
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(a > 0, g / (np.sqrt(a) + eps), 0.0))
    return out, total


def params_tree(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "table": jnp.asarray(rng.normal(size=(50, 16)), dtype),
        "conv": jnp.asarray(rng.normal(size=(3, 4, 8)), dtype),
        "bias": jnp.zeros(7, dtype),
        "scale": jnp.asarray(1.0, dtype),
        "frozen": None,
    }


def sparse_gradients(params, steps, seed=0):
    """Gradients spanning 1e-4..10, where each step touches only some table rows (the
    embedding lookups of a batch) and some steps are all zero."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        new = {}
        for key, leaf in params.items():
            if leaf is None:
                new[key] = None
                continue
            shape = jnp.shape(leaf)
            value = rng.choice([-1.0, 1.0], size=shape) * 10.0 ** rng.uniform(-4, 1, size=shape)
            if key == "table":
                value = value * (rng.uniform(size=(shape[0], 1)) < 0.3)
            if step in trees.ZERO_STEPS:
                value = np.zeros(shape)
            new[key] = jnp.asarray(value, leaf.dtype)
        out.append(new)
    return out


@pytest.mark.slow  # the eager variant alone takes ~10 s
class TestAgainstReference(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_reference(self):
        params = params_tree()
        grads = sparse_gradients(params, 40)
        for initial, eps in [(0.0, 1e-10), (0.1, 1e-10), (0.0, 0.0), (1.0, 1e-3)]:
            tx = rj.scale_by_rowwise_rss(initial, eps)
            update = self.variant(tx.update)
            state = tx.init(params)
            got = []
            for g in grads:
                u, state = update(g, state)
                got.append(u)
            for key in ["table", "conv", "bias", "scale"]:
                want, total = rowwise_reference([g[key] for g in grads], initial, eps)
                have = np.stack([np.asarray(u[key], np.float64) for u in got])
                np.testing.assert_allclose(have, np.stack(want), rtol=2e-5, atol=1e-7)
                np.testing.assert_allclose(state.sum_of_squares[key], total, rtol=2e-5)
                chex.assert_tree_all_finite(have)


def test_state_is_one_float32_per_row():
    table = jnp.zeros((50_000, 64), jnp.bfloat16)
    state = rj.rowwise_adagrad(0.1).init({"table": table, "bias": jnp.zeros(64)})
    acc = state[0].sum_of_squares
    assert acc["table"].shape == (50_000,) and acc["table"].dtype == jnp.float32
    assert acc["bias"].shape == (64,) and acc["bias"].dtype == jnp.float32
    assert acc["table"].nbytes / table.size == 4 / 64


def test_bfloat16_parameters_keep_float32_accumulators():
    params = params_tree(jnp.bfloat16)
    grads = sparse_gradients(params, 20, seed=2)
    tx = rj.scale_by_rowwise_rss()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        u, state = step(g, state)
        chex.assert_trees_all_equal_dtypes(u, params)
    want, total = rowwise_reference([g["table"] for g in grads])
    np.testing.assert_allclose(np.asarray(u["table"], np.float64), want[-1], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(state.sum_of_squares["table"], total, rtol=1e-5)


def test_rows_without_gradient_keep_their_accumulator_and_get_no_update():
    tx = rj.scale_by_rowwise_rss()
    g = jnp.zeros((4, 3)).at[1].set(jnp.array([1.0, 2.0, 2.0]))
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(state.sum_of_squares, [0.0, 3.0, 0.0, 0.0])
    np.testing.assert_allclose(u[1], np.array([1.0, 2.0, 2.0]) / (np.sqrt(3.0) + 1e-10))
    assert np.all(np.asarray(u)[[0, 2, 3]] == 0)


def test_alias_is_the_chain_and_matches_reference():
    params = params_tree()
    grads = sparse_gradients(params, 15, seed=4)
    alias = rj.rowwise_adagrad(0.05)
    chain = rj.chain(rj.scale_by_rowwise_rss(0.0, 1e-10), rj.scale_by_learning_rate(0.05))
    s1, s2 = alias.init(params), chain.init(params)
    p = params
    for g in grads:
        u1, s1 = alias.update(g, s1, p)
        u2, s2 = chain.update(g, s2, p)
        chex.assert_trees_all_equal(u1, u2)
        p = rj.apply_updates(p, u1)
    want, _ = rowwise_reference([g["table"] for g in grads])
    expected = np.asarray(params["table"], np.float64) - 0.05 * np.sum(want, axis=0)
    np.testing.assert_allclose(p["table"], expected, rtol=1e-5, atol=1e-6)


def test_fuses_with_other_rules_and_update_and_apply():
    params = params_tree()
    tx = rj.rowwise_adagrad(0.1)
    g = sparse_gradients(params, 1, seed=5)[0]
    state = tx.init(params)
    fused_params, fused_state = jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))(
        g, state, params
    )
    u, s = jax.jit(tx.update)(g, state, params)
    # One compiled graph against two: XLA may round a fused multiply-add differently.
    chex.assert_trees_all_close(fused_params, jax.jit(rj.apply_updates)(params, u), rtol=1e-6)
    chex.assert_trees_all_close(fused_state, s, rtol=1e-6)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: rj.scale_by_rowwise_rss(initial_accumulator_value=-1.0),
            "rmsjax.scale_by_rowwise_rss: initial_accumulator_value must be >= 0, got -1.0",
        ),
        (
            lambda: rj.scale_by_rowwise_rss(eps=float("nan")),
            "rmsjax.scale_by_rowwise_rss: eps must be a number >= 0 (not NaN), got nan",
        ),
        (
            lambda: rj.rowwise_adagrad(-0.1),
            "rmsjax.rowwise_adagrad: learning_rate must be >= 0, got -0.1",
        ),
        (
            lambda: rj.rowwise_adagrad(0.1, eps=-1e-3),
            "rmsjax.rowwise_adagrad: eps must be >= 0, got -0.001",
        ),
    ],
)
def test_bad_hyperparameters(build, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build()


def test_shape_mismatch_names_both_shapes():
    tx = rj.scale_by_rowwise_rss()
    state = tx.init(jnp.zeros((4, 3)))
    with pytest.raises(
        ValueError,
        match=r"has shape \(5, 3\) but the state holds \(4,\) \(its sum_of_squares needs \(5,\)\)",
    ):
        tx.update(jnp.zeros((5, 3)), state)
    with pytest.raises(TypeError, match="ScaleByRowwiseRssState"):
        tx.update(jnp.zeros((4, 3)), rj.scale_by_rss().init(jnp.zeros((4, 3))))
