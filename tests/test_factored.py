"""The factored second moment against a float64 NumPy transcription of Adafactor's."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from tests import reference, trees


def factored_reference(grads, decay=0.9, eps=1e-30, min_dim=32):
    """Shazeer & Stern (2018), eqs. for the factored second moment with a constant
    decay: R, C are decaying averages of the row and column means of g^2 + eps over the
    last two axes; v = R C^T / mean(R); u = g / sqrt(v). Otherwise a full average."""
    g0 = np.asarray(grads[0], np.float64)
    factored = g0.ndim >= 2 and min(g0.shape[-2:]) >= min_dim
    row = np.zeros(g0.shape[:-1])
    col = np.zeros(g0.shape[:-2] + g0.shape[-1:])
    full = np.zeros(g0.shape)
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        s = g * g + eps
        if factored:
            row = decay * row + (1 - decay) * s.mean(axis=-1)
            col = decay * col + (1 - decay) * s.mean(axis=-2)
            v = np.einsum("...i,...j->...ij", row, col) / row.mean(axis=-1)[..., None, None]
        else:
            full = decay * full + (1 - decay) * s
            v = full
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(g == 0, 0.0, g / np.sqrt(v)))
    return out, (row, col, full)


def params_tree(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(48, 40)), dtype),
        "batch": jnp.asarray(rng.normal(size=(2, 32, 36)), dtype),
        "small": jnp.asarray(rng.normal(size=(8, 40)), dtype),
        "bias": jnp.zeros(40, dtype),
        "scalar": jnp.asarray(0.5, dtype),
        "none": None,
    }


@pytest.mark.slow  # the eager variant alone takes ~10 s
class TestAgainstReference(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_reference(self):
        params = params_tree()
        grads = trees.gradient_sequence(params, 40, seed=1)
        for decay, eps in [(0.9, 1e-30), (0.99, 1e-3), (0.0, 1e-30)]:
            tx = rj.scale_by_factored_rmsprop(decay, eps)
            update = self.variant(tx.update)
            state = tx.init(params)
            got = []
            for g in grads:
                u, state = update(g, state)
                got.append(u)
            for key in ["w", "batch", "small", "bias", "scalar"]:
                want, (row, col, full) = factored_reference([g[key] for g in grads], decay, eps)
                have = np.stack([np.asarray(u[key], np.float64) for u in got])
                chex.assert_tree_all_finite(have)
                np.testing.assert_allclose(have, np.stack(want), rtol=5e-5, atol=1e-7)
                if key in ("w", "batch"):
                    np.testing.assert_allclose(state.nu_row[key], row, rtol=5e-5)
                    np.testing.assert_allclose(state.nu_col[key], col, rtol=5e-5)
                else:
                    np.testing.assert_allclose(state.nu[key], full, rtol=5e-5, atol=1e-30)


@pytest.mark.parametrize("outlier", [3e38, 1e-37])
def test_one_outlier_among_ordinary_gradients_keeps_every_step_finite(outlier):
    # One element 2^128 above (or below) the others moves the leaf's exponent by up to
    # 256 binades; the moments then moved by 4^-128 on the exponent bits, which wrapped
    # into the sign, and the other elements, whose averages are 0 in the new units,
    # stepped by 0 / 0.
    decay, eps = 0.9, 1e-30
    params = params_tree()
    tx = rj.scale_by_factored_rmsprop(decay, eps)
    update = jax.jit(tx.update)
    state = tx.init(params)
    sequence = trees.gradient_sequence(params, 4, seed=3)
    for step, grads in enumerate(sequence):
        if step == 2:
            grads = {
                k: g if g is None else g.at[(0,) * g.ndim].set(outlier) for k, g in grads.items()
            }
        updates, state = update(grads, state)
        chex.assert_tree_all_finite((updates, state))
        for key in ("bias", "small"):  # unfactored: per element, as RMSprop
            u, g = np.asarray(updates[key]), np.asarray(grads[key])
            assert np.all(np.abs(u) <= (1 - decay) ** -0.5 * (1 + 1e-6))
            # (0 where the true step is under float32's range: the outlier's own element,
            # once its gradient is ordinary again)
            assert np.all((np.sign(u) == np.sign(g)) | (u == 0))
            assert np.mean(u == 0) < 0.1
        if step == 2 and outlier > 1:
            # the outlier itself steps as the float64 equations say
            want, _ = factored_reference(
                [g["bias"] for g in sequence[:2]] + [grads["bias"]], decay, eps
            )
            np.testing.assert_allclose(updates["bias"][0], want[-1][0], rtol=1e-6)


@pytest.mark.parametrize("outlier", [1e10, 1e15, 1e20])
def test_an_outlier_in_a_factored_matrix_leaves_the_equations_only_past_its_limit(outlier):
    # docs/numerics.md: the leaf's exponent moves once a gradient passes 2^40 (1.1e12);
    # under it every step is the float64 equations'. Past it, an element whose estimate
    # R_i C_j / mean(R) is under float32's range in units of 4^E steps as on its own
    # first step, g / sqrt((1 - decay) g^2 + eps), where the equations give the other
    # elements steps of 2e10 to 3e14 beside an outlier of 1e15 (the outlier's row and
    # column: up to 1.3, which the first steps' bound of 3.2 keeps in sign)
    decay, eps = 0.9, 1e-30
    g = np.random.default_rng(1).normal(size=(40, 36)).astype(np.float32)
    g[0, 0] = outlier
    tx = rj.scale_by_factored_rmsprop(decay, eps)
    u = np.asarray(jax.jit(tx.update)(jnp.asarray(g), tx.init(jnp.zeros((40, 36))))[0])
    want = factored_reference([g], decay, eps)[0][0]
    first_step = g.astype(np.float64) / np.sqrt((1 - decay) * g.astype(np.float64) ** 2 + eps)
    np.testing.assert_allclose(u[0, 0], want[0, 0], rtol=1e-6)  # the outlier itself
    if outlier < 2.0**40:
        np.testing.assert_allclose(u, want, rtol=2e-5)
    else:
        np.testing.assert_allclose(u[1:, 1:], first_step[1:, 1:], rtol=1e-6)
        assert np.abs(u).max() <= (1 - decay) ** -0.5 * (1 + 1e-6)


def test_state_shapes_and_bytes():
    params = {
        "w": jnp.zeros((512, 256), jnp.bfloat16),
        "table": jnp.zeros((50_000, 64)),
        "out": jnp.zeros((256, 10)),
        "b": jnp.zeros(256),
    }
    state = rj.factored_rmsprop(1e-3).init(params)[0]
    assert isinstance(state, rj.ScaleByFactoredRmsState)
    assert state.nu_row["w"].shape == (512,) and state.nu_col["w"].shape == (256,)
    assert state.nu["w"].shape == ()
    assert state.nu_row["out"].shape == () and state.nu["out"].shape == (256, 10)
    assert state.nu["b"].shape == (256,)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
    for key, (n, m) in [("w", (512, 256)), ("table", (50_000, 64))]:
        nbytes = sum(x[key].nbytes for x in state)
        # the row and column averages, and a 4-byte placeholder for the full average
        assert nbytes == 4 * (n + m) + 4 and nbytes / (n * m) <= 4 * (n + m + 1) / (n * m)


def test_float64_parameters_keep_float64_state_as_documented():
    with jax.enable_x64(True):
        params = {"w": jnp.zeros((40, 40), jnp.float64), "b": jnp.zeros(3, jnp.float64)}
        state = rj.scale_by_factored_rmsprop(min_dim_size_to_factor=8).init(params)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(state))
        assert sum(x["w"].nbytes for x in state) == 8 * (40 + 40) + 8


def test_rank_one_squares_give_rmsprop_exactly():
    # When g*g is an outer product the factored estimate is exact: same as scale_by_rms.
    rng = np.random.default_rng(2)
    grads = []
    for _ in range(10):
        a, b = rng.uniform(0.1, 2, size=40), rng.uniform(0.1, 2, size=33)
        grads.append(jnp.asarray(np.outer(a, b) * rng.choice([-1, 1], size=(40, 33)), jnp.float32))
    factored = rj.scale_by_factored_rmsprop(decay=0.0, eps=0.0)
    u, _ = factored.update(grads[0], factored.init(grads[0]))
    np.testing.assert_allclose(u, np.sign(grads[0]), rtol=1e-5)
    full = reference.rms([np.asarray(grads[0], np.float64)], decay=0.0, eps=0.0)
    np.testing.assert_allclose(u, full[0], rtol=1e-5)


def test_zero_gradient_gives_zero_update_even_with_zero_eps():
    tx = rj.scale_by_factored_rmsprop(eps=0.0)
    g = jnp.zeros((64, 64))
    u, state = tx.update(g, tx.init(g))
    chex.assert_trees_all_equal(u, g)
    g2 = g.at[3, 5].set(2.0)
    u, _ = tx.update(g2, state)
    chex.assert_tree_all_finite(u)
    assert np.count_nonzero(np.asarray(u)) == 1


def test_alias_is_the_chain_and_trains():
    params = params_tree()
    grads = trees.gradient_sequence(params, 12, seed=3)
    alias = rj.factored_rmsprop(1e-2, decay=0.95, momentum=0.9, nesterov=True)
    chain = rj.chain(
        rj.scale_by_factored_rmsprop(0.95, 1e-30, min_dim_size_to_factor=32),
        rj.scale_by_learning_rate(1e-2),
        rj.trace(0.9, nesterov=True),
    )
    s1, s2 = alias.init(params), chain.init(params)
    for g in grads:
        u1, s1 = alias.update(g, s1, params)
        u2, s2 = chain.update(g, s2, params)
        chex.assert_trees_all_equal(u1, u2)
    want, _ = factored_reference([g["w"] for g in grads], 0.95)
    want = reference.trace(reference.scale_by_learning_rate(want, 1e-2), 0.9, nesterov=True)
    # Nesterov adds terms that can cancel: float32's error is relative to the terms,
    # so the absolute floor scales with the largest step.
    atol = 1e-6 * np.max(np.abs(want[-1]))
    np.testing.assert_allclose(u1["w"], want[-1], rtol=5e-5, atol=atol)


def test_minimises_a_least_squares_problem():
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(64, 40)), jnp.float32)

    def loss(w):
        return jnp.mean((a @ w - target) ** 2)

    tx = rj.factored_rmsprop(3e-3, decay=0.99)
    w = jnp.zeros((48, 40))
    state = tx.init(w)
    step = jax.jit(lambda w, s: rj.update_and_apply(tx, jax.grad(loss)(w), s, w))
    for _ in range(300):
        w, state = step(w, state)
    best = jnp.linalg.lstsq(a, target)[0]
    assert float(loss(w)) < 1.05 * float(loss(best)) + 1e-3


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: rj.scale_by_factored_rmsprop(decay=1.0),
            r"rmsjax.scale_by_factored_rmsprop: decay must be in \[0, 1\), got 1.0",
        ),
        (
            lambda: rj.scale_by_factored_rmsprop(eps=-1.0),
            "rmsjax.scale_by_factored_rmsprop: eps must be >= 0, got -1.0",
        ),
        (
            lambda: rj.scale_by_factored_rmsprop(min_dim_size_to_factor=0),
            "rmsjax.scale_by_factored_rmsprop: min_dim_size_to_factor must be an integer >= 1, "
            "got 0",
        ),
        (
            lambda: rj.factored_rmsprop(1e-3, momentum=1.5),
            r"rmsjax.factored_rmsprop: momentum must be in \[0, 1\], got 1.5",
        ),
        (
            lambda: rj.factored_rmsprop(-1.0),
            "rmsjax.factored_rmsprop: learning_rate must be >= 0, got -1.0",
        ),
    ],
)
def test_bad_hyperparameters(build, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        build()


def test_a_fractional_size_is_the_wrong_type():
    with pytest.raises(
        TypeError,
        match=r"^rmsjax\.factored_rmsprop: min_dim_size_to_factor must be an integer >= 1, "
        r"got 2\.5 \(float\)$",
    ):
        rj.factored_rmsprop(1e-3, min_dim_size_to_factor=2.5)


def test_shape_mismatch_is_reported():
    tx = rj.scale_by_factored_rmsprop()
    state = tx.init(jnp.zeros((64, 64)))
    with pytest.raises(
        ValueError,
        match=r"has shape \(64, 32\) but the state holds \(64,\) \(its nu_col needs \(32,\)\)",
    ):
        tx.update(jnp.zeros((64, 32)), state)
