"""Tests of the transforms chained with RMSprop and Adagrad: clipping, masking, weight
decay with a mask, the non-finite guard, hyperparameter injection and gradient
accumulation. Each is checked against a float64 NumPy transcription written here and
against optax, live."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj
from rmsjax._src import fusion
from tests import registry

# ------------------------------------------------------------------ NumPy references


def np_rmsprop(grads, lr, decay=0.9, eps=1e-8, momentum=None):
    """optax's rmsprop, float64: nu, g/sqrt(nu+eps), times -lr, then momentum."""
    nu = np.zeros_like(np.asarray(grads[0], np.float64))
    buffer = np.zeros_like(nu)
    out = []
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        nu = decay * nu + (1 - decay) * g * g
        step = -(lr(t) if callable(lr) else lr) * g / np.sqrt(nu + eps)
        if momentum is not None:
            buffer = step + momentum * buffer
            step = buffer
        out.append(step)
    return out


def np_global_norm(leaves):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves))


def tree_params():
    return {
        "dense": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full(4, 0.5)},
        "scale": jnp.asarray(2.0),
        "frozen": None,
    }


def tree_grads(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    params = tree_params()
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.normal(size=jnp.shape(p)), jnp.float32), params
    )


# ---------------------------------------------------------------------------- clip


def test_clip_matches_numpy_and_optax():
    grads = tree_grads(0, scale=3.0)
    tx = rj.clip(1.5)
    ours, state = tx.update(grads, tx.init(tree_params()))
    theirs, _ = optax.clip(1.5).update(grads, optax.clip(1.5).init(tree_params()))
    expected = jax.tree.map(lambda g: np.clip(np.asarray(g, np.float64), -1.5, 1.5), grads)
    chex.assert_trees_all_close(ours, expected, rtol=0, atol=0)
    chex.assert_trees_all_equal(ours, theirs)
    assert state == rj.EmptyState()


def test_clip_is_fused_inside_chain_and_keeps_bfloat16():
    tx = rj.chain(rj.clip(0.5), rj.scale_by_rms(), rj.scale_by_learning_rate(0.1))
    assert fusion.leaf_rule_of(tx) is not None  # one elementwise rule
    g = jnp.array([2.0, -0.25, 0.0], jnp.bfloat16)
    updates, _ = tx.update(g, tx.init(jnp.zeros(3, jnp.bfloat16)))
    assert updates.dtype == jnp.bfloat16
    clipped = np.clip([2.0, -0.25, 0.0], -0.5, 0.5)
    expected = np_rmsprop([clipped], 0.1)[0]
    np.testing.assert_allclose(np.asarray(updates, np.float64), expected, rtol=1e-2)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_clip_rejects_bad_max_delta(bad):
    with pytest.raises(
        ValueError, match=r"rmsjax\.clip: max_delta must be (a number )?>= 0( \(not NaN\))?, got"
    ):
        rj.clip(bad)


# ---------------------------------------------------------------- clip_by_global_norm


WITH_AND_WITHOUT_JIT = pytest.mark.parametrize(
    "variant", [jax.jit, lambda fn: fn], ids=["with_jit", "without_jit"]
)


@WITH_AND_WITHOUT_JIT
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_by_global_norm_equals_optax_and_numpy(max_norm, variant):
    grads = tree_grads(1, scale=2.0)
    tx = rj.clip_by_global_norm(max_norm)
    ours, _ = variant(tx.update)(grads, tx.init(None))
    opt = optax.clip_by_global_norm(max_norm)
    theirs, _ = variant(opt.update)(grads, opt.init(None))
    chex.assert_trees_all_equal(ours, theirs)  # the same float32 numbers, bit for bit

    leaves = jax.tree.leaves(grads)
    norm = np_global_norm(leaves)
    factor = 1.0 if norm < max_norm else max_norm / norm
    expected = jax.tree.map(lambda g: factor * np.asarray(g, np.float64), grads)
    chex.assert_trees_all_close(ours, expected, rtol=2e-6)
    np.testing.assert_allclose(np_global_norm(jax.tree.leaves(ours)), min(norm, max_norm), 1e-6)
    assert ours["frozen"] is None


def test_clip_by_global_norm_bfloat16_computes_norm_in_float32():
    g = jnp.full(4096, 0.01, jnp.bfloat16)  # sum of squares in bfloat16 would stall
    tx = rj.clip_by_global_norm(0.1)
    out, _ = tx.update(g, tx.init(None))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(rj.global_norm(g)), np.sqrt(4096) * 0.01, rtol=1e-2)
    np.testing.assert_allclose(np_global_norm([out]), 0.1, rtol=1e-2)


def test_global_norm_matches_numpy():
    grads = tree_grads(2)
    np.testing.assert_allclose(
        float(rj.global_norm(grads)), np_global_norm(jax.tree.leaves(grads)), rtol=1e-6
    )
    assert float(rj.global_norm({})) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 1e30, 1e36, 1e38])
def test_global_norm_and_clipping_hold_at_every_scale(scale, dtype):
    # A plain float32 sum of squares overflows from a norm of 1.8e19 (optax's norm is
    # inf there and every clipped update 0) and underflows under 1e-19. The norm is
    # right wherever it fits in float32, inf where it does not (the largest scale
    # here), and the clipped updates are right at every scale, in float32 and bfloat16.
    rng = np.random.default_rng(3)
    raw = {"a": rng.normal(size=(40, 50)), "b": rng.normal(size=7), "c": np.array(-3.0)}
    raw = jax.tree.map(lambda x: x / np.abs(x).max() * 0.9, raw)  # the largest is 0.9 * scale
    grads = jax.tree.map(lambda x: jnp.asarray(x * scale, dtype), raw)
    exact = np_global_norm(jax.tree.leaves(grads))
    norm = float(jax.jit(rj.global_norm)(grads))
    if exact < np.finfo(np.float32).max:
        np.testing.assert_allclose(norm, exact, rtol=1e-6)
    else:
        assert norm == np.inf
    if dtype == jnp.float32 and scale >= 1e20:  # README's "Relation to optax" row
        theirs, _ = optax.clip_by_global_norm(1.0).update(grads, None)
        optax_norm = optax.tree.norm if hasattr(optax, "tree") else optax.global_norm
        assert float(optax_norm(grads)) == np.inf
        assert not any(np.any(np.asarray(t)) for t in jax.tree.leaves(theirs))
    for max_norm in [1.0, exact * 2]:
        tx = rj.clip_by_global_norm(min(max_norm, 1e38))
        ours, _ = jax.jit(tx.update)(grads, tx.init(None))
        factor = min(1.0, min(max_norm, 1e38) / exact)
        for got, g in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)):
            assert got.dtype == dtype
            np.testing.assert_allclose(
                np.asarray(got, np.float64),
                factor * np.asarray(g, np.float64),
                rtol=2e-6 if dtype == jnp.float32 else 2**-8,
            )


def test_global_norm_keeps_optax_bits_for_every_tree_optax_does_not_overflow():
    # Scaling by a power of two changes no rounding: random trees of float32 and complex
    # leaves whose norms span 1e-8 ... 1e8, jitted and eager. (Half-precision leaves
    # are summed and clipped in float32 here, in their own dtype by optax: the test
    # above and test_clip_by_global_norm_bfloat16_computes_norm_in_float32.)
    rng = np.random.default_rng(4)
    optax_norm = optax.tree.norm if hasattr(optax, "tree") else optax.global_norm
    for trial in range(16):
        tree = {}
        for i in range(int(rng.integers(1, 4))):
            size = int(rng.integers(1, 3000))
            x = rng.normal(size=size) * 10.0 ** rng.uniform(-8, 8)
            if rng.uniform() < 0.3:
                x = x + 1j * rng.normal(size=size) * np.abs(x).max()
            tree[f"leaf{i}"] = jnp.asarray(x, jnp.complex64 if np.iscomplexobj(x) else jnp.float32)
        max_norm = float(10.0 ** rng.uniform(-3, 3))
        variant = jax.jit if trial % 2 else (lambda fn: fn)
        assert variant(rj.global_norm)(tree) == variant(optax_norm)(tree)
        ours = variant(rj.clip_by_global_norm(max_norm).update)(tree, rj.EmptyState())[0]
        theirs = variant(optax.clip_by_global_norm(max_norm).update)(tree, optax.EmptyState())[0]
        chex.assert_trees_all_equal(ours, theirs)


def test_global_norm_of_constants_folded_by_the_compiler():
    # Gradients that are constants of the jitted function: XLA folds what it can, and
    # must not turn (g * s) * (g * s) into (g * g) * (s * s), where g * g overflows.
    norm = jax.jit(lambda: rj.global_norm({"a": jnp.full(4, 1e20), "b": jnp.full(5, -2e20)}))()
    np.testing.assert_allclose(float(norm), np.sqrt(4 * 1e40 + 5 * 4e40), rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), -float("inf"), 1e39])
def test_clip_by_global_norm_rejects_bad_max_norm(bad):
    with pytest.raises(ValueError, match=r"rmsjax\.clip_by_global_norm: max_norm must be"):
        rj.clip_by_global_norm(bad)


def test_clip_by_global_norm_of_inf_clips_nothing_as_optax():
    # optax's idiom for "clipping off" in a config; it was refused as not finite
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.normal(size=(5, 3)) * 1e3, jnp.float32), "b": jnp.ones(2)}
    ours = jax.jit(rj.clip_by_global_norm(float("inf")).update)(grads, rj.EmptyState())[0]
    theirs = jax.jit(optax.clip_by_global_norm(float("inf")).update)(grads, optax.EmptyState())[0]
    for key in grads:
        np.testing.assert_array_equal(ours[key], theirs[key])
        np.testing.assert_array_equal(ours[key], grads[key])
    # a norm beyond float32's maximum: the gradients as they are (optax's are NaN)
    huge = {"w": jnp.array([3e38, -3e38, 1.0])}
    out = rj.clip_by_global_norm(np.float32("inf")).update(huge, rj.EmptyState())[0]
    np.testing.assert_array_equal(out["w"], huge["w"])


# ----------------------------------------------------------- masked and weight decay


def decay_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def test_add_decayed_weights_with_mask_matches_numpy_and_optax():
    params, grads = tree_params(), tree_grads(3)
    for mask in [decay_mask, decay_mask(params)]:
        tx = rj.add_decayed_weights(0.1, mask=mask)
        state = tx.init(params)
        assert state == rj.EmptyState()  # same state as without a mask
        ours, _ = tx.update(grads, state, params)
        opt = optax.add_decayed_weights(0.1, mask=mask)
        theirs, _ = opt.update(grads, opt.init(params), params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-7)
    expected_w = np.asarray(grads["dense"]["w"], np.float64) + 0.1 * np.asarray(
        params["dense"]["w"], np.float64
    )
    np.testing.assert_allclose(ours["dense"]["w"], expected_w, rtol=1e-6)
    chex.assert_trees_all_equal(ours["dense"]["b"], grads["dense"]["b"])
    chex.assert_trees_all_equal(ours["scale"], grads["scale"])


def test_add_decayed_weights_mask_in_chain_matches_optax_over_steps():
    params = tree_params()
    ours_tx = rj.chain(
        rj.clip_by_global_norm(1.0),
        rj.add_decayed_weights(1e-2, mask=decay_mask),
        rj.rmsprop(1e-2, momentum=0.9),
    )
    theirs_tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(1e-2, mask=decay_mask),
        optax.rmsprop(1e-2, momentum=0.9),
    )
    p_ours, p_theirs = params, params
    s_ours, s_theirs = ours_tx.init(params), theirs_tx.init(params)
    step_ours = jax.jit(ours_tx.update)
    step_theirs = jax.jit(theirs_tx.update)
    for t in range(25):
        g = tree_grads(10 + t, scale=2.0)
        u, s_ours = step_ours(g, s_ours, p_ours)
        p_ours = rj.apply_updates(p_ours, u)
        u, s_theirs = step_theirs(g, s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, u)
    chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)


def test_add_decayed_weights_mask_needs_params():
    tx = rj.add_decayed_weights(0.1, mask=decay_mask)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(tree_grads(0), tx.init(tree_params()))


def test_masked_rss_matches_optax_and_keeps_no_state_for_unselected_leaves():
    params = tree_params()
    mask = {"dense": {"w": True, "b": False}, "scale": True, "frozen": False}
    tx = rj.masked(rj.scale_by_rss(), mask)
    opt = optax.masked(optax.scale_by_rss(), mask)
    state, opt_state = tx.init(params), opt.init(params)
    assert isinstance(state, rj.MaskedState)
    assert isinstance(state.inner_state.sum_of_squares["dense"]["b"], rj.MaskedNode)
    sums = {"w": np.full((3, 4), 0.1), "scale": np.full((), 0.1)}
    for t in range(5):
        g = tree_grads(20 + t)
        ours, state = tx.update(g, state, params)
        theirs, opt_state = opt.update(g, opt_state, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
        for key, leaf in [("w", g["dense"]["w"]), ("scale", g["scale"])]:
            sums[key] = sums[key] + np.asarray(leaf, np.float64) ** 2
        expected_w = np.asarray(g["dense"]["w"], np.float64) / np.sqrt(sums["w"] + 1e-7)
        np.testing.assert_allclose(ours["dense"]["w"], expected_w, rtol=1e-5)
        chex.assert_trees_all_equal(ours["dense"]["b"], g["dense"]["b"])


def test_masked_prefix_mask_and_callable_mask():
    params = tree_params()
    tx = rj.masked(rj.scale(-2.0), {"dense": True, "scale": False, "frozen": False})
    g = tree_grads(4)
    out, _ = tx.update(g, tx.init(params))
    chex.assert_trees_all_close(out["dense"], jax.tree.map(lambda x: -2.0 * x, g["dense"]))
    chex.assert_trees_all_equal(out["scale"], g["scale"])
    tx = rj.masked(rj.scale(-2.0), lambda p: jax.tree.map(lambda x: jnp.ndim(x) == 0, p))
    out, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(out["scale"], -2.0 * g["scale"])
    chex.assert_trees_all_equal(out["dense"], g["dense"])


def test_masked_rejects_non_bool_mask():
    with pytest.raises(TypeError, match=r"rmsjax\.masked: the mask must hold True or False"):
        rj.masked(rj.scale(1.0), {"w": 1.5}).init({"w": jnp.ones(2)})


# ------------------------------------------------------------------- apply_if_finite

BAD_STEPS = {3: jnp.nan, 7: jnp.inf, 8: -jnp.inf}


def guarded_gradients(steps=14):
    out = []
    for t in range(steps):
        g = tree_grads(40 + t)
        if t in BAD_STEPS:
            g["dense"]["w"] = g["dense"]["w"].at[1, 2].set(BAD_STEPS[t])
        out.append(g)
    return out


def test_apply_if_finite_skips_bad_steps_like_numpy_and_optax():
    params = tree_params()
    tx = rj.apply_if_finite(rj.rmsprop(1e-2, momentum=0.9), max_consecutive_errors=5)
    opt = optax.apply_if_finite(optax.rmsprop(1e-2, momentum=0.9), max_consecutive_errors=5)
    state, opt_state = tx.init(params), opt.init(params)
    step, opt_step = jax.jit(tx.update), jax.jit(opt.update)
    grads = guarded_gradients()
    p, p_opt = params, params
    for t, g in enumerate(grads):
        u, state = step(g, state, p)
        p = rj.apply_updates(p, u)
        u_opt, opt_state = opt_step(g, opt_state, p_opt)
        p_opt = optax.apply_updates(p_opt, u_opt)
        assert bool(state.last_finite) == (t not in BAD_STEPS)
        assert int(state.notfinite_count) == int(opt_state.notfinite_count)
        assert int(state.total_notfinite) == int(opt_state.total_notfinite)
    assert int(state.total_notfinite) == 3
    assert int(state.notfinite_count) == 0  # reset by the good steps after step 8
    chex.assert_trees_all_close(p, p_opt, rtol=1e-5, atol=1e-7)

    # NumPy: the same rmsprop run on the finite steps only.
    good = [g for t, g in enumerate(grads) if t not in BAD_STEPS]
    w_steps = np_rmsprop([g["dense"]["w"] for g in good], 1e-2, momentum=0.9)
    expected_w = np.asarray(params["dense"]["w"], np.float64) + sum(w_steps)
    np.testing.assert_allclose(p["dense"]["w"], expected_w, rtol=1e-5, atol=1e-6)


def bits(tree):
    """The raw bits of every leaf, so that -0.0 and +0.0 (or two NaNs) are told apart."""
    return jax.tree.map(lambda x: np.asarray(x).view(f"u{np.asarray(x).itemsize}"), tree)


@pytest.mark.parametrize("fused", [False, True])
def test_apply_if_finite_bad_step_leaves_params_and_state_bit_identical(fused):
    params = {"w": jnp.array([1.0, -0.0, 0.0, 3.5]), "b": jnp.array([-0.0], jnp.bfloat16)}
    tx = rj.apply_if_finite(rj.rmsprop(0.1, momentum=0.9), max_consecutive_errors=2)
    state = tx.init(params)
    good = {"w": jnp.array([0.5, 0.0, 0.0, -1.0]), "b": jnp.array([0.0], jnp.bfloat16)}
    bad = {"w": jnp.array([0.5, jnp.nan, 0.0, -1.0]), "b": jnp.array([1.0], jnp.bfloat16)}

    if fused:
        step = jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))
    else:
        update = jax.jit(tx.update)

        def step(g, s, p):
            updates, s = update(g, s, p)
            return rj.apply_updates(p, updates), s

    for g in [bad, good, good, bad]:
        before_params, before_inner = bits(params), bits(state.inner_state)
        params, state = step(g, state, params)
        if g is bad:
            chex.assert_trees_all_equal(bits(params), before_params)
            chex.assert_trees_all_equal(bits(state.inner_state), before_inner)
            assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
        else:
            assert int(state.notfinite_count) == 0 and bool(state.last_finite)
            assert not np.array_equal(bits(params)["w"], before_params["w"])
    assert int(state.total_notfinite) == 2


@pytest.mark.parametrize("fused", [False, True])
def test_apply_if_finite_takes_a_state_that_holds_inf_by_design(fused):
    # reduce_on_plateau's best value starts at inf: checking the whole new inner state
    # skipped every step; only what a step turns non-finite counts, as optax (which
    # checks the gradients alone) applies every step here
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([0.1, 0.2, 0.3])}
    plateau = optax.contrib.reduce_on_plateau(accumulation_size=3)
    ours = rj.apply_if_finite(rj.chain(rj.sgd(0.1), plateau), 5)
    theirs = optax.apply_if_finite(optax.chain(optax.sgd(0.1), plateau), 5)
    s_ours, s_theirs, p_ours = ours.init(params), theirs.init(params), params
    for _ in range(4):
        u_theirs, s_theirs = jax.jit(theirs.update)(grads, s_theirs, params, value=1.0)
        if fused:
            p_ours, s_ours = jax.jit(functools.partial(rj.update_and_apply, ours))(
                grads, s_ours, p_ours, value=1.0
            )
        else:
            u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, params, value=1.0)
            np.testing.assert_array_equal(u_ours["w"], u_theirs["w"])
        assert int(s_ours.notfinite_count) == int(s_ours.total_notfinite) == 0
    if fused:
        np.testing.assert_allclose(p_ours["w"], 1.0 - 4 * 0.1 * grads["w"], rtol=1e-6)
    # a NaN the step writes into the state is still caught
    bad = rj.apply_if_finite(rj.rmsprop(0.1), 2)
    state = bad.init(params)
    updates, state = bad.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
    assert int(state.notfinite_count) == 1 and bool(jnp.all(updates["w"] == 0))


def test_apply_if_finite_applies_after_max_consecutive_errors_and_resets():
    tx = rj.apply_if_finite(rj.sgd(1.0), max_consecutive_errors=2)
    opt = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=2)
    params = jnp.zeros(2)
    state, opt_state = tx.init(params), opt.init(params)
    nan = jnp.array([jnp.nan, 1.0])
    counts = []
    for t, g in enumerate([nan, nan, nan, jnp.ones(2), nan]):
        updates, state = tx.update(g, state, params)
        opt_updates, opt_state = opt.update(g, opt_state, params)
        counts.append(int(state.notfinite_count))
        assert int(opt_state.notfinite_count) == counts[-1]
        if t < 2:
            chex.assert_trees_all_equal(updates, jnp.zeros(2))
        if t == 2:  # the third bad step in a row goes through, as in optax
            assert np.isnan(np.asarray(updates)[0]) and np.isnan(np.asarray(opt_updates)[0])
    assert counts == [1, 2, 3, 0, 1]
    assert int(state.total_notfinite) == 4


@pytest.mark.parametrize(
    "bad,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError)]
)
def test_apply_if_finite_rejects_bad_max_consecutive_errors(bad, error):
    with pytest.raises(error, match=r"rmsjax\.apply_if_finite: max_consecutive_errors"):
        rj.apply_if_finite(rj.sgd(0.1), bad)


# ---------------------------------------------------------------- inject_hyperparams


def test_an_integer_hyperparameter_set_to_a_float_is_not_truncated():
    # learning_rate=1 is held as int32; setting 0.01 (item by item or with tree_set)
    # stored 0 and stepped by zero, where optax steps by 0.01
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.array([0.1, 0.2, 0.3])}
    for lib in (rj, optax):
        tx = lib.inject_hyperparams(lib.sgd)(learning_rate=1, momentum=0)
        state = tx.init(params)
        state.hyperparams["learning_rate"] = 0.01
        state.hyperparams["momentum"] = 0.9
        updates, state = jax.jit(tx.update)(grads, state, params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        np.testing.assert_allclose(updates["w"], -0.019 * grads["w"], rtol=1e-6)
        reset = optax.tree_utils.tree_set(tx.init(params), learning_rate=0.5)
        np.testing.assert_allclose(tx.update(grads, reset, params)[0]["w"], -0.5 * grads["w"])
    # an integer int32 cannot hold wrapped around: np.int64(2**40) stepped by -2**31
    tx = rj.inject_hyperparams(rj.sgd)(learning_rate=np.int64(2**40))
    state = tx.init(params)
    np.testing.assert_allclose(tx.update(grads, state, params)[0]["w"], -(2.0**40) * grads["w"])
    state = rj.inject_hyperparams(rj.sgd)(learning_rate=1).init(params)
    state.hyperparams["learning_rate"] = np.int64(2**40)
    assert float(state.hyperparams["learning_rate"]) == 2.0**40


def test_inject_hyperparams_matches_optax_and_numpy_with_changed_learning_rate():
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    tx = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.05, decay=0.8, momentum=0.5)
    opt = optax.inject_hyperparams(optax.rmsprop)(learning_rate=0.05, decay=0.8, momentum=0.5)
    state, opt_state = tx.init(params), opt.init(params)
    grads = [
        {"w": jnp.asarray(np.random.default_rng(t).normal(size=6), jnp.float32)} for t in range(12)
    ]
    lrs = [0.05] * 4 + [0.01] * 4 + [0.2] * 4
    for t, g in enumerate(grads):
        lr = jnp.asarray(lrs[t], jnp.float32)
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})
        opt_state.hyperparams["learning_rate"] = lr
        ours, state = tx.update(g, state, params)
        theirs, opt_state = opt.update(g, opt_state, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
    # NumPy: rmsprop with the learning rate changed between steps.
    expected = np_rmsprop([g["w"] for g in grads], lambda t: lrs[t], decay=0.8, momentum=0.5)
    np.testing.assert_allclose(ours["w"], expected[-1], rtol=1e-5)
    assert int(state.count) == 12


def test_inject_hyperparams_are_float32_for_bfloat16_params():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    tx = rj.inject_hyperparams(rj.adagrad)(learning_rate=1e-3, initial_accumulator_value=0.1)
    state = tx.init(params)
    for value in state.hyperparams.values():
        assert value.dtype == jnp.float32 and value.shape == ()
    # 1e-3 survives exactly in float32 (bfloat16 would store 0.000999451).
    assert float(state.hyperparams["learning_rate"]) == float(np.float32(1e-3))
    _, state = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, state, params)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    assert set(state.hyperparams) == {"learning_rate", "initial_accumulator_value", "eps"}


def test_inject_hyperparams_changing_the_learning_rate_does_not_recompile():
    params = {"w": jnp.ones(4)}
    tx = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, momentum=0.9)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state

    state = tx.init(params)
    for lr in [0.1, 0.03, 0.5, 1e-4]:
        state = state._replace(
            hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)}
        )
        new_params, state = step(params, state, {"w": jnp.ones(4)})
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(lr)
    chex.clear_trace_counter()


def test_tree_set_with_python_floats_traces_once_more_as_with_optax():
    # README: a Python float set with tree_set is weakly typed: one more trace on its
    # first step, none after; an array of the state's dtype, none at all
    def traces_after(make):
        tx, count = make(learning_rate=0.1), [0]

        def step(g, s):
            count[0] += 1
            return tx.update(g, s)

        step = jax.jit(step)
        grads = {"w": jnp.ones(3)}
        state = step(grads, tx.init(grads))[1]
        seen = []
        for lr in (jnp.asarray(0.05, jnp.float32), 0.04, 0.03):
            state = optax.tree_utils.tree_set(state, learning_rate=lr)
            state = step(grads, state)[1]
            seen.append(count[0])
        return seen

    assert traces_after(rj.inject_hyperparams(rj.rmsprop)) == [1, 2, 2]
    assert traces_after(optax.inject_hyperparams(optax.rmsprop)) == [1, 2, 2]


def test_inject_hyperparams_evaluates_schedules_per_step():
    schedule = rj.schedules.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    tx = rj.inject_hyperparams(rj.sgd)(learning_rate=schedule)
    opt = optax.inject_hyperparams(optax.sgd)(
        learning_rate=optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    )
    params = jnp.zeros(2)
    state, opt_state = tx.init(params), opt.init(params)
    step = jax.jit(tx.update)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1, rtol=1e-6)
    for t in range(5):
        updates, state = step(jnp.ones(2), state, params)
        opt_updates, opt_state = opt.update(jnp.ones(2), opt_state, params)
        # The state holds the value the step used, for logging.
        np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1 * 0.5**t, rtol=1e-6)
        np.testing.assert_allclose(updates, np.full(2, -0.1 * 0.5**t), rtol=1e-6)
        chex.assert_trees_all_close(updates, opt_updates, rtol=1e-6)


def test_inject_hyperparams_validates_where_built_and_keeps_static_args():
    with pytest.raises(ValueError, match=r"its inner rmsprop: decay must be in \[0, 1\), got"):
        rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, decay=1.5)
    with pytest.raises(ValueError, match="static_args must name arguments"):
        rj.inject_hyperparams(rj.rmsprop, static_args=("nope",))
    tx = rj.inject_hyperparams(rj.rmsprop, static_args=("decay",))(0.1, decay=0.5, centered=True)
    state = tx.init(jnp.zeros(2))
    assert "decay" not in state.hyperparams and "centered" not in state.hyperparams
    assert state.inner_state[0].mu is not None  # centered=True was passed through


# -------------------------------------------------------------- accumulate_gradients


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.sgd(0.1, momentum=0.9),
        lambda: rj.adagrad(0.1),
        lambda: rj.rmsprop(0.01, momentum=0.9),
    ],
)
def test_accumulating_one_micro_batch_is_the_inner_optimizer_bit_for_bit(make):
    # under lax.cond the inner step's kernels were compiled apart and contracted other
    # products into multiply-adds: hundreds of parameters an ulp or more off in 12 steps
    inner = make()
    outer = rj.accumulate_gradients(inner, 1)
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(6, 9)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
    }

    def stepper(tx):
        return jax.jit(
            lambda g, s, p: (lambda u, s: (rj.apply_updates(p, u), s))(*tx.update(g, s, p))
        )

    step_inner, step_outer = stepper(inner), stepper(outer)
    p_in, s_in, p_out, s_out = params, inner.init(params), params, outer.init(params)
    for _ in range(12):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        p_in, s_in = step_inner(g, s_in, p_in)
        p_out, s_out = step_outer(g, s_out, p_out)
        chex.assert_trees_all_equal(p_in, p_out)
        chex.assert_trees_all_equal(s_in, s_out.inner_state)


def test_a_nan_micro_batch_costs_one_cycle_where_multisteps_keeps_it():
    # docs/porting.md: optax's running mean multiplies the old mean by the micro-step
    # (0 at a cycle's start), 0 * NaN is NaN, and every later cycle is skipped; the sum
    # here starts each cycle from zero. Skipping the micro-step itself (apply_if_finite
    # outside) is the same in both.
    params = {"w": jnp.ones(3)}
    grads = [jnp.ones(3), jnp.full(3, jnp.nan)] + [jnp.full(3, 0.5)] * 4

    def trajectory(tx):
        state, p, out = tx.init(params), params, []
        for g in grads:
            updates, state = jax.jit(tx.update)({"w": g}, state, p)
            p = optax.apply_updates(p, updates)
            out.append(np.asarray(p["w"]))
        return np.stack(out)

    ours = trajectory(rj.accumulate_gradients(rj.apply_if_finite(rj.rmsprop(0.1), 10), 2))
    theirs = trajectory(optax.MultiSteps(optax.apply_if_finite(optax.rmsprop(0.1), 10), 2))
    np.testing.assert_array_equal(theirs, np.ones_like(theirs))  # never moves again
    np.testing.assert_array_equal(ours[:3], np.ones_like(ours[:3]))  # the NaN cycle skipped
    assert np.all(ours[3:] < 1.0)  # the next cycles step
    ours = trajectory(rj.apply_if_finite(rj.accumulate_gradients(rj.rmsprop(0.1), 2), 10))
    theirs = trajectory(optax.apply_if_finite(optax.MultiSteps(optax.rmsprop(0.1), 2), 10))
    np.testing.assert_array_equal(ours, theirs)


def regression_problem(examples=24, features=5, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(examples, features)), jnp.float32)
    y = jnp.asarray(rng.normal(size=examples), jnp.float32)
    return x, y


def mse(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def test_accumulate_gradients_equals_the_big_batch_step():
    x, y = regression_problem()
    k = 4
    params0 = {"w": jnp.zeros(5), "b": jnp.zeros(())}
    inner = rj.rmsprop(0.05, momentum=0.9)
    tx = rj.accumulate_gradients(inner, every_k=k)
    grad = jax.jit(jax.grad(mse))
    step = jax.jit(tx.update)

    big_params, big_state = params0, inner.init(params0)
    params, state = params0, tx.init(params0)
    for cycle in range(6):
        big_updates, big_state = inner.update(grad(big_params, x, y), big_state, big_params)
        big_params = rj.apply_updates(big_params, big_updates)
        for micro in range(k):
            rows = slice(micro * 6, (micro + 1) * 6)
            before = params
            updates, state = step(grad(params, x[rows], y[rows]), state, params)
            params = rj.apply_updates(params, updates)
            if micro < k - 1:
                chex.assert_trees_all_equal(params, before)  # waiting: nothing moves
                assert int(state.mini_step) == micro + 1
        assert int(state.mini_step) == 0 and int(state.gradient_step) == cycle + 1
        chex.assert_trees_all_close(params, big_params, rtol=1e-5, atol=1e-6)


def test_accumulate_gradients_matches_optax_multisteps_and_numpy():
    k = 3
    grads = [jnp.asarray(np.random.default_rng(t).normal(size=4), jnp.float32) for t in range(12)]
    tx = rj.accumulate_gradients(rj.rmsprop(0.1), every_k=k)
    opt = optax.MultiSteps(optax.rmsprop(0.1), every_k_schedule=k)
    params = jnp.zeros(4)
    state, opt_state = tx.init(params), opt.init(params)
    emitted = []
    step, opt_step = jax.jit(tx.update), jax.jit(opt.update)
    for g in grads:
        ours, state = step(g, state, params)
        theirs, opt_state = opt_step(g, opt_state, params)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-7)
        emitted.append(np.asarray(ours, np.float64))
    means = [
        np.mean([np.asarray(g, np.float64) for g in grads[i : i + k]], 0) for i in (0, 3, 6, 9)
    ]
    expected = np_rmsprop(means, 0.1)
    for j, step in enumerate(expected):
        np.testing.assert_allclose(emitted[j * k + k - 1], step, rtol=1e-5)
        for i in range(j * k, j * k + k - 1):
            np.testing.assert_array_equal(emitted[i], 0.0)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_accumulate_gradients_averages_gradients_near_float32s_maximum(k):
    # A float32 sum of micro-batch gradients overflows long before their mean does:
    # four gradients of 1e38 summed are inf. Each cycle's mean is compared with the
    # float64 mean (up to float32 rounding of the sums), over gradients up to 3.4e38 of
    # both signs, and ordinary and tiny ones in between.
    rng = np.random.default_rng(k)
    tx = rj.accumulate_gradients(rj.sgd(1.0), every_k=k)
    params = jnp.zeros(6)
    state, step = tx.init(params), jax.jit(tx.update)
    for scale in [3.4e38, 1.0, 1e38, 1e-30]:
        grads = [(rng.uniform(-1, 1, 6) * scale).astype(np.float32) for _ in range(k)]
        for g in grads:
            updates, state = step(jnp.asarray(g), state, params)
        want = -np.mean(np.asarray(grads, np.float64), axis=0)
        # float32 sums: each addition rounds by at most half a step of the scale
        np.testing.assert_allclose(np.asarray(updates, np.float64), want, atol=2**-22 * scale)


@pytest.mark.parametrize("dtype, largest", [(jnp.bfloat16, 3.3895e38), (jnp.float16, 65504.0)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_narrower_accumulator_saturates_instead_of_stepping_by_infinity(dtype, largest, k):
    # float32 gradients of 3.4e38 (over bfloat16's largest) and 1e5 (over float16's)
    # were stored in the sum as inf, and RMSprop stepped by -inf
    big = 3.4e38 if dtype == jnp.bfloat16 else 1e5
    params = jnp.ones(3)
    grads = jnp.array([big, -big, 1.0], jnp.float32)
    for inner, want in (
        (rj.rmsprop(0.01), -0.01 / np.sqrt(0.1) * np.sign(np.asarray(grads))),
        (rj.sgd(1.0), -np.array([largest, -largest, 1.0])),  # the sum held at the largest
    ):
        tx = rj.accumulate_gradients(inner, k, accumulator_dtype=dtype)
        state, step = tx.init(params), jax.jit(tx.update)
        for _ in range(k):
            updates, state = step(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates, np.float64), want, rtol=1e-3)
    # an infinite gradient still shows as one
    tx = rj.accumulate_gradients(rj.sgd(1.0), k, accumulator_dtype=dtype)
    state = tx.init(params)
    for _ in range(k):
        updates, state = tx.update(jnp.array([jnp.inf, -jnp.inf, 1.0]), state, params)
    np.testing.assert_array_equal(np.asarray(updates)[:2], [-np.inf, np.inf])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, None])
@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_gradients_at_float32s_largest_accumulate_to_a_finite_step(dtype, k):
    # bfloat16 holds float32's largest / 2 as 2^127: two of them summed to inf in
    # float32, and RMSprop stepped by -inf (the sum saturated only when it came out finite)
    largest = np.finfo(np.float32).max
    params = jnp.ones(3)
    grads = jnp.array([largest, -largest, 1.0], jnp.float32)
    rmsprop_step = -0.01 / np.sqrt(0.1) * np.sign(np.asarray(grads))
    # sgd: the mean, within the accumulator's rounding (bfloat16's: 2^-8)
    for inner, want, rtol in ((rj.rmsprop(0.01), rmsprop_step, 1e-6), (rj.sgd(1.0), None, 2**-7)):
        tx = rj.accumulate_gradients(inner, k, accumulator_dtype=dtype)
        state, step = tx.init(params), jax.jit(tx.update)
        for _ in range(k):
            updates, state = step(grads, state, params)
            assert np.all(np.isfinite(np.asarray(updates)))
            assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
        want = [-largest, largest, -1.0] if want is None else want
        np.testing.assert_allclose(np.asarray(updates, np.float64), want, rtol=rtol)


@pytest.mark.parametrize("dtype", [None, jnp.complex64])
def test_complex_gradients_accumulate_part_by_part(dtype):
    # the saturation of finite sums clipped the complex sum whole: jnp.clip refuses it
    largest = np.finfo(np.float32).max
    params = jnp.ones(3, jnp.complex64)
    grads = [
        jnp.array([1 + 2j, largest + 1j, -largest * 1j], jnp.complex64),
        jnp.array([3 - 1j, largest - 1j, -largest * 1j], jnp.complex64),
        jnp.array([-1 + 0j, largest + 3j, -largest * 1j], jnp.complex64),
    ]
    tx = rj.accumulate_gradients(rj.sgd(1.0), 3, accumulator_dtype=dtype)
    state, step = tx.init(params), jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
    assert updates.dtype == jnp.complex64
    want = -np.mean(np.asarray(grads, np.complex128), axis=0)
    np.testing.assert_allclose(np.asarray(updates, np.complex128), want, rtol=1e-6)


def test_accumulate_gradients_every_1_is_the_inner_optimizer():
    inner = rj.adagrad(0.1)
    tx = rj.accumulate_gradients(inner, every_k=1)
    params = jnp.ones(3)
    s1, s2 = tx.init(params), inner.init(params)
    step1, step2 = jax.jit(tx.update), jax.jit(inner.update)
    for t in range(4):
        g = jnp.asarray([0.3, -1.0, 2.0]) * (t + 1)
        u1, s1 = step1(g, s1, params)
        u2, s2 = step2(g, s2, params)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6)
    chex.assert_trees_all_close(s1.inner_state, s2, rtol=1e-6)


@pytest.mark.parametrize(
    "bad,error", [(0, ValueError), (-2, ValueError), (1.0, TypeError), (True, TypeError)]
)
def test_accumulate_gradients_rejects_bad_every_k(bad, error):
    with pytest.raises(error, match=r"rmsjax\.accumulate_gradients: every_k must be"):
        rj.accumulate_gradients(rj.sgd(0.1), bad)


def test_accumulate_gradients_bfloat16_and_an_optax_inner():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    grads = [{"w": jnp.asarray([0.5, -1.0, 2.0], jnp.bfloat16) * (t + 1)} for t in range(4)]
    for inner in [rj.rmsprop(0.1), optax.rmsprop(0.1)]:
        tx = rj.accumulate_gradients(inner, every_k=2, accumulator_dtype=jnp.float32)
        state = tx.init(params)
        assert state.accumulated["w"].dtype == jnp.float32
        step = jax.jit(tx.update)
        emitted = []
        for g in grads:
            updates, state = step(g, state, params)
            assert updates["w"].dtype == jnp.bfloat16
            emitted.append(np.asarray(updates["w"], np.float64))
        means = [np.asarray([0.5, -1.0, 2.0]) * 1.5, np.asarray([0.5, -1.0, 2.0]) * 3.5]
        expected = np_rmsprop(means, 0.1)
        np.testing.assert_allclose(emitted[1], expected[0], rtol=1e-2)
        np.testing.assert_allclose(emitted[3], expected[1], rtol=1e-2)
        np.testing.assert_array_equal(emitted[0], 0.0)


def test_inject_hyperparams_static_callable_is_not_a_schedule():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    mask = {"w": True, "b": False}
    tx = rj.inject_hyperparams(rj.add_decayed_weights, static_args=("mask",))(
        weight_decay=0.5, mask=lambda p: mask
    )
    state = tx.init(params)
    assert set(state.hyperparams) == {"weight_decay"}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = state._replace(hyperparams={"weight_decay": jnp.asarray(0.25, jnp.float32)})
    updates, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["w"], np.full((2, 2), 0.25))
    np.testing.assert_array_equal(updates["b"], np.zeros(2))


def test_extras_reach_the_parts_that_take_them_and_skip_the_others():
    # A plain optax transformation takes no extras: chain and every wrapper normalise it
    # once, when built, so a step passes them on without inspecting what it calls.
    seen = []

    def init(params):
        return rj.EmptyState()

    def update(updates, state, params=None, **extra):
        seen.append(sorted(extra))
        return updates, state

    takes_extras = rj.GradientTransformation(init, update)
    plain = optax.scale(2.0)
    assert rj.with_extra_args_support(takes_extras) is takes_extras
    rmsprop = rj.rmsprop(0.1)
    assert rj.with_extra_args_support(rmsprop) is rmsprop  # fusion rides on its update
    assert rj.with_extra_args_support(plain) is not plain
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 0.5)}
    for tx in [
        rj.chain(plain, takes_extras),
        rj.masked(rj.chain(plain, takes_extras), {"w": True}),
        rj.apply_if_finite(rj.chain(plain, takes_extras), 2),
        rj.accumulate_gradients(rj.chain(plain, takes_extras), 1),
        rj.masked(plain, {"w": True}),
        rj.apply_if_finite(plain, 2),
    ]:
        seen.clear()
        updates, _ = tx.update(grads, tx.init(params), params, step=3)
        np.testing.assert_allclose(updates["w"], np.full(3, 1.0))
        assert all(keys == ["step"] for keys in seen)
        new_params, _ = rj.update_and_apply(tx, grads, tx.init(params), params, step=3)
        np.testing.assert_allclose(new_params["w"], np.full(3, 2.0))


# (masked-decay's masks name the registry's own tree)
@pytest.mark.parametrize("name", sorted(set(registry.cases("state")) - {"masked-decay"}))
def test_leaves_with_no_elements_step_as_nothing(name):
    # a zero-size leaf (an empty bias, a layer of width 0) beside ordinary ones: its
    # update is empty, every other leaf steps as it does without it
    tx = registry.cases("state")[name].make(rj)
    full = {"w": jnp.linspace(-1.0, 1.0, 4096 * 2).reshape(64, 128), "b": jnp.arange(3.0)}
    empty = {"e": jnp.zeros((0,)), "m": jnp.zeros((2, 0, 3)), "n": jnp.zeros((0, 300, 200))}
    with_empty = {**full, **empty}
    step = jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))
    params, state = with_empty, tx.init(with_empty)
    alone, alone_state = full, tx.init(full)
    for _ in range(3):
        params, state = step(jax.tree.map(jnp.cos, params), state, params)
        alone, alone_state = step(jax.tree.map(jnp.cos, alone), alone_state, alone)
    for key, leaf in empty.items():
        assert params[key].shape == leaf.shape
    for key in full:
        np.testing.assert_array_equal(params[key], alone[key])


def test_a_none_in_a_mask_over_an_array_is_a_structure_error_as_in_optax():
    # None is an empty subtree, not False: the leaf was left out in silence
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    for make in (
        lambda lib: lib.masked(lib.sgd(0.1), {"w": True, "b": None}),
        lambda lib: lib.add_decayed_weights(0.1, {"w": True, "b": None}),
    ):
        for lib in (rj, optax):
            tx = make(lib)
            with pytest.raises(ValueError, match="structure"):
                tx.update(params, tx.init(params), params)
    # over a None parameter it is what it was: nothing to select
    params = {"w": jnp.ones(3), "b": None}
    tx = rj.masked(rj.sgd(0.1), {"w": True, "b": None})
    assert tx.update(params, tx.init(params), params)[0]["b"] is None


def test_accumulate_gradients_sums_half_precision_gradients_in_float32_by_default():
    # optax.MultiSteps accumulates in float32 by default; rmsjax summed bfloat16
    # gradients in bfloat16: 16 gradients near 1.027 averaged to 1.03125, not to the
    # nearest bfloat16 of the mean (1.0234375), as MultiSteps gives
    with jax.enable_x64(True):
        params = {"w": jnp.ones(8, jnp.bfloat16), "x": jnp.ones(2, jnp.float64)}
        grads = [
            {"w": jnp.full(8, 1.0 + (i % 7) * 1e-2, jnp.bfloat16), "x": jnp.full(2, 0.1 * i)}
            for i in range(16)
        ]
        results = []
        for tx in (
            rj.accumulate_gradients(rj.sgd(1.0), 16),
            optax.MultiSteps(optax.sgd(1.0), 16),
        ):
            state = tx.init(params)
            for g in grads:
                updates, state = tx.update(g, state, params)
            results.append(updates)
        state = rj.accumulate_gradients(rj.sgd(1.0), 16).init(params)
        # float32 for bfloat16 leaves; float64 kept (MultiSteps' float32 would narrow it)
        assert state.accumulated["w"].dtype == jnp.float32
        assert state.accumulated["x"].dtype == jnp.float64
    exact = np.mean([float(g["w"][0]) for g in grads])
    assert float(results[0]["w"][0]) == float(jnp.bfloat16(-exact)) == -1.0234375
    np.testing.assert_array_equal(results[0]["w"], results[1]["w"])
    np.testing.assert_allclose(results[0]["x"], -np.mean([0.1 * i for i in range(16)]), rtol=1e-15)


def test_apply_if_finite_rereads_a_nan_schedule_until_the_errors_run_out():
    # docs/training.md: a skipped step leaves the inner count, so a schedule that yields
    # NaN at count 2 is read there again until max_consecutive_errors lets it through;
    # optax checks only the gradients and applies the NaN step at once
    def schedule(count):
        return jnp.where(count == 2, jnp.nan, 0.1)

    got = {}
    for lib in (rj, optax):
        tx = lib.apply_if_finite(lib.sgd(schedule), 3)
        params = jnp.ones(2)
        state = tx.init(params)
        got[lib.__name__] = []
        for _ in range(7):
            updates, state = tx.update(jnp.ones(2), state, params)
            got[lib.__name__].append(float(updates[0]))
    lr = float(np.float32(0.1))
    np.testing.assert_array_equal(got["rmsjax"], [-lr, -lr, -0.0, -0.0, -0.0, np.nan, -lr])
    np.testing.assert_array_equal(got["optax"], [-lr, -lr, np.nan, -lr, -lr, -lr, -lr])


def test_accumulate_gradients_resumed_with_a_smaller_every_k_steps_rather_than_never():
    # a state of every_k=4 after three micro-batches, stepped with every_k=2 under jit:
    # its count (3) was past the new last micro-step (1), so == never held again
    four, two = rj.accumulate_gradients(rj.sgd(1.0), 4), rj.accumulate_gradients(rj.sgd(1.0), 2)
    state = four.init(jnp.zeros(1))
    for _ in range(3):
        _, state = four.update(jnp.array([1.0]), state)
    step = jax.jit(two.update)
    stepped = []
    for _ in range(4):
        updates, state = step(jnp.array([1.0]), state)
        stepped.append(bool(updates[0] != 0))
    assert stepped == [True, False, True, False]
    assert int(state.gradient_step) == 2


def test_accumulate_gradients_says_when_it_stepped_as_has_updated_does():
    tx = rj.accumulate_gradients(rj.sgd(1.0), 2)
    theirs = optax.MultiSteps(optax.sgd(1.0), 2)
    state, reference = tx.init(jnp.zeros(2)), theirs.init(jnp.zeros(2))
    for _ in range(4):
        stepped = bool((state.mini_step == 0) & (state.gradient_step > 0))
        assert stepped == bool(theirs.has_updated(reference))
        _, state = tx.update(jnp.ones(2), state)
        _, reference = theirs.update(jnp.ones(2), reference)
